"""Which LSN the slot may be confirmed up to (SPEC §5), as a small pure state machine.

The pipeline reports what it receives and hands to the writer; once per step (`settle`) it
reports what became durable together with the buffer's state *as of that moment*, and
`confirmable` answers. Rules:
- a transaction's changes count as durable only when the batch holding them is durable in
  Delta; the flush LSN is then that batch's version (the end LSN of its last transaction);
- with nothing in flight (no open transaction, no rows waiting, no batch being written) the
  server's keepalive position is confirmed: the walsender reports there everything it has
  already decoded, including transactions that touched no published table, so an idle or
  quiet source never holds WAL back;
- "nothing in flight" is only ever judged from one consistent reading of the buffer, taken
  after the durable batches were collected: a batch becoming durable says nothing about rows
  received since it was taken. (Judging it from the buffer state of an earlier step confirmed
  the transaction received meanwhile, and a reconnect then skipped it: issue 12.)
- the flush LSN never moves backwards;
- while `held` (a table's snapshot runs beside the stream), nothing is confirmed at all: the
  slot stays where the session started, at or before the snapshot's consistent point, so the
  next session replays the new table's changes after that point (the other tables skip what
  they already applied).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class Progress:
    flush_lsn: int = 0
    received_lsn: int = 0  # end LSN of the last committed transaction received
    keepalive_lsn: int = 0
    in_flight: int = 0  # batches handed to the writer and not yet durable
    held: bool = False

    @property
    def confirmable(self) -> int:
        """The position to report to the server as flushed (0: nothing claimed)."""
        return 0 if self.held else self.flush_lsn

    def received(self, end_lsn: int) -> None:
        self.received_lsn = max(self.received_lsn, end_lsn)

    def batch_started(self) -> None:
        self.in_flight += 1

    def settle(self, *, durable: Iterable[int], open_transaction: bool, pending_rows: int,
               keepalive_lsn: int) -> int:
        """One step: `durable` are the versions of the batches that became durable since the
        last step (in order); `open_transaction`, `pending_rows` and `keepalive_lsn` are read
        *after* they were collected. Returns `confirmable`."""
        for version in durable:
            if self.in_flight <= 0:
                raise ValueError("a batch became durable that was never started")
            self.in_flight -= 1
            self.flush_lsn = max(self.flush_lsn, version)
        self.keepalive_lsn = max(self.keepalive_lsn, keepalive_lsn)
        if not (self.in_flight or open_transaction or pending_rows):
            # Everything received is applied (rows are durable, or the transaction touched no
            # captured table), and the keepalive position is past all of it.
            self.flush_lsn = max(self.flush_lsn, self.received_lsn, self.keepalive_lsn)
        return self.confirmable
