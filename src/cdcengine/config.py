"""Configuration: the TOML file, `CDCENGINE__…` environment overrides, and validation (SPEC §2).

`load_config(path)` reads the file (default `./cdcengine.toml`), applies environment overrides
(`CDCENGINE__<SOURCE>__<KEY>` / `CDCENGINE__ENGINE__<KEY>`, values parsed by the key's type, lists
and tables as JSON) and validates everything. `SourceConfig(...)` can also be built directly from
keyword arguments (the library use); it validates the same way.

Every error is a `ConfigError` whose message names where the bad value came from (the file or the
environment variable), the source and the key, and says what is allowed. Secrets (the dsn's
password, every `destination_options` value) never appear in a repr, a message or a result.

What each key accepts is one table per section (`_SOURCE_KEYS`, `_ENGINE_KEYS`: a `Rule` per
key), checked by `cdcengine.config_validation.check`; that module also reads the environment's
overrides and checks that sources stay apart.
"""

from __future__ import annotations

import enum
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from cdcengine import ssh_tunnel as ssh
from cdcengine.config_engine import _ENGINE_KEYS, DEFAULT_STATE_URL, EngineConfig
from cdcengine.config_engine import LogFormat as LogFormat  # re-exported: part of the config API
from cdcengine.config_validation import (
    ENV_PREFIX,
    Invalid,
    Rule,
    check,
    check_sources_apart,
    choice_error,
    column_list,
    env_overrides,
    merge_env,
    partition_list,
    where,
)
from cdcengine.errors import ConfigError, UnknownSource
from cdcengine.hostpolicy import HostNotAllowed, HostPolicy, dsn_hosts
from cdcengine.names import NameError_, TableRef, case_collisions
from cdcengine.object_store import StorageOptionsError, storage_plan
from cdcengine.secrets import (
    UNPARSEABLE_DSN,
    display_dsn,
    dsn_password,
    environment_secrets,
    option_secrets,
    scrub,
)

DEFAULT_CONFIG_PATH = "cdcengine.toml"

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


SETTINGS_KEYS = ("auto_drop_slot", "lag_warning_threshold_mb", "lag_critical_threshold_mb")
#: The largest lag threshold (1 PiB of retained WAL, in MB): beyond it a threshold means "never"
#: and would overflow the byte arithmetic and the state store's 64-bit integers.
MAX_THRESHOLD_MB = 1024 * 1024 * 1024

# What each key accepts (see `Rule`): its kind parses environment strings and checks TOML
# value types; the rules with an error text are checked by `check`, in this order.
_BOOL = Rule(kind="bool", error="must be true or false (got {value!r})")
_POSITIVE = Rule(kind="int", minimum=1, error="must be an integer >= 1 (got {value!r})")
_THRESHOLD = Rule(kind="int", minimum=1, error=_POSITIVE.error, maximum=MAX_THRESHOLD_MB,
                  above=f"must be at most {MAX_THRESHOLD_MB} (1 PiB; got {{value}})")
_OFF_OR_POSITIVE = Rule(kind="int", minimum=0,
                        error="must be an integer >= 0, 0 turning it off (got {value!r})")
