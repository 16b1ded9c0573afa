"""The `cdcengine` console command end to end (SPEC §2-§3), as a user runs it.

Every test runs the real command in a subprocess (`cli_util.run_cli`: ``python -m cdcengine
--config PATH ...``, working directory = the test's tmp_path, no ``CDCENGINE__`` variables)
against the session's PostgreSQL server, with a cdcengine.toml whose state store is a sqlite
file in tmp_path and whose slot and publication names derive from the test's database name, so
tests never share a slot or a publication.

What users and scripts rely on: the exit codes (0 ok, 1 a stated failure, 2 usage/config), one
✅/⚠️/❌ line per check with its fix, the `status --json` shape, idempotent enable/disable,
settings that say what changed and show their origin, config errors that name the file, line and
key, and no password -- nor a fragment of one -- in any output, with or without ``-v``, in
console or JSON log format. Unreachable sources use a closed port on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from cli_util import (
    LSN,
    CliResult,
    assert_no_secret,
    closed_port,
    run_cli,
    run_cli_many,
    write_config,
)
from pgutil import ScratchDatabase

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

SOURCE_STATES = {"disabled", "snapshotting", "streaming", "warning", "error", "paused", "broken"}
SOURCE_KEYS = {"name", "state", "broken", "slot", "publication", "settings", "tables"}
SLOT_KEYS = {"name", "exists", "active", "confirmed_flush_lsn", "restart_lsn", "lag_bytes",
             "retained_wal_bytes", "wal_status"}
PUBLICATION_KEYS = {"name", "exists", "tables"}
SETTINGS_KEYS = {"auto_drop_slot", "lag_warning_threshold_mb", "lag_critical_threshold_mb",
                 "origin"}
TUNING_KEYS = {"auto_drop_slot", "lag_warning_threshold_mb", "lag_critical_threshold_mb"}
TABLE_KEYS = {"name", "mode", "state", "applied_lsn", "rows"}

ORDERS_DDL = "CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2), note text)"


def _source(db: ScratchDatabase, dsn: str, **overrides: object) -> dict[str, object]:
    """Source `shop` on `db`, its slot and publication named after the database."""
    return {
        "name": "shop",
        "dsn": dsn,
        "tables": ["public.orders"],
        "destination": "./lake",
        "slot_name": f"cdc_{db.name}",
        "publication_name": f"cdcpub_{db.name}",
    } | overrides


def _slots(db: ScratchDatabase) -> list[tuple[Any, ...]]:
    """(slot_name, plugin, slot_type, temporary, active, confirmed_flush_lsn, restart_lsn,
    wal_status) of every slot of the test's database."""
    return db.execute(
        "SELECT slot_name, plugin, slot_type, temporary, active, confirmed_flush_lsn::text,"
        " restart_lsn::text, wal_status FROM pg_replication_slots WHERE database = %s"
        " ORDER BY slot_name",
        [db.name],
    )


def _publications(db: ScratchDatabase) -> dict[str, list[str]]:
    """Every publication of the test's database with its tables."""
    pubs: dict[str, list[str]] = {name: [] for (name,) in db.execute(
        "SELECT pubname FROM pg_publication")}
    for pub, schema, table in db.execute(
        "SELECT pubname, schemaname, tablename FROM pg_publication_tables"
        " ORDER BY pubname, schemaname, tablename"
    ):
        pubs[pub].append(f"{schema}.{table}")
    return pubs


def _summary(result: CliResult) -> tuple[int, int]:
    """(checks, failed) from the "N checks: F failed, W warnings" line of `check`."""
    m = re.search(r"^  (\d+) checks: (\d+) failed, \d+ warnings$", result.stdout, re.MULTILINE)
    assert m, f"no summary line\n{result}"
    return int(m.group(1)), int(m.group(2))


def _only(doc: dict[str, Any]) -> dict[str, Any]:
    assert set(doc) >= {"sources"}, doc
    assert len(doc["sources"]) == 1, doc
    source: dict[str, Any] = doc["sources"][0]
    return source


# ---- the happy path ------------------------------------------------------------------------


