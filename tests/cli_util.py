"""Helpers for tests that drive the real `cdcengine` console command in a subprocess.

`write_config` writes a cdcengine.toml (state in a sqlite file beside it, HTTP off);
`run_cli` runs ``python -m cdcengine --config PATH ...`` with the config's folder as working
directory and an environment without any ``CDCENGINE__`` override; `assert_no_secret` checks
that no command printed a secret or a fragment of one. Loopback addresses only: `closed_port`
gives a 127.0.0.1 port nothing listens on.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CLI_TIMEOUT_S = 120.0

#: One prerequisite line of `cdcengine check`: "  ✅ name [schema.table]: message".
CHECK_LINE = re.compile(r"^  (?P<symbol>✅|⚠️|❌) (?P<name>[a-z_]+)(?: \[(?P<table>[^\]]+)\])?: "
                        r"(?P<message>.*)$")
#: PostgreSQL's text form of an LSN.
LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")


@dataclass(frozen=True, repr=False)
class CliResult:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)

    def checks(self) -> list[dict[str, str | None]]:
        """The check lines of `cdcengine check` output, each with the `fix:` line under it."""
        out: list[dict[str, str | None]] = []
        for line in self.stdout.splitlines():
            m = CHECK_LINE.match(line)
            if m:
                out.append(m.groupdict() | {"fix": None})
            elif line.strip().startswith("fix:") and out:
                out[-1]["fix"] = line.strip()[len("fix:"):].strip()
        return out

    def __repr__(self) -> str:  # what an assertion message shows (in full with -vv)
        return (f"$ cdcengine {' '.join(self.args)}  -> exit {self.returncode}\n"
                f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}")

    __str__ = __repr__


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for {value!r}")


def write_config(
    directory: Path,
    sources: Sequence[Mapping[str, object]],
    *,
    engine: Mapping[str, object] | None = None,
    filename: str = "cdcengine.toml",
) -> Path:
    """Write `directory/filename`: [engine] (state = sqlite file in `directory`, http_port = 0,
    plus `engine`) and one [[source]] per mapping. Returns the file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    eng: dict[str, object] = {"state": f"sqlite:///{directory / 'state.db'}", "http_port": 0}
    eng.update(engine or {})
    lines = ["[engine]"] + [f"{k} = {_toml_value(v)}" for k, v in eng.items()]
    for src in sources:
        lines += ["", "[[source]]"] + [f"{k} = {_toml_value(v)}" for k, v in src.items()]
    path = directory / filename
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def cli_env() -> dict[str, str]:
    """The test process's environment without any CDCENGINE__ override."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CDCENGINE__")}


def run_cli(config: Path, *args: str, cwd: Path | None = None) -> CliResult:
    """Run the console command `cdcengine --config CONFIG ARGS...` and capture its output."""
    proc = subprocess.run(
        [sys.executable, "-m", "cdcengine", "--config", str(config), *args],
        cwd=cwd or config.parent,
        env=cli_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=CLI_TIMEOUT_S,
        check=False,
    )
    return CliResult(tuple(args), proc.returncode, proc.stdout, proc.stderr)


def run_cli_many(
    jobs: Sequence[tuple[Path, Sequence[str]]], *, workers: int = 2
) -> list[CliResult]:
    """Run independent commands (config, args) concurrently; results in the jobs' order.

    Only for commands that cannot interfere: give commands that take a source's lease (enable,
    disable, settings) a config, hence a state store, of their own."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: run_cli(job[0], *job[1]), jobs))


def assert_no_secret(results: Iterable[CliResult], secrets: Iterable[str]) -> None:
    """No secret (nor any given fragment of one) in any command's stdout or stderr."""
    secrets = [s for s in secrets if s]
    leaks = [f"{s!r} in the output of `cdcengine {' '.join(r.args)}`"
             for r in results for s in secrets if s in r.output]
    assert not leaks, "secret leaked: " + "; ".join(leaks)


def closed_port() -> int:
    """A 127.0.0.1 TCP port nothing listens on (bound by us, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
