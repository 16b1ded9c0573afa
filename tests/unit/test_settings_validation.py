"""`update_cdc_settings` (SPEC §2, §4): tuning only, validated, kept in the state store.

No database server: the source is marked enabled directly in a SQLite state store, and
update_cdc_settings never connects to the source.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdcengine.api import SettingsResult, update_cdc_settings
from cdcengine.config import SourceConfig
from cdcengine.errors import ConfigError, NotEnabled, Reason
from cdcengine.state import StateStore, open_state
from cdcengine.state.settings import effective_settings

PASSWORD = "hunter22secret"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = open_state("sqlite:///" + str(tmp_path / "s.db"))
    try:
        yield s
    finally:
        s.close()


def make_source(name: str = "shop", **kw: object) -> SourceConfig:
    return SourceConfig(name=name, dsn=f"postgresql://cdc:{PASSWORD}@db/shop",
                        tables=["orders"], destination="/lake/shop", **kw)  # type: ignore[arg-type]


def enable(store: StateStore, source: SourceConfig) -> None:
    store.record_enabled(
        source.name, management_mode=str(source.management_mode), slot_name=source.slot_name,
        publication_name=source.publication_name, consistent_point=0x16_B374D848,
        system_identifier="7000000000000000001", timeline=1,
        tables={tc.name: str(tc.mode) for tc in source.table_configs})


@pytest.fixture
def shop(store: StateStore) -> SourceConfig:
    src = make_source()
    enable(store, src)
    return src


def overrides(store: StateStore, name: str = "shop") -> dict[str, object]:
    return {k: v.value for k, v in store.get_settings(name).items()}


class Untouchable:
    """A state store that fails the test if anything touches it."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the state store was touched ({name}) before validation")


# ---- refused before the state store is touched -----------------------------------------------