def test_check_enable_status_settings_disable(db: ScratchDatabase, tmp_path: Path) -> None:
    db.execute(ORDERS_DDL)
    password = "Life-Hush-3141"
    _, dsn = db.create_role(password=password, superuser=True)
    slot, pub = f"cdc_{db.name}", f"cdcpub_{db.name}"
    config = write_config(tmp_path, [_source(db, dsn, lag_critical_threshold_mb=3000)])
    results: list[CliResult] = []

    def cli(*args: str) -> CliResult:
        results.append(run_cli(config, *args))
        return results[-1]

    # check: one ✅ line per check, nothing changed on the server
    check = cli("check")
    assert check.returncode == EXIT_OK, check
    checks = check.checks()
    assert checks, check
    assert [c for c in checks if c["symbol"] != "✅"] == [], check
    assert _summary(check) == (len(checks), 0), check
    names = {c["name"] for c in checks}
    assert {"wal_level", "replication_privilege", "replication_slots", "wal_senders", "slot",
            "publication", "primary_key", "replica_identity"} <= names, check
    assert {c["table"] for c in checks if c["table"]} == {"public.orders"}, check
    assert "fix:" not in check.stdout, check
    assert _slots(db) == [] and _publications(db) == {}

    # enable: slot + publication exist on the server
    enable = cli("enable")
    assert enable.returncode == EXIT_OK, enable
    assert "enabled" in enable.stdout and "already" not in enable.stdout, enable
    assert slot in enable.stdout and pub in enable.stdout, enable
    slots = _slots(db)
    assert [(s[0], s[1], s[2], s[3]) for s in slots] == [(slot, "pgoutput", "logical", False)]
    assert _publications(db) == {pub: ["public.orders"]}

    # status, text
    status = cli("status")
    assert status.returncode == EXIT_OK, status
    assert re.search(r"^shop: \w+ \(enabled, managed\)", status.stdout, re.MULTILINE), status
    assert f"slot {slot}: inactive" in status.stdout, status
    assert f"publication {pub}: 1 table(s)" in status.stdout, status
    assert re.search(r"^\s+public\.orders\s+consolidated\s+pending\b", status.stdout,
                     re.MULTILINE), status
    assert "***" in status.stdout, status  # the dsn is shown masked

    # status --json: SPEC §3 shape, values matching the server
    st = cli("status", "--json")
    assert st.returncode == EXIT_OK, st
    src = _only(st.json())
    assert SOURCE_KEYS <= set(src), src
    assert src["name"] == "shop"
    assert src["state"] in SOURCE_STATES - {"disabled", "broken", "paused", "error"}, src
    assert src["broken"] is None
    s = src["slot"]
    assert SLOT_KEYS <= set(s), s
    (_, _, _, _, pg_active, pg_confirmed, pg_restart, pg_wal_status) = _slots(db)[0]
    assert (s["name"], s["exists"], s["active"]) == (slot, True, False) and not pg_active
    assert LSN.match(s["confirmed_flush_lsn"]) and s["confirmed_flush_lsn"] == pg_confirmed, s
    assert LSN.match(s["restart_lsn"]) and s["restart_lsn"] == pg_restart, s
    for key in ("lag_bytes", "retained_wal_bytes"):
        assert isinstance(s[key], int) and not isinstance(s[key], bool) and s[key] >= 0, s
    assert s["wal_status"] == pg_wal_status, s
    p = src["publication"]
    assert PUBLICATION_KEYS <= set(p), p
    assert (p["name"], p["exists"], p["tables"]) == (pub, True, ["public.orders"])
    se = src["settings"]
    assert SETTINGS_KEYS <= set(se), se
    assert (se["auto_drop_slot"], se["lag_warning_threshold_mb"],
            se["lag_critical_threshold_mb"]) == (True, 512, 3000), se
    assert set(se["origin"]) == TUNING_KEYS, se
    assert se["origin"]["lag_warning_threshold_mb"] == "default", se
    assert se["origin"]["auto_drop_slot"] == "default", se
    assert config.name in se["origin"]["lag_critical_threshold_mb"], se  # set in the file
    [table] = src["tables"]
    assert TABLE_KEYS <= set(table), table
    assert (table["name"], table["mode"], table["state"], table["applied_lsn"]) == (
        "public.orders", "consolidated", "pending", None), table
    assert table["rows"] is None or isinstance(table["rows"], int), table

    # enable again: nothing recreated
    again = cli("enable")
    assert again.returncode == EXIT_OK, again
    assert "already enabled" in again.stdout, again
    assert [(r[0], r[5], r[6]) for r in _slots(db)] == [(slot, pg_confirmed, pg_restart)]
    assert _publications(db) == {pub: ["public.orders"]}

    # settings: the change, then "unchanged", then a refused value
    changed = cli("settings", "--source", "shop", "--lag-warning-mb", "100")
    assert changed.returncode == EXIT_OK, changed
    assert re.search(r"lag_warning_threshold_mb\b.*\b100\b", changed.stdout), changed
    assert "unchanged" not in changed.stdout, changed
    same = cli("settings", "--source", "shop", "--lag-warning-mb", "100")
    assert same.returncode == EXIT_OK, same
    assert "unchanged" in same.stdout and "lag_warning_threshold_mb" not in same.stdout, same
    refused = cli("settings", "--source", "shop", "--lag-warning-mb", "5000")
    assert refused.returncode != EXIT_OK, refused
    assert "5000" in refused.output and "3000" in refused.output, refused
    assert "critical" in refused.output and "warning" in refused.output, refused
    assert "Traceback" not in refused.stderr, refused
    assert "5000" not in refused.stdout, refused

    # status shows the override's origin (and the refused value changed nothing)
    status = cli("status")
    assert status.returncode == EXIT_OK, status
    assert "warning 100 MB (settings" in status.stdout, status
    assert re.search(r"critical 3000 MB \([^)]*cdcengine\.toml\)", status.stdout), status
    se = _only(cli("status", "--json").json())["settings"]
    assert (se["lag_warning_threshold_mb"], se["lag_critical_threshold_mb"]) == (100, 3000), se
    assert se["origin"]["lag_warning_threshold_mb"].startswith("settings"), se
    assert config.name in se["origin"]["lag_critical_threshold_mb"], se

    # disable: usage error without a target, then drops both, then has nothing to drop
    usage = cli("disable")
    assert usage.returncode == EXIT_USAGE, usage
    assert "--source" in usage.stderr and "--all" in usage.stderr, usage
    assert [r[0] for r in _slots(db)] == [slot] and list(_publications(db)) == [pub]
    disable = cli("disable", "--source", "shop")
    assert disable.returncode == EXIT_OK, disable
    assert "dropped" in disable.stdout and slot in disable.stdout and pub in disable.stdout
    assert _slots(db) == [] and _publications(db) == {}
    twice = cli("disable", "--source", "shop")
    assert twice.returncode == EXIT_OK, twice
    assert "nothing to drop" in twice.stdout, twice
    after = _only(cli("status", "--json").json())
    assert after["state"] == "disabled", after
    assert after["slot"]["exists"] is False and after["publication"]["exists"] is False, after

    assert_no_secret(results, [password, "Life-Hush", "Hush-3141"])


