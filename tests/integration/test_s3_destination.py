"""Delta on S3, end to end: a local S3 (moto's server, `s3util`) as the destination.

The engine runs as the real command line (`cdcengine enable`, `run`, `status`, `verify`, `jobs`,
`resync`, `check`), its daemon killed with SIGKILL mid-stream and restarted; the Delta tables are
read back from the bucket. Every command that touched S3 must exit 0: deltalake's S3 client once
aborted a finished process at interpreter exit (`terminate called without an active exception`,
exit 134), which a scheduler would count as a failed run.

Commit safety (`cdcengine.object_store`): concurrent writers of one table race for a version and
moto's request log shows the refused conditional puts (412) of the losers. Secrets: a distinctive
secret key, given in `destination_options` or in the environment, never appears in any output,
log or error.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from cdc_util import crash_at, logs_on_failure, start_daemon, store
from cli_util import CliResult, assert_no_secret, closed_port, run_cli, write_config
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError
from s3util import ACCESS_KEY_ID, SECRET_KEY, MotoServer, S3Bucket, client
from test_crash import COLUMNS, Workload, delta_rows, replay_log, source_rows
from test_pipeline import wait_for

from cdcengine.config import SourceConfig
from cdcengine.control.history import as_of
from cdcengine.names import TableRef
from cdcengine.sink.delta import DeltaMaintenance, DeltaSink
from cdcengine.sink.delta.read import delta_options
from cdcengine.state.base import ChunkState

TABLES = ("acct", "ledger")


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer.start(tmp_path_factory.mktemp("moto"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def bucket(moto: MotoServer) -> S3Bucket:
    return moto.bucket()


def s3_source(db: Any, bucket: S3Bucket, tables: list[str], *, credentials: bool = True,
              **keys: Any) -> dict[str, Any]:
    """A [[source]] writing to `bucket` (keys in destination_options unless `credentials` is
    False), with names unique to the test's database."""
    name = "s3_" + db.dsn.rsplit("/", 1)[-1].split("?")[0].lower().replace("-", "_")
    return {"name": name, "dsn": db.dsn, "tables": tables, "destination": bucket.uri(),
            "destination_options": bucket.options(credentials=credentials), **keys}


def config_of(source: dict[str, Any]) -> SourceConfig:
    return SourceConfig(**source)


def ok(result: CliResult) -> CliResult:
    assert result.returncode == 0, result
    return result


def seed(db: Any, acct_rows: int) -> None:
    db.execute("CREATE TABLE acct (id int PRIMARY KEY, v int, note text);"
               "CREATE TABLE ledger (id serial PRIMARY KEY, acct int, amount int);"
               f"INSERT INTO acct SELECT i, i % 7, 'seed' FROM generate_series(1, {acct_rows}) i;"
               "INSERT INTO ledger (acct, amount) SELECT i, i FROM generate_series(1, 50) i")


def events(log: Path) -> list[dict[str, Any]]:
    """The JSON log events of a daemon log (other lines skipped)."""
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def stop(daemon: Any) -> int:
    """SIGTERM, then the exit code (a requested stop is exit 0, SPEC §3)."""
    if daemon.poll() is None:
        daemon.send_signal(signal.SIGTERM)
    try:
        return int(daemon.wait(timeout=90))
    finally:
        if daemon.poll() is None:
            daemon.kill()


