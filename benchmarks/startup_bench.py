"""Start-up of `cdcengine run` from outside: process start → the engine's `stream_started` log
line, on an enabled source with nothing to catch up (a throwaway cluster), several starts per
build in alternating order. Pass one or more Python interpreters (builds) to compare:

    .venv/bin/python benchmarks/startup_bench.py .venv/bin/python /old/checkout/.venv/bin/python

(Used in RESULTS.md, issue 16.)
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

from cdcengine_postgres.testing.cluster import TempCluster, start_with_database

REPS = 6


def main() -> None:
    pythons = sys.argv[1:] or [sys.executable]
    root = Path(tempfile.mkdtemp(prefix="startup-bench-"))
    cluster = TempCluster({"fsync": "off"})
    dsn = start_with_database(cluster, "startup", application_name="startup-bench", say=print,
                              starting="startup bench", instead="use another machine")
    try:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            conn.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 1000) g")
        configs = []
        for i, python in enumerate(pythons):
            cfg = root / f"c{i}.toml"
            cfg.write_text(f'[engine]\nstate = "sqlite:///{root}/state{i}.db"\nhttp_port = 0\n\n'
                           f'[[source]]\nname = "s{i}"\ndsn = "{dsn}"\ntables = ["public.t"]\n'
                           f'destination = "{root}/lake{i}"\n')
            subprocess.run([python, "-m", "cdcengine", "--config", str(cfg), "enable"],
                           check=True, capture_output=True)
            _start(python, cfg)  # the first start takes the snapshot: not timed
            configs.append(cfg)
        seconds: dict[int, list[float]] = {i: [] for i in range(len(pythons))}
        order = list(range(len(pythons)))
        for rep in range(REPS):
            for i in (order if rep % 2 == 0 else order[::-1]):
                seconds[i].append(_start(pythons[i], configs[i]))
        for i, python in enumerate(pythons):
            s = seconds[i]
            print(f"{python}: start -> stream_started min {min(s):.3f} median "
                  f"{statistics.median(s):.3f} max {max(s):.3f} s ({len(s)} starts)")
    finally:
        cluster.cleanup()


def _start(python: str, cfg: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen([python, "-m", "cdcengine", "--config", str(cfg), "run"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    took = float("nan")
    for line in proc.stderr:
        if "stream_started" in line:
            took = time.monotonic() - t0
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    return took


if __name__ == "__main__":
    main()