def test_tables_json_lists_columns_and_delta_types(db: ScratchDatabase, tmp_path: Path) -> None:
    db.execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, qty int4, total numeric(12,2), note text,"
        " paid boolean, raw bytea, tags text[], day date, placed_at timestamptz,"
        " local_at timestamp);"
        " CREATE TABLE audit_log (a int, b text)"
    )
    config = write_config(tmp_path, [_source(db, db.dsn)])
    result = run_cli(config, "tables", "--json")
    assert result.returncode == EXIT_OK, result
    src = _only(result.json())
    assert src["source"] == "shop", src
    tables = {t["qualified"]: t for t in src["tables"]}
    assert set(tables) == {"public.orders", "public.audit_log"}, list(tables)

    orders = tables["public.orders"]
    assert (orders["configured"], orders["capturable"], orders["reasons"]) == (True, True, [])
    assert orders["primary_key"] == ["id"]
    assert [(c["name"], c["delta_type"]) for c in orders["columns"]] == [
        ("id", "long"), ("qty", "integer"), ("total", "decimal(12,2)"), ("note", "string"),
        ("paid", "boolean"), ("raw", "binary"), ("tags", "array<string>"), ("day", "date"),
        ("placed_at", "timestamp"), ("local_at", "timestamp_ntz"),
    ]
    assert [c["name"] for c in orders["columns"] if c["primary_key"]] == ["id"]
    assert all(c["captured"] for c in orders["columns"]), orders

    audit = tables["public.audit_log"]
    assert (audit["configured"], audit["capturable"]) == (False, False), audit
    assert any("REPLICA IDENTITY" in r for r in audit["reasons"]), audit

    text = run_cli(config, "tables")
    assert text.returncode == EXIT_OK, text
    assert re.search(r"^ \* public\.orders\b.*\bcapturable", text.stdout, re.MULTILINE), text
    assert re.search(r"^   public\.audit_log\b.*NOT capturable", text.stdout, re.MULTILINE), text
    assert re.search(r"^\s+total\s+numeric\(12,2\)\s+-> decimal\(12,2\)", text.stdout,
                     re.MULTILINE), text


