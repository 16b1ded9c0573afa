"""What a source's pipeline has pending and when something became durable, for the daemon's
watchdog (`serve.watchdog`) to judge.

It lives with the pipeline because the pipeline's threads write it (cheap attribute stores on
the hot path); the watchdog only reads it, so the data path never depends on the daemon.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from cdcengine.errors import Reason


class Lane:
    """One kind of a pipeline's work. Written by the thread doing it with plain attribute
    stores (atomic under the GIL: the stream reports every loop turn, so no lock), read by the
    watchdog. `moves` only ever grows: the watchdog compares it between ticks."""

    __slots__ = ("detail", "failures", "moves", "name", "pending", "undone")

    def __init__(self, name: str) -> None:
        self.name = name
        self.pending = False
        self.moves = 0
        self.detail: Mapping[str, object] = {}
        # a failed run left this lane's work undone (the reason): pending until it is redone
        self.undone: str | None = None
        self.failures = 0  # failed runs in a row on this lane's pending work

    def report(self, *, pending: bool, moved: bool = False, **detail: object) -> None:
        if moved:
            self.moved()
        self.pending = pending
        self.detail = detail

    def moved(self) -> None:
        """Something of this lane became durable."""
        self.moves += 1
        self.undone = None
        self.failures = 0


class Activity:
    """What one source's pipeline has pending; one per source runner, kept across reconnects."""

    def __init__(self) -> None:
        self.stream = Lane("stream")
        self.snapshot = Lane("snapshot")

    @contextmanager
    def snapshotting(self, table: str) -> Iterator[None]:
        """A table snapshot (or resync) runs for the `with` body."""
        self.snapshot.report(pending=True, moved=True, table=table)
        try:
            yield
        finally:
            self.snapshot.report(pending=False, moved=True)

    def interrupted(self, reason: str, message: str = "") -> None:
        """A run failed and will be retried: what the stream had pending is still to do.

        Not for a lost connection to the source: reconnecting is healthy (SPEC §7) and the
        changes wait safely in the slot; the next session's own pending work counts as usual.
        A failure that repeats on the same changes (a destination refusing them) is carried."""
        if self.stream.pending and reason not in _RECONNECTING:
            # what failed, in the error's own (secret-free) words: status shows it
            self.stream.undone = f"{reason}: {message}" if message else reason
            self.stream.failures += 1

    def lanes(self) -> tuple[Lane, ...]:
        return (self.stream, self.snapshot)


_RECONNECTING = frozenset({str(Reason.CONNECTION_FAILED), str(Reason.HOST_UNREACHABLE),
                           str(Reason.SLOT_IN_USE), str(Reason.LEASE_HELD)})
