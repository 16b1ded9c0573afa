"""The seams, checked: the core never imports psycopg, the adapter never imports deltalake."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(folder: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = names
    return out


def test_core_never_imports_psycopg() -> None:
    offenders = {p: n for p, n in _imports(ROOT / "src" / "cdcengine").items()
                 if n & {"psycopg", "psycopg_binary", "psycopg_c", "cdcengine_postgres"}}
    assert offenders == {}


def test_adapter_never_imports_deltalake() -> None:
    offenders = {p: n for p, n in _imports(ROOT / "adapters").items() if "deltalake" in n}
    assert offenders == {}


def test_importing_the_library_loads_no_driver() -> None:
    code = ("import sys, cdcengine, cdcengine.cli, cdcengine.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('psycopg', 'cdcengine_postgres')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


def test_importing_the_package_or_the_adapter_loads_no_deltalake() -> None:
    """Lazy re-exports: `import cdcengine` and any adapter module stay light (issue 14); the
    names still resolve on first use."""
    code = ("import sys, cdcengine, cdcengine_postgres.stream, cdcengine_postgres.changes; "
            "loaded = 'deltalake' in sys.modules; cdcengine.SourceConfig; cdcengine.verify; "
            "print(loaded, 'deltalake' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True"]