# ---- checks that fail ----------------------------------------------------------------------


def test_check_fails_on_missing_primary_key_and_missing_table(
    db: ScratchDatabase, tmp_path: Path
) -> None:
    db.execute(f"{ORDERS_DDL}; CREATE TABLE audit_log (a int, b text)")
    config = write_config(tmp_path, [_source(
        db, db.dsn, tables=["public.orders", "public.audit_log", "public.missing"])])

    check = run_cli(config, "check")
    assert check.returncode == EXIT_FAILED, check
    checks = check.checks()
    failed = [c for c in checks if c["symbol"] == "❌"]
    assert {c["table"] for c in failed} == {"public.audit_log", "public.missing"}, check
    assert ("table_exists", "public.missing") in {(c["name"], c["table"]) for c in failed}
    no_key = [c for c in failed if c["table"] == "public.audit_log"]
    assert {c["name"] for c in no_key} & {"primary_key", "replica_identity"}, check
    assert any("REPLICA IDENTITY" in (c["fix"] or "") for c in no_key), check
    assert all(c["fix"] for c in failed), check
    assert any(c["table"] == "public.orders" and c["symbol"] == "✅" for c in checks), check
    assert _summary(check) == (len(checks), len(failed)), check

    as_json = run_cli(config, "check", "--json")
    assert as_json.returncode == EXIT_FAILED, as_json
    jchecks = _only(as_json.json())["checks"]
    errors = {(c["name"], c["table"]) for c in jchecks if c["severity"] == "error"}
    assert errors == {(c["name"], c["table"]) for c in failed}, as_json
    assert all(c["ok"] is (c["severity"] != "error") for c in jchecks), as_json

    # enable re-runs the checks and changes nothing
    enable = run_cli(config, "enable")
    assert enable.returncode == EXIT_FAILED, enable
    assert "prerequisites_failed" in enable.stdout and "table_exists" in enable.stdout, enable
    assert _slots(db) == [] and _publications(db) == {}


# ---- configuration and usage errors (no server needed) -------------------------------------


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    secret = "Toml-Hush-1618"
    config = tmp_path / "cdcengine.toml"
    config.write_text(
        "[engine]\n"
        f'state = "sqlite:///{tmp_path}/state.db"\n'
        "\n"
        "[[source]]\n"
        'name = "shop"\n'
        f'dsn = "postgresql://cdc_user:{secret}@127.0.0.1:{closed_port()}/shop"\n'
        "tables = [public.orders]\n"  # line 7: an unquoted string
        'destination = "./lake"\n',
        encoding="utf-8",
    )
    result = run_cli(config, "check")
    assert result.returncode == EXIT_USAGE, result
    assert result.stdout == "", result
    assert str(config) in result.stderr, result
    assert re.search(r"\bline 7\b", result.stderr), result
    assert "Traceback" not in result.stderr, result
    assert not (tmp_path / "state.db").exists()
    assert_no_secret([result], [secret, "Toml-Hush", "Hush-1618"])


def test_unknown_source_lists_configured_names(tmp_path: Path) -> None:
    port = closed_port()
    config = write_config(tmp_path, [
        {"name": name, "dsn": f"postgresql://cdc_user@127.0.0.1:{port}/{name}",
         "tables": ["public.orders"], "destination": f"./lake/{name}"}
        for name in ("shop", "crm")
    ])
    for args in (("check",), ("status", "--json"), ("enable",), ("tables",),
                 ("disable", "--source", "nope"),
                 ("settings", "--source", "nope", "--lag-warning-mb", "10")):
        if "--source" not in args:
            args = (*args, "--source", "nope")
        result = run_cli(config, *args)
        assert result.returncode == EXIT_USAGE, result
        assert result.stdout == "", result
        assert "'nope'" in result.stderr, result
        assert "shop" in result.stderr and "crm" in result.stderr, result
        assert "Traceback" not in result.stderr, result


