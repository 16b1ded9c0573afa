"""The project checks its own shape (issue 14): small modules, packages that ship, deltalake only
behind the Delta sink, and imports that load nothing they should not.

Import circles and the psycopg rule are in `test_seams.py`; this file adds the rest.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "src" / "cdcengine"
ADAPTER = ROOT / "adapters" / "postgres"
#: Past this a module does several jobs; split it by job rather than raise the limit.
MAX_LINES = 600
#: The one folder allowed to import deltalake: the Delta sink and its reader.
DELTA_SINK = CORE / "sink" / "delta"


def _sources() -> list[Path]:
    return sorted([*CORE.rglob("*.py"), *ADAPTER.rglob("*.py")])


def _module_name(path: Path) -> str:
    if path.is_relative_to(CORE):
        parts = ["cdcengine", *path.relative_to(CORE).with_suffix("").parts]
    else:
        parts = ["cdcengine_postgres", *path.relative_to(ADAPTER).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_module_is_over_the_line_limit() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"split these by job (limit {MAX_LINES} lines)"


def test_only_the_delta_sink_imports_deltalake() -> None:
    """Any import counts, a lazy one inside a function too: it is still a dependency."""
    from test_seams import _imports

    imports = {**_imports(ROOT / "src"), **_imports(ROOT / "adapters")}
    sink = str(DELTA_SINK.relative_to(ROOT))
    assert [p for p, names in imports.items()
            if "deltalake" in names and not p.startswith(sink)] == []


def test_every_package_is_shipped() -> None:
    """A folder with an `__init__.py` missing from pyproject's package list works in the editable
    install the tests use and is silently absent from a built wheel."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {_module_name(p) for p in _sources() if p.name == "__init__.py"}
    assert found - listed == set()
    assert listed - found == set()


def _loaded_after_importing(modules: list[str], watched: tuple[str, ...]) -> list[str]:
    """Import `modules` in a fresh interpreter; which of the `watched` packages got loaded."""
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print(sorted({{n.split('.')[0] for n in sys.modules}} & {set(watched)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    return list(ast.literal_eval(out))


def test_importing_the_package_loads_neither_deltalake_nor_a_driver() -> None:
    assert _loaded_after_importing(["cdcengine"], ("deltalake", "psycopg")) == []


def test_no_adapter_module_loads_deltalake() -> None:
    """All adapter modules at once: if their union loads no deltalake, none of them does."""
    modules = [_module_name(p) for p in ADAPTER.rglob("*.py")]
    assert len(modules) > 10  # the walk found the adapter
    assert _loaded_after_importing(modules, ("deltalake",)) == []


def test_no_core_module_loads_a_driver() -> None:
    """Every core module, the Delta sink included, imports without psycopg or the adapter: the
    adapter is found by name at run time (`source.registry`)."""
    modules = [_module_name(p) for p in CORE.rglob("*.py") if p.name != "__main__.py"]
    assert _loaded_after_importing(modules, ("psycopg", "cdcengine_postgres")) == []


#: The data path and what it stands on; the front-ends and the operator's tools sit above.
LOWER = ("cdcengine.pipeline", "cdcengine.sink", "cdcengine.source", "cdcengine.state")
UPPER = ("cdcengine.api", "cdcengine.serve", "cdcengine.control")


def test_the_data_path_never_imports_the_layers_above_it() -> None:
    """The pipeline, sinks, the source seam and the state store run under any front-end (the
    daemon, a web API embedding the library, the bench harness): none of them may import one."""
    from test_seams import _module_graph

    upward = {m: sorted(t for t in targets if t.startswith(UPPER))
              for m, targets in _module_graph().items() if m.startswith(LOWER)}
    assert {m: t for m, t in upward.items() if t} == {}


def test_the_operators_tools_never_import_the_facade_or_the_daemon() -> None:
    """`control` (health, sweep, prune, verify, history) runs under the daemon, the CLI and the
    library alike; the façade and the daemon build on it, not the other way round."""
    from test_seams import _module_graph

    upward = {m: sorted(t for t in targets if t.startswith(("cdcengine.api", "cdcengine.serve")))
              for m, targets in _module_graph().items() if m.startswith("cdcengine.control")}
    assert {m: t for m, t in upward.items() if t} == {}


def test_test_files_have_unique_names() -> None:
    """tests/ has no packages: pytest imports test files by basename, and two files of one name
    (one in unit/, one in integration/) stop the whole run at collection."""
    names = [p.name for p in (ROOT / "tests").rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
