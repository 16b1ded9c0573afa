"""Many snapshots at once in one process never deadlock inside deltalake (issue 12, defect 3).

The hang this guards against: a deltalake call that blocks on delta-rs' shared tokio runtime
while holding the GIL (`set_table_properties` in `begin_snapshot`, `is_deltatable`, ...) and a
`write_deltalake` fed by a Python-backed reader, whose batches the tokio workers can only pull
with the GIL. Each waits for the other; every PostgreSQL session then idles in ClientRead.

The snapshots run in a child process (`snapshot_stress.py`), round after round; a round that
does not end within `ROUND_TIMEOUT_S` fails the test with every thread's Python stack (and the
native stacks when gdb is installed), then the child is killed. `CDCENGINE_STRESS_ROUNDS` runs
more rounds (default 12, about 25 s here), `CDCENGINE_STRESS_SCALE` bigger tables,
`CDCENGINE_STRESS_SPILL_BYTES` a smaller in-memory budget per chunk (chunks spill to files).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

CHILD = Path(__file__).with_name("snapshot_stress.py")
ROUNDS = int(os.environ.get("CDCENGINE_STRESS_ROUNDS", "12"))
ROUND_TIMEOUT_S = float(os.environ.get("CDCENGINE_STRESS_ROUND_TIMEOUT_S", "60"))
SCALE = int(os.environ.get("CDCENGINE_STRESS_SCALE", "1"))  # rows per table x SCALE
SPILL_BYTES = int(os.environ.get("CDCENGINE_STRESS_SPILL_BYTES", "0"))  # 0: the sink's default

# five tables of different sizes (so begin_snapshot of one overlaps chunk writes of others),
# in every table mode: `both` tees each chunk to two concurrent deltalake writers
TABLES = [("s1", 30_000, "consolidated"), ("s2", 12_000, "both"), ("s3", 20_000, "append"),
          ("s4", 8_000, "consolidated"), ("s5", 25_000, "both")]


def _native_stacks(pid: int) -> str:
    gdb = shutil.which("gdb")
    if gdb is None:
        return "(gdb not installed: no native stacks)"
    try:
        done = subprocess.run([gdb, "-p", str(pid), "-batch", "-nx", "-ex",
                               "thread apply all bt 30"],
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "(gdb timed out)"
    # one line per frame, cut short: the thread and function names are what tell the story
    return "\n".join(line[:200] for line in done.stdout.splitlines())


def test_concurrent_snapshots_never_deadlock(db, tmp_path: Path) -> None:
    tables = [(name, rows * SCALE, mode) for name, rows, mode in TABLES]
    for name, rows, _ in tables:
        db.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, v int, note text, j jsonb);"
                   f"INSERT INTO {name} SELECT i, i % 97, 'row ' || i, "
                   f"jsonb_build_object('i', i) FROM generate_series(1, {rows}) i;"
                   f"ANALYZE {name}")
    config = {"dsn": db.dsn, "root": str(tmp_path), "rounds": ROUNDS,
              "chunk_rows": 2_000 * SCALE, "spill_bytes": SPILL_BYTES,
              "workers": 2,
              "tables": [{"name": n, "rows": r, "mode": m} for n, r, m in tables]}
    child = subprocess.Popen([sys.executable, str(CHILD), json.dumps(config)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(child.stdout.readline, "")),
                              daemon=True)
    errs = threading.Thread(target=lambda: stderr.extend(iter(child.stderr.readline, "")),
                            daemon=True)
    reader.start()
    errs.start()
    try:
        seen = 0
        deadline = time.monotonic() + ROUND_TIMEOUT_S + 30  # the first round starts the child
        while child.poll() is None or len(lines) > seen:
            if len(lines) > seen:
                seen = len(lines)
                deadline = time.monotonic() + ROUND_TIMEOUT_S
            elif time.monotonic() > deadline:
                child.send_signal(signal.SIGUSR1)  # faulthandler: every thread's Python stack
                time.sleep(1.0)
                native = _native_stacks(child.pid)
                child.kill()
                child.wait()
                errs.join(5)
                pytest.fail(
                    f"round {seen} of {ROUNDS} hung for {ROUND_TIMEOUT_S:.0f} s (deadlock) after "
                    f"{''.join(lines)}\n--- Python stacks ---\n{''.join(stderr)[-30_000:]}"
                    f"\n--- native stacks ---\n{native}")
            time.sleep(0.2)
        reader.join(5)
        errs.join(5)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0, f"{''.join(lines)}\n{''.join(stderr)[-10_000:]}"
    assert [ln.split()[:2] for ln in lines] == [["round", str(i)] for i in range(ROUNDS)]
    assert all(ln.split()[2] == "ok" for ln in lines), "".join(lines)
    print("".join(lines))  # the round times (pytest -s or -rP shows them)
