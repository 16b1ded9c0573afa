"""Prerequisite checks of the server and the connecting role: version, primary, encryption,
wal_level, the REPLICATION and CREATE privileges."""

from __future__ import annotations

import ipaddress

import psycopg

from cdcengine.source.adapter import Check
from cdcengine_postgres.control.check_context import ERR, OK, WARN, CheckContext

__all__ = ["check_create_privilege", "check_encryption", "check_not_standby",
           "check_replication_privilege", "check_server_version", "check_wal_level"]


def check_server_version(ctx: CheckContext) -> list[Check]:
    v, major = ctx.version, ctx.version // 10000
    if v < 130000:
        return [Check(name="server_version", severity=ERR,
                      message=f"PostgreSQL {major} is too old: 13 or later is required "
                              "(publish_via_partition_root, wal_status).",
                      fix="Upgrade the server to PostgreSQL 13 or later (15+ recommended).")]
    missing = []
    if v < 140000:
        missing.append("streaming of large in-progress transactions (needs 14; large "
                       "transactions are decoded fully on the server first)")
    if v < 150000:
        missing.append("publication column lists (needs 15; `columns` is filtered by the "
                       "engine, all columns travel in WAL)")
    if missing:
        return [Check(name="server_version", severity=WARN,
                      message=f"PostgreSQL {major} works, without: " + "; ".join(missing) + ".",
                      fix="Upgrade to PostgreSQL 15 or later for these features.")]
    return [Check(name="server_version", severity=OK,
                  message=f"PostgreSQL {major}: streaming of large transactions and column "
                          "lists available.")]


def check_not_standby(ctx: CheckContext) -> list[Check]:
    row = ctx.conn.execute("SELECT pg_is_in_recovery()").fetchone()
    if row and row[0]:
        return [Check(name="not_standby", severity=ERR,
                      message="The server is a standby (pg_is_in_recovery() is true); "
                              "publications and slots must be created on the primary.",
                      fix="Point the dsn at the primary server.")]
    return [Check(name="not_standby", severity=OK, message="Connected to a primary.")]


def _is_local(host: str, hostaddr: str) -> bool:
    """A unix socket or a loopback address: traffic that never leaves this machine. `hostaddr` is
    the address libpq actually connected to (psycopg resolves names before connecting), so a
    name such as `db.internal` that resolves to 127.0.0.1 counts as local, and `localhost`
    resolving elsewhere does not."""
    if not host or host.startswith(("/", "@")):  # "@" is a Linux abstract-namespace socket
        return True
    try:
        return ipaddress.ip_address(hostaddr or host).is_loopback
    except ValueError:
        return False


def _option(conn: psycopg.Connection, keyword: str) -> str:
    """The value libpq uses for a connection option (the dsn's, else libpq's default)."""
    for opt in conn.pgconn.info:
        if opt.keyword.decode() == keyword:
            return (opt.val or opt.compiled or b"").decode()
    return ""


def _gss_encrypted(conn: psycopg.Connection) -> bool:
    """GSSAPI encryption (gssencmode) protects the link as well as TLS does. A pooler or a
    PostgreSQL-compatible server without pg_stat_gssapi counts as not encrypted."""
    try:
        row = conn.execute(
            "SELECT encrypted FROM pg_stat_gssapi WHERE pid = pg_backend_pid()").fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


