"""`cdcengine demo`: sample tables and a live workload replicated into Delta, then cleaned up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cdc_util import publication_exists, query, slot_exists
from cli_util import cli_env
from deltalake import DeltaTable

from cdcengine.serve.cli import main as cli
from cdcengine.serve.demo import STATE_FILE
from cdcengine_postgres.testing import demo as pg_demo
from cdcengine_postgres.testing.cluster import ClusterError, find_bindir

TABLES = ("customers", "products", "orders")
JSON_COLUMNS = {"attributes", "shipping"}
SLOT = PUBLICATION = "cdcengine_demo"


def delta_live(lake: Path, table: str) -> dict[int, dict[str, Any]]:
    rows = DeltaTable(str(lake / "shop" / table)).to_pyarrow_table().to_pylist()
    return {r["id"]: {k: v for k, v in r.items() if not k.startswith("_cdc_")}
            for r in rows if not r["_cdc_deleted"]}


def source_table(dsn: str, table: str) -> dict[int, dict[str, Any]]:
    with psycopg.connect(dsn, row_factory=psycopg.rows.dict_row) as conn:
        rows = conn.execute(f"SELECT * FROM shop.{table}").fetchall()
    return {r["id"]: dict(r) for r in rows}


def normalised(rows: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """jsonb comes from psycopg as objects and from Delta as JSON text: compare documents."""
    return {k: {c: json.loads(v) if c in JSON_COLUMNS and isinstance(v, str) else v
                for c, v in r.items()} for k, r in rows.items()}


def schema_exists(dsn: str) -> bool:
    return bool(query(dsn, "SELECT 1 FROM pg_namespace WHERE nspname = 'shop'"))


def test_demo_against_a_server_replicates_exactly_then_cleans_up(
        db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "lake"
    final: dict[str, dict[int, dict[str, Any]]] = {}
    drop = pg_demo.PostgresDemo.drop_sample

    def read_then_drop(self: pg_demo.PostgresDemo) -> None:
        # the workload and the pipeline have stopped: this is the source's final state
        for t in TABLES:
            final[t] = source_table(db.dsn, t)
        drop(self)

    monkeypatch.setattr(pg_demo.PostgresDemo, "drop_sample", read_then_drop)
    code = cli.main(["demo", "--dsn", db.dsn, "--lake", str(lake), "--duration", "3"])
    out = capsys.readouterr()
    assert code == 0, out
    assert "caught up: every Delta table equals its source table" in out.out
    assert "workload: 0 transactions" not in out.out
    assert db.server.password not in out.out + out.err
    assert (lake / STATE_FILE).is_file()
    for t in TABLES:
        delta = delta_live(lake, t)
        assert len(delta) > 100
        assert normalised(delta) == normalised(final[t]), t
    assert len(final["orders"]) != 4000 or len(final["customers"]) != 600  # the workload ran
    assert not slot_exists(db.dsn, SLOT)
    assert not publication_exists(db.dsn, PUBLICATION)
    assert not schema_exists(db.dsn)


def test_keep_leaves_the_source_and_a_rerun_replaces_the_demo_lake(
        db, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "lake"
    args = ["demo", "--dsn", db.dsn, "--lake", str(lake), "--duration", "1"]
    assert cli.main([*args, "--keep"]) == 0, capsys.readouterr()
    assert slot_exists(db.dsn, SLOT) and publication_exists(db.dsn, PUBLICATION)
    assert normalised(delta_live(lake, "orders")) == normalised(source_table(db.dsn, "orders"))
    assert cli.main(args) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "replacing the previous demo lake" in out
    assert not slot_exists(db.dsn, SLOT) and not publication_exists(db.dsn, PUBLICATION)
    assert not schema_exists(db.dsn)
    assert len(delta_live(lake, "customers")) > 100


def test_refuses_a_lake_that_is_not_a_demo_lake(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lake = tmp_path / "data"
    lake.mkdir()
    (lake / "precious.parquet").write_bytes(b"x")
    # refused before anything is started or connected to (the dsn points nowhere)
    code = cli.main(["demo", "--dsn", "postgresql://u:p@127.0.0.1:1/x", "--lake", str(lake)])
    assert code == 2
    assert "not a demo lake" in capsys.readouterr().err
    assert (lake / "precious.parquet").exists()


def test_duration_must_be_a_number_of_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--duration", "soon"])
    assert info.value.code == 2
    assert "seconds" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_starts_its_own_server(tmp_path: Path) -> None:
    try:
        find_bindir()
    except ClusterError as exc:
        pytest.skip(f"needs local PostgreSQL server binaries: {exc}")
    proc = subprocess.run([sys.executable, "-m", "cdcengine", "demo", "--duration", "3"],
                          cwd=tmp_path, env=cli_env(), capture_output=True, text=True,
                          encoding="utf-8", timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caught up: every Delta table equals its source table" in proc.stdout
    assert "stopped and removed the throwaway PostgreSQL server" in proc.stdout
    lake = tmp_path / "demo-lake"
    for t in TABLES:
        assert (lake / "shop" / t / "_delta_log").is_dir()
        assert len(delta_live(lake, t)) > 100
    assert not list(tmp_path.glob("cdcengine.toml"))  # it needed no config file
