"""Classification of psycopg exceptions into `CDCError`s (no server needed).

The exceptions are real psycopg objects built by hand with the texts PostgreSQL 15 and libpq send,
or produced by libpq itself (`conninfo_to_dict` on a malformed dsn).
"""

from __future__ import annotations

import pickle

import psycopg
import pytest
from psycopg import errors as pge
from psycopg.conninfo import conninfo_to_dict

from cdcengine.errors import (
    POLICY,
    CDCError,
    PermissionDenied,
    Reason,
    ReplicationResourceError,
    SourceUnreachable,
    iter_chain,
)
from cdcengine_postgres.errors import (
    classify_postgres_error,
    error_class_for,
    postgres_error,
    translate_errors,
)

CONN = 'connection failed: connection to server at "127.0.0.1", port 5432 failed: '

MATRIX: list[tuple[str, BaseException, Reason]] = [
    # --- by class / SQLSTATE -----------------------------------------------------------------
    (
        "slot_in_use",
        pge.ObjectInUse('replication slot "cdcengine_shop" is active for PID 4242'),
        Reason.SLOT_IN_USE,
    ),
    (
        "slot_missing",
        pge.UndefinedObject('replication slot "cdcengine_shop" does not exist'),
        Reason.SLOT_MISSING,
    ),
    (
        "publication_missing",
        pge.UndefinedObject('publication "cdcengine_shop" does not exist'),
        Reason.PUBLICATION_MISSING,
    ),
    (
        "slot_invalidated_pg15",
        pge.ObjectNotInPrerequisiteState(
            'can no longer get changes from replication slot "cdcengine_shop"'
        ),
        Reason.SLOT_INVALIDATED,
    ),
    (
        "slot_invalidated_detail",
        pge.ObjectNotInPrerequisiteState(
            "This slot has been invalidated because it exceeded the maximum reserved size."
        ),
        Reason.SLOT_INVALIDATED,
    ),
    (
        "slot_invalidated_advance",
        pge.ObjectNotInPrerequisiteState(
            "cannot advance replication slot that has not previously reserved WAL"
        ),
        Reason.SLOT_INVALIDATED,
    ),
    (
        "slot_invalidated_pg17",
        pge.ObjectNotInPrerequisiteState('can no longer access replication slot "s"'),
        Reason.SLOT_INVALIDATED,
    ),
    (
        "wal_level_pg15",
        pge.ObjectNotInPrerequisiteState("logical decoding requires wal_level >= logical"),
        Reason.WAL_LEVEL_NOT_LOGICAL,
    ),
    (
        "wal_level_pg16",
        pge.ObjectNotInPrerequisiteState('logical decoding requires "wal_level" >= "logical"'),
        Reason.WAL_LEVEL_NOT_LOGICAL,
    ),
    (
        "read_only_class",
        pge.ReadOnlySqlTransaction("cannot execute CREATE PUBLICATION in a read-only transaction"),
        Reason.READ_ONLY,
    ),
    (
        "recovery_in_progress",
        pge.ObjectNotInPrerequisiteState("recovery is in progress"),
        Reason.READ_ONLY,
    ),
    (
        "permission_class",
        pge.InsufficientPrivilege("permission denied for table orders"),
        Reason.PERMISSION_DENIED,
    ),
    (
        "permission_replication_role",
        pge.InsufficientPrivilege("must be superuser or replication role to use replication slots"),
        Reason.PERMISSION_DENIED,
    ),
    (
        "database_missing_class",
        pge.InvalidCatalogName('database "nosuch" does not exist'),
        Reason.DATABASE_MISSING,
    ),
    (
        "auth_class",
        pge.InvalidPassword('password authentication failed for user "cdc"'),
        Reason.AUTH_FAILED,
    ),
    (
        "auth_spec_class",
        pge.InvalidAuthorizationSpecification('role "cdc" does not exist'),
        Reason.AUTH_FAILED,
    ),
    (
        "hba_no_encryption_class",
        pge.InvalidAuthorizationSpecification(
            'no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop", no encryption'
        ),
        Reason.AUTH_FAILED,
    ),
    (
        "admin_shutdown",
        pge.AdminShutdown("terminating connection due to administrator command"),
        Reason.CONNECTION_FAILED,
    ),
    (
        "cannot_connect_now",
        pge.CannotConnectNow("the database system is starting up"),
        Reason.CONNECTION_FAILED,
    ),
    (
        "too_many_clients",
        pge.TooManyConnections("sorry, too many clients already"),
        Reason.CONNECTION_FAILED,
    ),
    ("connection_failure_08006", pge.ConnectionFailure("boom"), Reason.CONNECTION_FAILED),
    (
        "connection_timeout",
        pge.ConnectionTimeout("connection timeout expired"),
        Reason.CONNECTION_FAILED,
    ),
    (
        "slot_exists",
        pge.DuplicateObject('replication slot "cdcengine_shop" already exists'),
        Reason.SLOT_EXISTS,
    ),
    (
        "publication_exists",
        pge.DuplicateObject('publication "cdcengine_shop" already exists'),
        Reason.PUBLICATION_EXISTS,
    ),
    (
        "slots_full",
        pge.ConfigurationLimitExceeded("all replication slots are in use"),
        Reason.PREREQUISITES_FAILED,
    ),
    # --- connect time: OperationalError without SQLSTATE, by libpq/server text ----------------
    (
        "password_failed",
        psycopg.OperationalError(CONN + 'FATAL:  password authentication failed for user "cdc"'),
        Reason.AUTH_FAILED,
    ),
    (
        "no_password",
        psycopg.OperationalError(CONN + "fe_sendauth: no password supplied"),
        Reason.AUTH_FAILED,
    ),
    (
        "role_missing",
        psycopg.OperationalError(CONN + 'FATAL:  role "nobody_here" does not exist'),
        Reason.AUTH_FAILED,
    ),
    (
        "hba_entry",
        psycopg.OperationalError(
            CONN + 'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop"'
        ),
        Reason.AUTH_FAILED,
    ),
    (
        "hba_ssl_off",
        psycopg.OperationalError(
            CONN + 'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop", '
            "SSL off"
        ),
        Reason.AUTH_FAILED,
    ),
    (
        "hba_no_encryption",
        psycopg.OperationalError(
            CONN + 'FATAL:  no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop", '
            "no encryption"
        ),
        Reason.AUTH_FAILED,
    ),
    (
        "server_no_ssl",
        psycopg.OperationalError(CONN + "server does not support SSL, but SSL was required"),
        Reason.SSL_REQUIRED,
    ),
    (
        "ssl_is_required",
        psycopg.OperationalError(CONN + "FATAL:  SSL is required"),
        Reason.SSL_REQUIRED,
    ),
    (
        "ssl_connection_required",
        psycopg.OperationalError(CONN + "FATAL:  SSL connection is required"),
        Reason.SSL_REQUIRED,
    ),
    (
        "database_missing_text",
        psycopg.OperationalError(CONN + 'FATAL:  database "nosuch" does not exist'),
        Reason.DATABASE_MISSING,
    ),
    (
        "walsender_permission",
        psycopg.OperationalError(
            CONN + "FATAL:  must be superuser or replication role to start walsender"
        ),
        Reason.PERMISSION_DENIED,
    ),
    (
        "walsender_permission_pg16",
        psycopg.OperationalError(CONN + "FATAL:  permission denied to start WAL sender"),
        Reason.PERMISSION_DENIED,
    ),
    (
        "dns",
        psycopg.OperationalError(
            'connection failed: could not translate host name "db.invalid" to address: '
            "Name or service not known"
        ),
        Reason.HOST_UNREACHABLE,
    ),
    (
        "nodename",
        psycopg.OperationalError("nodename nor servname provided, or not known"),
        Reason.HOST_UNREACHABLE,
    ),
    (
        "unreachable",
        psycopg.OperationalError(CONN + "Network is unreachable"),
        Reason.HOST_UNREACHABLE,
    ),
    ("no_route", psycopg.OperationalError(CONN + "No route to host"), Reason.HOST_UNREACHABLE),
    (
        "refused",
        psycopg.OperationalError(
            CONN + "Connection refused\n\tIs the server running on that host and accepting TCP/IP "
            "connections?"
        ),
        Reason.CONNECTION_FAILED,
    ),
    ("timeout", psycopg.OperationalError(CONN + "timeout expired"), Reason.CONNECTION_FAILED),
    (
        "closed_unexpectedly",
        psycopg.OperationalError(
            "consuming input failed: server closed the connection unexpectedly\n\tThis probably "
            "means the server terminated abnormally"
        ),
        Reason.CONNECTION_FAILED,
    ),
    (
        "ssl_closed",
        psycopg.OperationalError("SSL connection has been closed unexpectedly"),
        Reason.CONNECTION_FAILED,
    ),
    (
        "could_not_receive",
        psycopg.OperationalError("could not receive data from server: Connection reset by peer"),
        Reason.CONNECTION_FAILED,
    ),
    (
        "terminating",
        psycopg.OperationalError("terminating connection due to administrator command"),
        Reason.CONNECTION_FAILED,
    ),
    (
        "invalid_sslmode",
        psycopg.OperationalError('connection is bad: invalid sslmode value: "bogus"'),
        Reason.DSN_INVALID,
    ),
    (
        "invalid_port",
        psycopg.OperationalError(
            'connection is bad: invalid integer value "abc" for connection option "port"'
        ),
        Reason.DSN_INVALID,
    ),
    (
        "invalid_option_value",
        psycopg.OperationalError('connection is bad: invalid target_session_attrs value: "x"'),
        Reason.DSN_INVALID,
    ),
    (
        "port_count",
        psycopg.OperationalError("connection is bad: could not match 2 port numbers to 1 hosts"),
        Reason.DSN_INVALID,
    ),
    # --- dsn parse errors (libpq PQconninfoParse) --------------------------------------------
    (
        "invalid_option",
        psycopg.ProgrammingError('invalid connection option "foo"'),
        Reason.DSN_INVALID,
    ),
    (
        "missing_equals",
        psycopg.ProgrammingError('missing "=" after "password" in connection info string'),
        Reason.DSN_INVALID,
    ),
    (
        "percent_token",
        psycopg.ProgrammingError('invalid percent-encoded token: "p%zz"'),
        Reason.DSN_INVALID,
    ),
    (
        "invalid_uri",
        psycopg.ProgrammingError('invalid URI query parameter: "x"'),
        Reason.DSN_INVALID,
    ),
]


