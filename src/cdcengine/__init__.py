"""cdcengine: PostgreSQL logical replication into Delta Lake, exactly once.

The library API (SPEC §4) is re-exported here; see `cdcengine.api` for the functions and their
guarantees. Importing this package never imports a database driver.
"""

from __future__ import annotations

from cdcengine.adapter import Check, ColumnInfo, Severity, TableInfo
from cdcengine.api import (
    DisableResult,
    EnableResult,
    SettingsResult,
    Status,
    TableVerify,
    VerifyResult,
    cdc_status,
    check_prerequisites,
    disable_cdc,
    discover_tables,
    enable_cdc,
    resync_table,
    update_cdc_settings,
    verify,
)
from cdcengine.config import Config, EngineConfig, SourceConfig, TableConfig, load_config
from cdcengine.errors import CDCError, Reason

__all__ = [
    "CDCError",
    "Check",
    "ColumnInfo",
    "Config",
    "DisableResult",
    "EnableResult",
    "EngineConfig",
    "Reason",
    "SettingsResult",
    "Severity",
    "SourceConfig",
    "Status",
    "TableConfig",
    "TableInfo",
    "TableVerify",
    "VerifyResult",
    "cdc_status",
    "check_prerequisites",
    "disable_cdc",
    "discover_tables",
    "enable_cdc",
    "load_config",
    "resync_table",
    "update_cdc_settings",
    "verify",
]

__version__ = "0.1.0"
