"""`cdcengine_postgres.connection`, `.errors` and `.types` against a real server (fixture `db`).

What users and operators rely on: every connection renders values the same way (SPEC §6 GUCs,
whatever the dsn says), a replication connection speaks the walsender protocol, every failure to
connect is a typed `CDCError` with the right reason and retry flag, and no message, repr or
chained exception shows the password. Connections go to the test server or to 127.0.0.1 only.
"""

from __future__ import annotations

import socket
import traceback
from urllib.parse import quote

import psycopg
import pyarrow as pa
import pytest
from pgutil import ScratchDatabase, unique_name
from psycopg import sql

from cdcengine.errors import CDCError, PermissionDenied, Reason, SourceUnreachable, iter_chain
from cdcengine_postgres.connection import PINNED_SETTINGS, connect, quote_ident, server_version
from cdcengine_postgres.errors import translate_errors
from cdcengine_postgres.types.mapping import arrow_type, delta_type_name, load_types

EXPECTED = {name.lower(): value for name, value in PINNED_SETTINGS}


def _with_param(dsn: str, key: str, value: str) -> str:
    return dsn + ("&" if "?" in dsn else "?") + f"{key}={quote(value, safe='')}"


def _show(conn: psycopg.Connection[tuple[object, ...]], name: str) -> str:
    row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
    assert row is not None
    return str(row[0])


def _show_simple(conn: psycopg.Connection[tuple[object, ...]], name: str) -> str:
    """SHOW on a walsender: simple protocol only, so the statement carries no parameters."""
    query = sql.SQL("SHOW {}").format(sql.Identifier(name)).as_string(conn)
    with conn.cursor() as cur:
        cur.execute(query.encode())
        row = cur.fetchone()
    assert row is not None
    return str(row[0])


def _assert_pinned(show: dict[str, str]) -> None:
    assert show["timezone"] == "UTC"
    assert show["datestyle"].startswith("ISO")
    assert show["intervalstyle"] == "iso_8601"
    assert show["bytea_output"] == "hex"
    assert show["extra_float_digits"] == "3"


def _closed_local_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _all_texts(err: BaseException) -> list[str]:
    """Everything a user, a log line or an error reporter could print of `err`."""
    texts = [str(err), repr(err)]
    if isinstance(err, CDCError):
        texts += [err.message, err.fix, str(err.to_dict())]
    for cur in iter_chain(err):
        texts += [str(cur), repr(cur)]
        pgconn = getattr(cur, "pgconn", None)
        if pgconn is not None:
            texts.append(repr(pgconn))
    texts.append("".join(traceback.format_exception(err)))
    return texts


def test_session_settings_are_pinned(db: ScratchDatabase) -> None:
    with connect(db.dsn) as conn:
        show = {name: _show(conn, name) for name in EXPECTED}
        assert conn.autocommit
        assert _show(conn, "application_name") == "cdcengine"
        assert server_version(conn) == db.server.version
    _assert_pinned(show)


def test_settings_pinned_over_the_dsns_options(db: ScratchDatabase) -> None:
    db.execute("CREATE SCHEMA x")
    dsn = _with_param(db.dsn, "options", "-c search_path=x -c TimeZone=America/New_York")
    with connect(dsn) as conn:
        assert _show(conn, "search_path") == "x"  # the user's own option is kept ...
        show = {name: _show(conn, name) for name in EXPECTED}
        row = conn.execute("SELECT '2024-01-02 03:04:05+00'::timestamptz::text").fetchone()
    _assert_pinned(show)  # ... and ours win over the user's TimeZone
    assert row == ("2024-01-02 03:04:05+00",)


def test_dsn_application_name_wins(db: ScratchDatabase) -> None:
    dsn = _with_param(db.dsn, "application_name", "mine")
    with connect(dsn, application_name="cdcengine") as conn:
        assert _show(conn, "application_name") == "mine"


def test_replication_connection(db: ScratchDatabase) -> None:
    dsn = _with_param(db.dsn, "options", "-c search_path=x")
    with connect(dsn, replication=True) as conn:
        assert conn.autocommit
        show = {name: _show_simple(conn, name) for name in EXPECTED}
        with conn.cursor() as cur:
            cur.execute(b"IDENTIFY_SYSTEM")
            row = cur.fetchone()
    _assert_pinned(show)
    assert row is not None
    systemid, timeline, xlogpos, dbname = row
    assert int(systemid) > 0
    assert int(timeline) >= 1
    assert "/" in str(xlogpos)
    assert dbname == db.name


