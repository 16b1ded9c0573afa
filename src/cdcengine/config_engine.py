"""The `[engine]` section: the state store, the HTTP server, logging and the host policy.

Split from `cdcengine.config` (which re-exports `EngineConfig`); the rules per key are checked by
`cdcengine.config_validation.check` like a source's.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from cdcengine.config_validation import Invalid, Rule, check, where
from cdcengine.errors import ConfigError
from cdcengine.hostpolicy import HostPolicy
from cdcengine.secrets import mask_dsn

__all__ = ["DEFAULT_STATE_URL", "EngineConfig", "LogFormat"]

DEFAULT_STATE_URL = "sqlite:///.cdcengine/state.db"


class LogFormat(enum.StrEnum):
    CONSOLE = "console"
    JSON = "json"


_STR, _LIST = Rule(kind="str"), Rule(kind="list[str]")
_ENGINE_KEYS: dict[str, Rule] = {
    "state": _STR,
    "http_port": Rule(kind="int", minimum=0, maximum=65535,
                      error="must be an integer 0-65535, 0 = off (got {value!r})"),
    "http_host": Rule(kind="str", pattern=re.compile(r"^[A-Za-z0-9.:_-]{1,253}$"),
                      error="must be an address or host name to listen on, such as "
                            "127.0.0.1, 0.0.0.0 or ::1 (got {value!r})"),
    "log_format": Rule(kind="str", choices=LogFormat,
                       error="must be console | json (got {value!r})"),
    # host policy (cdcengine.hostpolicy): on when either is set
    "allowed_hosts": _LIST, "denied_networks": _LIST,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    state: str = DEFAULT_STATE_URL
    http_port: int = 9790
    # loopback by default: /status names databases and tables; "0.0.0.0" in a container
    http_host: str = "127.0.0.1"
    log_format: LogFormat = LogFormat.CONSOLE
    allowed_hosts: tuple[str, ...] | None = None
    denied_networks: tuple[str, ...] | None = None
    provenance: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    origin: str = field(default="EngineConfig()", repr=False, compare=False)
    host_policy: HostPolicy = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(key: str, what: str) -> ConfigError:
            return ConfigError(f"{where(self.provenance, self.origin, key)}: [engine]: key "
                               f"{key!r}: {what}")

        if not isinstance(self.state, str) or not self.state.startswith(
            ("sqlite://", "postgresql://", "postgres://")
        ):
            raise fail("state", "must be a sqlite:///path URL or a postgresql:// URL "
                       f"(got {mask_dsn(str(self.state))!r})")
        for key in ("http_port", "http_host", "log_format"):
            try:
                object.__setattr__(self, key, check(_ENGINE_KEYS[key], getattr(self, key)))
            except Invalid as exc:
                raise fail(key, str(exc)) from None
        for key in ("allowed_hosts", "denied_networks"):
            value = getattr(self, key)
            if value is not None:
                if isinstance(value, str) or not isinstance(value, list | tuple) or not all(
                        isinstance(v, str) for v in value):
                    raise fail(key, 'must be a list of strings, such as ["db.example.com"]')
                object.__setattr__(self, key, tuple(value))
        try:
            policy = HostPolicy.from_config(self.allowed_hosts, self.denied_networks)
        except ValueError as exc:
            key = "allowed_hosts" if "allowed_hosts" in str(exc) else "denied_networks"
            raise fail(key, str(exc)) from None
        object.__setattr__(self, "host_policy", policy)

    def __repr__(self) -> str:  # a postgresql:// state URL may carry a password
        return (f"EngineConfig(state={mask_dsn(self.state)!r}, http_port={self.http_port!r}, "
                f"http_host={self.http_host!r}, "
                f"log_format={self.log_format!r})")
