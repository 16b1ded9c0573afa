"""The source seam: what an adapter (PostgreSQL first) promises the engine, and how one is found.

`adapter` holds the Protocol and the dataclasses that cross the seam; `registry` picks the
adapter for a source by its dsn and imports it lazily, so the core never imports a driver.
"""
