"""Helpers shared by the control-plane integration tests."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psycopg

from cdcengine.config import SourceConfig
from cdcengine.source.adapter import Check, Severity
from cdcengine.state import open_state
from cdcengine.state.base import StateStore


def source_for(dsn: str, tmp_path: Path, tables: list[str], **kw: Any) -> SourceConfig:
    """A source whose slot/publication names are unique to the test's database."""
    dbname = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
    assert isinstance(dbname, str)
    kw.setdefault("name", "src_" + dbname.lower().replace("-", "_"))
    return SourceConfig(dsn=dsn, tables=tables, destination=str(tmp_path / "lake"), **kw)


def store(tmp_path: Path, name: str = "state.db") -> StateStore:
    return open_state("sqlite:///" + str(tmp_path / name))


def by_name(checks: list[Check], name: str, table: str | None = None) -> list[Check]:
    return [c for c in checks if c.name == name and (table is None or c.table == table)]


def one(checks: list[Check], name: str, table: str | None = None) -> Check:
    found = by_name(checks, name, table)
    assert len(found) == 1, f"expected one {name!r} check, got {found}"
    return found[0]


def errors(checks: list[Check]) -> set[str]:
    return {c.name for c in checks if c.severity is Severity.ERROR}


def query(dsn: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def slot_exists(dsn: str, name: str) -> bool:
    return bool(query(dsn, "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", [name]))


def publication_exists(dsn: str, name: str) -> bool:
    return bool(query(dsn, "SELECT 1 FROM pg_publication WHERE pubname = %s", [name]))


class TransactionLoop:
    """Runs `transaction(conn)` again and again, one source transaction each, on a background
    thread for the duration of a `with` block; the thread's error is raised at its end."""

    def __init__(self, dsn: str, seed: int) -> None:
        self.dsn = dsn
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.transactions = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def transaction(self, conn: psycopg.Connection[Any]) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        try:
            with psycopg.connect(self.dsn, autocommit=True) as conn:
                while not self.stop.is_set():
                    with conn.transaction():
                        self.transaction(conn)
                    self.transactions += 1
        except BaseException as exc:  # noqa: BLE001 - surfaced by the test
            self.error = exc

    def __enter__(self) -> TransactionLoop:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error


def start_daemon(cfg: Path, log: Path, failpoint: str | None = None) -> subprocess.Popen[str]:
    """`cdcengine run` on `cfg` as a process, its output appended to `log`; `failpoint` arms
    `CDCENGINE_FAILPOINT` (cdcengine.failpoints) so it kills itself there."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("CDCENGINE__") and k != "CDCENGINE_FAILPOINT"}
    if failpoint:
        env["CDCENGINE_FAILPOINT"] = failpoint
    return subprocess.Popen([sys.executable, "-m", "cdcengine", "--config", str(cfg), "run"],
                            cwd=cfg.parent, env=env, stdout=log.open("a"),
                            stderr=subprocess.STDOUT, text=True)


def crash_at(cfg: Path, log: Path, failpoint: str, *, timeout: float = 120) -> None:
    """`cdcengine run` armed to SIGKILL itself at `failpoint`; returns once it did (fails the
    test, with the log's tail, when it ended any other way or not in time)."""
    crashing = start_daemon(cfg, log, failpoint)
    try:
        crashing.wait(timeout=timeout)
    finally:
        if crashing.poll() is None:
            crashing.kill()
    assert crashing.returncode == -signal.SIGKILL, log.read_text()[-3000:]


def daemon_config(tmp_path: Path, src: SourceConfig, state: str, tables: Sequence[str], *,
                  json_logs: bool = False, **keys: str | int) -> Path:
    """`cdcengine.toml` for a daemon process running `src` on `tables` with `keys` set."""
    cfg = tmp_path / "cdcengine.toml"
    listed = ", ".join(f'"{t}"' for t in tables)
    text = f'[engine]\nstate = "{state}"\nhttp_port = 0\n'
    if json_logs:
        text += 'log_format = "json"\n'
    text += (f'[[source]]\nname = "{src.name}"\ndsn = "{src.dsn}"\n'
             f'tables = [{listed}]\ndestination = "{src.destination}"\n')
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    cfg.write_text(text)
    return cfg


@contextlib.contextmanager
def logs_on_failure(*logs: Path, tail: int = 4000) -> Iterator[None]:
    """On a failure inside the block (a timeout included), the end of each daemon log is
    attached to the exception, so a run that fails elsewhere says what the daemons did."""
    try:
        yield
    except BaseException as exc:
        for log in logs:
            text = log.read_text(errors="replace")[-tail:] if log.exists() else "(no log)"
            exc.add_note(f"--- {log.name} (end) ---\n{text}")
        raise
