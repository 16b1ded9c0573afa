"""Child process of `test_concurrent_snapshots.py`: many table snapshots at once in ONE process.

Run as `python snapshot_stress.py CONFIG_JSON`. Each round snapshots every table of the config at
the same time, one thread per table and each table under its own source (its own temporary slot
and sink), into a fresh destination — the way a daemon with several sources snapshots them — with
`snapshot_workers` chunk copies per table. A line `round <i> ok <seconds>` is printed after each
round; the parent watches those lines and treats a round that does not end in time as a hang.

It runs in a child process because a hang of this kind holds the GIL: the test process could
not even run its own timeout. `faulthandler` is registered on SIGUSR1 so the parent can ask for
every thread's Python stack (a C-level dump that needs no GIL) before it kills the child.
"""

from __future__ import annotations

import faulthandler
import json
import resource
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any


def main(config: dict[str, Any]) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    import structlog

    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())  # quiet: stdout is ours

    from cdcengine.config import SourceConfig
    from cdcengine.names import TableRef
    from cdcengine.pipeline.snapshots import snapshot_table
    from cdcengine.sink.base import kinds_for
    from cdcengine.sink.delta import DeltaSink
    from cdcengine.source.registry import adapter_for
    from cdcengine.state import open_state

    root = Path(config["root"])
    tables: list[dict[str, Any]] = config["tables"]
    for r in range(int(config["rounds"])):
        started = time.monotonic()
        failures: list[str] = []

        def one(t: dict[str, Any], r: int = r, failures: list[str] = failures) -> None:
            name = t["name"]
            src = SourceConfig(name=f"stress_{name}", dsn=config["dsn"], tables=[name],
                               destination=str(root / f"round{r}" / name),
                               snapshot_chunk_rows=int(config["chunk_rows"]),
                               snapshot_workers=int(config["workers"]),
                               table_mode=t["mode"])
            try:
                spill = int(config.get("spill_bytes") or 0)
                sink = DeltaSink(src.destination, source=src.name,
                                 **({"spill_bytes": spill} if spill else {}))
                with open_state("sqlite:///" + str(root / f"state-{name}.db")) as store:
                    outcome = snapshot_table(adapter_for(src), src, src.table_config(name),
                                             sink, store)
                if not outcome.finished:
                    failures.append(f"{name}: snapshot not finished")
                    return
                for kind in kinds_for(src.table_config(name).mode):
                    rows = DeltaSink.for_source(src).row_count(TableRef.parse(name), kind)
                    if rows != t["rows"]:
                        failures.append(f"{name}: {rows} rows in its {kind} Delta table, "
                                        f"{t['rows']} in the source")
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                failures.append(f"{name}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=one, args=(t,), name=f"source-{t['name']}")
                   for t in tables]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            print(f"round {r} failed: {'; '.join(failures)}", flush=True)
            return 1
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
        print(f"round {r} ok {time.monotonic() - started:.2f} s, peak rss {peak_mb} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