def check_encryption(ctx: CheckContext) -> list[Check]:
    """⚠️ when a source across the network is reached without encryption: the password (for
    `password`/`md5` auth) and every replicated row then travel in clear text. Decided from what
    the connection actually did (libpq's SSL state), not from the dsn: sslmode=prefer may or may
    not end up encrypted. Every connection the engine opens uses the same dsn, so the control
    connection's answer holds for the replication connections too."""
    conn = ctx.conn
    mode = _option(conn, "sslmode") or "prefer"
    if conn.pgconn.ssl_in_use:
        if mode == "verify-full":
            how = "the server's certificate and host name are verified (sslmode=verify-full)"
        elif mode == "verify-ca":
            how = ("the server's certificate is verified but not its host name "
                   "(sslmode=verify-ca)")
        else:
            how = f"the server's certificate is not verified (sslmode={mode})"
        return [Check(name="encryption", severity=OK, message=f"Encrypted with TLS; {how}.")]
    tunnel = ctx.source.ssh_tunnel
    if tunnel is not None:  # libpq's end is the local forwarder: loopback says nothing here
        if _gss_encrypted(conn):
            return [Check(name="encryption", severity=OK, message="Encrypted with GSSAPI.")]
        return [Check(name="encryption", severity=OK,
                      message=f"Not encrypted by PostgreSQL, but carried inside the SSH tunnel "
                              f"through {tunnel.describe()}: encrypted as far as the bastion; "
                              f"from the bastion to {conn.info.host} it is clear text, which "
                              "is fine on a private network between them.",
                      fix="If the bastion reaches the database across an untrusted network, "
                          "add sslmode=verify-full and sslrootcert=<CA certificate> to the dsn "
                          "as well.")]
    if _is_local(conn.info.host, conn.info.hostaddr):
        return [Check(name="encryption", severity=OK,
                      message="Not encrypted, which is fine here: the source is on this "
                              "machine (unix socket or loopback address).")]
    if _gss_encrypted(conn):
        return [Check(name="encryption", severity=OK, message="Encrypted with GSSAPI.")]
    return [Check(name="encryption", severity=WARN,
                  message=f"The connection to {conn.info.hostaddr or conn.info.host} is not "
                          f"encrypted (sslmode={mode}): credentials and every replicated row "
                          "cross the network in clear text.",
                  fix="Add sslmode=verify-full and sslrootcert=<the CA certificate that "
                      "signed the server's certificate> to the dsn (and ssl = on at the "
                      "server if it is off).")]


def check_wal_level(ctx: CheckContext) -> list[Check]:
    try:
        row = ctx.conn.execute("SHOW wal_level").fetchone()
    except psycopg.Error:
        # PgBouncer in transaction mode and some wire-compatible databases refuse SHOW.
        return [Check(name="wal_level", severity=ERR,
                      message="This endpoint does not expose wal_level (a connection pooler "
                              "or a PostgreSQL-compatible database?); logical replication "
                              "needs a direct connection to PostgreSQL.",
                      fix="Point the dsn at the PostgreSQL primary itself, not a pooler.")]
    level = row[0] if row else "unknown"
    if level != "logical":
        return [Check(name="wal_level", severity=ERR,
                      message=f"wal_level is '{level}'; logical replication needs 'logical'.",
                      fix="ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL "
                          "(on managed services: set the logical replication parameter).")]
    return [Check(name="wal_level", severity=OK, message="wal_level is 'logical'.")]


def check_replication_privilege(ctx: CheckContext) -> list[Check]:
    row = ctx.conn.execute(
        "SELECT r.rolsuper, r.rolreplication,"
        " EXISTS (SELECT 1 FROM pg_roles g WHERE g.rolname IN ('rds_replication',"
        "  'rds_superuser') AND pg_has_role(current_user, g.oid, 'MEMBER'))"
        " FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()
    sup, repl, rds = row if row else (False, False, False)
    if sup or repl or rds:
        how = "superuser" if sup else ("REPLICATION" if repl else "rds_replication")
        return [Check(name="replication_privilege", severity=OK,
                      message=f"User {ctx.user} may replicate ({how}).")]
    return [Check(name="replication_privilege", severity=ERR,
                  message=f"User {ctx.user} is neither superuser nor has the REPLICATION "
                          "attribute (nor rds_replication/rds_superuser membership).",
                  fix=f"ALTER ROLE {ctx.q(ctx.user)} WITH REPLICATION;  "
                      f"(on Amazon RDS: GRANT rds_replication TO {ctx.q(ctx.user)};)")]


def check_create_privilege(ctx: CheckContext) -> list[Check]:
    if not ctx.managed:
        return [Check(name="create_privilege", severity=OK,
                      message="Not needed: self_managed mode creates no publication.")]
    row = ctx.conn.execute(
        "SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()
    if row and row[0]:
        return [Check(name="create_privilege", severity=OK,
                      message=f"User {ctx.user} may create publications in {ctx.database}.")]
    return [Check(name="create_privilege", severity=ERR,
                  message=f"User {ctx.user} lacks CREATE on database {ctx.database}, which "
                          "managed mode needs to create the publication.",
                  fix=f"GRANT CREATE ON DATABASE {ctx.q(ctx.database)} TO {ctx.q(ctx.user)};  "
                      "(or use management_mode = \"self_managed\")")]
