"""cdcengine's PostgreSQL adapter: slots, publications, prerequisites, catalog, error taxonomy.

Implements `cdcengine.source.adapter.SourceAdapter`
(see `cdcengine_postgres.adapter.PostgresAdapter`).
It may import psycopg and pyarrow, never deltalake: writing Delta is the core's job.
"""