@pytest.mark.parametrize(
    ("exc", "reason"), [(e, r) for _, e, r in MATRIX], ids=[n for n, _, _ in MATRIX]
)
def test_classification_matrix(exc: BaseException, reason: Reason) -> None:
    err = classify_postgres_error(exc)
    assert err is not None
    assert err.reason is reason
    assert err.retryable is POLICY[reason].retryable
    # static text: the reason's, or for pg_hba and no-SSL-server rejections a more exact one
    text = str(exc).lower()
    if "pg_hba.conf" in text or "does not support ssl" in text or "slots are in use" in text:
        assert ("pg_hba.conf" in err.message or "does not support SSL" in err.message
                or "max_replication_slots" in err.message)
    else:
        assert err.message == POLICY[reason].message
    assert isinstance(err, error_class_for(reason))


@pytest.mark.parametrize(
    ("reason", "cls"),
    [
        (Reason.AUTH_FAILED, SourceUnreachable),
        (Reason.SSL_REQUIRED, SourceUnreachable),
        (Reason.CONNECTION_FAILED, SourceUnreachable),
        (Reason.HOST_UNREACHABLE, SourceUnreachable),
        (Reason.DSN_INVALID, SourceUnreachable),
        (Reason.DATABASE_MISSING, SourceUnreachable),
        (Reason.PERMISSION_DENIED, PermissionDenied),
        (Reason.SLOT_MISSING, ReplicationResourceError),
        (Reason.SLOT_IN_USE, ReplicationResourceError),
        (Reason.SLOT_INVALIDATED, ReplicationResourceError),
        (Reason.PUBLICATION_MISSING, ReplicationResourceError),
        (Reason.WAL_LEVEL_NOT_LOGICAL, CDCError),
        (Reason.READ_ONLY, CDCError),
        (Reason.UNKNOWN, CDCError),
    ],
)
def test_error_class_per_reason(reason: Reason, cls: type[CDCError]) -> None:
    assert error_class_for(reason) is cls


