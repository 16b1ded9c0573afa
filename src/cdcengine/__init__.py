"""cdcengine: PostgreSQL logical replication into Delta Lake, exactly once.

The library API (SPEC §4) is re-exported here; see `cdcengine.api` for the functions and their
guarantees. Importing this package imports neither a database driver nor deltalake: the names
load on first use (lazy re-exports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdcengine.lazy import lazy_exports

if TYPE_CHECKING:  # the names for type checkers; at run time they load on first use
    from cdcengine.api import (
        DisableResult,
        EnableResult,
        JobView,
        SettingsResult,
        Status,
        TableVerify,
        VerifyResult,
        cdc_status,
        check_prerequisites,
        disable_cdc,
        discover_tables,
        enable_cdc,
        list_jobs,
        resync_table,
        update_cdc_settings,
        verify,
    )
    from cdcengine.api.recovery import RepairResult, ResumeResult, repair_cdc, resume_cdc
    from cdcengine.config import Config, EngineConfig, SourceConfig, TableConfig, load_config
    from cdcengine.control.health import HealthReport, SweepResult, sweep
    from cdcengine.errors import CDCError, Reason
    from cdcengine.source.adapter import Check, ColumnInfo, Severity, TableInfo

# Lazy re-exports (PEP 562): `import cdcengine` (and any `cdcengine_postgres` module, which
# imports `cdcengine.errors` and so this package) loads neither deltalake nor a driver; each name
# loads its module when first used.
_EXPORTS: dict[str, str] = {
    "CDCError": "cdcengine.errors",
    "Check": "cdcengine.source.adapter",
    "ColumnInfo": "cdcengine.source.adapter",
    "Config": "cdcengine.config",
    "DisableResult": "cdcengine.api",
    "EnableResult": "cdcengine.api",
    "EngineConfig": "cdcengine.config",
    "HealthReport": "cdcengine.control.health",
    "JobView": "cdcengine.api",
    "Reason": "cdcengine.errors",
    "RepairResult": "cdcengine.api.recovery",
    "ResumeResult": "cdcengine.api.recovery",
    "SettingsResult": "cdcengine.api",
    "Severity": "cdcengine.source.adapter",
    "SourceConfig": "cdcengine.config",
    "Status": "cdcengine.api",
    "SweepResult": "cdcengine.control.health",
    "TableConfig": "cdcengine.config",
    "TableInfo": "cdcengine.source.adapter",
    "TableVerify": "cdcengine.api",
    "VerifyResult": "cdcengine.api",
    "cdc_status": "cdcengine.api",
    "check_prerequisites": "cdcengine.api",
    "disable_cdc": "cdcengine.api",
    "discover_tables": "cdcengine.api",
    "enable_cdc": "cdcengine.api",
    "list_jobs": "cdcengine.api",
    "load_config": "cdcengine.config",
    "repair_cdc": "cdcengine.api.recovery",
    "resume_cdc": "cdcengine.api.recovery",
    "resync_table": "cdcengine.api",
    "sweep": "cdcengine.control.health",
    "update_cdc_settings": "cdcengine.api",
    "verify": "cdcengine.api",
}


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())


__all__ = [
    "CDCError",
    "Check",
    "ColumnInfo",
    "Config",
    "DisableResult",
    "EnableResult",
    "EngineConfig",
    "HealthReport",
    "JobView",
    "Reason",
    "RepairResult",
    "ResumeResult",
    "SettingsResult",
    "Severity",
    "SourceConfig",
    "Status",
    "SweepResult",
    "TableConfig",
    "TableInfo",
    "TableVerify",
    "VerifyResult",
    "cdc_status",
    "check_prerequisites",
    "disable_cdc",
    "discover_tables",
    "enable_cdc",
    "list_jobs",
    "load_config",
    "repair_cdc",
    "resume_cdc",
    "resync_table",
    "sweep",
    "update_cdc_settings",
    "verify",
]

__version__ = "0.1.0"
