"""The config's validation rules, checked by one function; the check that sources stay apart;
the environment's overrides (`CDCENGINE__…` variables, parsed by the key's kind).

`cdcengine.config` describes each key of a source and of `[engine]` by a `Rule` (its kind, and
for the keys checked by the table: range, pattern or allowed values, and the error text);
`check` applies one. The keys with checks of their own (dsn, tables, destination, the
per-table overrides) use `Rule` for their kind only. Messages name the key's origin and the
key; those parts are added by the caller.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cdcengine.errors import ConfigError
from cdcengine.names import case_collisions, is_engine_column

if TYPE_CHECKING:  # cdcengine.config imports this module
    from cdcengine.config import SourceConfig, TableMode

ENV_PREFIX = "CDCENGINE__"

__all__ = [
    "ENV_PREFIX",
    "EnvOverrides",
    "Invalid",
    "Rule",
    "check",
    "check_sources_apart",
    "choice_error",
    "column_list",
    "env_overrides",
    "merge_env",
    "parse_env_value",
    "where",
]


def where(provenance: Mapping[str, str], default: str, key: str) -> str:
    """Where a key's value came from (a file, an environment variable), for messages."""
    # `table.<t>.mode` came from wherever `table` came from
    return provenance.get(key) or provenance.get(key.split(".", 1)[0], default)