def test_retryable_flags() -> None:
    refused = classify_postgres_error(psycopg.OperationalError(CONN + "Connection refused"))
    wrong_pw = classify_postgres_error(
        psycopg.OperationalError(CONN + 'FATAL:  password authentication failed for user "u"')
    )
    in_use = classify_postgres_error(pge.ObjectInUse('replication slot "s" is active for PID 1'))
    assert refused is not None
    assert refused.retryable
    assert wrong_pw is not None
    assert not wrong_pw.retryable
    assert in_use is not None
    assert in_use.retryable


def test_slot_in_use_checked_before_does_not_exist() -> None:
    # A message carrying both markers (e.g. a wrapper's text) must stay retryable slot_in_use.
    exc = psycopg.OperationalError(
        'replication slot "s" is active for PID 7; publication "p" does not exist'
    )
    err = classify_postgres_error(exc)
    assert err is not None
    assert err.reason is Reason.SLOT_IN_USE
    exc2 = pge.ObjectInUse('replication slot "s" is active for PID 7 (does not exist)')
    err2 = classify_postgres_error(exc2)
    assert err2 is not None
    assert err2.reason is Reason.SLOT_IN_USE


@pytest.mark.parametrize(
    "exc",
    [
        ValueError('replication slot "s" does not exist'),
        RuntimeError("password authentication failed for user x"),
        KeyError("Connection refused"),
        OSError("Network is unreachable"),
        TimeoutError("timeout expired"),
    ],
    ids=["value", "runtime", "key", "os", "timeout"],
)
def test_non_psycopg_strings_are_not_classified(exc: BaseException) -> None:
    assert classify_postgres_error(exc) is None
    err = postgres_error(exc)
    assert err.reason is Reason.UNKNOWN
    assert err.retryable
    assert str(exc.args[0]) not in err.message


