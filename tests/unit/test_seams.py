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


def test_only_the_delta_sink_imports_deltalake() -> None:
    """One Delta reader (issue 14): `status`, `verify`, `history` and the demo read Delta tables
    through `cdcengine.sink.delta.read`, never through deltalake themselves."""
    offenders = {p: n for p, n in _imports(ROOT / "src" / "cdcengine").items()
                 if "deltalake" in n and not p.startswith("src/cdcengine/sink/delta/")}
    assert offenders == {}


def test_the_delta_sink_modules_stay_small() -> None:
    """sink/delta is one module per job (issue 14); none may grow past 600 lines."""
    sizes = {p.name: len(p.read_text().splitlines())
             for p in (ROOT / "src" / "cdcengine" / "sink" / "delta").glob("*.py")}
    assert len(sizes) > 5
    assert {name: n for name, n in sizes.items() if n > 600} == {}


def test_importing_the_library_loads_no_driver() -> None:
    code = ("import sys, cdcengine, cdcengine.serve.cli.main, cdcengine.api; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('psycopg', 'cdcengine_postgres')))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True).stdout.strip()
    assert out == "[]"


def test_importing_the_package_or_the_adapter_loads_no_deltalake() -> None:
    """Lazy re-exports: `import cdcengine` and any adapter module stay light (issue 14); the
    names still resolve on first use."""
    code = ("import sys, cdcengine, cdcengine_postgres.replication.stream, "
            "cdcengine_postgres.replication.changes; "
            "loaded = 'deltalake' in sys.modules; cdcengine.SourceConfig; "
            "print(loaded, callable(cdcengine.verify), callable(cdcengine.enable_cdc))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["False", "True", "True"]


def _module_graph() -> dict[str, set[str]]:
    """Which of our modules imports which (any import, at any depth; TYPE_CHECKING blocks,
    which never run, left out)."""
    roots = {"cdcengine": ROOT / "src" / "cdcengine",
             "cdcengine_postgres": ROOT / "adapters" / "postgres"}
    files: dict[str, Path] = {}
    for pkg, root in roots.items():
        for path in root.rglob("*.py"):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join(parts)] = path
    graph: dict[str, set[str]] = {m: set() for m in files}

    def visit(module: str, node: ast.AST, package: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join([*up, *([child.module] if child.module else [])])
                for alias in child.names:
                    target = f"{base}.{alias.name}"
                    target = target if target in files else base
                    if target in files and target != module:
                        graph[module].add(target)
            elif isinstance(child, ast.Import):
                graph[module] |= {a.name for a in child.names if a.name in files} - {module}
            visit(module, child, package)

    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        visit(module, ast.parse(path.read_text(), str(path)), package)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)):
            return found
    return None


def test_no_import_circles() -> None:
    """An import circle makes the order of module loading matter and the layers meaningless
    (issue 14): health ↔ prune and cli ↔ cli_ops were the last ones."""
    # a package importing its own submodules (lazy re-exports) is not a circle of layers
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]  # it finds one
    graph = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in _module_graph().items()}
    assert _cycle(graph) is None


def test_the_engine_does_not_import_its_own_facade() -> None:
    """The pipeline and the daemon's parts reach the state store through `cdcengine.state`, not
    through the library's façade `cdcengine.api` (issue 14)."""
    graph = _module_graph()
    engine = ["cdcengine.pipeline.pipeline", "cdcengine.serve.runner", "cdcengine.serve.monitor",
              "cdcengine.serve.watchdog", "cdcengine.control.health", "cdcengine.pipeline.writer",
              "cdcengine.pipeline.batcher"]
    assert {m: "cdcengine.api" for m in engine if "cdcengine.api" in graph[m]} == {}
