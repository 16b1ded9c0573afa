"""Which LSN the slot may be confirmed up to (SPEC §5), as a small pure state machine.

The pipeline reports what it receives and what becomes durable; `flush_lsn` answers. Rules:
- a transaction's changes count as durable only when the batch holding them is durable in
  Delta; the flush LSN is then that batch's version (the end LSN of its last transaction);
- with nothing in flight (no open transaction, no rows waiting, no batch being written) the
  server's keepalive position is confirmed: the walsender reports there everything it has
  already decoded, including transactions that touched no published table, so an idle or
  quiet source never holds WAL back;
- the flush LSN never moves backwards;
- while `held` (a table's snapshot runs beside the stream), nothing is confirmed at all: the
  slot stays where the session started, at or before the snapshot's consistent point, so the
  next session replays the new table's changes after that point (the other tables skip what
  they already applied).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Progress:
    flush_lsn: int = 0
    received_lsn: int = 0  # end LSN of the last committed transaction received
    keepalive_lsn: int = 0
    in_flight: int = 0  # batches handed to the writer and not yet durable
    open_transaction: bool = False
    pending_rows: int = 0
    held: bool = False

    @property
    def confirmable(self) -> int:
        """The position to report to the server as flushed (0: nothing claimed)."""
        return 0 if self.held else self.flush_lsn

    def received(self, end_lsn: int) -> None:
        self.received_lsn = max(self.received_lsn, end_lsn)

    def keepalive(self, wal_end: int) -> None:
        self.keepalive_lsn = max(self.keepalive_lsn, wal_end)
        self._idle_advance()

    def batch_started(self) -> None:
        self.in_flight += 1

    def batch_durable(self, version: int) -> None:
        self.in_flight -= 1
        self.flush_lsn = max(self.flush_lsn, version)
        self._idle_advance()

    def buffer_state(self, *, open_transaction: bool, pending_rows: int) -> None:
        self.open_transaction, self.pending_rows = open_transaction, pending_rows
        self._idle_advance()

    @property
    def idle(self) -> bool:
        return not (self.in_flight or self.open_transaction or self.pending_rows)

    def _idle_advance(self) -> None:
        if self.idle:
            # Everything received is applied (rows are durable, or the transaction touched no
            # captured table), and the keepalive position is past all of it.
            self.flush_lsn = max(self.flush_lsn, self.received_lsn, self.keepalive_lsn)