def test_unrecognised_psycopg_errors_are_none() -> None:
    assert classify_postgres_error(pge.UndefinedTable('relation "x" does not exist')) is None
    assert classify_postgres_error(pge.UndefinedObject('type "x" does not exist')) is None
    # DETAIL/row data of an unrelated server error is not matched against slot markers.
    assert classify_postgres_error(pge.UniqueViolation("duplicate key value")) is None
    # 08P01 is our protocol bug (extended protocol on a walsender), not a network blip.
    assert (
        classify_postgres_error(
            pge.ProtocolViolation(
                "extended query protocol not supported in a replication connection"
            )
        )
        is None
    )
    # psycopg ProgrammingErrors that are not dsn parsing.
    assert classify_postgres_error(psycopg.ProgrammingError("no results to fetch")) is None
    # A server error's class decides: a 58030 I/O error saying "permission denied" is not a GRANT.
    assert (
        classify_postgres_error(pge.IoError('could not open file "x": Permission denied')) is None
    )


def test_chained_causes_are_walked() -> None:
    try:
        try:
            raise pge.UndefinedObject('replication slot "s" does not exist')
        except psycopg.Error as inner:
            raise RuntimeError("wrapper") from inner
    except RuntimeError as outer:
        err = classify_postgres_error(outer)
    assert err is not None
    assert err.reason is Reason.SLOT_MISSING

    # implicit context (raised while handling another exception)
    try:
        try:
            raise psycopg.OperationalError(CONN + "Connection refused")
        except psycopg.Error:
            raise ValueError("cleanup")  # noqa: B904 - the implicit __context__ is the point
    except ValueError as outer2:
        err2 = classify_postgres_error(outer2)
    assert err2 is not None
    assert err2.reason is Reason.CONNECTION_FAILED


