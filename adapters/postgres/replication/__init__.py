"""The data path out of PostgreSQL: table snapshots and the change stream.

`snapshot` copies tables (COPY under a temporary slot's exported snapshot); `stream` is the
walsender connection (START_REPLICATION, status updates); `pgoutput` decodes its messages;
`transactions` keeps committed transactions only; `packed` keeps inserts raw for columnar
decoding; `changes` is the session the engine reads: stream → decoded, converted events.
"""
