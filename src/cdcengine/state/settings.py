"""A source's effective tuning settings: the config file's values with the state store's
`settings` overrides applied (they win over the file; SPEC §3 `settings`).

The daemon's parts (health pass, recovery) use `with_overrides`; the library API shows each
value with where it came from (`effective_settings`) and checks requested changes
(`check_setting_changes`) before it stores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from cdcengine.config import MAX_THRESHOLD_MB, SETTINGS_KEYS, SourceConfig
from cdcengine.errors import ConfigError, Reason
from cdcengine.state.base import StateStore

__all__ = ["IMMUTABLE_KEYS", "check_setting_changes", "effective_settings", "with_overrides"]

#: What `settings` refuses as immutable (disable, then enable, changes them).
IMMUTABLE_KEYS = ("slot_name", "publication_name", "management_mode")


def effective_settings(source: SourceConfig, store: StateStore) -> dict[str, tuple[object, str]]:
    """Each tuning key's effective value and its origin: 'settings (<when> UTC)' for a state
    store override, else the file or environment variable it came from, or 'default'."""
    overrides = store.get_settings(source.name)
    out: dict[str, tuple[object, str]] = {}
    for key in SETTINGS_KEYS:
        if key in overrides:
            ov = overrides[key]
            out[key] = (ov.value, f"settings ({ov.updated_at:%Y-%m-%d %H:%M:%S} UTC)")
        else:
            out[key] = (getattr(source, key), source.setting_origin(key))
    return out


def with_overrides(source: SourceConfig, store: StateStore) -> SourceConfig:
    """The source with its `settings` overrides applied (they win over the file)."""
    overrides = {k: v.value for k, v in store.get_settings(source.name).items()
                 if k in SETTINGS_KEYS}
    return dataclasses.replace(source, **overrides) if overrides else source  # type: ignore[arg-type]


def check_setting_changes(changes: Mapping[str, object]) -> None:
    """`ConfigError` unless every change is a tuning key with a value of its type and range.
    Whether warning < critical holds is checked against the effective values, by the caller."""
    unknown = sorted(set(changes) - set(SETTINGS_KEYS))
    if unknown:
        raise ConfigError(f"settings: {unknown[0]!r} cannot be changed here; only "
                          f"{', '.join(SETTINGS_KEYS)} (slot name, publication and mode are "
                          "immutable: disable, then enable)",
                          reason=Reason.IMMUTABLE_SETTING if unknown[0] in IMMUTABLE_KEYS
                          else Reason.CONFIG_INVALID)
    for key, value in changes.items():
        if key == "auto_drop_slot":
            if not isinstance(value, bool):
                raise ConfigError(f"settings: auto_drop_slot must be true or false "
                                  f"(got {value!r})")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"settings: {key} must be an integer (got {value!r})")
        elif value < 1:
            raise ConfigError(f"settings: {key} must be >= 1 (got {value})")
        elif value > MAX_THRESHOLD_MB:
            raise ConfigError(f"settings: {key} must be at most {MAX_THRESHOLD_MB} (1 PiB; got "
                              f"{value})")
