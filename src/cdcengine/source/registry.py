"""Which adapter serves a source, found by its dsn; adapters are imported lazily by name.

Lazy import keeps the core free of driver imports (the core never imports psycopg) and lets a
second engine be added as a new folder under `adapters/` plus one line here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, cast

from cdcengine.errors import ConfigError

if TYPE_CHECKING:
    from cdcengine.bench.source import BenchFactory
    from cdcengine.config import SourceConfig
    from cdcengine.serve.demo import DemoFactory
    from cdcengine.source.adapter import SourceAdapter

# engine name -> "module:attribute" of a zero-argument adapter factory
ADAPTERS: dict[str, str] = {"postgres": "cdcengine_postgres.adapter:PostgresAdapter"}
# engine name -> "module:attribute" of the engine's `cdcengine demo` part (a `DemoFactory`)
DEMOS: dict[str, str] = {"postgres": "cdcengine_postgres.testing.demo:open_demo"}
# engine name -> "module:attribute" of the engine's `cdcengine bench` part (a `BenchFactory`)
BENCHES: dict[str, str] = {"postgres": "cdcengine_postgres.bench.source:open_bench"}


def engine_of(source: SourceConfig) -> str:
    """`postgres` for postgresql:// and postgres:// URLs and libpq key=value strings."""
    dsn = source.dsn.strip()
    scheme = dsn.split("://", 1)[0].lower() if "://" in dsn else ""
    if scheme in ("postgresql", "postgres") or (not scheme and "=" in dsn):
        return "postgres"
    raise ConfigError(
        f"{source.provenance.get('dsn', source.origin)}: source {source.name!r}: key 'dsn': "
        "unsupported scheme; use postgresql://user:password@host:port/dbname"
    )


def adapter_for(source: SourceConfig) -> SourceAdapter:
    module_name, _, attr = ADAPTERS[engine_of(source)].partition(":")
    factory = getattr(importlib.import_module(module_name), attr)
    return cast("SourceAdapter", factory())


def demo_for(engine: str = "postgres") -> DemoFactory:
    """The engine's demo factory: `factory(dsn or None, say=print) -> DemoSource`."""
    try:
        target = DEMOS[engine]
    except KeyError:
        raise ConfigError(f"no demo for engine {engine!r} (known: {', '.join(DEMOS)})") from None
    module_name, _, attr = target.partition(":")
    return cast("DemoFactory", getattr(importlib.import_module(module_name), attr))


def bench_for(engine: str = "postgres") -> BenchFactory:
    """The engine's bench factory: `factory(dsn or None, say=print) -> BenchSource`."""
    try:
        target = BENCHES[engine]
    except KeyError:
        raise ConfigError(f"no bench for engine {engine!r} (known: {', '.join(BENCHES)})") \
            from None
    module_name, _, attr = target.partition(":")
    return cast("BenchFactory", getattr(importlib.import_module(module_name), attr))
