"""PostgreSQL values and types in Arrow terms (SPEC §6).

`mapping` decides a column's Arrow/Delta type from its `pg_type` row; `convert` turns columns of
PostgreSQL text values into Arrow arrays; `defaults` reads what old rows hold in an added column.
"""