def test_outermost_recognised_exception_wins() -> None:
    inner = pge.UndefinedObject('replication slot "s" does not exist')
    outer = pge.ObjectInUse('replication slot "s" is active for PID 3')
    outer.__cause__ = inner
    err = classify_postgres_error(outer)
    assert err is not None
    assert err.reason is Reason.SLOT_IN_USE


def test_existing_cdcerror_in_chain_is_returned() -> None:
    mine = ReplicationResourceError("custom", reason=Reason.SLOT_EXISTS)
    wrapper = RuntimeError("x")
    wrapper.__cause__ = mine
    assert classify_postgres_error(wrapper) is mine
    assert postgres_error(wrapper, context="ctx") is mine


def test_cycle_in_chain_terminates() -> None:
    a = psycopg.OperationalError("a")
    b = psycopg.OperationalError("b")
    a.__cause__ = b
    b.__cause__ = a
    assert classify_postgres_error(a) is None


def test_postgres_error_unknown_summary() -> None:
    exc = pge.UndefinedTable('relation "secret_table_name" does not exist')
    err = postgres_error(exc, context='creating publication "p"')
    assert err.reason is Reason.UNKNOWN
    assert err.retryable
    assert err.message == 'creating publication "p": UndefinedTable 42P01'
    assert "secret_table_name" not in str(err)

    no_ctx = postgres_error(psycopg.OperationalError("weird"))
    assert no_ctx.message == "An unexpected error occurred: OperationalError"


def test_postgres_error_context_prefix_and_truncation() -> None:
    err = postgres_error(
        pge.ObjectInUse('replication slot "s" is active for PID 1'),
        context='reading slot "cdcengine_shop"',
    )
    assert err.reason is Reason.SLOT_IN_USE
    assert err.message == f'reading slot "cdcengine_shop": {POLICY[Reason.SLOT_IN_USE].message}'

    long = postgres_error(psycopg.OperationalError("x"), context="c" * 1000)
    assert len(long.message) <= 300
    long2 = postgres_error(pge.ObjectInUse("is active for PID 1"), context="c" * 1000)
    assert len(long2.message) <= 300


def test_context_is_scrubbed() -> None:
    err = postgres_error(
        psycopg.OperationalError("x"), secrets=["hunter2xyz"], context="connecting with hunter2xyz"
    )
    assert "hunter2xyz" not in err.message


SECRET = "p%zzsecret"
BAD_DSN = f"postgresql://u:{SECRET}@127.0.0.1:1/db"


def _parse_error() -> psycopg.ProgrammingError:
    try:
        conninfo_to_dict(BAD_DSN)
    except psycopg.ProgrammingError as exc:
        return exc
    raise AssertionError("libpq accepted a malformed dsn")


def test_dsn_parse_error_from_libpq() -> None:
    exc = _parse_error()
    assert "zzsecret" in str(exc)  # libpq echoes the token: the reason for static messages
    err = classify_postgres_error(exc)
    assert err is not None
    assert err.reason is Reason.DSN_INVALID
    assert isinstance(err, SourceUnreachable)
    assert not err.retryable


