"""cdcengine: PostgreSQL logical replication into Delta Lake, exactly once.

The library API (SPEC §4) is re-exported here; see `cdcengine.api` for the functions and their
guarantees. Importing this package never imports a database driver.
"""

from __future__ import annotations

from cdcengine.adapter import Check, ColumnInfo, Severity, TableInfo
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
from cdcengine.config import Config, EngineConfig, SourceConfig, TableConfig, load_config
from cdcengine.errors import CDCError, Reason
from cdcengine.health import HealthReport, SweepResult, sweep
from cdcengine.recovery import RepairResult, ResumeResult, repair_cdc, resume_cdc

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