@pytest.mark.slow
def test_s3_snapshot_stream_kill9_restart_is_exact(db, moto: MotoServer, bucket: S3Bucket,
                                                   tmp_path: Path) -> None:
    seed(db, 12_000)
    source = s3_source(db, bucket, [f"public.{t}" for t in TABLES], table_mode="both",
                       flush_interval_ms=50, max_batch_rows=400, maintenance_interval_s=3,
                       snapshot_chunk_rows=3_000, snapshot_workers=2)
    cfg = write_config(tmp_path, [source], engine={"log_format": "json"})
    src = config_of(source)
    sink = DeltaSink.for_source(src)
    outputs = [ok(run_cli(cfg, "enable"))]
    log = tmp_path / "daemon.log"
    workload = Workload(db.dsn, seed=17)
    workload.next_id = 100_000  # its new keys above the seeded ones
    with logs_on_failure(log), workload:
        crash_at(cfg, log, "after_commit:6")  # SIGKILL after a stream commit
        daemon = start_daemon(cfg, log)
        wait_for(lambda: all(sink.exists(TableRef("public", t), "consolidated")
                             for t in TABLES), timeout=60)
    with logs_on_failure(log):
        try:
            for t in TABLES:
                wait_for(lambda t=t: delta_rows(sink, t, COLUMNS[t]) == source_rows(db.dsn, t),
                         timeout=120)
            # verify compares under a source snapshot: a daemon confirms what Delta holds
            outputs.append(ok(run_cli(cfg, "verify", "--source", src.name)))
        finally:
            code = stop(daemon)
        assert code == 0, "the daemon that wrote to S3 did not exit 0 on SIGTERM"
    for t in TABLES:  # exact: the consolidated tables and the replayed change logs
        assert delta_rows(sink, t, COLUMNS[t]) == source_rows(db.dsn, t)
        assert replay_log(sink, t, COLUMNS[t]) == source_rows(db.dsn, t)
    with store(tmp_path) as st:  # the first snapshot of acct was chunked, in parallel
        chunks = st.list_snapshot_chunks(src.name, "public.acct")
    assert len(chunks) >= 4 and {c.state for c in chunks} == {ChunkState.FINISHED}
    planned = [e for e in events(log) if e.get("event") == "snapshot_planned"
               and e.get("table") == "public.acct"]
    assert planned and planned[0]["workers"] == 2 and planned[0]["chunks"] == len(chunks)

    # the same Delta tables through every reading command, all against S3
    status = ok(run_cli(cfg, "status", "--json"))
    outputs += [status, ok(run_cli(cfg, "status")), ok(run_cli(cfg, "jobs")),
                ok(run_cli(cfg, "jobs", "--json")), ok(run_cli(cfg, "check"))]
    [view] = status.json()["sources"]
    assert {t["name"]: t["state"] for t in view["tables"]} == {
        "public.acct": "streaming", "public.ledger": "streaming"}
    assert all(t["applied_lsn"] for t in view["tables"])
    # history: the change log on S3 replayed as of its last LSN is the consolidated table
    snapshot = sink.reader.open(TableRef("public", "acct"), "append")
    assert snapshot is not None
    last = max(snapshot.read(columns=["_cdc_lsn"]).column(0).to_pylist())
    rows = as_of(snapshot, ["id"], last).to_pylist()
    assert {r["id"]: (r["id"], r["v"], r["note"]) for r in rows} == source_rows(db.dsn, "acct")
    # upkeep ran on S3 in the writer while streaming (maintenance_interval_s = 3): the change
    # log's small files compacted, a checkpoint written
    upkeep = [e for e in events(log) if e.get("event") == "delta_table_maintained"
              and e.get("table") == "public.acct" and e.get("kind") == "append"]
    assert upkeep and upkeep[0]["files_removed"] > 1 and upkeep[0]["checkpointed"], upkeep
    commits = sink.reader.open(TableRef("public", "acct"), "append").commits()
    assert any(c.get("operation") == "OPTIMIZE" for c in commits)
    assert_no_secret(outputs, [SECRET_KEY])
    assert SECRET_KEY not in log.read_text()
    assert any(e.get("event") == "batch_committed" for e in events(log))


