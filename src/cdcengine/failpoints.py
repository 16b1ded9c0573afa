"""Named crash points, for proving exactly-once under `kill -9` at the moments that matter.

`CDCENGINE_FAILPOINT=name` (or `name:n`, the n-th time it is reached; several comma-separated)
makes the process SIGKILL itself at that point: no `finally`, no flush, no status update — the
same as a power cut or the OOM killer. Unset (always, outside tests), `hit` is one dict lookup.

Points (in the order a batch meets them):
- `batch_taken`: a batch was cut, nothing of it written;
- `between_tables`: some tables of a batch are committed to Delta, others not;
- `between_kinds`: a table's append table is committed, its consolidated table not;
- `after_commit`: every Delta commit of the batch is done, the slot not yet confirmed;
- `after_confirm`: the slot was told the batch is flushed;
- `after_snapshot`: a table's snapshot is committed, its state not yet recorded;
- `snapshot_chunk_committed`: one chunk of a table snapshot is committed to Delta (other chunks
  may be mid-copy), the table not yet marked loaded.
"""

from __future__ import annotations

import os
import signal

ENV = "CDCENGINE_FAILPOINT"


def _parse(spec: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, nth = part.partition(":")
        points[name] = int(nth) if nth else 1
    return points


_armed = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Die here if `name` is armed and this is its n-th arrival."""
    if not _armed or name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)


def arm(spec: str) -> None:
    """Replace the armed points (for a process that is told after it started)."""
    _armed.clear()
    _armed.update(_parse(spec))