def test_replication_connection_refuses_manual_transactions(db: ScratchDatabase) -> None:
    with pytest.raises(ValueError, match="autocommit"):
        connect(db.dsn, replication=True, autocommit=False)


def test_replication_connection_without_replication_role(db: ScratchDatabase) -> None:
    _, dsn = db.create_role(replication=False)
    with pytest.raises(PermissionDenied) as info:
        connect(dsn, replication=True)
    assert info.value.reason is Reason.PERMISSION_DENIED
    assert not info.value.retryable


def test_wrong_password_is_auth_failed(db: ScratchDatabase) -> None:
    if db.server.host.startswith("/"):
        pytest.skip("the test server is reached over a unix socket; its auth method is unknown")
    role, _ = db.create_role(password="Right-Password-1")
    wrong = "Wr0ng-Secret-pw"
    dsn = db.server.dsn(db.name, user=role, password=wrong)
    with pytest.raises(SourceUnreachable) as info:
        connect(dsn)
    err = info.value
    assert err.reason is Reason.AUTH_FAILED
    assert not err.retryable
    assert err.__context__ is None
    assert isinstance(err.__cause__, psycopg.OperationalError)
    assert err.__cause__.pgconn is None  # the failed connection's repr would show the password
    for text in _all_texts(err):
        assert wrong not in text


def test_connection_refused_is_retryable(db: ScratchDatabase) -> None:
    port = _closed_local_port()
    dsn = f"postgresql://someone:Refused-Secret-9@127.0.0.1:{port}/{db.name}"
    with pytest.raises(SourceUnreachable) as info:
        connect(dsn, connect_timeout=5)
    err = info.value
    assert err.reason is Reason.CONNECTION_FAILED
    assert err.retryable
    for text in _all_texts(err):
        assert "Refused-Secret-9" not in text


@pytest.mark.parametrize(
    ("dsn", "secret"),
    [
        ("postgresql://u:p%zzsecret@127.0.0.1:1/db", "zzsecret"),
        ("postgresql://u:zzsecret@[::1/db", "zzsecret"),
        ("host=127.0.0.1 port=1 password=zzsecret bogus_option=1", "zzsecret"),
        ("host=127.0.0.1 port=1 password=zzsecret sslmode=zzsecret", "zzsecret"),
    ],
    ids=["percent_token", "ipv6_uri", "unknown_option", "option_value"],
)
def test_malformed_dsn_is_dsn_invalid_without_the_password(dsn: str, secret: str) -> None:
    with pytest.raises(SourceUnreachable) as info:
        connect(dsn, connect_timeout=2)
    err = info.value
    assert err.reason is Reason.DSN_INVALID
    assert not err.retryable
    assert err.message == "The dsn could not be parsed."
    assert err.__context__ is None
    assert isinstance(err.__cause__, psycopg.Error)
    for text in _all_texts(err):
        assert secret not in text


def test_missing_database(db: ScratchDatabase) -> None:
    dsn = db.server.dsn(unique_name("nosuch"))
    with pytest.raises(SourceUnreachable) as info:
        connect(dsn)
    assert info.value.reason is Reason.DATABASE_MISSING
    assert not info.value.retryable


def test_terminated_session_is_connection_failed(db: ScratchDatabase) -> None:
    # closed, not left by `with`: psycopg's __exit__ may try a COMMIT on the dead connection
    conn = connect(db.dsn)
    try:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        db.execute("SELECT pg_terminate_backend(%s)", [row[0]])
        with pytest.raises(CDCError) as info, translate_errors(context="polling"):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    assert info.value.reason is Reason.CONNECTION_FAILED
    assert info.value.retryable
    assert info.value.message.startswith("polling: ")