def test_maintenance_and_resync_on_s3(db, bucket: S3Bucket, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 500) i")
    source = s3_source(db, bucket, ["public.items"], table_mode="both", flush_interval_ms=50)
    cfg = write_config(tmp_path, [source])
    src = config_of(source)
    ref = TableRef("public", "items")
    sink = DeltaSink.for_source(src)
    ok(run_cli(cfg, "enable"))
    log = tmp_path / "daemon.log"

    def live() -> dict[int, tuple[Any, ...]]:
        return delta_rows(sink, "items", ["id", "v"])

    with logs_on_failure(log):
        daemon = start_daemon(cfg, log)
        try:
            wait_for(lambda: len(live()) == 500, timeout=60)
            for i in range(8):  # small commits: new keys land as small files to compact
                db.execute(f"INSERT INTO items SELECT n, 'n' FROM generate_series("
                           f"{1000 + 10 * i}, {1009 + 10 * i}) n;"
                           f"UPDATE items SET v = 'u{i}' WHERE id % 8 = {i};"
                           f"DELETE FROM items WHERE id = {i + 1}")
                wait_for(lambda i=i: live().get(i + 8, ("", ""))[1] == f"u{i}", timeout=60)
            wait_for(lambda: live() == source_rows(db.dsn, "items"), timeout=60)
        finally:
            assert stop(daemon) == 0
    applied = {kind: sink.applied_version(ref, kind) for kind in ("consolidated", "append")}
    log_rows = sink.row_count(ref, "append")
    prefix = "lake/public/items_cdc/"  # the change log: one small file per commit
    before = bucket.keys(prefix)

    upkeep = DeltaSink(src.destination, source=src.name, storage_options=src.destination_options,
                       maintenance=DeltaMaintenance(checkpoint_interval=1, cluster_overlap=None,
                                                    vacuum_retention_hours=0,
                                                    enforce_retention_duration=False))
    result = upkeep.maintain(ref, "append")
    assert result.files_removed > 1 and result.files_added >= 1, result
    assert result.checkpointed and result.vacuumed_files >= result.files_removed, result
    after = bucket.keys(prefix)
    assert f"{prefix}_delta_log/_last_checkpoint" in after
    assert any(k.endswith(".checkpoint.parquet") for k in after)
    gone = {k for k in before if k.endswith(".parquet") and "_delta_log" not in k} - set(after)
    assert len(gone) == result.vacuumed_files  # vacuum deleted the objects from the bucket
    assert upkeep.maintain(ref, "consolidated").checkpointed
    assert sink.row_count(ref, "append") == log_rows  # nothing a reader sees changed
    assert live() == source_rows(db.dsn, "items")
    assert {k: sink.applied_version(ref, k) for k in applied} == applied

    # drift behind the engine's back, then `resync` (queued: no daemon) repairs it at the start
    DeltaTable(sink.path(ref, "consolidated"), storage_options=delta_options(
        src.destination, src.destination_options)).delete("id <= 100")
    assert len(live()) < len(source_rows(db.dsn, "items"))
    ok(run_cli(cfg, "resync", "--source", src.name, "--table", "public.items"))
    with logs_on_failure(log):
        daemon = start_daemon(cfg, log)
        try:
            wait_for(lambda: live() == source_rows(db.dsn, "items"), timeout=90)
            db.execute("INSERT INTO items VALUES (9999, 'after')")
            wait_for(lambda: live() == source_rows(db.dsn, "items"), timeout=60)
            ok(run_cli(cfg, "verify", "--source", src.name))
        finally:
            assert stop(daemon) == 0
    commits = sink.reader.open(ref, "consolidated").commits()
    assert sum(1 for c in commits if c.get("cdcengine.operation") == "resync") == 1


