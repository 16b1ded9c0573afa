"""The docker-compose demo's parts that run without Docker, against a real PostgreSQL 15.

docker-compose.yml cannot be started here (no Docker engine), so this runs what it would run:
deploy/compose/init.sql by psql on a fresh server, then the engine's two services, `enable`
and the daemon, as processes with the compose file's config and environment overrides. Only
the host names change (`postgres` → this server) and the destination (MinIO → a local
folder, through the same CDCENGINE__ overrides). What this proves: the init script works as
the postgres image runs it, the engine's own role has every privilege `enable` and the
daemon need, the PostgreSQL state store on that role works, a second `enable` (every
`docker compose up`) is harmless, the demo table is snapshotted and streamed, and the
compose health check passes against the running daemon.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psycopg
import yaml
from cdc_util import logs_on_failure
from cli_util import closed_port
from test_pipeline import live_rows, wait_for

from cdcengine.config import load_config
from cdcengine_postgres.testing.cluster import find_bindir

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"


def compose_services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())[
        "services"]
    return services


def engine_env(port: int, lake: Path, http_port: int) -> dict[str, str]:
    """The compose engine's environment, pointed at this server and a local lake."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CDCENGINE", "AWS_"))}
    for key, value in compose_services()["engine"]["environment"].items():
        if key.startswith("CDCENGINE__"):
            env[key] = value.replace("@postgres:5432/", f"@127.0.0.1:{port}/")
    env |= {"CDCENGINE__APP__DESTINATION": str(lake),
            "CDCENGINE__APP__DESTINATION_OPTIONS": "{}",
            "CDCENGINE__ENGINE__HTTP_HOST": "127.0.0.1",
            "CDCENGINE__ENGINE__HTTP_PORT": str(http_port)}
    return env


def health(http_port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/health", timeout=5) as r:
            return int(r.status)
    except OSError:
        return 0


def test_compose_demo_snapshots_and_streams_app_orders(make_cluster: Any,
                                                       tmp_path: Path) -> None:
    cluster = make_cluster()
    psql = find_bindir() / "psql"
    subprocess.run([str(psql), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", cluster.admin_dsn,
                    "-f", str(COMPOSE_DIR / "init.sql")], check=True, capture_output=True,
                   timeout=120)
    config = tmp_path / "cdcengine.toml"
    config.write_text((COMPOSE_DIR / "cdcengine.toml").read_text())
    http_port = closed_port()
    env = engine_env(cluster.port, tmp_path / "lake", http_port)
    src = load_config(config, environ=env).source("app")

    enable = compose_services()["engine-enable"]["command"]
    assert enable[:2] == ["--config", "/etc/cdcengine/cdcengine.toml"]
    for _ in range(2):  # every `docker compose up` runs it again
        proc = subprocess.run([sys.executable, "-m", "cdcengine", "--config", str(config),
                               *enable[2:]], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "already enabled" in proc.stdout

    log = tmp_path / "engine.log"
    daemon = subprocess.Popen([sys.executable, "-m", "cdcengine", "--config", str(config),
                               "run"], env=env, cwd=tmp_path, stdout=log.open("a"),
                              stderr=subprocess.STDOUT, text=True)
    try:
        with logs_on_failure(log):
            wait_for(lambda: len(live_rows(src, "app.orders")) == 1000, timeout=120)
            with psycopg.connect(src.dsn, autocommit=True) as conn:
                conn.execute("INSERT INTO app.orders (customer, amount) VALUES ('late', 1.5)")
            wait_for(lambda: len(live_rows(src, "app.orders")) == 1001, timeout=60)
            assert {r["customer"] for r in live_rows(src, "app.orders").values()} >= {"late"}
            wait_for(lambda: health(http_port) == 200, timeout=30)
            test = compose_services()["engine"]["healthcheck"]["test"]
            code = test[-1].replace(":9790/", f":{http_port}/")
            check = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                   timeout=60, check=False)
            assert check.returncode == 0, check.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)  # what `docker compose stop` sends
        rc = daemon.wait(timeout=120)
    assert rc == 0, log.read_text()[-4000:]
    lines = [json.loads(line) for line in log.read_text().splitlines()
             if line.startswith("{")]
    assert any(line.get("event") == "daemon_started" for line in lines)  # log_format = json
    assert "cdcengine-demo-secret" not in log.read_text()
