"""Typed errors with stable reason codes.

Every failure that reaches a user (CLI line, library exception, `status` JSON, a log event) is a
`CDCError`: a stable `reason` code, a `retryable` flag and a static, friendly `message` that never
contains a secret. Engine adapters turn driver exceptions into these (see
`cdcengine_postgres.errors`); the core never inspects driver exceptions itself.

Policy is a pure function of the reason (`POLICY`): whether an automatic retry can help, the default
message, and what the operator should do. The list is kept deliberately short: the reasons SPEC
names plus the few the control plane needs.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass


class Reason(enum.StrEnum):
    # reaching the source
    AUTH_FAILED = "auth_failed"
    SSL_REQUIRED = "ssl_required"
    SSL_VERIFY_FAILED = "ssl_verify_failed"
    CONNECTION_FAILED = "connection_failed"
    HOST_UNREACHABLE = "host_unreachable"
    DSN_INVALID = "dsn_invalid"
    DATABASE_MISSING = "database_missing"
    HOST_NOT_ALLOWED = "host_not_allowed"
    # the source's SSH tunnel (`ssh_tunnel`)
    SSH_TUNNEL_FAILED = "ssh_tunnel_failed"
    SSH_AUTH_FAILED = "ssh_auth_failed"
    SSH_HOST_KEY_MISMATCH = "ssh_host_key_mismatch"
    # rights and server set-up
    PERMISSION_DENIED = "permission_denied"
    WAL_LEVEL_NOT_LOGICAL = "wal_level_not_logical"
    READ_ONLY = "read_only"
    PREREQUISITES_FAILED = "prerequisites_failed"
    # replication resources
    SLOT_MISSING = "slot_missing"
    SLOT_IN_USE = "slot_in_use"
    SLOT_INVALIDATED = "slot_invalidated"
    SLOT_EXISTS = "slot_exists"
    SLOT_CREATION_BLOCKED = "slot_creation_blocked"
    PUBLICATION_MISSING = "publication_missing"
    PUBLICATION_EXISTS = "publication_exists"
    SOURCE_CHANGED = "source_changed"
    AUTO_DROPPED_CRITICAL_LAG = "auto_dropped_critical_lag"
    CRITICAL_LAG_SELF_MANAGED = "critical_lag_self_managed"
    NOTHING_TO_REPAIR = "nothing_to_repair"
    # destination
    SCHEMA_INCOMPATIBLE = "schema_incompatible"
    DESTINATION_FAILED = "destination_failed"
    # engine and operator
    CONFIG_INVALID = "config_invalid"
    UNKNOWN_SOURCE = "unknown_source"
    NOT_ENABLED = "not_enabled"
    IMMUTABLE_SETTING = "immutable_setting"
    LEASE_HELD = "lease_held"
    STATE_STORE_FAILED = "state_store_failed"
    UNKNOWN = "unknown"


# What a running source's failure becomes (the pipeline's `_record_failure`): broken — the slot
# or publication is gone or not ours, `repair` is the way back; paused — the operator must fix
# credentials, certificates, the tunnel or the host policy and then `resume`.
BREAKING_REASONS = frozenset({Reason.SLOT_MISSING, Reason.SLOT_INVALIDATED,
                              Reason.SOURCE_CHANGED, Reason.PUBLICATION_MISSING})
PAUSING_REASONS = frozenset({Reason.AUTH_FAILED, Reason.PERMISSION_DENIED, Reason.SSL_REQUIRED,
                             Reason.SSL_VERIFY_FAILED, Reason.SSH_AUTH_FAILED,
                             Reason.SSH_HOST_KEY_MISMATCH, Reason.HOST_NOT_ALLOWED})


@dataclass(frozen=True, slots=True)
class ReasonPolicy:
    retryable: bool
    message: str
    fix: str


POLICY: dict[Reason, ReasonPolicy] = {
    Reason.AUTH_FAILED: ReasonPolicy(
        False,
        "The database rejected the credentials (wrong user or password, or no pg_hba.conf entry).",
        "Check the user and password in the source's dsn, and that pg_hba.conf admits this host.",
    ),
    Reason.SSL_REQUIRED: ReasonPolicy(
        False,
        "The server and the client disagree about SSL.",
        "Add sslmode=require (or verify-full) to the dsn, or allow this host without SSL.",
    ),
    # A certificate problem in the TLS handshake, on either side: retrying cannot fix a file.
    Reason.SSL_VERIFY_FAILED: ReasonPolicy(
        False,
        "The TLS certificate check failed (the server's certificate is not trusted or not for "
        "this host name, or the client certificate or key was refused).",
        "Check sslrootcert (the CA that signed the server's certificate), that the dsn's host "
        "is a name in that certificate, and sslcert/sslkey.",
    ),
    Reason.CONNECTION_FAILED: ReasonPolicy(
        True,
        "Could not connect to the database (refused, timed out or dropped).",
        "Check that the server is running and reachable at the dsn's host and port.",
    ),
    Reason.HOST_UNREACHABLE: ReasonPolicy(
        False,
        "The database host cannot be reached (unknown host name or no route).",
        "Check the host name in the dsn and the network path from this machine.",
    ),
    Reason.DSN_INVALID: ReasonPolicy(
        False,
        "The dsn could not be parsed.",
        "Use postgresql://user:password@host:port/dbname; percent-encode special characters "
        "in the password (e.g. % as %25, @ as %40).",
    ),
    Reason.DATABASE_MISSING: ReasonPolicy(
        False,
        "The database named in the dsn does not exist.",
        "Fix the database name in the dsn.",
    ),
    Reason.HOST_NOT_ALLOWED: ReasonPolicy(
        False,
        "The host is not allowed by this engine's host policy.",
        "Use a host this service allows ([engine] allowed_hosts / denied_networks).",
    ),
    # Retryable: a bastion that is down or restarting, or a dropped SSH connection, comes back;
    # the next connect opens a new SSH connection. A refused login or host key does not.
    Reason.SSH_TUNNEL_FAILED: ReasonPolicy(
        True,
        "Could not reach the database through the SSH tunnel (the bastion refused, timed out or "
        "dropped the connection, or could not open a channel to the database).",
        "Check that the bastion in ssh_tunnel is up and reachable from this machine, and that it "
        "may forward to the dsn's host and port (sshd AllowTcpForwarding / PermitOpen).",
    ),
    Reason.SSH_AUTH_FAILED: ReasonPolicy(
        False,
        "The SSH bastion rejected the login (wrong user, key, passphrase or password).",
        "Check ssh_tunnel's user and private_key_file (or password), and that the key's public "
        "half is in the user's authorized_keys on the bastion; then `cdcengine resume`.",
    ),
    Reason.SSH_HOST_KEY_MISMATCH: ReasonPolicy(
        False,
        "The SSH bastion's host key is not the one in ssh_tunnel's known_hosts file (unknown or "
        "changed): the connection was refused, since it may not be the real bastion.",
        "Confirm the bastion's key fingerprint with its administrator, then add it to the "
        "known_hosts file (ssh-keyscan -p PORT HOST >> known_hosts); then `cdcengine resume`.",
    ),
    Reason.PERMISSION_DENIED: ReasonPolicy(
        False,
        "The database user lacks a privilege this operation needs.",
        "Run `cdcengine check` for the exact GRANT or ALTER to run.",
    ),
    Reason.WAL_LEVEL_NOT_LOGICAL: ReasonPolicy(
        False,
        "wal_level is not 'logical', so logical replication is off.",
        "Set wal_level = logical (ALTER SYSTEM SET wal_level = logical) and restart PostgreSQL.",
    ),
    Reason.READ_ONLY: ReasonPolicy(
        False,
        "The server is a read-only standby.",
        "Point the dsn at the primary.",
    ),
    Reason.PREREQUISITES_FAILED: ReasonPolicy(
        False,
        "Some prerequisite checks failed.",
        "Run `cdcengine check` and apply the fixes it lists.",
    ),
    Reason.SLOT_MISSING: ReasonPolicy(
        False,
        "The replication slot does not exist (dropped, or never created).",
        "Run `cdcengine repair` to recreate it and re-snapshot.",
    ),
    Reason.SLOT_IN_USE: ReasonPolicy(
        True,
        "The replication slot is in use by another connection.",
        "Stop the other consumer of the slot, or wait for it to exit.",
    ),
    Reason.SLOT_INVALIDATED: ReasonPolicy(
        False,
        "PostgreSQL invalidated the replication slot (it retained more WAL than allowed).",
        "Run `cdcengine repair` to recreate the slot and re-snapshot.",
    ),
    Reason.SLOT_EXISTS: ReasonPolicy(
        False,
        "A replication slot with this name already exists and is not this engine's to adopt.",
        "Choose another slot_name, or drop the existing slot if it is unused.",
    ),
    Reason.SLOT_CREATION_BLOCKED: ReasonPolicy(
        True,
        "Creating the replication slot waited too long for running transactions to finish.",
        "Let the listed transactions finish (or end them), then run `cdcengine enable` again.",
    ),
    Reason.PUBLICATION_MISSING: ReasonPolicy(
        False,
        "The publication does not exist or no longer covers the configured tables.",
        "Create or alter the publication as `cdcengine check` shows, then `cdcengine repair`.",
    ),
    Reason.PUBLICATION_EXISTS: ReasonPolicy(
        False,
        "A publication with this name already exists and was not created by this install.",
        "Choose another publication_name, or use management_mode = \"self_managed\".",
    ),
    Reason.SOURCE_CHANGED: ReasonPolicy(
        False,
        "The source database's identity changed (restored, failed over or recreated).",
        "Run `cdcengine repair` to re-snapshot from the new source.",
    ),
    Reason.AUTO_DROPPED_CRITICAL_LAG: ReasonPolicy(
        False,
        "The replication slot retained more WAL than the critical threshold, so the engine "
        "dropped it (and its publication) before it could fill the database's disk.",
        "Find why the stream fell behind (destination down, daemon stopped), then run "
        "`cdcengine repair`, which recreates the slot and re-snapshots every table.",
    ),
    Reason.CRITICAL_LAG_SELF_MANAGED: ReasonPolicy(
        False,
        "The replication slot retains more WAL than the critical threshold; the source is "
        "self-managed, so nothing was dropped.",
        "Find why the stream fell behind; the state clears by itself once retained WAL is below "
        "the warning threshold. Drop the slot yourself if the disk is at risk.",
    ),
    Reason.NOTHING_TO_REPAIR: ReasonPolicy(
        False,
        "Nothing is broken: the slot and the publication are in place.",
        "No repair is needed; `cdcengine resync` re-snapshots a single table.",
    ),
    Reason.SCHEMA_INCOMPATIBLE: ReasonPolicy(
        False,
        "A change does not fit the Delta table's schema (an incompatible type change).",
        "Run `cdcengine resync` for that table.",
    ),
    Reason.DESTINATION_FAILED: ReasonPolicy(
        True,
        "The Delta destination failed a read or a commit.",
        "Check the destination path or object store and its credentials; the write is retried "
        "safely.",
    ),
    Reason.CONFIG_INVALID: ReasonPolicy(
        False, "The configuration is invalid.", "Fix the configuration as the message says."
    ),
    Reason.UNKNOWN_SOURCE: ReasonPolicy(
        False, "No source with that name is configured.", "Use a name from the config file."
    ),
    Reason.NOT_ENABLED: ReasonPolicy(
        False, "CDC is not enabled for this source.", "Run `cdcengine enable` first."
    ),
    Reason.IMMUTABLE_SETTING: ReasonPolicy(
        False,
        "Slot name, publication name and management mode cannot change while CDC is enabled.",
        "Run `cdcengine disable`, then `cdcengine enable` with the new values.",
    ),
    Reason.LEASE_HELD: ReasonPolicy(
        True,
        "Another process is acting on this source right now.",
        "Wait for it to finish, or stop the daemon that holds the source.",
    ),
    Reason.STATE_STORE_FAILED: ReasonPolicy(
        True,
        "The state store could not be read or written.",
        "Check the [engine] state URL and that its file or database is writable.",
    ),
    Reason.UNKNOWN: ReasonPolicy(
        True, "An unexpected error occurred.", "See the logs; retry, and report it if it persists."
    ),
}


class CDCError(Exception):
    """Base of every error the engine raises on purpose.

    `reason` is a stable code, `retryable` says whether retrying the same call can help, `message`
    is user-facing and never contains a secret, `fix` is what to do. Chain the original exception
    with `raise CDCError(...) from exc`; the classifier walks that chain. Picklable.
    """

    default_reason: Reason = Reason.UNKNOWN

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: Reason | None = None,
        retryable: bool | None = None,
        fix: str | None = None,
    ) -> None:
        self.reason: Reason = reason or self.default_reason
        policy = POLICY[self.reason]
        self.message: str = message or policy.message
        self.retryable: bool = policy.retryable if retryable is None else retryable
        self.fix: str = fix if fix is not None else policy.fix
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"

    def __reduce__(self) -> tuple[object, ...]:
        # The instance dict carries subclass attributes (e.g. PrerequisitesFailed.checks).
        return (
            _rebuild,
            (type(self), self.message, self.reason.value, self.retryable, self.fix),
            dict(self.__dict__),
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "reason": str(self.reason),
            "message": self.message,
            "retryable": self.retryable,
            "fix": self.fix,
        }


def _rebuild(
    cls: type[CDCError], message: str, reason: str, retryable: bool, fix: str
) -> CDCError:
    err = cls.__new__(cls)
    CDCError.__init__(err, message, reason=Reason(reason), retryable=retryable, fix=fix)
    return err


class ConfigError(CDCError):
    """The configuration is invalid. Message names the file, the source and the key."""

    default_reason = Reason.CONFIG_INVALID


class SourceUnreachable(CDCError):
    """The source database could not be reached or refused us (auth, SSL, network, dsn)."""

    default_reason = Reason.CONNECTION_FAILED


class PermissionDenied(CDCError):
    default_reason = Reason.PERMISSION_DENIED


class ReplicationResourceError(CDCError):
    """A slot or publication is missing, in use, invalidated, or not ours."""

    default_reason = Reason.SLOT_MISSING


class SlotCreationBlocked(ReplicationResourceError):
    default_reason = Reason.SLOT_CREATION_BLOCKED


class PrerequisitesFailed(CDCError):
    """`enable` refused because a check failed; `.checks` holds every check's result."""

    default_reason = Reason.PREREQUISITES_FAILED

    def __init__(self, message: str | None = None, *, checks: list[object] | None = None) -> None:
        super().__init__(message)
        self.checks = list(checks or [])