_STR, _LIST, _DICT = Rule(kind="str"), Rule(kind="list[str]"), Rule(kind="dict")
_SOURCE_KEYS: dict[str, Rule] = {
    "name": Rule(kind="str", pattern=re.compile(r"^[a-z][a-z0-9_]*$"),
                 error="must match [a-z][a-z0-9_]* (got {value!r})"),
    "dsn": _STR, "tables": _LIST, "destination": _STR, "destination_options": _DICT,
    "ssh_tunnel": _DICT,  # checked by cdcengine.ssh_tunnel
    "management_mode": Rule(kind="str", choices=ManagementMode,
                            error=choice_error(ManagementMode)),
    # PostgreSQL: slot names are lower-case letters, digits and underscores, at most 63 bytes.
    "slot_name": Rule(kind="str", pattern=re.compile(r"^[a-z0-9_]{1,63}$"),
                      error="must be 1-63 lower-case letters, digits or underscores "
                            "(got {value!r})"),
    # Publication names are quoted wherever they are used; this keeps them printable and safe
    # to put in the replication protocol's `publication_names '…'` literal (no parameters).
    "publication_name": Rule(kind="str", pattern=re.compile(r"^[A-Za-z_][A-Za-z0-9_$-]{0,62}$"),
                             error="must start with a letter or underscore and hold only "
                                   "letters, digits, _, $ or -, at most 63 (got {value!r})"),
    "table_mode": Rule(kind="str", choices=TableMode, error=choice_error(TableMode)),
    "hard_deletes": _BOOL, "auto_drop_slot": _BOOL,
    "lag_warning_threshold_mb": _THRESHOLD, "lag_critical_threshold_mb": _THRESHOLD,
    "lag_check_interval_s": _POSITIVE, "flush_interval_ms": _POSITIVE,
    "max_batch_rows": _POSITIVE, "max_batch_mb": _POSITIVE, "table": _DICT,
    "maintenance_interval_s": _OFF_OR_POSITIVE, "vacuum_retention_hours": _OFF_OR_POSITIVE,
    "snapshot_chunk_rows": _POSITIVE, "snapshot_workers": _POSITIVE,
    "stall_timeout_s": _POSITIVE, "replication_timeout_s": _POSITIVE,
    "catchup_threshold_mb": _OFF_OR_POSITIVE, "catchup_chunk_mb": _POSITIVE,
}
# checked after the table list and before the derived names (slot, publication)
_TUNING_KEYS = tuple(k for k, r in _SOURCE_KEYS.items()
                     if r.checked and k not in ("name", "slot_name", "publication_name"))
_TABLE_KEYS = ("mode", "columns", "primary_key", "partition_by")


