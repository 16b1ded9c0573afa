"""How the library's commands hold a source (the state store's lease) against each other and
against a running daemon."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from cdcengine.state.base import StateStore, hold_lease

# A command's lease outlives a slow statement; the slot-creation wait is added on top.
COMMAND_LEASE_TTL_S = 120.0


@contextmanager
def enable_lease(store: StateStore, source: str, slot_wait_s: float) -> Iterator[bool]:
    """`enable` holds the lease (True), except on an enabled source a daemon streams (False):
    then it only adopts the slot, brings the publication in line and registers the tables,
    which the daemon reads at its next check."""
    rec = store.get_source(source)
    if rec is not None and rec.enabled:
        with lease_unless_daemon(store, source, "enable", wait_s=0) as leased:
            yield leased
        return
    with hold_lease(store, source, purpose="enable", ttl_s=COMMAND_LEASE_TTL_S + slot_wait_s,
                    wait_s=0):
        yield True


@contextmanager
def lease_unless_daemon(store: StateStore, source: str, purpose: str, *,
                        wait_s: float = 5) -> Iterator[bool]:
    """The source's lease for a change a running daemon also accepts queued in the state store
    (it reads settings and resync requests there): with a daemon holding the lease, the change
    is written without it (False) and the daemon applies it at its next check."""
    if daemon_holds(store, source):
        yield False
        return
    with hold_lease(store, source, purpose=purpose, ttl_s=COMMAND_LEASE_TTL_S, wait_s=wait_s):
        yield True


def daemon_holds(store: StateStore, source: str) -> bool:
    """A running daemon holds the source's lease."""
    held = store.get_lease(source)
    return held is not None and held.purpose == "daemon"
