-- Run once by the postgres image on a fresh volume (/docker-entrypoint-initdb.d): the demo's
-- source table, in a database of its own so the `postgres` database stays as the test suite
-- expects it, and the engine's state store (leases, runs, table states) in another.
-- The engine connects as a role of its own rather than the superuser: REPLICATION for the
-- slot, ownership of the table for the publication (managed mode), and a password that is
-- not a word found all over the logs (every printed line is scrubbed of it).
CREATE ROLE cdcengine LOGIN REPLICATION PASSWORD 'cdcengine-demo-secret';
CREATE DATABASE cdcengine_state OWNER cdcengine;
CREATE DATABASE app OWNER cdcengine;
\connect app
SET ROLE cdcengine;
CREATE SCHEMA app;
CREATE TABLE app.orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    customer text NOT NULL,
    amount numeric(12, 2) NOT NULL,
    status text NOT NULL DEFAULT 'new',
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO app.orders (customer, amount)
SELECT 'customer ' || (g % 100), round((g * 7.31)::numeric % 1000, 2)
FROM generate_series(1, 1000) AS g;