@dataclass(frozen=True, slots=True, kw_only=True)
class TableConfig:
    """One captured table with its per-table overrides resolved."""

    ref: TableRef
    mode: TableMode
    columns: tuple[str, ...] | None = None  # None: every column
    primary_key: tuple[str, ...] | None = None  # None: the table's own primary key
    partition_by: tuple[str, ...] | None = None  # consolidated table's Delta partition columns

    @property
    def name(self) -> str:
        return self.ref.qualified


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
    # a session starting at least this far behind the server reads the backlog through SQL
    # peeks of the slot, in chunks of WAL, then streams (issue 15); 0: always stream
    catchup_threshold_mb: int = 64
    catchup_chunk_mb: int = 256
    table: Mapping[str, Mapping[str, object]] = field(default_factory=dict, repr=False)
    ssh_tunnel: ssh.SshTunnel | None = None  # every connection to the source goes through it
    # The engine's host policy ([engine] allowed_hosts / denied_networks), carried by every
    # source so each connection the adapter opens for it is checked (load_config fills it in).
    host_policy: HostPolicy = field(default_factory=HostPolicy, repr=False, compare=False)
    # Where each key came from ("cdcengine.toml", "CDCENGINE__SHOP__DSN"), for error messages.
    provenance: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    origin: str = field(default="SourceConfig()", repr=False, compare=False)
    table_configs: tuple[TableConfig, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def fail(key: str, what: str) -> ConfigError:
            origin = where(self.provenance, self.origin, key)
            who = f"source {self.name!r}" if isinstance(self.name, str) else "source"
            return ConfigError(scrub(f"{origin}: {who}: key {key!r}: {what}", self.secrets()))

        set_ = object.__setattr__

        def checked(key: str, value: object) -> object:
            try:
                return check(_SOURCE_KEYS[key], value)
            except Invalid as exc:
                raise fail(key, str(exc)) from None

        checked("name", self.name)
        if self.name == "engine":
            raise fail("name", "'engine' is reserved for the [engine] section; pick another name")
        if len(self.name) > 53:
            raise fail("name", "must be at most 53 characters (the default slot name adds 10)")
        self._check_dsn(fail)
        set_(self, "ssh_tunnel", ssh.parse_ssh_tunnel(self.ssh_tunnel, fail))
        self._check_hosts(fail)
        refs = self._table_refs(fail)
        set_(self, "tables", tuple(r.qualified for r in refs))
        self._check_destination(fail)
        for key in _TUNING_KEYS:
            set_(self, key, checked(key, getattr(self, key)))
        if self.lag_warning_threshold_mb >= self.lag_critical_threshold_mb:
            raise fail("lag_warning_threshold_mb",
                       f"must be less than lag_critical_threshold_mb "
                       f"({self.lag_warning_threshold_mb} >= {self.lag_critical_threshold_mb})")
        set_(self, "slot_name", checked("slot_name", self.slot_name or f"cdcengine_{self.name}"))
        set_(self, "publication_name",
             checked("publication_name", self.publication_name or f"cdcengine_{self.name}"))

        set_(self, "table_configs", self._resolve_tables(refs, fail))
        self._check_delta_paths(fail)

    def _check_dsn(self, fail: _Fail) -> None:
        if not isinstance(self.dsn, str) or not self.dsn.strip():
            raise fail("dsn", "must be a non-empty connection string such as "
                       "postgresql://user:password@host:5432/dbname")
        if display_dsn(self.dsn) == UNPARSEABLE_DSN:
            # not shown: a mistyped dsn may hold the password where no password belongs
            raise fail("dsn", "is not a connection string (not shown: it may hold a password): "
                       "write postgresql://user:password@host:5432/dbname (is the '@' before "
                       "the host missing? percent-encode / ? # @ : in a password, e.g. / as "
                       "%2F) or key=value pairs such as host=… dbname=…")

    def _check_hosts(self, fail: _Fail) -> None:
        """The host policy's static check of every host the dsn names (no DNS here: the adapter
        checks the resolved addresses at connect). A dsn naming no host means the local unix
        socket ($PGHOST or the default), which the policy refuses unless listed."""
        if not isinstance(self.host_policy, HostPolicy):
            raise ConfigError("SourceConfig: host_policy must be a cdcengine.hostpolicy.HostPolicy")
        if not self.host_policy.enabled:
            return
        if self.ssh_tunnel is not None:
            # the bastion resolves and reaches the database, in the tunnel owner's network (a
            # private address there is the point of a bastion): the bastion is what is checked
            checks = [("ssh_tunnel", "SSH tunnel host", self.ssh_tunnel.host)]
        else:
            default = os.environ.get("PGHOST") or "/var/run/postgresql"
            checks = [("dsn", "database host", h) for h in dsn_hosts(self.dsn, default=default)]
        for key, what, host in checks:
            try:
                self.host_policy.check_host(host, what=what)
            except HostNotAllowed as exc:
                raise HostNotAllowed(fail(key, exc.message).message, fix=exc.fix) from None

    def _table_refs(self, fail: _Fail) -> list[TableRef]:
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
        return refs

    def _check_destination(self, fail: _Fail) -> None:
        """The destination's form, and its options as strings (booleans as true / false)."""
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
        try:  # options that allow an unsafe commit fail here, not at the first write
            storage_plan(self.destination, clean_opts)
        except StorageOptionsError as exc:
            raise fail("destination_options", str(exc)) from None
        object.__setattr__(self, "destination_options", clean_opts)

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
                raise fail(f"table.{key}", f"must be a table with keys {', '.join(_TABLE_KEYS)}")
            unknown = sorted(set(value) - set(_TABLE_KEYS))
            if unknown:
                raise fail(f"table.{key}.{unknown[0]}",
                           f"unknown key; allowed: {', '.join(_TABLE_KEYS)}")
            overrides[ref] = value
        out: list[TableConfig] = []
        for ref in refs:
            o = overrides.get(ref, {})
            prefix = f"table.{ref.qualified}"
            try:
                mode = TableMode(str(check(_SOURCE_KEYS["table_mode"],
                                           o.get("mode", self.table_mode))))
            except Invalid as exc:
                raise fail(f"{prefix}.mode", str(exc)) from None
            cols = column_list(o.get("columns"), f"{prefix}.columns", fail)
            pk = column_list(o.get("primary_key"), f"{prefix}.primary_key", fail)
            if cols is not None and pk is not None:
                # key columns are always captured
                cols = cols + tuple(c for c in pk if c not in cols)
                for a, b in case_collisions(cols):
                    raise fail(f"{prefix}.primary_key", f"columns {a!r} and {b!r} differ only "
                               "in case (Delta is case-insensitive)")
            parts = partition_list(o.get("partition_by"), f"{prefix}.partition_by", fail,
                                   mode=mode, columns=cols)
            out.append(TableConfig(ref=ref, mode=mode, columns=cols, primary_key=pk,
                                   partition_by=parts))
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
        """Every secret this config holds, for `scrub`: the dsn password, option values, the
        tunnel's password and key passphrase and, for an object-store destination, the
        credentials in the environment."""
        out: list[str] = []
        if isinstance(self.dsn, str):
            pw = dsn_password(self.dsn)
            if pw:
                out.append(pw)
        opts = self.destination_options
        if isinstance(opts, Mapping):
            out.extend(option_secrets(opts))
        if isinstance(self.destination, str) and "://" in self.destination:
            out.extend(environment_secrets())  # credentials delta-rs takes from the environment
        return (*out, *ssh.tunnel_secrets(self.ssh_tunnel))

    def with_tables(self, tables: Sequence[TableConfig]) -> SourceConfig:
        """This source capturing exactly `tables` (each with its own mode and options)."""
        overrides: dict[str, dict[str, object]] = {}
        for tc in tables:
            o: dict[str, object] = {"mode": str(tc.mode)}
            if tc.columns is not None:
                o["columns"] = list(tc.columns)
            if tc.primary_key is not None:
                o["primary_key"] = list(tc.primary_key)
            if tc.partition_by is not None:
                o["partition_by"] = list(tc.partition_by)
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


@dataclass(frozen=True, slots=True)
class _File:
    """What `load_config` read: the TOML data (empty without a file), where relative paths
    start, the label messages name (the file, or "environment") and the file's path."""

    data: Mapping[str, object]
    base: Path
    label: str
    path: Path | None


def load_config(
    path: str | os.PathLike[str] | None = None, *, environ: Mapping[str, str] | None = None
) -> Config:
    """Read, override from the environment, resolve relative paths, and validate.

    `path` None means `./cdcengine.toml`; when that default file does not exist the config may
    come from the environment alone. An explicit path that does not exist is an error.
    """
    env = os.environ if environ is None else environ
    file = _read_file(path, env)
    raw_engine, raw_sources = _sections(file)
    env_engine, env_sources, env_engine_prov, env_sources_prov = env_overrides(
        env, source_keys=_SOURCE_KEYS, engine_keys=_ENGINE_KEYS,
        nested={"ssh_tunnel": ssh.SSH_TUNNEL_KEYS})
    engine = _engine_config(file, raw_engine, env_engine, env_engine_prov)
    sources = [_source_config(file, name, raw_sources, env_sources, env_sources_prov,
                              engine.host_policy)
               for name in _source_names(file, raw_sources, env_sources)]
    check_sources_apart(sources, file.label)
    return Config(engine=engine, sources=tuple(sources), path=file.path)


def _read_file(path: str | os.PathLike[str] | None, env: Mapping[str, str]) -> _File:
    cfg_path = Path(path if path is not None else DEFAULT_CONFIG_PATH)
    label = str(cfg_path)
    if not cfg_path.is_file():
        if path is not None or not any(k.startswith(ENV_PREFIX) for k in env):
            raise ConfigError(f"{label}: config file not found (pass --config PATH, or define "
                              "sources with CDCENGINE__<SOURCE>__<KEY> variables)")
        return _File(data={}, base=Path.cwd(), label="environment", path=None)
    try:
        with cfg_path.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot read the config file ({exc.strerror})") from None
    return _File(data=data, base=cfg_path.resolve().parent, label=label,
                 path=cfg_path.resolve())


def _sections(file: _File) -> tuple[dict[str, object], list[dict[str, object]]]:
    """The `[engine]` table and the `[[source]]` tables, their shapes checked."""
    label, data = file.label, file.data
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
    return raw_engine, raw_sources


def _engine_config(file: _File, raw: Mapping[str, object], env: Mapping[str, object],
                   env_prov: Mapping[str, str]) -> EngineConfig:
    for key in raw:
        if key not in _ENGINE_KEYS:
            raise ConfigError(f"{file.label}: [engine]: unknown key {key!r}; allowed: "
                              f"{', '.join(_ENGINE_KEYS)}")
    eng = {**raw, **env}
    prov = {k: file.label for k in raw} | dict(env_prov)
    state = eng.setdefault("state", DEFAULT_STATE_URL)
    if isinstance(state, str):
        eng["state"] = _resolve_state_url(state, file.base)
    return EngineConfig(provenance=prov, origin=file.label, **eng)  # type: ignore[arg-type]


def _source_names(file: _File, raw_sources: Sequence[Mapping[str, object]],
                  env_sources: Mapping[str, object]) -> list[str]:
    """The sources' names: the file's (each with known keys, named, once), then those only
    the environment defines."""
    names: list[str] = []
    for i, raw in enumerate(raw_sources):
        name = raw.get("name")
        who = f"source {name!r}" if isinstance(name, str) else f"[[source]] #{i + 1}"
        for key in raw:
            if key not in _SOURCE_KEYS:
                raise ConfigError(f"{file.label}: {who}: unknown key {key!r}; allowed: "
                                  f"{', '.join(_SOURCE_KEYS)}")
        if not isinstance(name, str):
            raise ConfigError(f"{file.label}: {who}: key 'name' is required: a name matching "
                              "[a-z][a-z0-9_]*")
        if name in names:
            raise ConfigError(f"{file.label}: source {name!r}: key 'name': two sources share "
                              "this name; names must be unique")
        names.append(name)
    return names + [n for n in env_sources if n not in names]


def _source_config(file: _File, name: str, raw_sources: Sequence[Mapping[str, object]],
                   env: Mapping[str, Mapping[str, object]],
                   env_prov: Mapping[str, Mapping[str, str]],
                   host_policy: HostPolicy) -> SourceConfig:
    """One source: the file's keys, overridden by its environment variables."""
    in_file = next((r for r in raw_sources if r.get("name") == name), None)
    raw: dict[str, object] = dict(in_file) if in_file is not None else {"name": name}
    prov: dict[str, str] = {k: file.label for k in raw}
    merge_env(raw, env.get(name, {}))
    prov.update(env_prov.get(name, {}))
    origin = file.label if in_file is not None else "environment"
    missing = [k for k in ("dsn", "tables", "destination") if k not in raw]
    if missing:
        raise ConfigError(f"{origin}: source {name!r}: key {missing[0]!r} is required")
    if isinstance(raw.get("destination"), str):
        raw["destination"] = _resolve_local(str(raw["destination"]), file.base)
    if "ssh_tunnel" in raw:
        raw["ssh_tunnel"] = ssh.resolve_paths(raw["ssh_tunnel"], file.base)
    if isinstance(raw.get("tables"), list):
        raw["tables"] = tuple(raw["tables"])  # type: ignore[arg-type]
    return SourceConfig(provenance=prov, origin=origin, host_policy=host_policy,
                        **raw)  # type: ignore[arg-type]


