"""Configuration: the TOML file, `CDCENGINE__…` environment overrides, and validation (SPEC §2).

`load_config(path)` reads the file (default `./cdcengine.toml`), applies environment overrides
(`CDCENGINE__<SOURCE>__<KEY>` / `CDCENGINE__ENGINE__<KEY>`, values parsed by the key's type, lists
and tables as JSON) and validates everything. `SourceConfig(...)` can also be built directly from
keyword arguments (the library use); it validates the same way.

Every error is a `ConfigError` whose message names where the bad value came from (the file or the
environment variable), the source and the key, and says what is allowed. Secrets (the dsn's
password, every `destination_options` value) never appear in a repr, a message or a result.
"""

from __future__ import annotations

import enum
import json
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cdcengine.errors import ConfigError, UnknownSource
from cdcengine.names import NameError_, TableRef, case_collisions, is_engine_column
from cdcengine.secrets import (
    UNPARSEABLE_DSN,
    display_dsn,
    dsn_password,
    mask_dsn,
    option_secrets,
    scrub,
)

DEFAULT_CONFIG_PATH = "cdcengine.toml"
DEFAULT_STATE_URL = "sqlite:///.cdcengine/state.db"
ENV_PREFIX = "CDCENGINE__"

_SOURCE_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# PostgreSQL: slot names are lower-case letters, digits and underscores, at most 63 bytes.
_SLOT_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
# Publication names are quoted wherever they are used; this keeps them printable and safe to put
# in the replication protocol's `publication_names '…'` literal, which takes no parameters.
_PUBLICATION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$")
_OBJECT_STORE_SCHEMES = ("s3://", "s3a://", "gs://", "gcs://", "az://", "abfs://", "abfss://",
                         "adl://", "azure://", "file://", "memory://")


class ManagementMode(enum.StrEnum):
    MANAGED = "managed"
    SELF_MANAGED = "self_managed"


class TableMode(enum.StrEnum):
    CONSOLIDATED = "consolidated"
    APPEND = "append"
    BOTH = "both"

    @property
    def writes_consolidated(self) -> bool:
        return self in (TableMode.CONSOLIDATED, TableMode.BOTH)

    @property
    def writes_append(self) -> bool:
        return self in (TableMode.APPEND, TableMode.BOTH)


class LogFormat(enum.StrEnum):
    CONSOLE = "console"
    JSON = "json"


# key -> kind, used to parse environment strings and to check TOML value types.
_SOURCE_KEYS: dict[str, str] = {
    "name": "str", "dsn": "str", "tables": "list[str]", "destination": "str",
    "destination_options": "dict", "management_mode": "str", "slot_name": "str",
    "publication_name": "str", "table_mode": "str", "hard_deletes": "bool",
    "auto_drop_slot": "bool", "lag_warning_threshold_mb": "int",
    "lag_critical_threshold_mb": "int", "lag_check_interval_s": "int",
    "flush_interval_ms": "int", "max_batch_rows": "int", "max_batch_mb": "int", "table": "dict",
    "maintenance_interval_s": "int", "vacuum_retention_hours": "int",
    "snapshot_chunk_rows": "int", "snapshot_workers": "int", "stall_timeout_s": "int",
    "replication_timeout_s": "int",
}
_HTTP_HOST = re.compile(r"^[A-Za-z0-9.:_-]{1,253}$")
_ENGINE_KEYS: dict[str, str] = {"state": "str", "http_port": "int", "http_host": "str",
                                "log_format": "str"}
_TABLE_KEYS = ("mode", "columns", "primary_key")
SETTINGS_KEYS = ("auto_drop_slot", "lag_warning_threshold_mb", "lag_critical_threshold_mb")
#: The largest lag threshold (1 PiB of retained WAL, in MB): beyond it a threshold means "never"
#: and would overflow the byte arithmetic and the state store's 64-bit integers.
MAX_THRESHOLD_MB = 1024 * 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class TableConfig:
    """One captured table with its per-table overrides resolved."""

    ref: TableRef
    mode: TableMode
    columns: tuple[str, ...] | None = None  # None: every column
    primary_key: tuple[str, ...] | None = None  # None: the table's own primary key

    @property
    def name(self) -> str:
        return self.ref.qualified