@pytest.mark.parametrize(
    "dsn",
    [
        BAD_DSN,
        "host=127.0.0.1 password=zzsecret foo=bar",
        "host=127.0.0.1 password",
        "postgresql://u:zzsecret@[::1/db",
        "postgresql://u:zzsecret@127.0.0.1/db?foo=bar",
        "host='127.0.0.1 password=zzsecret",
    ],
    ids=["percent", "option", "missing_eq", "ipv6", "query", "quote"],
)
def test_translate_errors_keeps_secret_out(dsn: str) -> None:
    secrets = ["zzsecret", SECRET]
    with pytest.raises(CDCError) as info, translate_errors(secrets=secrets, context=None):
        conninfo_to_dict(dsn)
    err = info.value
    assert err.reason is Reason.DSN_INVALID
    assert isinstance(err.__cause__, psycopg.ProgrammingError)
    assert err.__suppress_context__
    texts = [str(err), repr(err), err.message, err.fix, str(err.to_dict())]
    texts += [str(e) for e in iter_chain(err)] + [repr(e) for e in iter_chain(err)]
    for text in texts:
        assert "zzsecret" not in text


def test_translate_errors_chains_original_when_clean() -> None:
    original = pge.ObjectInUse('replication slot "s" is active for PID 9')
    with pytest.raises(ReplicationResourceError) as info, translate_errors(context="streaming"):
        raise original
    assert info.value.reason is Reason.SLOT_IN_USE
    assert info.value.__cause__ is original
    assert info.value.message.startswith("streaming: ")


def test_translate_errors_leaves_others_alone() -> None:
    with pytest.raises(ValueError, match="does not exist"), translate_errors():
        raise ValueError('replication slot "s" does not exist')
    mine = CDCError(reason=Reason.LEASE_HELD)
    with pytest.raises(CDCError) as info, translate_errors():
        raise mine
    assert info.value is mine
    with pytest.raises(KeyboardInterrupt), translate_errors():
        raise KeyboardInterrupt


def test_translate_errors_unknown_psycopg_error() -> None:
    with pytest.raises(CDCError) as info, translate_errors(context="reading catalog"):
        raise pge.UndefinedTable('relation "x" does not exist')
    assert info.value.reason is Reason.UNKNOWN
    assert info.value.retryable
    assert info.value.message == "reading catalog: UndefinedTable 42P01"


def test_classified_error_pickles() -> None:
    err = postgres_error(_parse_error())
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is SourceUnreachable
    assert again.reason is Reason.DSN_INVALID
    assert again.message == err.message


def test_psycopg_name_resolution_failure_is_host_unreachable() -> None:
    exc = psycopg.OperationalError("failed to resolve host 'u': [Errno -3] Temporary failure")
    err = classify_postgres_error(exc)
    assert err is not None
    assert err.reason is Reason.HOST_UNREACHABLE


@pytest.mark.parametrize(("text", "tried"), [
    ('no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop", no encryption',
     "without SSL"),
    ('no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop", SSL encryption',
     "with SSL"),
    ('no pg_hba.conf entry for host "10.0.0.1", user "cdc", database "shop", SSL encryption\n'
     'connection to server failed: FATAL:  no pg_hba.conf entry for host "10.0.0.1", user '
     '"cdc", database "shop", no encryption', "with and without SSL"),
])
def test_a_missing_pg_hba_entry_is_not_an_ssl_problem(text: str, tried: str) -> None:
    """PG 14+ appends the attempt's encryption to *every* rejection: ", no encryption" says
    which attempt was refused, not that SSL would help (issue 13)."""
    err = classify_postgres_error(psycopg.OperationalError(CONN + "FATAL:  " + text))
    assert err is not None and err.reason is Reason.AUTH_FAILED
    assert "pg_hba.conf" in err.message and tried in err.message
    assert "pg_hba.conf" in err.fix and "sslmode" not in err.fix
    assert "10.0.0.1" not in err.message  # static text only


def test_sslmode_require_against_a_server_without_ssl_says_so() -> None:
    err = classify_postgres_error(psycopg.OperationalError(
        CONN + "server does not support SSL, but SSL was required"))
    assert err is not None and err.reason is Reason.SSL_REQUIRED
    assert "does not support SSL" in err.message
    assert "Add sslmode=require" not in err.fix and "ssl = on" in err.fix
