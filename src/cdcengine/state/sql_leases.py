"""The state store's leases in SQL: who holds a source, until when (see `Lease`).

A mixin of `cdcengine.state.sql.SQLStateStore`, over the dialect's serialised write
transactions; expiry is in epoch seconds, so it holds across processes and machines.
"""

from __future__ import annotations

import os
import socket
from dataclasses import replace
from typing import TypeVar

from cdcengine.errors import LeaseHeld
from cdcengine.state.base import Lease, holder_gone, lease_held_message
from cdcengine.state.dialect import DialectStore
from cdcengine.state.records import dt, lease_record, refuse

C = TypeVar("C")  # the driver's connection type


class LeaseSQL(DialectStore[C]):
    """Acquire, renew, release and read a source's lease (`SQLStateStore.lease` holds one for
    a `with` block)."""

    # leases -----------------------------------------------------------------------------------

    def acquire_lease(self, source: str, *, holder: str, purpose: str, ttl_s: float) -> Lease:
        """`holder` holds the source until `ttl_s` from now. Free and expired leases are taken,
        the holder's own is renewed (keeping when it was first acquired); a live lease of another
        holder raises `LeaseHeld` naming it. Epoch seconds, so expiry holds across processes and
        machines; a holder found dead by pid is taken over only when it ran on this host."""
        if ttl_s <= 0:
            raise refuse(f"lease ttl must be positive, got {ttl_s}")
        with self._write() as tx:
            now = self._clock()
            row = tx.one("SELECT * FROM leases WHERE source = ?", (source,))
            if row is not None and row["holder"] != holder and row["expires_at"] >= now \
                    and not holder_gone(row["host"], row["pid"]):
                raise LeaseHeld(lease_held_message(lease_record(row)))
            acquired_at = row["acquired_at"] if row is not None and row["holder"] == holder else now
            lease = Lease(
                source=source,
                holder=holder,
                purpose=purpose,
                host=socket.gethostname(),
                pid=os.getpid(),
                acquired_at=dt(acquired_at),
                expires_at=dt(now + ttl_s),
            )
            tx.run(
                "INSERT INTO leases (source, holder, purpose, host, pid, acquired_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE"
                " SET holder = excluded.holder, purpose = excluded.purpose,"
                " host = excluded.host, pid = excluded.pid,"
                " acquired_at = excluded.acquired_at, expires_at = excluded.expires_at",
                (source, holder, purpose, lease.host, lease.pid, acquired_at, now + ttl_s),
            )
            return lease

    def renew_lease(self, lease: Lease, ttl_s: float) -> Lease:
        """The lease now runs until `ttl_s` from now. Raises `LeaseHeld` if it was lost (released,
        or expired and taken by another holder); a lapsed lease nobody took is still ours."""
        if ttl_s <= 0:
            raise refuse(f"lease ttl must be positive, got {ttl_s}")
        with self._write() as tx:
            row = tx.one("SELECT * FROM leases WHERE source = ?", (lease.source,))
            if row is None or row["holder"] != lease.holder:
                raise LeaseHeld(
                    lease_held_message(lease_record(row))
                    if row is not None
                    else f"the lease on source {lease.source!r} was lost (released or taken over)"
                )
            expires_at = self._clock() + ttl_s
            tx.run("UPDATE leases SET expires_at = ? WHERE source = ?", (expires_at, lease.source))
            return replace(lease_record(row), expires_at=dt(expires_at))

    def release_lease(self, lease: Lease) -> None:
        """The source is free, unless someone else holds it by now (theirs is left alone)."""
        with self._write() as tx:
            tx.run(
                "DELETE FROM leases WHERE source = ? AND holder = ?", (lease.source, lease.holder)
            )

    def get_lease(self, source: str) -> Lease | None:
        """The live lease on the source, or None when it is free or its lease expired."""
        now = self._clock()
        row = self._read(
            lambda tx: tx.one(
                "SELECT * FROM leases WHERE source = ? AND expires_at >= ?", (source, now)
            )
        )
        return None if row is None else lease_record(row)
