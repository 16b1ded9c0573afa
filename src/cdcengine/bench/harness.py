"""`cdcengine bench`: run the chosen workloads against a source, write `results.json`,
`report.md` and the plots under `benchmarks/results/<date>-<host>/` (or `--out`).

Exit codes: 0 every leg ran and every result was correct; 1 a leg failed or a result was
wrong (marked in the JSON: `ok` false, `failures`); 2 usage.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cdcengine.bench import live, workloads
from cdcengine.bench.bytecode import compile_engine
from cdcengine.bench.context import ALL_WORKLOADS, Bench, BenchOptions, loadavg
from cdcengine.bench.report import plot, render
from cdcengine.errors import ConfigError
from cdcengine.source.registry import bench_for

RUNNERS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "insert": workloads.insert, "mixed": workloads.mixed, "bigtxn": workloads.bigtxn,
    "snapshot": workloads.snapshot, "merge": workloads.merge, "catchup": workloads.catchup,
    "latency": live.latency, "steady": live.steady,
}
assert set(RUNNERS) == set(ALL_WORKLOADS)


def machine() -> dict[str, object]:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or None
    try:
        import psutil
        memory = psutil.virtual_memory().total / 2**30
    except Exception:  # noqa: BLE001 - informative only
        memory = None
    return {"host": socket.gethostname(), "cpu_count": os.cpu_count(), "cpu_model": model,
            "memory_gb": memory, "platform": platform.platform()}


def versions() -> dict[str, object]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, object] = {"python": platform.python_version()}
    for pkg in ("cdcengine", "deltalake", "pyarrow", "duckdb", "psycopg"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                capture_output=True, text=True, check=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=False, timeout=10).stdout.strip()
        out["git_commit"] = commit.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def default_out(root: Path | None = None) -> Path:
    base = root or Path("benchmarks") / "results"
    stamp = datetime.now().strftime("%Y-%m-%d")
    return base / f"{stamp}-{socket.gethostname()}"


def run_bench(options: BenchOptions, *, dsn: str | None, out: Path | None = None,
              say: Callable[[str], None] = print, engine: str = "postgres",
              keep_workdir: bool = False) -> int:
    unknown = [w for w in options.workloads if w not in RUNNERS]
    if unknown:
        raise ConfigError(f"unknown workload(s) {', '.join(unknown)}; known: "
                          f"{', '.join(ALL_WORKLOADS)}")
    if options.rows < 10 or options.repeat < 1:
        raise ConfigError("--rows must be >= 10 and --repeat >= 1")
    out = out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="cdcengine-bench-",
                                    dir=os.environ.get("CDCENGINE_BENCH_TMP")))
    started = datetime.now(UTC)
    source = bench_for(engine)(dsn, say=say)
    bench = Bench(source=source, options=options, workdir=workdir, out=out, say=say)
    results: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"), "machine": machine(),
        "versions": versions(), "settings": options.to_dict(), "load_before": loadavg(),
        "workloads": {}, "legs": bench.legs,
    }
    t0 = time.monotonic()
    try:
        results["bytecode"] = [compile_engine(py) for py in
                               dict.fromkeys(p for p in (sys.executable, options.before_python)
                                             if p)]
        results["source"] = source.facts()
        say(f"bench: {source.description}; workloads {', '.join(options.workloads)}; "
            f"{options.rows:,} rows; {options.repeat} repetition(s); results in {out}")
        for name in options.workloads:
            bench.progress(name, "starting")
            try:
                results["workloads"][name] = RUNNERS[name](bench)
            except Exception as exc:  # noqa: BLE001 - the run goes on; this workload failed
                results["workloads"][name] = {"error": f"{type(exc).__name__}: {exc}"}
                bench.failures.append(f"{name}: {type(exc).__name__}: {exc}")
                bench.progress(name, f"FAILED: {type(exc).__name__}: {exc}")
            _write(results, bench, out, t0, plots=False)  # partial results survive a crash
    finally:
        source.close()
        if not keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    _write(results, bench, out, t0, plots=True)
    for name, res in results["workloads"].items():
        for g in res.get("goals", []):
            value = g.get("value")
            shown = f"{value:.2f}" if isinstance(value, int | float) else "-"
            say(f"{name}: {g['goal']} {g['target']}: {shown} → {g['verdict']}")
    say(f"bench {'passed' if results['ok'] else 'FAILED'} in {time.monotonic() - t0:.0f} s; "
        f"report: {out / 'report.md'}")
    return 0 if results["ok"] else 1


def _write(results: dict[str, Any], bench: Bench, out: Path, t0: float, *, plots: bool) -> None:
    results["failures"] = list(bench.failures)
    results["ok"] = not bench.failures
    results["load_after"] = loadavg()
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    if plots:
        try:
            results["plots"] = plot(results, out)
        except Exception as exc:  # noqa: BLE001 - the figures stand without the pictures
            results["plots_error"] = f"{type(exc).__name__}: {exc}"
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    (out / "report.md").write_text(render(results) + "\n")
    sys.stdout.flush()


__all__ = ["RUNNERS", "default_out", "machine", "run_bench", "versions"]