@pytest.mark.parametrize(
    ("source", "mentions"),
    [
        pytest.param({"tables": ["public.orders", "a.b.c"]}, ["'tables'", "a.b.c"],
                     id="three-part-name"),
        pytest.param({"tables": ["orders", "orders_cdc"], "table_mode": "both"},
                     ["'tables'", "public.orders", "public.orders_cdc", "orders_cdc"],
                     id="both-mode-collides-with-table"),
        pytest.param({"tables": ["orders", "orders_cdc"],
                      "table": {"public.orders": {"mode": "both"}}},
                     ["'tables'", "public.orders", "public.orders_cdc"],
                     id="per-table-both-collides-with-table"),
    ],
)
def test_bad_tables_are_refused_at_config_load(
    tmp_path: Path, source: dict[str, object], mentions: list[str]
) -> None:
    secret = "Load-Hush-2718"
    dsn = f"postgresql://cdc_user:{secret}@127.0.0.1:{closed_port()}/shop"
    config = write_config(tmp_path, [{"name": "shop", "dsn": dsn, "destination": "./lake"}
                                     | source])
    result = run_cli(config, "check")
    assert result.returncode == EXIT_USAGE, result
    assert result.stdout == "", result
    assert str(config) in result.stderr and "'shop'" in result.stderr, result
    for text in mentions:
        assert text in result.stderr, (text, result)
    assert "Traceback" not in result.stderr, result
    assert not (tmp_path / "state.db").exists()  # refused before anything ran
    assert_no_secret([result], [secret, "Load-Hush", "Hush-2718"])


# ---- sources that cannot be used: reason, exit code, and never the password ----------------

# reason -> whether it is retryable; every command must fail with it (exit 1).
DSN_CASES = {
    "connection_failed": True,
    "auth_failed": False,
    "dsn_invalid": False,
}
PLAIN_COMMANDS = [("check",), ("status",), ("enable",)]
VERBOSE_COMMANDS = [("-v", "check"), ("-v", "check", "--json"), ("-v", "status"),
                    ("-v", "status", "--json"), ("-v", "enable"), ("-v", "tables"),
                    ("-v", "disable", "--source", "shop")]


def _bad_dsn(case: str, db: ScratchDatabase) -> tuple[str, list[str]]:
    """The dsn for a case and the secrets (with distinctive fragments) that must not show."""
    if case == "connection_failed":
        secret = "Unreach-Hush-4242"
        dsn = f"postgresql://cdc_user:{secret}@127.0.0.1:{closed_port()}/{db.name}"
        return dsn, [secret, "Unreach", "Hush-4242"]
    if case == "auth_failed":
        right, wrong = "Right-Hush-8080", "Wr0ng-Hush-5150"
        role, _ = db.create_role(password=right, superuser=True)
        return db.server.dsn(db.name, user=role, password=wrong), [
            wrong, "Wr0ng", "Hush-5150", right, "Hush-8080"]
    assert case == "dsn_invalid"
    secret = "Sekr%ZZet-7731"
    dsn = f"postgresql://cdc_user:{secret}@127.0.0.1:{db.server.port}/{db.name}"
    return dsn, [secret, "Sekr", "ZZet-7731", "%ZZet", "ZZet"]


def _assert_fails_with(result: CliResult, reason: str, retryable: bool) -> None:
    assert result.returncode == EXIT_FAILED, result
    assert "Traceback" not in result.stderr, result
    args = [a for a in result.args if a != "-v"]
    if "--json" in args:
        doc = result.json()
        [entry] = doc["sources"]
        assert entry["error"]["reason"] == reason, result
        assert entry["error"]["retryable"] is retryable, result
        if args[0] == "status":
            assert (entry["name"], entry["state"]) == ("shop", "unreachable"), result
    else:
        assert f"❌ {reason}:" in result.stdout, result
        assert "fix:" in result.stdout, result
    if args[0] in ("check", "tables") and "--json" not in args:
        assert re.search(r"^source shop \(postgresql://[^:@/]+:\*\*\*@", result.stdout,
                         re.MULTILINE), result


