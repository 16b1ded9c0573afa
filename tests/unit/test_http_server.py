"""`cdcengine.serve.http`: /health, /status, /metrics over a real loopback socket, no PostgreSQL.

The sources' DSNs point at a closed loopback port, so /status exercises the "unreachable" path;
the state store is a SQLite file the tests write markers into.
"""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, ConfigError, NotEnabled
from cdcengine.metrics import Metrics
from cdcengine.serve.http import Endpoints, HttpServer
from cdcengine.state import open_state
from cdcengine.state.base import SourceState

SECRET = "Http-Hush-4471"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def source(name: str, tmp_path: Path, port: int) -> SourceConfig:
    return SourceConfig(name=name, dsn=f"postgresql://cdc:{SECRET}@127.0.0.1:{port}/db",
                        tables=["public.t"], destination=str(tmp_path / "lake" / name))


@pytest.fixture
def state(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    with open_state(url) as store:
        for name in ("shop", "crm"):
            store.record_enabled(name, management_mode="managed", slot_name=f"s_{name}",
                                 publication_name=f"p_{name}", consistent_point=None,
                                 system_identifier=None, timeline=None,
                                 tables={"public.t": "consolidated"})
    return url


@pytest.fixture
def endpoints(tmp_path: Path, state: str) -> Endpoints:
    port = closed_port()
    return Endpoints(sources=[source("shop", tmp_path, port), source("crm", tmp_path, port)],
                     state=state, metrics=Metrics())


@pytest.fixture
def server(endpoints: Endpoints) -> Iterator[HttpServer]:
    srv = HttpServer(endpoints, port=0).start()  # port 0: the OS picks a free one
    try:
        yield srv
    finally:
        srv.close()


def get(srv: HttpServer, path: str) -> tuple[int, str, bytes]:
    url = f"http://127.0.0.1:{srv.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def test_health_is_ok_while_sources_run_even_with_lag_warnings(
        server: HttpServer, state: str) -> None:
    with open_state(state) as store:
        store.set_source_state("shop", SourceState.STREAMING)
        store.set_source_state("crm", SourceState.WARNING)
    code, ctype, body = get(server, "/health")
    assert code == 200
    assert ctype.startswith("application/json")
    assert json.loads(body) == {"status": "ok",
                                "sources": {"shop": "streaming", "crm": "warning"}}


def test_health_is_503_with_reasons_for_broken_and_paused_sources(
        server: HttpServer, state: str) -> None:
    with open_state(state) as store:
        store.set_broken("shop", "slot_missing", "the slot s_shop is gone; run repair")
        store.set_paused("crm", "auth_failed", "password authentication failed")
    code, _, body = get(server, "/health")
    assert code == 503
    doc = json.loads(body)
    assert doc["status"] == "unhealthy"
    assert doc["sources"] == {"shop": "broken", "crm": "paused"}
    problems = {p["source"]: p for p in doc["problems"]}
    assert problems["shop"]["reason"] == "slot_missing"
    assert problems["shop"]["state"] == "broken"
    assert "repair" in problems["shop"]["message"]
    assert datetime.fromisoformat(problems["shop"]["at"]).tzinfo is not None
    assert problems["crm"]["reason"] == "auth_failed"
    with open_state(state) as store:  # the store is read on every request
        store.clear_broken("shop")
        store.clear_paused("crm")
    assert get(server, "/health")[0] == 200


def test_a_source_the_daemon_gave_up_on_is_unhealthy(endpoints: Endpoints) -> None:
    err = NotEnabled("source 'crm' is not enabled; run `cdcengine enable`")
    at = datetime(2024, 5, 1, tzinfo=UTC)
    endpoints.stopped = lambda: {"crm": (err, at)}
    code, doc = endpoints.health()
    assert code == 503
    assert doc["problems"] == [{"source": "crm", "state": "snapshotting",
                                "reason": "not_enabled", "message": err.message,
                                "at": at.isoformat()}]


def test_health_is_503_when_the_state_store_cannot_be_read(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    ep = Endpoints(sources=[source("shop", tmp_path, closed_port())],
                   state=f"sqlite:///{blocker}/sub/state.db", metrics=Metrics())
    code, doc = ep.health()
    assert code == 503
    assert doc["problems"][0]["reason"] == "state_store_failed"  # type: ignore[index]


def test_status_reports_an_unreachable_source_inside_the_document(server: HttpServer) -> None:
    code, ctype, body = get(server, "/status")
    assert code == 200
    assert ctype.startswith("application/json")
    doc = json.loads(body)
    assert [s["name"] for s in doc["sources"]] == ["shop", "crm"]
    for entry in doc["sources"]:
        assert entry["state"] == "unreachable"
        assert entry["error"]["reason"] in ("connection_failed", "host_unreachable")
    assert SECRET.encode() not in body


def test_metrics_are_prometheus_text_with_states_from_the_store(
        server: HttpServer, endpoints: Endpoints, state: str) -> None:
    with open_state(state) as store:
        store.set_broken("shop", "slot_missing", "gone")
    endpoints.metrics.count_applied("crm", "public.t", rows=4, nbytes=40)
    code, ctype, body = get(server, "/metrics")
    assert code == 200
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    assert found[("cdcengine_source_state", (("source", "shop"), ("state", "broken")))] == 1
    assert found[("cdcengine_source_state", (("source", "crm"), ("state", "snapshotting")))] == 1
    assert found[("cdcengine_rows_applied_total",
                  (("source", "crm"), ("table", "public.t")))] == 4


def test_other_paths_are_404_and_query_strings_are_ignored(server: HttpServer) -> None:
    code, _, body = get(server, "/nope")
    assert code == 404
    assert json.loads(body)["error"] == "not found"
    assert get(server, "/health?verbose=1")[0] == 200
    assert get(server, "/metrics/")[0] == 200


def test_a_port_in_use_is_a_config_error_naming_the_key(endpoints: Endpoints) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError) as info:
            HttpServer(endpoints, port=port)
    err: CDCError = info.value
    assert f"http_port = {port}" in err.message
    assert "already in use" in err.message
    assert "0" in (err.fix or "")
    assert err.reason == "config_invalid"


def test_close_stops_serving(endpoints: Endpoints) -> None:
    srv = HttpServer(endpoints, port=0).start()
    port = srv.port
    srv.close()
    with pytest.raises(ConnectionRefusedError), \
            socket.create_connection(("127.0.0.1", port), timeout=2):
        pass


def test_http_host_chooses_the_listening_address(endpoints: Endpoints) -> None:
    srv = HttpServer(endpoints, port=0, host="0.0.0.0").start()  # every interface
    try:
        assert srv.host == "0.0.0.0"
        assert get(srv, "/health")[0] == 200
    finally:
        srv.close()


def test_an_address_not_on_this_machine_is_a_config_error(endpoints: Endpoints) -> None:
    with pytest.raises(ConfigError) as info:
        HttpServer(endpoints, port=0, host="192.0.2.1")  # TEST-NET-1: never local
    assert "cannot listen on 192.0.2.1" in info.value.message
    assert "http_host" in (info.value.fix or "")
