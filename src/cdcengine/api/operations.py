"""Operating an enabled source (SPEC §3 `settings`, `resync`, `verify`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import structlog

from cdcengine.api.leases import daemon_holds, lease_unless_daemon
from cdcengine.config import SETTINGS_KEYS, SourceConfig, TableConfig
from cdcengine.control.verify import DEFAULT_EXAMPLES as DEFAULT_VERIFY_EXAMPLES
from cdcengine.control.verify import DEFAULT_WAIT_S as DEFAULT_VERIFY_WAIT_S
from cdcengine.control.verify import VerifyResult, verify_table
from cdcengine.errors import ConfigError, NotEnabled
from cdcengine.lsn import parse_lsn
from cdcengine.names import TableRef
from cdcengine.source.registry import adapter_for
from cdcengine.state.access import StateArg, as_enabled, open_store
from cdcengine.state.settings import check_setting_changes, effective_settings

log = structlog.get_logger("cdcengine.api")


# ---- settings -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class SettingsResult:
    source: str
    changed: tuple[str, ...]  # keys whose effective value changed; empty when unchanged
    settings: dict[str, object]

    @property
    def unchanged(self) -> bool:
        return not self.changed

    def to_dict(self) -> dict[str, object]:
        return asdict(self) | {"unchanged": self.unchanged}


def update_cdc_settings(
    source: SourceConfig, *, state: StateArg = None, **changes: object
) -> SettingsResult:
    """Change tuning only: auto_drop_slot and the two lag thresholds (ints >= 1, warning <
    critical, checked against the effective values). Kept in the state store, where it wins over
    the file; a running daemon applies it at its next lag check. Slot name, publication and mode
    are immutable here. `.changed` is empty when nothing changed."""
    check_setting_changes(changes)
    with open_store(state) as store, lease_unless_daemon(store, source.name, "settings"):
        rec = store.get_source(source.name)
        if not (rec and rec.enabled):
            raise NotEnabled(f"source {source.name!r}: CDC is not enabled; settings apply to "
                             "enabled sources (run `cdcengine enable`).")
        current = {k: v for k, (v, _) in effective_settings(source, store).items()}
        new = current | changes
        if new["lag_warning_threshold_mb"] >= new["lag_critical_threshold_mb"]:  # type: ignore[operator]
            raise ConfigError(
                f"settings: the warning threshold ({new['lag_warning_threshold_mb']} MB) must be "
                f"less than the critical threshold ({new['lag_critical_threshold_mb']} MB)")
        changed = tuple(k for k in SETTINGS_KEYS if k in changes and changes[k] != current[k])
        for key in changed:
            store.set_setting(source.name, key, new[key])  # type: ignore[arg-type]
        if changed:
            log.info("settings_updated", source=source.name, changed=list(changed))
        return SettingsResult(source=source.name, changed=changed,
                              settings={k: new[k] for k in SETTINGS_KEYS})


# ---- resync ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ResyncResult:
    source: str
    table: str
    queued: bool
    daemon_running: bool  # a running daemon holds the lease and performs it while streaming

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def resync_table(source: SourceConfig, table: str, *, state: StateArg = None) -> ResyncResult:
    """Queue a re-snapshot of one table (SPEC §3 `resync`): the table becomes `pending` with a
    resync request in the state store. A running daemon (which holds the source's lease)
    performs it within seconds, beside the stream: the other tables keep streaming meanwhile;
    without a daemon the next `run` does it (`cdcengine.pipeline.resync.run_resync`). The swap
    into Delta is one commit per Delta table.
    """
    from cdcengine.pipeline.resync import request_resync  # pipeline-side module: imported lazily

    tc = tables_to_verify(source, table)[0]
    with open_store(state) as store:
        rec = store.get_source(source.name)
        if not (rec and rec.enabled):
            raise NotEnabled(f"source {source.name!r}: CDC is not enabled; run "
                             "`cdcengine enable` first.")
        daemon = daemon_holds(store, source.name)
        with lease_unless_daemon(store, source.name, "resync"):
            request_resync(store, source.name, tc)
    log.info("resync_requested", source=source.name, table=tc.name, daemon_running=daemon)
    return ResyncResult(source=source.name, table=tc.name, queued=True, daemon_running=daemon)


# ---- verify ---------------------------------------------------------------------------------


def tables_to_verify(source: SourceConfig, table: str | None = None) -> list[TableConfig]:
    """The source's table configs `verify` covers: all, or the one named (`schema.table`, bare
    → public). Raises `ConfigError` for a table that is not in the source's config."""
    if table is None:
        return list(source.table_configs)
    try:
        wanted = TableRef.parse(table).qualified
    except ValueError as exc:
        raise ConfigError(f"verify: {exc}") from None
    tcs = [tc for tc in source.table_configs if tc.name == wanted]
    if not tcs:
        raise ConfigError(f"verify: table {table!r} is not one of source {source.name!r}'s "
                          f"tables ({', '.join(tc.name for tc in source.table_configs)})")
    return tcs


def verify(
    source: SourceConfig,
    table: str | None = None,
    *,
    state: StateArg = None,
    wait_s: float = DEFAULT_VERIFY_WAIT_S,
    examples: int = DEFAULT_VERIFY_EXAMPLES,
) -> VerifyResult:
    """Compare the source tables (or one, `table`) with their Delta tables (SPEC §3 `verify`).

    Safe while the daemon streams: each table is read under an exactly positioned source
    snapshot C; the comparison waits at most `wait_s` for Delta to hold every change up to C
    (else that table is `not_caught_up`), and rows changed in Delta after C are in flux, not
    differences. Per table: counts and up to `examples` keys of rows missing in Delta, extra in
    Delta and different (with the columns). Read-only: takes no lease, changes nothing. Raises
    `ConfigError` for a table not in the source's config, a `CDCError` when the source cannot
    be reached. See `cdcengine.control.verify`.
    """
    tcs = tables_to_verify(source, table)
    with open_store(state) as store:
        rec = store.get_source(source.name)
        target = as_enabled(rec, source)
    adapter = adapter_for(source)

    def confirmed() -> int | None:
        if not (rec and rec.enabled):
            return None
        lsn = adapter.slot_status(target).confirmed_flush_lsn
        return parse_lsn(lsn) if lsn else None

    return VerifyResult(source=source.name, tables=tuple(
        verify_table(adapter, target, tc, confirmed_lsn=confirmed, wait_s=wait_s,
                     examples=examples, enabled=bool(rec and rec.enabled)) for tc in tcs))