@pytest.mark.parametrize(("changes", "needles"), [
    ({"slot_name": "other"}, ["'slot_name'", "immutable", "auto_drop_slot"]),
    ({"publication_name": "p"}, ["'publication_name'", "immutable"]),
    ({"management_mode": "self_managed"}, ["'management_mode'", "immutable"]),
    ({"table_mode": "append"}, ["'table_mode'", "cannot be changed"]),
    ({"lag_warning_mb": 10}, ["'lag_warning_mb'", "lag_warning_threshold_mb"]),
    ({"auto_drop_slot": 1}, ["auto_drop_slot", "true or false", "1"]),
    ({"auto_drop_slot": "false"}, ["auto_drop_slot", "true or false"]),
    ({"auto_drop_slot": None}, ["auto_drop_slot", "true or false"]),
    ({"lag_warning_threshold_mb": "100"}, ["lag_warning_threshold_mb", "integer", "'100'"]),
    ({"lag_warning_threshold_mb": 100.0}, ["lag_warning_threshold_mb", "integer"]),
    ({"lag_warning_threshold_mb": True}, ["lag_warning_threshold_mb", "integer", "True"]),
    ({"lag_critical_threshold_mb": False}, ["lag_critical_threshold_mb", "integer"]),
    ({"lag_critical_threshold_mb": None}, ["lag_critical_threshold_mb", "integer"]),
    ({"lag_warning_threshold_mb": 0}, ["lag_warning_threshold_mb", ">= 1", "0"]),
    ({"lag_critical_threshold_mb": -5}, ["lag_critical_threshold_mb", ">= 1", "-5"]),
    # one bad key spoils the call, even beside good ones
    ({"auto_drop_slot": False, "lag_warning_threshold_mb": 0}, ["lag_warning_threshold_mb"]),
    ({"auto_drop_slot": False, "slot_name": "x"}, ["'slot_name'"]),
    ({"lag_critical_threshold_mb": 99999999999999999999999}, ["at most", "1 PiB"]),
    ({"lag_warning_threshold_mb": 9223372036854775807}, ["at most"]),
])
def test_invalid_input_refused_before_the_store(
    changes: dict[str, object], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as info:
        update_cdc_settings(make_source(), state=Untouchable(), **changes)  # type: ignore[arg-type]
    immutable = {"slot_name", "publication_name", "management_mode"} & set(changes)
    assert info.value.reason is (Reason.IMMUTABLE_SETTING if immutable else Reason.CONFIG_INVALID)
    assert info.value.retryable is False
    for needle in needles:
        assert needle in info.value.message, (needle, info.value.message)
    assert PASSWORD not in info.value.message


def test_refusal_changes_nothing(store: StateStore, shop: SourceConfig) -> None:
    update_cdc_settings(shop, state=store, lag_warning_threshold_mb=100)
    with pytest.raises(ConfigError):
        update_cdc_settings(shop, state=store, auto_drop_slot=False, lag_critical_threshold_mb=0)
    with pytest.raises(ConfigError):
        update_cdc_settings(shop, state=store, auto_drop_slot=False, lag_warning_threshold_mb=5000)
    assert overrides(store) == {"lag_warning_threshold_mb": 100}
    assert store.get_lease("shop") is None  # released after a refusal too


def test_immutable_keys_use_the_immutable_reason() -> None:
    with pytest.raises(ConfigError) as info:
        update_cdc_settings(make_source(), state=Untouchable(), slot_name="x")  # type: ignore[arg-type]
    assert info.value.reason is Reason.IMMUTABLE_SETTING


# ---- warning < critical against the effective values ------------------------------------------


def test_warning_must_stay_below_configured_critical(
    store: StateStore, shop: SourceConfig
) -> None:
    for warning in (2048, 5000):
        with pytest.raises(ConfigError) as info:
            update_cdc_settings(shop, state=store, lag_warning_threshold_mb=warning)
        assert f"warning threshold ({warning} MB)" in info.value.message
        assert "critical threshold (2048 MB)" in info.value.message
    with pytest.raises(ConfigError, match=r"\(512 MB\).*\(512 MB\)"):
        update_cdc_settings(shop, state=store, lag_critical_threshold_mb=512)
    assert overrides(store) == {}
    assert update_cdc_settings(shop, state=store, lag_warning_threshold_mb=2047).changed == (
        "lag_warning_threshold_mb",)


def test_warning_checked_against_stored_override(store: StateStore, shop: SourceConfig) -> None:
    update_cdc_settings(shop, state=store, lag_critical_threshold_mb=1000)
    with pytest.raises(ConfigError, match=r"\(1000 MB\).*\(1000 MB\)"):
        update_cdc_settings(shop, state=store, lag_warning_threshold_mb=1000)
    # the config's 512 < 1000 is fine; lowering critical below the stored warning is not
    update_cdc_settings(shop, state=store, lag_warning_threshold_mb=900)
    with pytest.raises(ConfigError, match=r"\(900 MB\).*\(800 MB\)"):
        update_cdc_settings(shop, state=store, lag_critical_threshold_mb=800)
    assert overrides(store) == {"lag_critical_threshold_mb": 1000, "lag_warning_threshold_mb": 900}


def test_both_thresholds_at_once_are_checked_together(
    store: StateStore, shop: SourceConfig
) -> None:
    # each alone would violate the effective value of the other; together they are valid
    result = update_cdc_settings(shop, state=store, lag_warning_threshold_mb=3000,
                                 lag_critical_threshold_mb=4000)
    assert result.changed == ("lag_warning_threshold_mb", "lag_critical_threshold_mb")
    assert result.settings == {"auto_drop_slot": True, "lag_warning_threshold_mb": 3000,
                               "lag_critical_threshold_mb": 4000}
    with pytest.raises(ConfigError):
        update_cdc_settings(shop, state=store, lag_warning_threshold_mb=10,
                            lag_critical_threshold_mb=10)


def test_config_values_are_the_baseline(store: StateStore) -> None:
    src = make_source(lag_warning_threshold_mb=10, lag_critical_threshold_mb=20,
                      auto_drop_slot=False)
    enable(store, src)
    with pytest.raises(ConfigError, match=r"\(20 MB\).*\(20 MB\)"):
        update_cdc_settings(src, state=store, lag_warning_threshold_mb=20)
    result = update_cdc_settings(src, state=store, lag_critical_threshold_mb=11)
    assert result.settings == {"auto_drop_slot": False, "lag_warning_threshold_mb": 10,
                               "lag_critical_threshold_mb": 11}


# ---- changes and "unchanged" ------------------------------------------------------------------


def test_unchanged_when_values_equal_the_config(store: StateStore, shop: SourceConfig) -> None:
    result = update_cdc_settings(shop, state=store, auto_drop_slot=True,
                                 lag_warning_threshold_mb=512, lag_critical_threshold_mb=2048)
    assert isinstance(result, SettingsResult)
    assert result.changed == ()
    assert result.unchanged is True
    assert result.settings == {"auto_drop_slot": True, "lag_warning_threshold_mb": 512,
                               "lag_critical_threshold_mb": 2048}
    assert overrides(store) == {}  # nothing written
    d = result.to_dict()
    assert d["unchanged"] is True
    assert d["changed"] == ()
    json.dumps(d)


def test_no_changes_at_all_is_unchanged(store: StateStore, shop: SourceConfig) -> None:
    result = update_cdc_settings(shop, state=store)
    assert result.changed == ()
    assert result.settings["lag_warning_threshold_mb"] == 512


def test_changes_persist_and_show_as_overrides(store: StateStore, shop: SourceConfig) -> None:
    result = update_cdc_settings(shop, state=store, auto_drop_slot=False,
                                 lag_critical_threshold_mb=4096)
    assert result.source == "shop"
    assert result.changed == ("auto_drop_slot", "lag_critical_threshold_mb")  # SPEC key order
    assert result.unchanged is False
    assert result.settings == {"auto_drop_slot": False, "lag_warning_threshold_mb": 512,
                               "lag_critical_threshold_mb": 4096}
    stored = store.get_settings("shop")
    assert {k: v.value for k, v in stored.items()} == {"auto_drop_slot": False,
                                                       "lag_critical_threshold_mb": 4096}
    assert stored["auto_drop_slot"].value is False  # a bool stays a bool
    eff = effective_settings(shop, store)
    assert eff["auto_drop_slot"][0] is False
    assert eff["auto_drop_slot"][1].startswith("settings (")
    assert eff["lag_critical_threshold_mb"][0] == 4096
    assert eff["lag_critical_threshold_mb"][1].startswith("settings (")
    assert eff["lag_warning_threshold_mb"] == (512, "default")
    # the same values again: unchanged, and the override stays
    again = update_cdc_settings(shop, state=store, auto_drop_slot=False,
                                lag_critical_threshold_mb=4096)
    assert again.changed == ()
    assert again.settings == result.settings
    assert overrides(store) == {"auto_drop_slot": False, "lag_critical_threshold_mb": 4096}
    assert dataclasses.asdict(again)["changed"] == ()


def test_override_wins_over_a_changed_file(store: StateStore, shop: SourceConfig) -> None:
    update_cdc_settings(shop, state=store, lag_warning_threshold_mb=300)
    edited = dataclasses.replace(shop, lag_warning_threshold_mb=100)
    result = update_cdc_settings(edited, state=store)
    assert result.settings["lag_warning_threshold_mb"] == 300
    # back to the file's value: a change relative to the effective (override) value
    back = update_cdc_settings(edited, state=store, lag_warning_threshold_mb=100)
    assert back.changed == ("lag_warning_threshold_mb",)
    assert overrides(store)["lag_warning_threshold_mb"] == 100


def test_file_origin_shown_when_not_overridden(store: StateStore) -> None:
    src = dataclasses.replace(make_source(), provenance={"auto_drop_slot": "cdc.toml"})
    enable(store, src)
    eff = effective_settings(src, store)
    assert eff["auto_drop_slot"] == (True, "cdc.toml")
    assert eff["lag_warning_threshold_mb"] == (512, "default")


def test_settings_are_per_source(store: StateStore, shop: SourceConfig) -> None:
    crm = make_source("crm")
    enable(store, crm)
    update_cdc_settings(shop, state=store, lag_warning_threshold_mb=100)
    assert overrides(store, "crm") == {}
    assert update_cdc_settings(crm, state=store).settings["lag_warning_threshold_mb"] == 512


# ---- only enabled sources ---------------------------------------------------------------------


def test_not_enabled_source(store: StateStore) -> None:
    with pytest.raises(NotEnabled) as info:
        update_cdc_settings(make_source("never"), state=store, lag_warning_threshold_mb=100)
    assert info.value.reason is Reason.NOT_ENABLED
    assert info.value.retryable is False
    assert "'never'" in info.value.message
    assert overrides(store, "never") == {}


def test_disabled_source(store: StateStore, shop: SourceConfig) -> None:
    store.record_disabled("shop")
    with pytest.raises(NotEnabled):
        update_cdc_settings(shop, state=store, auto_drop_slot=False)
    assert overrides(store) == {}


def test_state_given_as_url(tmp_path: Path) -> None:
    url = "sqlite:///" + str(tmp_path / "u.db")
    with open_state(url) as s:
        enable(s, make_source())
    result = update_cdc_settings(make_source(), state=url, lag_warning_threshold_mb=7)
    assert result.changed == ("lag_warning_threshold_mb",)
    with open_state(url) as s:
        assert overrides(s) == {"lag_warning_threshold_mb": 7}


@pytest.mark.parametrize("key", ["lag_warning_threshold_mb", "lag_critical_threshold_mb"])
def test_a_threshold_beyond_any_disk_is_refused_at_config(key: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_source(**{key: 9223372036854775807})
    assert key in info.value.message and "at most" in info.value.message