def test_server_errors_are_classified(db: ScratchDatabase) -> None:
    with connect(db.dsn) as conn:
        with pytest.raises(CDCError) as missing, translate_errors():
            conn.execute("SELECT pg_drop_replication_slot('no_such_slot')")
        with pytest.raises(CDCError) as unknown, translate_errors(context="reading"):
            conn.execute("SELECT * FROM no_such_table")
    assert missing.value.reason is Reason.SLOT_MISSING
    assert unknown.value.reason is Reason.UNKNOWN
    assert unknown.value.message == "reading: UndefinedTable 42P01"


def test_load_types_round_trip(db: ScratchDatabase) -> None:
    db.execute(
        "CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');"
        "CREATE DOMAIN bigid AS int8;"
        "CREATE DOMAIN price AS numeric(12,2);"
        "CREATE TABLE t (a numeric(12,2), b int4[], c mood, d bigid, e timestamptz,"
        " f numeric, g numeric(5,-2), h price, i numeric(12,2)[], j timestamp, k text,"
        " l mood[], m bytea)"
    )
    with connect(db.dsn) as conn:
        rows = conn.execute(
            "SELECT attname::text, atttypid::int8, atttypmod FROM pg_attribute"
            " WHERE attrelid = 't'::regclass AND attnum > 0 ORDER BY attnum"
        ).fetchall()
        types = load_types(conn, [int(oid) for _, oid, _ in rows])
    assert set(types) == {int(oid) for _, oid, _ in rows}
    got = {name: arrow_type(types[int(oid)].with_typmod(int(mod))) for name, oid, mod in rows}
    assert got == {
        "a": pa.decimal128(12, 2),
        "b": pa.list_(pa.int32()),
        "c": pa.string(),
        "d": pa.int64(),
        "e": pa.timestamp("us", tz="UTC"),
        "f": pa.string(),
        "g": pa.string(),
        "h": pa.decimal128(12, 2),
        "i": pa.list_(pa.decimal128(12, 2)),
        "j": pa.timestamp("us"),
        "k": pa.string(),
        "l": pa.list_(pa.string()),
        "m": pa.binary(),
    }
    by_name = {name: types[int(oid)] for name, oid, _ in rows}
    assert by_name["c"].typtype == "e"
    assert by_name["c"].name == "mood"
    assert by_name["d"].typtype == "d"
    assert by_name["d"].base is not None
    assert by_name["d"].base.name == "int8"
    assert by_name["h"].base is not None
    assert by_name["h"].base.typmod != -1  # the domain's own numeric(12,2)
    assert by_name["b"].element is not None
    assert by_name["b"].element.name == "int4"
    assert by_name["l"].element == by_name["c"]
    assert delta_type_name(got["i"]) == "array<decimal(12,2)>"


def test_load_types_ignores_unknown_oids(db: ScratchDatabase) -> None:
    with connect(db.dsn) as conn:
        types = load_types(conn, [23, 4_000_000_000, 23])
    assert list(types) == [23]
    assert types[23].name == "int4"


def test_quote_ident() -> None:
    assert quote_ident("cdc") == '"cdc"'
    assert quote_ident('we"ird') == '"we""ird"'


@pytest.mark.slow
def test_no_pg_hba_entry_is_an_access_problem_not_ssl(make_cluster) -> None:  # type: ignore[no-untyped-def]
    """A server whose pg_hba.conf has no line for the client: PostgreSQL 14+ says "..., no
    encryption", which once made the engine advise adding sslmode=require (issue 13). The
    answer names pg_hba.conf; with sslmode=require against this server (no SSL) it says that
    the server does not support SSL instead of advising the sslmode that is already there."""
    cluster = make_cluster()
    (cluster.data_dir / "pg_hba.conf").write_text("local all all trust\n")
    cluster.stop()
    cluster.start()
    dsn = cluster.dsn("postgres")
    with pytest.raises(SourceUnreachable) as info:
        connect(dsn)
    err = info.value
    assert err.reason is Reason.AUTH_FAILED
    assert "pg_hba.conf" in err.message and "without SSL" in err.message
    assert "pg_hba.conf" in err.fix and "sslmode" not in err.fix
    assert cluster.password not in " ".join(_all_texts(err))
    with pytest.raises(SourceUnreachable) as info:
        connect(_with_param(dsn, "sslmode", "require"))
    assert info.value.reason is Reason.SSL_REQUIRED
    assert "does not support SSL" in info.value.message
    assert "Add sslmode=require" not in info.value.fix