@pytest.mark.parametrize("case", list(DSN_CASES))
def test_unusable_dsn_fails_with_reason_and_never_shows_the_password(
    case: str, db: ScratchDatabase, tmp_path: Path
) -> None:
    db.execute(ORDERS_DDL)
    dsn, secrets = _bad_dsn(case, db)
    # one config (hence state store) per command, so they can run side by side
    results = run_cli_many([(write_config(tmp_path / f"run{i}", [_source(db, dsn)]), args)
                            for i, args in enumerate(PLAIN_COMMANDS + VERBOSE_COMMANDS)])
    for result in results:
        _assert_fails_with(result, case, DSN_CASES[case])
    assert _slots(db) == [] and _publications(db) == {}
    assert_no_secret(results, secrets)


@pytest.mark.parametrize(
    "secret",
    [
        "Sekr@t-Hush-4711",
        "Sekr?t-Hush-4712",
        "Sekr/t-Hush-4713",
        "Sekr:t-Hush-4714",
        "Sekr#t-Hush-4715",
    ],
)
def test_password_with_unencoded_special_character_is_never_shown(
    secret: str, db: ScratchDatabase, tmp_path: Path
) -> None:
    # A common mistake: a special character in the password not percent-encoded. libpq then
    # splits the URL its own way; hostaddr keeps any attempt on the closed loopback port (no
    # name lookup). Whatever libpq makes of it, no part of the password may be printed.
    dsn = (f"postgresql://cdc_user:{secret}@127.0.0.1:{closed_port()}/{db.name}"
           "?hostaddr=127.0.0.1")
    head, tail = secret.split("-", 1)[0], secret.split("-", 1)[1]
    jobs = [(write_config(tmp_path / f"run{i}", [_source(db, dsn)]), args)
            for i, args in enumerate([("-v", "check"), ("-v", "tables")])]  # both print the dsn
    results = run_cli_many(jobs)
    for result in results:
        # a raw '/' ends the URL's authority before any '@': no longer a dsn at all, refused
        # at config (exit 2) without showing it; the others reach libpq and fail to connect
        expected = EXIT_USAGE if "/" in secret else EXIT_FAILED
        assert result.returncode == expected, result
        assert "Traceback" not in result.stderr, result
    assert_no_secret(results, [secret, secret[4:], head, tail])


# ---- JSON log format -----------------------------------------------------------------------


def test_json_log_format_writes_only_json_lines(db: ScratchDatabase, tmp_path: Path) -> None:
    db.execute(ORDERS_DDL)
    password, bad = "Json-Hush-6626", "Bad%QQpw-9090"
    _, dsn = db.create_role(password=password, superuser=True)
    crm = {"name": "crm", "dsn": f"postgresql://cdc_user:{bad}@127.0.0.1:{db.server.port}/crm",
           "tables": ["public.orders"], "destination": "./lake/crm",
           "slot_name": f"cdc_crm_{db.name}", "publication_name": f"cdcpub_crm_{db.name}"}
    config = write_config(tmp_path, [_source(db, dsn), crm], engine={"log_format": "json"})
    runs = {
        ("-v", "check"): EXIT_FAILED,  # crm's dsn cannot be parsed
        ("-v", "enable", "--source", "shop"): EXIT_OK,
        ("-v", "status", "--json"): EXIT_FAILED,  # crm unreachable
        ("-v", "settings", "--source", "shop", "--lag-warning-mb", "100"): EXIT_OK,
        ("-v", "disable", "--source", "shop"): EXIT_OK,
        ("-v", "disable", "--source", "crm"): EXIT_FAILED,
    }
    results = [run_cli(config, *args) for args in runs]
    events: list[str] = []
    for result, expected in zip(results, runs.values(), strict=True):
        assert result.returncode == expected, result
        for line in result.stderr.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                pytest.fail(f"not a JSON line on stderr: {line!r}\n{result}")
            assert isinstance(record, dict), line
            assert {"event", "level", "timestamp"} <= set(record), line
            events.append(record["event"])
    assert {"cdc_enabled", "settings_updated", "cdc_disabled"} <= set(events), events

    check = results[0]
    assert "❌ dsn_invalid:" in check.stdout and "✅ wal_level:" in check.stdout, check
    status = {s["name"]: s for s in results[2].json()["sources"]}
    assert status["shop"]["state"] != "disabled", status
    assert status["crm"]["error"]["reason"] == "dsn_invalid", status
    assert_no_secret(results, [password, "Json-Hush", "Hush-6626", bad, "QQpw", "%QQpw"])
