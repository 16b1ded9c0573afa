"""Named failure points, for proving exactly-once under `kill -9` and for making a hang happen
at the moments that matter.

`CDCENGINE_FAILPOINT=name` (or `name:n`, the n-th time it is reached; several comma-separated)
makes the process SIGKILL itself at that point: no `finally`, no flush, no status update — the
same as a power cut or the OOM killer. Unset (always, outside tests), `hit` is one dict lookup.

`name=hang` (or `name:n=hang`) blocks the thread that reaches the point instead, like a
deltalake call or a COPY that never returns: until the file named by
`CDCENGINE_FAILPOINT_RELEASE` exists (the test creates it to let the work go on), or for ever
when that variable is unset. `name=fail` raises `FailpointError` there, at every arrival from
the n-th on until that file exists: a failure that repeats on every retry. The watchdog tests use
both (`cdcengine.serve.watchdog`). `name=sleep:SECONDS` makes every arrival from the n-th on
sleep that long: a slow destination, for the adaptive batching tests (`pipeline.writer`).

Points (in the order a batch meets them):
- `batch_taken`: a batch was cut, nothing of it written;
- `between_tables`: some tables of a batch are committed to Delta, others not;
- `between_kinds`: a table's append table is committed, its consolidated table not;
- `after_commit`: every Delta commit of the batch is done, the slot not yet confirmed;
- `after_confirm`: the slot was told the batch is flushed;
- `after_snapshot`: a table's snapshot is committed, its state not yet recorded;
- `snapshot_chunk_committed`: one chunk of a table snapshot is committed to Delta (other chunks
  may be mid-copy), the table not yet marked loaded;
- catching up through SQL peeks of the slot (adapter `replication/catchup`): `catchup_chunk_read`
  (a chunk read whole, not all of it durable), `catchup_chunk_durable` (all of it durable, the
  slot not yet advanced), `catchup_chunk_advanced` (advanced, the next chunk not begun).
"""

from __future__ import annotations

import os
import signal
import time

ENV = "CDCENGINE_FAILPOINT"
RELEASE_ENV = "CDCENGINE_FAILPOINT_RELEASE"
KILL, HANG, FAIL, SLEEP = "kill", "hang", "fail", "sleep"


class FailpointError(RuntimeError):
    """Raised by a `fail` failpoint."""


def _parse(spec: str) -> dict[str, tuple[int, str]]:
    points: dict[str, tuple[int, str]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, action = part.partition("=")
        name, _, nth = point.partition(":")
        action = action.strip() or KILL
        verb, _, seconds = action.partition(":")
        if verb == SLEEP:
            float(seconds)  # `sleep:SECONDS`: a malformed figure fails here, at arming
        elif action not in (KILL, HANG, FAIL):
            raise ValueError(f"{ENV}: unknown action {action!r} in {part!r} "
                             "(kill | hang | fail | sleep:SECONDS)")
        points[name.strip()] = (int(nth) if nth else 1, action)
    return points


_armed = _parse(os.environ.get(ENV, ""))


def hit(name: str) -> None:
    """Die (or hang) here if `name` is armed and this is its n-th arrival."""
    if not _armed or name not in _armed:
        return
    left, action = _armed[name]
    _armed[name] = (left - 1, action)
    if left - 1 > 0:
        return
    if action.startswith(SLEEP + ":"):
        time.sleep(float(action.partition(":")[2]))  # stays armed: every later arrival too
    elif action == FAIL:
        if not _released():
            raise FailpointError(f"failpoint {name}")
        del _armed[name]
    elif action == HANG:
        del _armed[name]  # one thread hangs; the point is spent
        _hang()
    else:
        os.kill(os.getpid(), signal.SIGKILL)


def _released() -> bool:
    release = os.environ.get(RELEASE_ENV)
    return bool(release and os.path.exists(release))


def _hang() -> None:
    while not _released():
        time.sleep(0.1)


def arm(spec: str) -> None:
    """Replace the armed points (for a process that is told after it started)."""
    _armed.clear()
    _armed.update(_parse(spec))