class Invalid(ValueError):
    """A value a rule refuses; the message says what is allowed (without where it came from)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """What one config key accepts.

    `kind`: how an environment variable's text is parsed and what a TOML value must be (str,
    bool, int, list[str], dict). A rule with an `error` is checked by `check`: ints against
    `minimum` / `maximum` (`above`: the text for a value over the maximum, default `error`),
    strings against `pattern`, `choices` (an enum) by value. In the texts `{value!r}` and
    `{value}` stand for the refused value. Without `error` the key has checks of its own.
    """

    kind: str
    error: str = ""
    minimum: int | None = None
    maximum: int | None = None
    above: str = ""
    pattern: re.Pattern[str] | None = None
    choices: type[enum.StrEnum] | None = None

    @property
    def checked(self) -> bool:
        return bool(self.error)


def choice_error(choices: type[enum.StrEnum]) -> str:
    """The usual error text of a key with allowed values: 'must be one of a | b (got …)'."""
    return f"must be one of {' | '.join(m.value for m in choices)} (got {{value!r}})"


def check(rule: Rule, value: object) -> object:
    """`value` as the key holds it (a choice as its enum member), or `Invalid` with the rule's
    error text."""
    def invalid(text: str) -> Invalid:
        return Invalid(text.format(value=value))

    if rule.choices is not None:
        if isinstance(value, str) and value in rule.choices.__members__.values():
            return rule.choices(value)
        raise invalid(rule.error)
    if rule.kind == "bool":
        ok = isinstance(value, bool)
    elif rule.kind == "int":
        ok = not isinstance(value, bool) and isinstance(value, int) \
            and (rule.minimum is None or value >= rule.minimum)
        if ok and rule.maximum is not None and value > rule.maximum:  # type: ignore[operator]
            raise invalid(rule.above or rule.error)
    elif rule.kind == "str":
        ok = isinstance(value, str) and (rule.pattern is None or bool(rule.pattern.match(value)))
    else:
        ok = True
    if not ok:
        raise invalid(rule.error)
    return value


def column_list(value: object, key: str,
                fail: Callable[[str, str], ConfigError]) -> tuple[str, ...] | None:
    """A per-table `columns` / `primary_key` list: None when not given, else 1-63 byte names,
    none twice, none reserved (`_cdc_`), none differing from another only in case."""
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


def partition_list(value: object, key: str, fail: Callable[[str, str], ConfigError], *,
                   mode: TableMode, columns: tuple[str, ...] | None) -> tuple[str, ...] | None:
    """A per-table `partition_by`: the consolidated table's Delta partition columns (a date
    column, say, for a table whose changes concentrate on recent rows). Refused when the
    table has no consolidated table, and when `columns` leaves a partition column out; that
    the column exists and has a type Delta can partition by is checked when the table is
    created (the table stops with the reason otherwise)."""
    cols = column_list(value, key, fail)
    if cols is None:
        return None
    if not mode.writes_consolidated:
        raise fail(key, f"partitions the consolidated table, and mode {str(mode)!r} writes "
                   "none (the change log is append-only: partitioning saves it nothing)")
    if len(cols) > 2:
        raise fail(key, f"lists {len(cols)} columns; use one (or two) coarse columns, such as "
                   "a date: every partition value is a folder of files of its own")
    missing = [c for c in cols if columns is not None and c not in columns]
    if missing:
        raise fail(key, f"column {missing[0]!r} is not captured: add it to 'columns'")
    return cols


def parse_env_value(var: str, kind: str, raw: str, where: str) -> object:
    """An environment variable's text as a value of the key's kind (lists and tables as JSON)."""
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


EnvOverrides = tuple[
    dict[str, object], dict[str, dict[str, object]], dict[str, str], dict[str, dict[str, str]]
]


def env_overrides(environ: Mapping[str, str], *, source_keys: Mapping[str, Rule],
                  engine_keys: Mapping[str, Rule],
                  nested: Mapping[str, Mapping[str, str]] | None = None) -> EnvOverrides:
    """The `CDCENGINE__<SOURCE>__<KEY>` / `CDCENGINE__ENGINE__<KEY>` variables: engine values,
    values per source, and the variable each came from (engine, then per source).

    `nested` names the source keys that are tables whose entries can be set one by one, with
    each entry's kind: `CDCENGINE__SHOP__SSH_TUNNEL__PASSWORD` is entry `password` of table
    `ssh_tunnel`, returned under the dotted key `ssh_tunnel.password` (see `merge_env`), so a
    Kubernetes Secret can supply just the password of a tunnel the config file describes."""
    nested = nested or {}
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
            if key not in engine_keys:
                raise ConfigError(f"environment variable {var}: unknown [engine] key {key!r}; "
                                  f"allowed: {', '.join(engine_keys)}")
            engine[key] = parse_env_value(var, engine_keys[key].kind, environ[var],
                                           f"[engine]: key {key!r}")
            engine_prov[key] = var
            continue
        outer_scope, _, outer = scope.rpartition("__")
        if outer_scope and outer.lower() in nested:
            table, name = outer.lower(), outer_scope.lower()
            if key not in nested[table]:
                raise ConfigError(f"environment variable {var}: unknown {table} key {key!r}; "
                                  f"allowed: {', '.join(nested[table])}")
            dotted = f"{table}.{key}"
            sources.setdefault(name, {})[dotted] = parse_env_value(
                var, nested[table][key], environ[var], f"source {name!r}: key {dotted!r}")
            sources_prov.setdefault(name, {})[dotted] = var
            continue
        name = scope.lower()
        if key not in source_keys or key == "name":
            allowed = ", ".join(k for k in source_keys if k != "name")
            raise ConfigError(f"environment variable {var}: unknown source key {key!r}; "
                              f"allowed: {allowed}")
        value = parse_env_value(var, source_keys[key].kind, environ[var],
                                 f"source {name!r}: key {key!r}")
        sources.setdefault(name, {})[key] = value
        sources_prov.setdefault(name, {})[key] = var
    return engine, sources, engine_prov, sources_prov


def merge_env(raw: dict[str, object], values: Mapping[str, object]) -> None:
    """Apply one source's environment values to its file values, in place: a dotted key
    (`ssh_tunnel.password`) sets one entry of that table, keeping the file's other entries."""
    for key, value in values.items():
        table, dot, entry = key.partition(".")
        if not dot:
            raw[key] = value
            continue
        current = raw.get(table)
        raw[table] = {**(current if isinstance(current, Mapping) else {}), entry: value}


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
