"""Timing a process as a user sees it, and the RSS of its whole process tree.

`timed_run` starts a command, samples the RSS of the process and all its descendants every
`interval_s` (psutil), and stops the clock either when the process exits (a baseline such as
`pg_recvlogical --endpos`) or when `done()` first returns true (the engine: every change durable
in Delta) — then it sends SIGTERM and waits for the exit, which is not timed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of `proc` and all its descendants (0 when it is gone)."""
    total = 0
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in members:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


class RssSampler:
    """Samples the RSS of `pid`'s process tree on its own thread: `series` is `(seconds since
    start, bytes)`, `peak` the largest sample."""

    def __init__(self, pid: int, *, interval_s: float = 0.1) -> None:
        self._proc = psutil.Process(pid)
        self._interval = interval_s
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self.series: list[tuple[float, int]] = []
        self.peak = 0
        self._thread = threading.Thread(target=self._loop, name="bench-rss", daemon=True)

    def start(self) -> RssSampler:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def sample(self) -> int:
        rss = tree_rss(self._proc)
        self.series.append((time.monotonic() - self._t0, rss))
        self.peak = max(self.peak, rss)
        return rss

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)


@dataclass(slots=True)
class ProcessRun:
    """One timed process: `seconds` from start to exit (or to `done`), exit code, whether `done`
    was reached (always true for a process timed to its exit with code 0), peak tree RSS."""

    argv0: str
    seconds: float
    returncode: int | None
    reached: bool
    peak_rss: int
    rss: list[tuple[float, int]] = field(default_factory=list)
    stderr_tail: str = ""
    timed_out: bool = False


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def timed_run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    done: Callable[[], bool] | None = None,
    poll_s: float = 0.1,
    timeout_s: float = 3600.0,
    log: Path | None = None,
    rss_interval_s: float = 0.1,
    on_poll: Callable[[float], None] | None = None,
) -> ProcessRun:
    """Run `argv` (stdout to /dev/null, stderr to `log` or a pipe's tail) and time it."""
    err_path = log or Path(os.devnull)
    with open(err_path, "ab") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=err,
                                env=dict(env) if env is not None else None)
        sampler = RssSampler(proc.pid, interval_s=rss_interval_s).start()
        reached = False
        timed_out = False
        seconds = 0.0
        try:
            while True:
                rc = proc.poll()
                now = time.monotonic() - t0
                if done is not None and done():
                    seconds = time.monotonic() - t0
                    reached = True
                    break
                if rc is not None:
                    seconds = now
                    reached = done is None and rc == 0
                    break
                if now > timeout_s:
                    seconds = now
                    timed_out = True
                    break
                if on_poll is not None:
                    on_poll(now)
                time.sleep(poll_s if done is not None else min(poll_s, 0.01))
        finally:
            sampler.sample()
            sampler.stop()
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return ProcessRun(argv0=Path(argv[0]).name, seconds=seconds, returncode=proc.returncode,
                      reached=reached, peak_rss=sampler.peak, rss=sampler.series,
                      stderr_tail=_tail(log) if log else "", timed_out=timed_out)


__all__ = ["ProcessRun", "RssSampler", "timed_run", "tree_rss"]
