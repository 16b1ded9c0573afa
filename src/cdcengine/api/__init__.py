"""The library API (SPEC §4): plain functions over a `SourceConfig`, safe to call from a web
request.

No hidden globals: each call opens what it needs (the state store unless one is passed, the
adapter's short-lived connections) and closes it. Results are JSON-safe dataclasses
(`dataclasses.asdict`) without secrets. Commands that change a source take its lease in the state
store first, so a CLI call and a running daemon never act on one source at once; a held lease
raises `LeaseHeld` (retryable) naming the holder.

The functions live by concern: `setup` (check, tables, enable, disable), `status` (status,
jobs), `operations` (settings, resync, verify), `recovery` (repair, resume); `leases` is how
commands hold a source. Every
public name is re-exported here: `from cdcengine.api import enable_cdc`.

The re-exports are lazy (PEP 562): a name's module is imported the first time the name is
used, so a process that needs one function (the daemon answering /status, the CLI running one
command) does not pay for importing all of them at start-up.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdcengine.lazy import lazy_exports

if TYPE_CHECKING:
    from cdcengine.api.leases import COMMAND_LEASE_TTL_S
    from cdcengine.api.operations import (
        ResyncResult,
        SettingsResult,
        resync_table,
        tables_to_verify,
        update_cdc_settings,
        verify,
    )
    from cdcengine.api.setup import (
        DisableResult,
        EnableResult,
        check_prerequisites,
        disable_cdc,
        discover_tables,
        enable_cdc,
        refuse_failed_checks,
    )
    from cdcengine.api.status import (
        DeltaTableView,
        JobView,
        MarkerView,
        SettingsView,
        StallView,
        Status,
        TableStatus,
        cdc_status,
        list_jobs,
    )
    from cdcengine.control.verify import Comparison, RowDifference, TableVerify, VerifyResult
    from cdcengine.state.access import StateArg, open_store

_EXPORTS: dict[str, str] = {
    "COMMAND_LEASE_TTL_S": "cdcengine.api.leases",
    "Comparison": "cdcengine.control.verify",
    "DeltaTableView": "cdcengine.api.status",
    "DisableResult": "cdcengine.api.setup",
    "EnableResult": "cdcengine.api.setup",
    "JobView": "cdcengine.api.status",
    "MarkerView": "cdcengine.api.status",
    "ResyncResult": "cdcengine.api.operations",
    "RowDifference": "cdcengine.control.verify",
    "SettingsResult": "cdcengine.api.operations",
    "SettingsView": "cdcengine.api.status",
    "StallView": "cdcengine.api.status",
    "StateArg": "cdcengine.state.access",
    "Status": "cdcengine.api.status",
    "TableStatus": "cdcengine.api.status",
    "TableVerify": "cdcengine.control.verify",
    "VerifyResult": "cdcengine.control.verify",
    "cdc_status": "cdcengine.api.status",
    "check_prerequisites": "cdcengine.api.setup",
    "disable_cdc": "cdcengine.api.setup",
    "discover_tables": "cdcengine.api.setup",
    "enable_cdc": "cdcengine.api.setup",
    "list_jobs": "cdcengine.api.status",
    "open_store": "cdcengine.state.access",
    "refuse_failed_checks": "cdcengine.api.setup",
    "resync_table": "cdcengine.api.operations",
    "tables_to_verify": "cdcengine.api.operations",
    "update_cdc_settings": "cdcengine.api.operations",
    "verify": "cdcengine.api.operations",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "COMMAND_LEASE_TTL_S",
    "Comparison",
    "DeltaTableView",
    "DisableResult",
    "EnableResult",
    "JobView",
    "MarkerView",
    "ResyncResult",
    "RowDifference",
    "SettingsResult",
    "SettingsView",
    "StallView",
    "StateArg",
    "Status",
    "TableStatus",
    "TableVerify",
    "VerifyResult",
    "cdc_status",
    "check_prerequisites",
    "disable_cdc",
    "discover_tables",
    "enable_cdc",
    "list_jobs",
    "open_store",
    "refuse_failed_checks",
    "resync_table",
    "tables_to_verify",
    "update_cdc_settings",
    "verify",
]
