"""cdcengine's PostgreSQL adapter: `adapter.PostgresAdapter` implements
`cdcengine.source.adapter.SourceAdapter`, and the registry imports it by name.

At the top sit what every part uses: `connection` (connections with pinned session settings),
`errors` (driver errors → reason codes) and `state_store` (the PostgreSQL state store). The rest
is grouped by role: `replication/` (table snapshots and the change stream), `types/` (PostgreSQL
types and values in Arrow terms), `control/` (catalog facts, discovery, prerequisite checks,
slots, publications, provisioning, health, verify reads) and `testing/` (throwaway servers for
the tests and `cdcengine demo`).

It may import psycopg and pyarrow, never deltalake: writing Delta is the core's job.
"""