def test_moto_refuses_a_second_create_of_one_object(bucket: S3Bucket) -> None:
    """What conditional put relies on: `If-None-Match: *` on an existing key is a 412."""
    from botocore.exceptions import ClientError

    s3 = client(bucket.endpoint)
    s3.put_object(Bucket=bucket.name, Key="k", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as err:
        s3.put_object(Bucket=bucket.name, Key="k", Body=b"second", IfNoneMatch="*")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3.get_object(Bucket=bucket.name, Key="k")["Body"].read() == b"first"


def test_concurrent_writers_never_both_win_a_version(moto: MotoServer, bucket: S3Bucket) -> None:
    """Writers that all read version 0 race for version 1 with the engine's options: one wins
    each version, the others are refused (412) and commit on top, nothing is lost."""
    uri = bucket.uri("race/t")
    options = delta_options(uri, bucket.options())
    assert options is not None and options["aws_conditional_put"] == "etag"
    write_deltalake(uri, pa.table({"w": pa.array([-1], pa.int64())}), storage_options=options)
    writers = 4
    handles = [DeltaTable(uri, storage_options=options) for _ in range(writers)]
    assert {h.version() for h in handles} == {0}
    barrier, errors = threading.Barrier(writers), []

    def commit(i: int) -> None:
        barrier.wait()
        try:
            write_deltalake(handles[i], pa.table({"w": pa.array([i], pa.int64())}), mode="append",
                            commit_properties=CommitProperties(
                                app_transactions=[Transaction(f"writer-{i}", i + 1)]))
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    dt = DeltaTable(uri, storage_options=options)
    assert dt.version() == writers  # versions 1..writers, one per writer
    assert sorted(dt.to_pyarrow_table()["w"].to_pylist()) == [-1, *range(writers)]
    assert {dt.transaction_version(f"writer-{i}") for i in range(writers)} == set(
        range(1, writers + 1))
    s3 = client(bucket.endpoint)
    owners = []
    for version in range(1, writers + 1):  # each version holds exactly one writer's commit
        body = s3.get_object(Bucket=bucket.name, Key=f"race/t/_delta_log/{version:020}.json")
        actions = [json.loads(line) for line in body["Body"].read().splitlines() if line]
        owners += [a["txn"]["appId"] for a in actions if "txn" in a]
    assert sorted(owners) == [f"writer-{i}" for i in range(writers)]
    version_1 = [r for r in moto.requests(bucket)
                 if r.method == "PUT" and r.path.endswith("race/t/_delta_log/"
                                                          "00000000000000000001.json")]
    assert [r.status for r in version_1].count(200) == 1, version_1
    assert [r.status for r in version_1].count(412) >= 1, version_1  # they did race


def test_conflicting_rewrites_fail_cleanly_instead_of_both_committing(bucket: S3Bucket) -> None:
    """Two writers rewrite the same file from one version: the second commit is refused with a
    conflict (it would undo the first's delete), and the table holds the first's result only."""
    uri = bucket.uri("conflict/t")
    options = delta_options(uri, bucket.options())
    write_deltalake(uri, pa.table({"id": pa.array(range(10), pa.int64())}),
                    storage_options=options)
    first, second = (DeltaTable(uri, storage_options=options) for _ in range(2))
    first.delete("id = 1")
    with pytest.raises(CommitFailedError):
        second.delete("id = 2")
    dt = DeltaTable(uri, storage_options=options)
    assert dt.version() == 1
    assert sorted(dt.to_pyarrow_table()["id"].to_pylist()) == [0, *range(2, 10)]


def test_credentials_from_the_environment_are_used_and_never_shown(
        db, bucket: S3Bucket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    db.execute("CREATE TABLE items (id int PRIMARY KEY, v text);"
               "INSERT INTO items SELECT i, 'v' || i FROM generate_series(1, 50) i")
    source = s3_source(db, bucket, ["public.items"], credentials=False, flush_interval_ms=50)
    assert "AWS_SECRET_ACCESS_KEY" not in source["destination_options"]
    cfg = write_config(tmp_path, [source], engine={"log_format": "json"})
    src = config_of(source)
    sink = DeltaSink.for_source(src)
    outputs = [ok(run_cli(cfg, "check")), ok(run_cli(cfg, "enable"))]
    assert "conditional put" in outputs[0].stdout
    log = tmp_path / "daemon.log"
    with logs_on_failure(log):
        daemon = start_daemon(cfg, log)
        try:
            wait_for(lambda: len(delta_rows(sink, "items", ["id"])) == 50, timeout=60)
            db.execute("UPDATE items SET v = 'x' WHERE id = 7")
            wait_for(lambda: delta_rows(sink, "items", ["id", "v"]).get(7) == (7, "x"),
                     timeout=60)
            outputs.append(ok(run_cli(cfg, "verify", "--source", src.name)))
        finally:
            assert stop(daemon) == 0
    outputs += [ok(run_cli(cfg, "status")), ok(run_cli(cfg, "status", "--json")),
                ok(run_cli(cfg, "jobs")), ok(run_cli(cfg, "tables"))]
    assert_no_secret(outputs, [SECRET_KEY])
    text = log.read_text()
    assert SECRET_KEY not in text
    assert any(e.get("event") == "batch_committed" for e in events(log))


@pytest.mark.parametrize("fault", ["endpoint", "bucket"])
def test_an_unreachable_destination_is_a_clear_error_without_the_key(
        db, bucket: S3Bucket, tmp_path: Path, fault: str) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    source = s3_source(db, bucket, ["public.items"])
    if fault == "endpoint":
        source["destination_options"]["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{closed_port()}"
        source["destination_options"]["AWS_MAX_RETRIES"] = "0"
    else:
        source["destination"] = f"s3://{bucket.name}-missing/lake"
    cfg = write_config(tmp_path, [source])
    ok(run_cli(cfg, "enable"))  # enable provisions the source; it writes nothing to Delta
    cause = "Connection refused" if fault == "endpoint" else "NoSuchBucket"
    verify = run_cli(cfg, "verify", "--source", source["name"], "--wait", "0")
    assert verify.returncode == 1, verify
    assert "❌ destination_failed: cannot read the Delta table" in verify.stdout, verify
    assert cause in verify.stdout and "fix: Check the destination" in verify.stdout, verify
    # status reports the source (reachable) and says why its tables cannot be read
    status = run_cli(cfg, "status")
    assert status.returncode == 0, status
    assert "cannot read the Delta table" in status.stdout and cause in status.stdout, status
    for res in (verify, status):
        assert "Traceback" not in res.output and "OSError;" not in res.output, res
    assert_no_secret([verify, status], [SECRET_KEY])


def test_unsafe_commit_options_are_refused_at_load(db, bucket: S3Bucket, tmp_path: Path) -> None:
    db.execute("CREATE TABLE items (id int PRIMARY KEY)")
    source = s3_source(db, bucket, ["public.items"])
    source["destination_options"]["AWS_S3_ALLOW_UNSAFE_RENAME"] = "true"
    cfg = write_config(tmp_path, [source])
    res = run_cli(cfg, "check")
    assert res.returncode == 2, res
    assert "AWS_S3_ALLOW_UNSAFE_RENAME" in res.stderr and "conditional put" in res.stderr
    assert_no_secret([res], [SECRET_KEY])


def test_the_plan_is_applied_to_every_handle(bucket: S3Bucket) -> None:
    """The sink and its reader hand deltalake the planned options (conditional put on S3)."""
    src = SourceConfig(name="plan", dsn="postgresql://u@h/d", tables=["t"],
                       destination=bucket.uri(), destination_options=bucket.options())
    sink = DeltaSink.for_source(src)
    assert sink._storage_options is not None
    assert sink._storage_options["aws_conditional_put"] == "etag"
    assert sink.reader._storage_options == sink._storage_options
    assert dataclasses.asdict(src)["destination_options"] == bucket.options()  # config untouched


def test_a_destination_error_never_echoes_an_option_value(bucket: S3Bucket) -> None:
    """delta-rs quotes an option value it cannot parse: the engine's error names the problem
    and masks the value (here the secret key, pasted into the wrong option)."""
    from cdcengine.sink.base import SinkWriteError

    sink = DeltaSink(bucket.uri(), source="echo",
                     storage_options=bucket.options(aws_conditional_put=SECRET_KEY))
    with pytest.raises(SinkWriteError) as err:
        sink.exists(TableRef("public", "t"), "consolidated")
    assert "S3PutConditional" in err.value.message and "***" in err.value.message
    assert SECRET_KEY not in f"{err.value.message} {err.value.detail} {err.value}"
