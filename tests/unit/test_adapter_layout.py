"""The PostgreSQL adapter's layout, checked (issue 14): modules small enough to read, every
sub-package installed, and no adapter module that loads deltalake when imported."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ADAPTER = ROOT / "adapters" / "postgres"
MAX_LINES = 600


def _modules() -> list[str]:
    out = []
    for path in sorted(ADAPTER.rglob("*.py")):
        parts = ["cdcengine_postgres", *path.relative_to(ADAPTER).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out.append(".".join(parts))
    return out


def test_every_adapter_module_is_at_most_600_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in ROOT.joinpath("adapters").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_every_adapter_package_is_installed() -> None:
    """A sub-package missing from `packages` would be absent from a non-editable install."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    packages = {".".join(["cdcengine_postgres", *p.parent.relative_to(ADAPTER).parts])
                for p in ADAPTER.rglob("__init__.py")}
    assert packages - listed == set()


def test_no_adapter_module_loads_deltalake() -> None:
    """Writing Delta is the core's job: importing every adapter module, one after the other,
    leaves deltalake unloaded (the first module that loads it is named)."""
    code = ("import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n"
            "    if 'deltalake' in sys.modules:\n"
            "        print(name)\n"
            "        break\n")
    modules = _modules()
    assert "cdcengine_postgres.replication.stream" in modules
    out = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == ""
