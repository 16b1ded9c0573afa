"""What every workload of `cdcengine bench` shares: the options, the source, the work folder,
progress output, leg records (with load averages before and after each leg) and the profile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdcengine.bench.procs import ProcessRun, timed_run
from cdcengine.bench.source import BenchSource

ALL_WORKLOADS = ("insert", "mixed", "steady", "bigtxn", "snapshot", "latency", "merge",
                 "catchup")
#: What `--workloads all` (the default) runs: everything but `steady`, which is long (ask for it).
DEFAULT_WORKLOADS = ("insert", "mixed", "bigtxn", "snapshot", "latency", "merge", "catchup")


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    rows: int = 1_000_000
    repeat: int = 3
    txn_rows: int = 1000
    modes: tuple[str, ...] = ("consolidated", "append", "both")
    snapshot_large: bool = False
    merge_changes: int = 10_000
    steady_rows: int = 10_000_000
    steady_rate: int = 5000
    steady_seconds: float = 120.0
    latency_rate: int = 1000
    latency_seconds: float = 60.0
    latency_rows: int = 100_000
    engine_settings: Mapping[str, object] = field(default_factory=dict)
    # another build's interpreter (e.g. a checkout of the previous commit's .venv/bin/python):
    # its engine runs beside this one on the backlog and snapshot workloads, labelled
    # `<mode>@before`, so a before/after comparison comes from one run
    before_python: str | None = None
    profile: bool = False
    timeout_s: float = 3600.0
    corrupt_checksum: bool = False  # tests: the run must fail when a checksum differs

    def to_dict(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, tuple) else dict(v) if isinstance(v, Mapping)
                    else v) for k, v in
                ((f, getattr(self, f)) for f in self.__dataclass_fields__)}


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def downsample(series: list[tuple[float, int]], keep: int = 400) -> list[list[float]]:
    """At most `keep` points of a time series, the peak always kept."""
    if not series:
        return []
    step = max(1, len(series) // keep)
    picked = series[::step]
    peak = max(series, key=lambda p: p[1])
    if peak not in picked:
        picked.append(peak)
    return [[round(t, 3), v] for t, v in sorted(picked)]


@dataclass(slots=True)
class Bench:
    """One bench run in progress."""

    source: BenchSource
    options: BenchOptions
    workdir: Path
    out: Path
    say: Callable[[str], None] = print
    legs: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def progress(self, workload: str, text: str) -> None:
        self.say(f"[{time.strftime('%H:%M:%S')}] {workload}: {text}")

    def source_checksum(self, table: str) -> dict[str, str]:
        value = self.source.checksum(table)
        if self.options.corrupt_checksum:  # the test hook: a checksum that cannot match
            value = {**value, "sum_id": str(int(value["sum_id"]) + 1)}
        return value

    def record(self, workload: str, *, leg: str, label: str, rep: int, run: ProcessRun,
               changes: int, load_before: list[float], check: Mapping[str, Any] | None = None,
               extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """One leg into the results; a failed leg (timeout, crash, wrong result) fails the run
        and reports no rate."""
        ok = run.reached and not run.timed_out and (check is None or bool(check.get("ok")))
        entry: dict[str, Any] = {
            "workload": workload, "leg": leg, "label": label, "rep": rep, "ok": ok,
            "seconds": round(run.seconds, 4), "changes": changes,
            "rate": round(changes / run.seconds, 1) if ok and run.seconds > 0 else None,
            "peak_rss_mb": round(run.peak_rss / 2**20, 1), "returncode": run.returncode,
            "timed_out": run.timed_out, "load_before": load_before, "load_after": loadavg(),
            "rss": downsample(run.rss), **(extra or {}),
        }
        if check is not None:
            entry["check"] = dict(check)
        if not ok:
            why = ("timed out" if run.timed_out else "wrong result" if run.reached
                   else f"exited with code {run.returncode}")
            entry["error"] = why
            if run.stderr_tail:
                entry["stderr_tail"] = run.stderr_tail[-1500:]
            self.failures.append(f"{workload} {label} rep {rep}: {why}")
        self.legs.append(entry)
        rate = f"{entry['rate']:,.0f}/s" if entry["rate"] else "-"
        mark = "ok" if ok else f"FAILED ({entry['error']})"
        self.progress(workload, f"rep {rep + 1}/{self.options.repeat} {leg} {label}: "
                                f"{run.seconds:.2f} s, {rate}, peak RSS "
                                f"{entry['peak_rss_mb']:.0f} MB, {mark}")
        return entry

    def baseline(self, workload: str, label: str, rep: int, argv: list[str],
                 changes: int) -> dict[str, Any]:
        before = loadavg()
        self.progress(workload, f"rep {rep + 1} baseline {label} ...")
        log = self.workdir / "logs" / f"{workload}-{label}-{rep}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        run = timed_run(argv, env=self.source.baseline_env(), timeout_s=self.options.timeout_s,
                        log=log)
        return self.record(workload, leg="baseline", label=label, rep=rep, run=run,
                           changes=changes, load_before=before)

    def profile(self, workload: str, command: list[str], done: Callable[[], bool]) -> str | None:
        """Run `command` under py-spy until `done()`; the flame graph's path (None: no py-spy)."""
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            self.progress(workload, "profile skipped: py-spy not installed")
            return None
        target = self.out / f"profile-{workload}.svg"
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(proc.pid), "--subprocesses",
                                     "--nonblocking", "-o", str(target)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + self.options.timeout_s
        try:
            while not done() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            spy_proc.send_signal(2)  # SIGINT: py-spy writes the flame graph and exits
            try:
                spy_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                spy_proc.kill()
            proc.terminate()
            proc.wait(timeout=120)
        self.progress(workload, f"profile written: {target}")
        return target.name if target.exists() else None


__all__ = ["ALL_WORKLOADS", "DEFAULT_WORKLOADS", "Bench", "BenchOptions", "downsample",
           "loadavg"]
