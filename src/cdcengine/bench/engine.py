"""The engine as a user runs it: one config file per engine source, `enable` (which provisions
the source's own slot and publication), and `python -m cdcengine --config X run` as a
subprocess timed from process start until every change is durable in Delta.

Every engine repetition is its own source (own name, slot, publication, destination), enabled
and *primed* before the workload writes its backlog: primed = `run` until each table streams
(its first snapshot done), then SIGTERM. So each repetition's slot is in place before the
backlog, and a timed leg reads exactly the backlog.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cdcengine.bench.lake import Lake, differences, same
from cdcengine.bench.procs import ProcessRun, timed_run
from cdcengine.names import TableRef

KINDS = {"consolidated": ("consolidated",), "append": ("append",),
         "both": ("consolidated", "append")}


def _toml(value: object) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists: JSON is valid TOML here


#: How often a timed leg looks whether the engine is done. Looking costs one listing of each
#: table's `_delta_log` folder; the table itself is read only after a new commit appeared
#: (`when_committed`). It used to read the whole table every 0.1 s: up to 0.1 s added to every
#: leg's time, and the harness's CPU taken from the 2 cores the engine and the server share.
POLL_S = 0.02


def when_committed(lakes: list[Lake], check: Callable[[], bool]) -> Callable[[], bool]:
    """`check`, run only when some table's log changed since `check` last said no (or always,
    for a table on an object store)."""
    seen: dict[str, int] = {}

    def done() -> bool:
        marks = {lake.path: lake.log_mark() for lake in lakes}
        if all(mark is not None and seen.get(path) == mark for path, mark in marks.items()):
            return False
        if check():
            return True
        seen.update({path: mark for path, mark in marks.items() if mark is not None})
        return False

    return done


@dataclass(slots=True)
class EngineSource:
    """One engine source of the bench (see the module docstring)."""

    name: str
    workdir: Path
    dsn: str
    table: str
    mode: str = "consolidated"
    settings: Mapping[str, object] = field(default_factory=dict)
    primed_ops: dict[str, dict[str, int]] = field(default_factory=dict)
    python: str = sys.executable  # the build that runs (`--before-python`: another one)
    label: str = ""  # how its legs are labelled; default: the mode

    def __post_init__(self) -> None:
        self.label = self.label or self.mode

    @property
    def config_path(self) -> Path:
        return self.workdir / f"{self.name}.toml"

    @property
    def destination(self) -> Path:
        return self.workdir / "lake" / self.name

    @property
    def state_url(self) -> str:
        return f"sqlite:///{self.workdir / 'state.db'}"

    def log_path(self, leg: str) -> Path:
        return self.workdir / "logs" / f"{self.name}-{leg}.log"

    def lakes(self) -> dict[str, Lake]:
        ref = TableRef.parse(self.table)
        return {kind: Lake(ref.delta_path(str(self.destination), append=kind == "append"))
                for kind in KINDS[self.mode]}

    def write_config(self) -> Path:
        lines = ["[engine]", f"state = {_toml(self.state_url)}", "http_port = 0", "",
                 "[[source]]", f"name = {_toml(self.name)}", f"dsn = {_toml(self.dsn)}",
                 f"tables = {_toml([self.table])}",
                 f"destination = {_toml(str(self.destination))}",
                 f"slot_name = {_toml(self.name)}", f"publication_name = {_toml(self.name)}",
                 f"table_mode = {_toml(self.mode)}"]
        lines += [f"{k} = {_toml(v)}" for k, v in self.settings.items()]
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")
        self.config_path.chmod(0o600)  # it holds the dsn
        return self.config_path

    def command(self) -> list[str]:
        return [self.python, "-m", "cdcengine", "--config", str(self.config_path), "run"]

    def enable(self) -> None:
        from cdcengine import api
        from cdcengine.config import load_config

        self.write_config()
        src = load_config(str(self.config_path)).sources[0]
        api.enable_cdc(src, state=self.state_url)

    def streaming(self) -> bool:
        from cdcengine import api
        from cdcengine.config import load_config

        src = load_config(str(self.config_path)).sources[0]
        st = api.cdc_status(src, state=self.state_url)
        return bool(st.tables) and all(t.state == "streaming" for t in st.tables)

    def prime(self, *, timeout_s: float = 3600.0) -> float:
        """`run` until every table streams (first snapshot done), then SIGTERM; seconds."""
        t0 = time.monotonic()
        with self.log_path("prime").open("ab") as err:
            proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=err)
            try:
                while not self.streaming():
                    if proc.poll() is not None:
                        raise RuntimeError(f"engine {self.name} exited while priming (code "
                                           f"{proc.returncode}; see {self.log_path('prime')})")
                    if time.monotonic() - t0 > timeout_s:
                        raise TimeoutError(f"engine {self.name}: snapshot not done in "
                                           f"{timeout_s:.0f} s")
                    time.sleep(0.3)
            finally:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(timeout=120)
        for kind, lake in self.lakes().items():
            if kind == "append":
                self.primed_ops[kind] = lake.op_counts() if lake.snapshot() else {}
        return time.monotonic() - t0

    def caught_up(self, floor_lsn: int) -> Callable[[], bool]:
        lakes = list(self.lakes().values())

        def done() -> bool:
            for lake in lakes:
                top = lake.max_lsn()
                if top is None or top < floor_lsn:
                    return False
            return True

        return when_committed(lakes, done)

    def has_rows(self, rows: int) -> Callable[[], bool]:
        lakes = list(self.lakes().values())
        return when_committed(lakes, lambda: all(lake.records() >= rows for lake in lakes))

    def run(self, done: Callable[[], bool], *, leg: str, timeout_s: float = 3600.0,
            on_poll: Callable[[float], None] | None = None) -> ProcessRun:
        """The timed leg: process start → `done()`, then SIGTERM."""
        return timed_run(self.command(), done=done, timeout_s=timeout_s,
                         log=self.log_path(leg), poll_s=POLL_S, on_poll=on_poll)

    def read_path(self, leg: str) -> str:
        """How the leg read its backlog, from the engine's own log: `catch-up` when it logged
        `catchup_started`, else `streaming`."""
        try:
            text = self.log_path(leg).read_text(errors="replace")
        except FileNotFoundError:
            return "unknown"
        return "catch-up" if "catchup_started" in text else "streaming"

    def verify(self, source_checksum: Mapping[str, str], *, ops: Mapping[str, int] | None = None,
               inserts_only: bool = False, log_ops: bool = True) -> dict[str, object]:
        """The correctness check of a leg: consolidated live rows' checksum equals the source's;
        a change log holds exactly the primed changes plus `ops` per operation (and, for an
        insert-only backlog on an empty table, its inserts' checksum equals the source's).
        `log_ops=False`: the change log is not checked here (the caller knows less)."""
        result: dict[str, object] = {"ok": True}
        for kind, lake in self.lakes().items():
            if kind == "consolidated":
                got = lake.checksum(consolidated=True)
                ok = same(source_checksum, got)
                result["consolidated"] = {"ok": ok, "delta": got,
                                          "differences": differences(source_checksum, got)}
            elif not log_ops:
                continue
            else:
                want = dict(self.primed_ops.get(kind, {}))
                for op, n in (ops or {}).items():
                    want[op] = want.get(op, 0) + n
                have = lake.op_counts()
                ok = have == want
                entry: dict[str, object] = {"expected_ops": want, "delta_ops": have}
                if inserts_only and ok:
                    got = lake.checksum(consolidated=False, op="I")
                    ok = same(source_checksum, got)
                    entry.update(delta=got, differences=differences(source_checksum, got))
                entry["ok"] = ok
                result["append"] = entry
            result["ok"] = bool(result["ok"]) and ok
        result["source"] = dict(source_checksum)
        return result


__all__ = ["KINDS", "POLL_S", "EngineSource", "when_committed"]