def _where(provenance: Mapping[str, str], default: str, key: str) -> str:
    # `table.<t>.mode` came from wherever `table` came from
    return provenance.get(key) or provenance.get(key.split(".", 1)[0], default)


@dataclass(frozen=True, slots=True, kw_only=True)
class SourceConfig:
    """One source database and where its tables go. Keys and defaults are SPEC §2's.

    Construct it directly (`SourceConfig(name=…, dsn=…, tables=[…], destination=…)`) or through
    `load_config`. Validation happens on construction; an invalid value raises `ConfigError`.
    """

    name: str
    dsn: str = field(repr=False)
    tables: tuple[str, ...]
    destination: str
    destination_options: Mapping[str, str] = field(default_factory=dict, repr=False)
    management_mode: ManagementMode = ManagementMode.MANAGED
    slot_name: str = ""
    publication_name: str = ""
    table_mode: TableMode = TableMode.CONSOLIDATED
    hard_deletes: bool = False
    auto_drop_slot: bool = True
    lag_warning_threshold_mb: int = 512
    lag_critical_threshold_mb: int = 2048
    lag_check_interval_s: int = 30
    flush_interval_ms: int = 1000
    max_batch_rows: int = 200_000
    max_batch_mb: int = 256
    maintenance_interval_s: int = 600  # per Delta table: compaction + checkpoint + vacuum; 0 off
    vacuum_retention_hours: int = 168  # files unreferenced this long are deleted; 0: no vacuum
    snapshot_chunk_rows: int = 100_000  # rows per snapshot chunk (key ranges, planned)
    snapshot_workers: int = 2  # parallel snapshot copies, each on its own connection
    # the daemon's watchdog: changes pending and nothing durable this long → `stalled`
    stall_timeout_s: int = 300
    # the replication connection: nothing heard from the server this long, although asked to
    # answer → the connection is dead or stalled (or the walsender frozen): reconnect
    replication_timeout_s: int = 60
    table: Mapping[str, Mapping[str, object]] = field(default_factory=dict, repr=False)
    # Where each key came from ("cdcengine.toml", "CDCENGINE__SHOP__DSN"), for error messages.
    provenance: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    origin: str = field(default="SourceConfig()", repr=False, compare=False)
    table_configs: tuple[TableConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(key: str, what: str) -> ConfigError:
            where = _where(self.provenance, self.origin, key)
            who = f"source {self.name!r}" if isinstance(self.name, str) else "source"
            return ConfigError(scrub(f"{where}: {who}: key {key!r}: {what}", self.secrets()))

        set_ = object.__setattr__
        if not isinstance(self.name, str) or not _SOURCE_NAME.match(self.name):
            raise fail("name", "must match [a-z][a-z0-9_]* (got "
                       f"{self.name!r})")
        if self.name == "engine":
            raise fail("name", "'engine' is reserved for the [engine] section; pick another name")
        if len(self.name) > 53:
            raise fail("name", "must be at most 53 characters (the default slot name adds 10)")
        if not isinstance(self.dsn, str) or not self.dsn.strip():
            raise fail("dsn", "must be a non-empty connection string such as "
                       "postgresql://user:password@host:5432/dbname")
        if display_dsn(self.dsn) == UNPARSEABLE_DSN:
            # not shown: a mistyped dsn may hold the password where no password belongs
            raise fail("dsn", "is not a connection string (not shown: it may hold a password): "
                       "write postgresql://user:password@host:5432/dbname (is the '@' before "
                       "the host missing? percent-encode / ? # @ : in a password, e.g. / as "
                       "%2F) or key=value pairs such as host=… dbname=…")
        tables = self.tables
        if isinstance(tables, str) or not isinstance(tables, list | tuple) or not tables:
            raise fail("tables", 'must be a non-empty list of table names like ["public.orders"]')
        refs: list[TableRef] = []
        for t in tables:
            try:
                ref = TableRef.parse(t)
            except NameError_ as exc:
                raise fail("tables", str(exc)) from None
            if ref in refs:
                raise fail("tables", f"{ref.qualified} is listed twice")
            refs.append(ref)
        set_(self, "tables", tuple(r.qualified for r in refs))
        if not isinstance(self.destination, str) or not self.destination.strip():
            raise fail("destination", "must be a local path or an object-store URI "
                       "(s3://, gs://, az://)")
        if "://" in self.destination and not self.destination.startswith(_OBJECT_STORE_SCHEMES):
            raise fail("destination", "must be a local path or one of "
                       + ", ".join(_OBJECT_STORE_SCHEMES))
        opts = self.destination_options
        if not isinstance(opts, Mapping):
            raise fail("destination_options", "must be a table of string keys and values")
        clean_opts: dict[str, str] = {}
        for k, v in opts.items():
            if not isinstance(k, str) or isinstance(v, list | dict | Mapping) or v is None:
                raise fail("destination_options", "must map names to strings, numbers or "
                           "booleans (values are masked)")
            clean_opts[k] = str(v).lower() if isinstance(v, bool) else str(v)
        set_(self, "destination_options", clean_opts)

        for key, enum_cls in (("management_mode", ManagementMode), ("table_mode", TableMode)):
            value = getattr(self, key)
            try:
                set_(self, key, enum_cls(value))
            except ValueError:
                allowed = " | ".join(m.value for m in enum_cls)
                raise fail(key, f"must be one of {allowed} (got {value!r})") from None
        for key in ("hard_deletes", "auto_drop_slot"):
            if not isinstance(getattr(self, key), bool):
                raise fail(key, f"must be true or false (got {getattr(self, key)!r})")
        for key in ("lag_warning_threshold_mb", "lag_critical_threshold_mb",
                    "lag_check_interval_s", "flush_interval_ms", "max_batch_rows",
                    "max_batch_mb", "snapshot_chunk_rows", "snapshot_workers",
                    "stall_timeout_s", "replication_timeout_s"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise fail(key, f"must be an integer >= 1 (got {value!r})")
        for key in ("lag_warning_threshold_mb", "lag_critical_threshold_mb"):
            if getattr(self, key) > MAX_THRESHOLD_MB:
                raise fail(key, f"must be at most {MAX_THRESHOLD_MB} (1 PiB; got "
                                f"{getattr(self, key)})")
        for key in ("maintenance_interval_s", "vacuum_retention_hours"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise fail(key, f"must be an integer >= 0, 0 turning it off (got {value!r})")
        if self.lag_warning_threshold_mb >= self.lag_critical_threshold_mb:
            raise fail("lag_warning_threshold_mb",
                       f"must be less than lag_critical_threshold_mb "
                       f"({self.lag_warning_threshold_mb} >= {self.lag_critical_threshold_mb})")

        slot = self.slot_name or f"cdcengine_{self.name}"
        if not isinstance(slot, str) or not _SLOT_NAME.match(slot):
            raise fail("slot_name", "must be 1-63 lower-case letters, digits or underscores "
                       f"(got {slot!r})")
        set_(self, "slot_name", slot)
        pub = self.publication_name or f"cdcengine_{self.name}"
        if not isinstance(pub, str) or not _PUBLICATION_NAME.match(pub):
            raise fail("publication_name", "must start with a letter or underscore and hold "
                       f"only letters, digits, _, $ or -, at most 63 (got {pub!r})")
        set_(self, "publication_name", pub)

        set_(self, "table_configs", self._resolve_tables(refs, fail))
        self._check_delta_paths(fail)

    def _resolve_tables(self, refs: list[TableRef], fail: _Fail) -> tuple[TableConfig, ...]:
        overrides: dict[TableRef, Mapping[str, object]] = {}
        if not isinstance(self.table, Mapping):
            raise fail("table", 'must be a table of per-table overrides like '
                       '[source.table."public.events"]')
        for key, value in self.table.items():
            try:
                ref = TableRef.parse(key)
            except NameError_ as exc:
                raise fail("table", str(exc)) from None
            if ref not in refs:
                raise fail(f"table.{key}", "overrides a table that is not in 'tables' "
                           f"({', '.join(r.qualified for r in refs)})")
            if ref in overrides:
                raise fail(f"table.{key}", f"{ref.qualified} is overridden twice; merge its "
                           "per-table sections into one")
            if not isinstance(value, Mapping):
                raise fail(f"table.{key}", "must be a table with keys mode, columns, primary_key")
            unknown = sorted(set(value) - set(_TABLE_KEYS))
            if unknown:
                raise fail(f"table.{key}.{unknown[0]}",
                           f"unknown key; allowed: {', '.join(_TABLE_KEYS)}")
            overrides[ref] = value
        out: list[TableConfig] = []
        for ref in refs:
            o = overrides.get(ref, {})
            prefix = f"table.{ref.qualified}"
            mode_value = o.get("mode", self.table_mode)
            try:
                mode = TableMode(mode_value)
            except ValueError:
                raise fail(f"{prefix}.mode", "must be one of consolidated | append | both "
                           f"(got {mode_value!r})") from None
            cols = _column_list(o.get("columns"), f"{prefix}.columns", fail)
            pk = _column_list(o.get("primary_key"), f"{prefix}.primary_key", fail)
            if cols is not None and pk is not None:
                # key columns are always captured
                cols = cols + tuple(c for c in pk if c not in cols)
                for a, b in case_collisions(cols):
                    raise fail(f"{prefix}.primary_key", f"columns {a!r} and {b!r} differ only "
                               "in case (Delta is case-insensitive)")
            out.append(TableConfig(ref=ref, mode=mode, columns=cols, primary_key=pk))
        return tuple(out)

    def _check_delta_paths(self, fail: _Fail) -> None:
        seen: dict[str, str] = {}
        for tc in self.table_configs:
            targets = []
            if tc.mode.writes_consolidated:
                targets.append((tc.ref.delta_path(""), f"{tc.name} (consolidated)"))
            if tc.mode.writes_append:
                targets.append((tc.ref.delta_path("", append=True), f"{tc.name} (append)"))
            for path, label in targets:
                key = path.lower()  # object stores are case-sensitive, many file systems are not
                if key in seen:
                    raise fail("tables", f"{seen[key]} and {label} would write the same Delta "
                               f"table {self.destination.rstrip('/')}{path}; rename one, or "
                               "capture one of them in another mode or destination")
                seen[key] = label

    # ---- derived, secret-free views -------------------------------------------------------
    def table_config(self, table: str | TableRef) -> TableConfig:
        ref = table if isinstance(table, TableRef) else TableRef.parse(table)
        for tc in self.table_configs:
            if tc.ref == ref:
                return tc
        raise ConfigError(f"source {self.name!r}: table {ref.qualified} is not in its 'tables'")

    def secrets(self) -> tuple[str, ...]:
        """Every secret this config holds, for `scrub`: the dsn password, option values."""
        out: list[str] = []
        if isinstance(self.dsn, str):
            pw = dsn_password(self.dsn)
            if pw:
                out.append(pw)
        opts = self.destination_options
        if isinstance(opts, Mapping):
            out.extend(option_secrets(opts))
        return tuple(out)

    def with_tables(self, tables: Sequence[TableConfig]) -> SourceConfig:
        """This source capturing exactly `tables` (each with its own mode and options)."""
        overrides: dict[str, dict[str, object]] = {}
        for tc in tables:
            o: dict[str, object] = {"mode": str(tc.mode)}
            if tc.columns is not None:
                o["columns"] = list(tc.columns)
            if tc.primary_key is not None:
                o["primary_key"] = list(tc.primary_key)
            overrides[tc.name] = o
        return replace(self, tables=tuple(tc.name for tc in tables), table=overrides)

    @property
    def masked_dsn(self) -> str:
        return display_dsn(self.dsn)

    def setting_origin(self, key: str) -> str:
        """Where a tuning key's file/default value came from: 'default', a file or env var."""
        return self.provenance.get(key, "default")


class _Fail(Protocol):  # the signature of SourceConfig.__post_init__'s `fail`
    def __call__(self, key: str, what: str) -> ConfigError: ...


def _column_list(value: object, key: str, fail: _Fail) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
        raise fail(key, 'must be a non-empty list of column names like ["id", "kind"]')
    cols: list[str] = []
    for c in value:
        if not isinstance(c, str) or not c or "\x00" in c or len(c.encode()) > 63:
            raise fail(key, f"column names must be 1-63 byte strings (got {c!r})")
        if is_engine_column(c):
            raise fail(key, f"column {c!r} uses the reserved prefix _cdc_")
        if c in cols:
            raise fail(key, f"column {c!r} is listed twice")
        cols.append(c)
    for a, b in case_collisions(cols):
        raise fail(key, f"columns {a!r} and {b!r} differ only in case (Delta is "
                   "case-insensitive)")
    return tuple(cols)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineConfig:
    state: str = DEFAULT_STATE_URL
    http_port: int = 9790
    # loopback by default: /status names databases and tables; "0.0.0.0" in a container
    http_host: str = "127.0.0.1"
    log_format: LogFormat = LogFormat.CONSOLE
    provenance: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    origin: str = field(default="EngineConfig()", repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(key: str, what: str) -> ConfigError:
            return ConfigError(f"{_where(self.provenance, self.origin, key)}: [engine]: key "
                               f"{key!r}: {what}")

        if not isinstance(self.state, str) or not self.state.startswith(
            ("sqlite://", "postgresql://", "postgres://")
        ):
            raise fail("state", "must be a sqlite:///path URL or a postgresql:// URL "
                       f"(got {mask_dsn(str(self.state))!r})")
        port = self.http_port
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise fail("http_port", f"must be an integer 0-65535, 0 = off (got {port!r})")
        host = self.http_host
        if not isinstance(host, str) or not _HTTP_HOST.match(host):
            raise fail("http_host", "must be an address or host name to listen on, such as "
                       f"127.0.0.1, 0.0.0.0 or ::1 (got {host!r})")
        try:
            object.__setattr__(self, "log_format", LogFormat(self.log_format))
        except ValueError:
            raise fail("log_format", f"must be console | json (got {self.log_format!r})") \
                from None

    def __repr__(self) -> str:  # a postgresql:// state URL may carry a password
        return (f"EngineConfig(state={mask_dsn(self.state)!r}, http_port={self.http_port!r}, "
                f"http_host={self.http_host!r}, "
                f"log_format={self.log_format!r})")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    engine: EngineConfig
    sources: tuple[SourceConfig, ...]
    path: Path | None = None

    @property
    def base_dir(self) -> Path:
        return self.path.parent if self.path else Path.cwd()

    def source(self, name: str) -> SourceConfig:
        for s in self.sources:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.sources) or "none"
        raise UnknownSource(f"no source named {name!r} in the config (configured: {known})")


# ---- loading --------------------------------------------------------------------------------


def _parse_env_value(var: str, kind: str, raw: str, where: str) -> object:
    def bad(what: str) -> ConfigError:
        return ConfigError(f"{where}: {what} (environment variable {var})")

    if kind == "str":
        return raw
    if kind == "bool":
        low = raw.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise bad(f"must be true or false (got {raw!r})")
    if kind == "int":
        try:
            return int(raw.strip())
        except ValueError:
            raise bad(f"must be an integer (got {raw!r})") from None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise bad("must be JSON (a list like [\"public.orders\"] or an object)") from None
    if kind == "list[str]" and not isinstance(value, list):
        raise bad("must be a JSON list")
    if kind == "dict" and not isinstance(value, dict):
        raise bad("must be a JSON object")
    return value


_EnvOverrides = tuple[
    dict[str, object], dict[str, dict[str, object]], dict[str, str], dict[str, dict[str, str]]
]


def _env_overrides(environ: Mapping[str, str]) -> _EnvOverrides:
    engine: dict[str, object] = {}
    engine_prov: dict[str, str] = {}
    sources: dict[str, dict[str, object]] = {}
    sources_prov: dict[str, dict[str, str]] = {}
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX):
            continue
        rest = var[len(ENV_PREFIX):]
        scope, sep, key = rest.rpartition("__")
        if not sep or not scope or not key:
            raise ConfigError(f"environment variable {var}: expected CDCENGINE__<SOURCE>__<KEY> "
                              "or CDCENGINE__ENGINE__<KEY>")
        key = key.lower()
        if scope == "ENGINE":
            if key not in _ENGINE_KEYS:
                raise ConfigError(f"environment variable {var}: unknown [engine] key {key!r}; "
                                  f"allowed: {', '.join(_ENGINE_KEYS)}")
            engine[key] = _parse_env_value(var, _ENGINE_KEYS[key], environ[var],
                                           f"[engine]: key {key!r}")
            engine_prov[key] = var
            continue
        name = scope.lower()
        if key not in _SOURCE_KEYS or key == "name":
            allowed = ", ".join(k for k in _SOURCE_KEYS if k != "name")
            raise ConfigError(f"environment variable {var}: unknown source key {key!r}; "
                              f"allowed: {allowed}")
        value = _parse_env_value(var, _SOURCE_KEYS[key], environ[var],
                                 f"source {name!r}: key {key!r}")
        sources.setdefault(name, {})[key] = value
        sources_prov.setdefault(name, {})[key] = var
    return engine, sources, engine_prov, sources_prov


def _resolve_local(path_or_uri: str, base: Path) -> str:
    if "://" in path_or_uri:
        return path_or_uri
    p = Path(path_or_uri).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_state_url(url: str, base: Path) -> str:
    prefix = "sqlite:///"
    if url.startswith(prefix) and url != "sqlite://:memory:":
        rest = url[len(prefix):]
        p = Path(rest).expanduser()
        if rest.startswith("/"):
            return url
        return "sqlite:///" + str((base / p).resolve())
    return url


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, override from the environment, resolve relative paths, and validate.

    `path` None means `./cdcengine.toml`; when that default file does not exist the config may
    come from the environment alone. An explicit path that does not exist is an error.
    """
    env = os.environ if environ is None else environ
    explicit = path is not None
    cfg_path = Path(path if path is not None else DEFAULT_CONFIG_PATH)
    label = str(cfg_path)
    data: dict[str, object] = {}
    if cfg_path.is_file():
        try:
            with cfg_path.open("rb") as fh:
                data = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{label}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read the config file ({exc.strerror})") from None
        base = cfg_path.resolve().parent
    else:
        if explicit or not any(k.startswith(ENV_PREFIX) for k in env):
            raise ConfigError(f"{label}: config file not found (pass --config PATH, or define "
                              "sources with CDCENGINE__<SOURCE>__<KEY> variables)")
        base = Path.cwd()
        cfg_path_opt: Path | None = None
        label = "environment"
    cfg_path_opt = cfg_path.resolve() if cfg_path.is_file() else None

    unknown = sorted(set(data) - {"engine", "source"})
    if unknown:
        raise ConfigError(f"{label}: unknown top-level key {unknown[0]!r}; allowed: [engine] "
                          "and [[source]]")
    raw_engine = data.get("engine", {})
    if not isinstance(raw_engine, dict):
        raise ConfigError(f"{label}: [engine] must be a table")
    raw_sources = data.get("source", [])
    if not isinstance(raw_sources, list) or not all(isinstance(s, dict) for s in raw_sources):
        raise ConfigError(f"{label}: 'source' must be an array of tables: write [[source]]")

    env_engine, env_sources, env_engine_prov, env_sources_prov = _env_overrides(env)

    eng = dict(raw_engine)
    for key in eng:
        if key not in _ENGINE_KEYS:
            raise ConfigError(f"{label}: [engine]: unknown key {key!r}; allowed: "
                              f"{', '.join(_ENGINE_KEYS)}")
    eng_prov = {k: label for k in eng}
    eng.update(env_engine)
    eng_prov.update(env_engine_prov)
    if "state" in eng and isinstance(eng["state"], str):
        eng["state"] = _resolve_state_url(eng["state"], base)
    elif "state" not in eng:
        eng["state"] = _resolve_state_url(DEFAULT_STATE_URL, base)
    engine = EngineConfig(provenance=eng_prov, origin=label, **eng)  # type: ignore[arg-type]

    sources: list[SourceConfig] = []
    names: list[str] = []
    for i, raw in enumerate(raw_sources):
        name = raw.get("name")
        who = f"source {name!r}" if isinstance(name, str) else f"[[source]] #{i + 1}"
        for key in raw:
            if key not in _SOURCE_KEYS:
                raise ConfigError(f"{label}: {who}: unknown key {key!r}; allowed: "
                                  f"{', '.join(_SOURCE_KEYS)}")
        if not isinstance(name, str):
            raise ConfigError(f"{label}: {who}: key 'name' is required: a name matching "
                              "[a-z][a-z0-9_]*")
        if name in names:
            raise ConfigError(f"{label}: source {name!r}: key 'name': two sources share this "
                              "name; names must be unique")
        names.append(name)
    for env_name in env_sources:
        if env_name not in names:
            names.append(env_name)
    for name in names:
        raw: dict[str, object] = next(
            (dict(r) for r in raw_sources if r.get("name") == name), {"name": name})
        prov: dict[str, str] = {k: label for k in raw}
        raw.update(env_sources.get(name, {}))
        prov.update(env_sources_prov.get(name, {}))
        origin = label if any(r.get("name") == name for r in raw_sources) else "environment"
        missing = [k for k in ("dsn", "tables", "destination") if k not in raw]
        if missing:
            raise ConfigError(f"{origin}: source {name!r}: key {missing[0]!r} is required")
        if isinstance(raw.get("destination"), str):
            raw["destination"] = _resolve_local(str(raw["destination"]), base)
        if isinstance(raw.get("tables"), list):
            raw["tables"] = tuple(raw["tables"])
        sources.append(SourceConfig(provenance=prov, origin=origin, **raw))  # type: ignore[arg-type]
    check_sources_apart(sources, label)
    return Config(engine=engine, sources=tuple(sources), path=cfg_path_opt)


def check_sources_apart(sources: Sequence[SourceConfig], label: str = "config") -> None:
    """Sources of one install never share a slot, a publication or a Delta table: two streams
    on one slot steal each other's changes, and two writers of one Delta table fight over its
    commits (each one's progress is its own transaction id) -- refused here, before anything
    runs, rather than failing later with a commit conflict or "this install did not create it"."""
    owners: dict[tuple[str, str], str] = {}
    for src in sources:
        claims = [("slot_name", src.slot_name), ("publication_name", src.publication_name)]
        for tc in src.table_configs:
            if tc.mode.writes_consolidated:
                claims.append(("Delta table", src.destination.rstrip("/")
                               + tc.ref.delta_path("")))
            if tc.mode.writes_append:
                claims.append(("Delta table", src.destination.rstrip("/")
                               + tc.ref.delta_path("", append=True)))
        for what, value in claims:
            key = (what, value.lower() if what == "Delta table" else value)
            other = owners.setdefault(key, src.name)
            if other != src.name:
                fix = ("give one of them its own destination (or leave the table out of one)"
                       if what == "Delta table" else f"set a distinct {what} for one of them")
                raise ConfigError(f"{label}: sources {other!r} and {src.name!r} share the "
                                  f"{what} {value}: {fix}")