class LeaseHeld(CDCError):
    default_reason = Reason.LEASE_HELD


class StateStoreError(CDCError):
    default_reason = Reason.STATE_STORE_FAILED


class NotEnabled(CDCError):
    default_reason = Reason.NOT_ENABLED


class UnknownSource(CDCError):
    default_reason = Reason.UNKNOWN_SOURCE


def reason_of(text: str) -> Reason:
    """A stored reason code as a `Reason`; a code this version does not know is `unknown`."""
    try:
        return Reason(text)
    except ValueError:
        return Reason.UNKNOWN


def iter_chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception, then its causes and contexts, each once (cycle-safe)."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        yield cur
        if cur.__cause__ is not None:
            todo.append(cur.__cause__)
        if cur.__context__ is not None and not cur.__suppress_context__:
            todo.append(cur.__context__)


def classify_error(exc: BaseException) -> CDCError:
    """The first `CDCError` in the chain, else a retryable `unknown` wrapping nothing secret.

    Engine-specific classification happens in the adapter, which raises `CDCError`s; this is the
    engine-neutral fallback used by the CLI and the daemon.
    """
    for cur in iter_chain(exc):
        if isinstance(cur, CDCError):
            return cur
    return CDCError(reason=Reason.UNKNOWN)


class StopReason(enum.StrEnum):
    """Why a table stopped alone while the others stream on: its `reason` starts with one of
    these (then ': ' and the details). A batch that does not fit the table's Delta schema stops
    it with the error's own `cdcengine.errors.Reason` (`schema_incompatible`)."""

    TABLE_GONE = "table_gone"  # no longer exists at the source (dropped or renamed)
    TABLE_WRITE_FAILED = "table_write_failed"  # the destination keeps refusing its rows
    PRIMARY_KEY_CHANGED = "primary_key_changed"  # its key columns changed at the source
