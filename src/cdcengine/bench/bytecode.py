"""Byte code for every engine build the bench times, compiled before its first leg.

Why: a leg is timed from process start, so an engine whose own modules are compiled from source
at every start pays for that in every leg. A wheel installed by pip, and the Docker image, carry
compiled byte code; a source checkout run with `PYTHONDONTWRITEBYTECODE=1` (this project's CI
machines set it) never gets any, and then compiled ~130 modules at each start (~0.15 s of a
2 s leg). Compiling once here measures what a user runs; the report says it was done, and for
which builds (the `--before-python` build gets the same treatment, so before/after compare like
with like).
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

__all__ = ["compile_engine"]

# Run by the build's own Python: its packages' folders, compiled in place (py_compile writes the
# files even under PYTHONDONTWRITEBYTECODE, which only stops the import system from writing).
_COMPILE = """\
import compileall, importlib.util, json, sys
dirs = [p for m in ("cdcengine", "cdcengine_postgres")
        for p in (importlib.util.find_spec(m).submodule_search_locations or [])]
ok = all(compileall.compile_dir(d, quiet=1) for d in dirs)
print(json.dumps({"dirs": dirs, "ok": bool(ok)}))
"""


def compile_engine(python: str, *, timeout_s: float = 300.0) -> dict[str, Any]:
    """Compile the byte code of the engine build run by `python`; what was done, for the
    report (`ok` False with the reason when it could not be: the legs then run as they are)."""
    try:
        done = subprocess.run([python, "-c", _COMPILE], capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"python": python, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
    if done.returncode != 0:
        return {"python": python, "ok": False,
                "error": (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]}
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    return {"python": python, **facts}
