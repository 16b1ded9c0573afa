"""psycopg exceptions → `CDCError`s with stable reason codes.

The core never looks at driver exceptions (SPEC §1); this module is the one place that does. It
turns what PostgreSQL and libpq report into a `cdcengine.errors.Reason`, and the reason into a
`CDCError` whose message is a *static* template from `cdcengine.errors.POLICY` (plus, at most, a
short caller-supplied context such as a slot name). The driver's own text is never copied into our
message: libpq echoes the offending token of a malformed dsn (`invalid percent-encoded token:
"p%zzsecret"`, or the whole URI for a bad IPv6 host), and a connection error names host, port and
user.

How a psycopg exception is classified (first match wins; the cause/context chain is walked
outermost first, and a `CDCError` already in it is returned as is):

1. Server errors carry a SQLSTATE, so their rules key on it and use the primary message only to
   tell apart errors that share one (42704 is both `replication slot "s" does not exist` and
   `publication "p" does not exist`). DETAIL and CONTEXT are not matched for that: they can quote
   row data. `slot_in_use` (55006, "is active for PID") is checked before any "does not exist" rule.
2. Errors raised while *connecting* have no SQLSTATE: libpq reports a failed connection through
   `PQerrorMessage` only, so psycopg raises a bare `OperationalError` whose `sqlstate` is None
   (checked with psycopg 3.3 / libpq 18 against PostgreSQL 15: wrong password, missing role or
   database, refused port, SSL mismatch, certificate failures). Those are classified by libpq's
   and the server's message markers (certificate failures by `tls_errors`), definite server
   answers (auth, SSL, certificates, missing database) before transient network ones,
   so that a multi-address attempt whose first address refused and whose second rejected the
   password is `auth_failed`, not a retryable `connection_failed`.
3. A `psycopg.ProgrammingError` raised by `conninfo_to_dict` (libpq's `PQconninfoParse`) is
   `dsn_invalid`; so is libpq's option validation at connect time ("invalid sslmode value").

String matching only ever applies to psycopg exceptions: a `ValueError("... does not exist")` from
our own code must not become `slot_missing`. Anything unrecognised gives None from
`classify_postgres_error` and a retryable `unknown` from `postgres_error`.

Callers must print, log or store only a `CDCError`'s `str()`, `.message` or `.to_dict()`, never
the text of a chained driver exception unless it went through `cdcengine.secrets.scrub`.
`translate_errors` already replaces a cause whose text contains a known secret by a scrubbed copy.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType

import psycopg
from psycopg import errors as pge

from cdcengine.errors import (
    POLICY,
    CDCError,
    PermissionDenied,
    Reason,
    ReplicationResourceError,
    SourceUnreachable,
    iter_chain,
)
from cdcengine.secrets import scrub
from cdcengine_postgres.tls_errors import tls_reason, tls_specific

__all__ = [
    "classify_postgres_error",
    "error_class_for",
    "postgres_error",
    "translate_errors",
]

MAX_MESSAGE_CHARS = 300

_SOURCE_UNREACHABLE = frozenset(
    {
        Reason.AUTH_FAILED,
        Reason.SSL_REQUIRED,
        Reason.SSL_VERIFY_FAILED,
        Reason.CONNECTION_FAILED,
        Reason.HOST_UNREACHABLE,
        Reason.DSN_INVALID,
        Reason.DATABASE_MISSING,
        Reason.SSH_TUNNEL_FAILED,
        Reason.SSH_AUTH_FAILED,
        Reason.SSH_HOST_KEY_MISMATCH,
    }
)
_REPLICATION_RESOURCE = frozenset(
    {
        Reason.SLOT_MISSING,
        Reason.SLOT_IN_USE,
        Reason.SLOT_INVALIDATED,
        Reason.SLOT_EXISTS,
        Reason.PUBLICATION_MISSING,
        Reason.PUBLICATION_EXISTS,
    }
)

# --- message markers (all compared lower-case) -------------------------------------------------

# PG 13-16: logical.c "can no longer get changes from replication slot \"%s\"" with detail "This
# slot has been invalidated because it exceeded the maximum reserved size." (55000). PG 17+ says
# "can no longer access replication slot" / "This replication slot has been invalidated due to".
# pg_replication_slot_advance() on a lost slot: "cannot advance replication slot that has not
# previously reserved WAL" (55000).
_SLOT_INVALIDATED = (
    "can no longer get changes from replication slot",
    "can no longer access replication slot",
    "has been invalidated",
    "cannot advance replication slot that has not previously reserved wal",
)
# PG <= 15: "logical decoding requires wal_level >= logical"; PG 16+ quotes the names.
_WAL_LEVEL = (
    "logical decoding requires wal_level >= logical",
    'logical decoding requires "wal_level" >= "logical"',
    "wal_level >= logical",
    '"wal_level" >= "logical"',
)
# 25006 "cannot execute %s in a read-only transaction"; on a standby, 55000 "recovery is in
# progress" (WAL control functions) and, before PG 16, "logical decoding cannot be used while in
# recovery".
_READ_ONLY = (
    "in a read-only transaction",
    "recovery is in progress",
    "cannot be used while in recovery",
    "cannot be executed during recovery",
)
# 42501; at connect time (no SQLSTATE) PG 15 says "must be superuser or replication role to start
# walsender", PG 16+ "permission denied to start WAL sender".
_PERMISSION = (
    "permission denied for",
    "permission denied to",
    "must be owner of",
    "must be superuser",
    "must be a member of",
    "replication attribute",
)
# Connect-time authentication failures (server FATAL 28P01 / 28000, or libpq's fe_sendauth).
_AUTH = (
    "password authentication failed",
    "no password supplied",
    "authentication failed",
    "no pg_hba.conf entry",
    "pg_hba.conf rejects",
)
# What a pg_hba.conf rejection says about the attempt (PG 14+: ", SSL encryption" / ", GSS
# encryption" / ", no encryption"; older servers ", SSL on" / ", SSL off"). It is appended to
# *every* rejection, so it says which attempt was refused, never that SSL would have been let in.
_HBA_WITH_SSL = ("ssl encryption", "ssl on")
_HBA_WITHOUT_SSL = ("no encryption", "ssl off")
_NO_SERVER_SSL = "server does not support ssl"
_HBA_FIX = ("Add a line for this client address, user and database to the server's pg_hba.conf "
            "(`host` accepts connections with and without SSL, `hostssl` only with SSL) and "
            "reload it (SELECT pg_reload_conf()).")
_SSL = (
    "ssl is required",
    "server does not support ssl",
    "ssl connection is required",
)
# libpq's PQconninfoParse (fe-connect.c); raised as ProgrammingError by conninfo_to_dict.
_DSN_PARSE = (
    "invalid connection option",
    'missing "=" after',
    "invalid percent-encoded token",
    "forbidden value %00 in percent-encoded value",
    "invalid uri",
    "in uri",
    "uri query parameter",
    "couldn't parse",
    "unterminated quoted string",
    "in connection info string",
)
# libpq's option validation at connect time (connectOptions2): "connection is bad: invalid
# sslmode value: ...", "invalid integer value ... for connection option", "invalid port number",
# "could not match 2 port numbers to 1 hosts".
_DSN_OPTION = (
    "invalid port number",
    "could not match",
    "invalid connection option",
)
_DSN_OPTION_VALUE = re.compile(r"invalid [a-z_]+ value")
_CONNECTION = (
    "connection refused",
    "timeout expired",
    "timed out",
    "server closed the connection unexpectedly",
    "ssl connection has been closed unexpectedly",
    "could not receive data",
    "could not send data",
    "terminating connection",
    "connection reset by peer",
    "the database system is starting up",
    "the database system is shutting down",
    "the database system is in recovery mode",
    "the database system is not yet accepting connections",
    "sorry, too many clients already",
    "remaining connection slots are reserved",
    "the connection is closed",
    "the connection is lost",
    "consuming input failed",
    "no connection to the server",
)
_HOST = (
    "could not translate host name",
    "failed to resolve host",  # psycopg resolves names itself before libpq connects
    "no address associated with hostname",
    "name or service not known",
    "network is unreachable",
    "no route to host",
    "nodename nor servname",
    "temporary failure in name resolution",
)

# Class 57 "operator intervention" without 57014 (query_canceled: a statement/lock timeout or a
# cancel, which the caller decides about) and class 08 without 08P01 (a protocol violation is our
# bug, e.g. the extended protocol on a replication connection).
_CONNECTION_STATES = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "53300"})


def _server_text(exc: psycopg.Error) -> tuple[str, str]:
    """(primary message, primary + detail + hint), lower-cased, of a server error.

    The CONTEXT lines and, for the rule that tells slots from publications, the DETAIL are left out:
    they can quote row data (a unique violation's DETAIL echoes the key). An exception built by
    hand (no diag) falls back to its `str()`.
    """
    diag = exc.diag
    primary = (diag.message_primary or str(exc)).lower()
    extra = [m.lower() for m in (diag.message_detail, diag.message_hint) if m]
    return primary, "\n".join([primary, *extra])


def _has(text: str, markers: Iterable[str]) -> bool:
    return any(m in text for m in markers)


def _classify_server(exc: psycopg.Error, state: str) -> Reason | None:
    """A server error (it has a SQLSTATE): the class decides, the message only disambiguates."""
    primary, full = _server_text(exc)
    # 55006 object_in_use: "replication slot \"%s\" is active for PID %d". Before "does not exist".
    if "is active for pid" in primary or (state == "55006" and 'replication slot "' in primary):
        return Reason.SLOT_IN_USE
    if _has(full, _SLOT_INVALIDATED):
        return Reason.SLOT_INVALIDATED
    if _has(primary, _WAL_LEVEL):
        return Reason.WAL_LEVEL_NOT_LOGICAL
    # 42704 undefined_object is shared by slots, publications, types, roles, ...
    if state == "42704" or "does not exist" in primary:
        if 'replication slot "' in primary:
            return Reason.SLOT_MISSING
        if 'publication "' in primary:
            return Reason.PUBLICATION_MISSING
    # 42710 duplicate_object: CREATE_REPLICATION_SLOT / CREATE PUBLICATION of an existing name.
    if state == "42710":
        if 'replication slot "' in primary:
            return Reason.SLOT_EXISTS
        if 'publication "' in primary:
            return Reason.PUBLICATION_EXISTS
    if state == "25006" or _has(full, _READ_ONLY):
        return Reason.READ_ONLY
    if state == "42501":
        return Reason.PERMISSION_DENIED
    # 53400 configuration_limit_exceeded: "all replication slots are in use" (max_replication_slots)
    # is a capacity prerequisite that `check` reports with its fix; retrying cannot help by itself.
    if state == "53400" and "replication slots" in primary:
        return Reason.PREREQUISITES_FAILED
    if state == "3D000":
        return Reason.DATABASE_MISSING
    if state.startswith("28"):  # 28000 invalid_authorization_specification, 28P01 invalid_password
        return Reason.AUTH_FAILED
    if state in _CONNECTION_STATES or (state.startswith("08") and state != "08P01"):
        return Reason.CONNECTION_FAILED
    return None


def _classify_client(exc: psycopg.Error) -> Reason | None:
    """A libpq/psycopg-side error (no SQLSTATE): connecting, parsing the dsn, a dropped link."""
    if isinstance(exc, pge.ConnectionTimeout):
        return Reason.CONNECTION_FAILED
    text = str(exc).lower()
    if isinstance(exc, psycopg.ProgrammingError):
        return Reason.DSN_INVALID if _has(text, _DSN_PARSE) else None
    if _has(text, _SLOT_INVALIDATED):
        return Reason.SLOT_INVALIDATED
    if "is active for pid" in text:
        return Reason.SLOT_IN_USE
    if 'replication slot "' in text and "does not exist" in text:
        return Reason.SLOT_MISSING
    if _has(text, _WAL_LEVEL):
        return Reason.WAL_LEVEL_NOT_LOGICAL
    if _has(text, _PERMISSION):
        return Reason.PERMISSION_DENIED
    if 'database "' in text and "does not exist" in text:
        return Reason.DATABASE_MISSING
    if 'role "' in text and "does not exist" in text:
        return Reason.AUTH_FAILED
    if _has(text, _AUTH):
        return Reason.AUTH_FAILED
    # Certificate failures (tls_errors) before the generic SSL and network rules: "SSL error:
    # certificate verify failed" is a definite answer that no retry changes.
    if tls := tls_reason(text):
        return tls
    if _has(text, _SSL):
        return Reason.SSL_REQUIRED
    if _has(text, _DSN_OPTION) or _DSN_OPTION_VALUE.search(text):
        return Reason.DSN_INVALID
    if _has(text, _READ_ONLY):
        return Reason.READ_ONLY
    if _has(text, _CONNECTION):
        return Reason.CONNECTION_FAILED
    if _has(text, _HOST):
        return Reason.HOST_UNREACHABLE
    return None


def _classify_one(exc: psycopg.Error) -> Reason | None:
    """The reason for one psycopg exception, or None. See the module docstring for the order."""
    state = exc.sqlstate
    if state:
        return _classify_server(exc, state)
    return _classify_client(exc)


def error_class_for(reason: Reason) -> type[CDCError]:
    """The `CDCError` subclass callers can catch for `reason`.

    `SourceUnreachable` for reaching the source (auth, SSL, network, dsn, missing database),
    `PermissionDenied`, `ReplicationResourceError` for slot and publication reasons, else
    `CDCError`.
    """
    if reason in _SOURCE_UNREACHABLE:
        return SourceUnreachable
    if reason is Reason.PERMISSION_DENIED:
        return PermissionDenied
    if reason in _REPLICATION_RESOURCE:
        return ReplicationResourceError
    return CDCError


def _safe_context(context: str | None, secrets: Iterable[str]) -> str | None:
    if not context:
        return None
    return scrub(context, secrets)[:MAX_MESSAGE_CHARS]


def _make(reason: Reason, context: str | None, exc: BaseException | None = None,
          secrets: Iterable[str] = ()) -> CDCError:
    message, fix = _specific(reason, exc) or (POLICY[reason].message, None)
    if fix is not None:  # a specific text may quote a host name or a file path from the dsn
        message, fix = scrub(message, secrets), scrub(fix, secrets)
    if context:
        message = _truncate(f"{context}: {message}")
    return error_class_for(reason)(message, reason=reason, fix=fix)


def _specific(reason: Reason, exc: BaseException | None) -> tuple[str, str] | None:
    """A message and fix more exact than the reason's, where the server's words allow: a
    pg_hba.conf rejection names the attempts refused, and "the server does not support SSL"
    needs the opposite fix of "SSL is required". (Static texts: no driver text is shown.)"""
    if exc is None:
        return None
    text = str(exc).lower()
    if tls := tls_specific(reason, str(exc)):
        return tls
    if reason is Reason.AUTH_FAILED and "no pg_hba.conf entry" in text:
        with_ssl, without = _has(text, _HBA_WITH_SSL), _has(text, _HBA_WITHOUT_SSL)
        if with_ssl and without:
            tried = " (tried with and without SSL)"
        elif with_ssl:
            tried = " for a connection with SSL"
        elif without:
            tried = " for a connection without SSL"
        else:
            tried = ""
        return (f"The server's pg_hba.conf has no entry for this client address, user and "
                f"database{tried}.", _HBA_FIX)
    if reason is Reason.PREREQUISITES_FAILED and "replication slots are in use" in text:
        return ("All replication slots are in use (max_replication_slots): the engine needs one "
                "for the source and one temporary slot per table snapshot running at once.",
                "Drop slots nobody uses (SELECT slot_name FROM pg_replication_slots WHERE NOT "
                "active), or raise max_replication_slots (a server restart); `cdcengine check` "
                "counts the free slots.")
    if reason is Reason.SSL_REQUIRED and _NO_SERVER_SSL in text:
        return ("The dsn requires SSL (sslmode=require or stronger), but the server does not "
                "support SSL.", "Turn SSL on at the server (ssl = on with a certificate and "
                "key), or, on a trusted network only, connect with sslmode=prefer.")
    return None


def _truncate(text: str) -> str:
    if len(text) <= MAX_MESSAGE_CHARS:
        return text
    return text[: MAX_MESSAGE_CHARS - 1] + "…"


def _find(exc: BaseException) -> CDCError | tuple[Reason, psycopg.Error] | None:
    """The first `CDCError` or recognised psycopg exception in the chain, outermost first."""
    for cur in iter_chain(exc):
        if isinstance(cur, CDCError):
            return cur
        if isinstance(cur, psycopg.Error):
            reason = _classify_one(cur)
            if reason is not None:
                return reason, cur
    return None


def classify_postgres_error(exc: BaseException) -> CDCError | None:
    """The `CDCError` for `exc` (walking its cause/context chain), or None when unknown.

    A `CDCError` already in the chain is returned unchanged; otherwise the first psycopg exception
    in the chain that a rule recognises decides. The new error's message is the static `POLICY`
    text of its reason and never contains driver text. Non-psycopg exceptions are never matched by
    message. The result is not chained to `exc`; raise it `from exc`.
    """
    found = _find(exc)
    if found is None or isinstance(found, CDCError):
        return found
    return _make(found[0], None, found[1])


def postgres_error(
    exc: BaseException, *, secrets: Iterable[str] = (), context: str | None = None
) -> CDCError:
    """Always a `CDCError` for `exc`: its classification, else a retryable `unknown`.

    `context` is a short, safe description of what was being done (e.g. `creating replication slot
    "cdcengine_shop"`); it is scrubbed of `secrets` and prefixed to the static message. The
    `unknown` message names only the exception class and SQLSTATE, never the driver's text, e.g.
    `creating publication: UndefinedTable 42P01`. Messages are at most 300 characters. A `CDCError`
    already in the chain is returned unchanged. The caller chains the original with
    `raise postgres_error(exc) from exc` (or uses `translate_errors`).
    """
    secrets = tuple(secrets)
    ctx = _safe_context(context, secrets)
    found = _find(exc)
    if isinstance(found, CDCError):
        return found
    if found is not None:
        return _make(found[0], ctx, found[1], secrets)
    sqlstate = getattr(exc, "sqlstate", None)
    summary = type(exc).__name__ + (f" {sqlstate}" if isinstance(sqlstate, str) else "")
    prefix = ctx or POLICY[Reason.UNKNOWN].message.rstrip(".")
    return CDCError(_truncate(scrub(f"{prefix}: {summary}", secrets)), reason=Reason.UNKNOWN)


def _safe_cause(exc: psycopg.Error, secrets: tuple[str, ...]) -> psycopg.Error:
    """The exception to chain in place of `exc`: nothing in it may reveal a secret.

    - When its text contains a secret (libpq echoes a malformed dsn's token), a new exception of
      the same class carrying the scrubbed text (no diag: the diag fields would hold it too).
    - Else, when it references the connection (`exc.pgconn`: psycopg attaches the failed
      connection to a connect-time error, and that object's repr lists every conninfo option,
      the password included), a copy without it. psycopg's `Error.__reduce__` drops the pgconn
      and keeps the diag fields, and `copy.copy` goes through it.
    - Else `exc` itself.
    """
    raw = str(exc)
    clean = scrub(raw, secrets)
    if clean != raw:
        try:
            return type(exc)(clean)
        except TypeError:  # a subclass with another constructor: fall back to the base class
            return psycopg.Error(clean)
    if exc.pgconn is not None:
        return copy.copy(exc)
    return exc


class _Translator(AbstractContextManager[None]):
    __slots__ = ("_context", "_secrets")

    def __init__(self, secrets: tuple[str, ...], context: str | None) -> None:
        self._secrets = secrets
        self._context = context

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None or isinstance(exc, CDCError) or not isinstance(exc, psycopg.Error):
            return  # propagate unchanged (KeyboardInterrupt, our own errors, non-driver errors)
        err = postgres_error(exc, secrets=self._secrets, context=self._context)
        if any(e is err for e in iter_chain(exc)):
            # An older CDCError found in the driver error's context: raise a fresh copy rather
            # than make the chain a cycle.
            err = type(err)(err.message, reason=err.reason, retryable=err.retryable, fix=err.fix)
        cause = _safe_cause(exc, self._secrets)
        try:
            raise err from cause
        except CDCError:
            # Drop the implicit __context__ (the original exception, which may hold the secret or
            # the connection): re-raising the exception being handled does not set it again.
            err.__context__ = None
            raise


def translate_errors(
    *, secrets: Iterable[str] = (), context: str | None = None
) -> AbstractContextManager[None]:
    """A `with` block that re-raises psycopg errors as their `CDCError`, chained as the cause.

    `CDCError`s, `KeyboardInterrupt`/`SystemExit` and non-psycopg exceptions pass through
    untouched. The error comes from `postgres_error(exc, secrets=..., context=...)`. Its
    `__cause__` is the driver exception, or a sanitized copy of it (see `_safe_cause`: scrubbed
    when its text contains one of `secrets` or a URL/`password=` password, and never holding the
    failed connection object, whose repr shows the password); its `__context__` is cleared, so
    neither a logged traceback nor an error reporter walking the chain sees the original.
    """
    return _Translator(tuple(s for s in secrets if s), context)
