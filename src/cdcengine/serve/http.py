"""The daemon's HTTP endpoints (SPEC §7): `/health`, `/status`, `/metrics`.

- `GET /health`: 200 `{"status": "ok", "sources": {name: state}}` while no configured source is
  `broken`, `paused` or `stalled` in the state store (snapshotting, streaming, warning, error,
  reconnecting are all healthy: they need no operator), else 503 with `"status": "unhealthy"`
  and a `problems` list (`source`, `state`, `reason`, `message`, `at`; a stalled source's also
  `since`, `work` and `threads`: what each of its threads is doing, see `cdcengine.serve.watchdog`).
  A source whose runner the daemon gave up on (a non-retryable error that is neither broken
  nor paused, e.g. not enabled) replicates nothing either, so it is a problem too. The state
  store is the truth, read on every request: a `repair` or `resume` by the CLI shows at once.
- `GET /status`: the document `cdcengine status --json` prints; a source that cannot be reached
  is reported inside it with its error (still 200: the endpoint itself worked).
- `GET /metrics`: Prometheus text exposition of the daemon's `Metrics`, with
  `cdcengine_source_state` refreshed from the state store first.

Why stdlib `http.server`: three read-only GET endpoints need no framework, and a threaded server
on a daemon thread keeps a slow `/status` (it queries every source) from blocking `/health`.
Loopback by default: the endpoints carry no secret, but they describe the installation.
Every body is scrubbed of the configured secrets as a last line of defence.
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import structlog

from cdcengine import api
from cdcengine.config import SourceConfig
from cdcengine.errors import CDCError, ConfigError, classify_error
from cdcengine.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from cdcengine.metrics import Metrics
from cdcengine.secrets import dsn_password, scrub
from cdcengine.state.base import Marker, SourceRecord, SourceState, live_stall, shown_state

log = structlog.get_logger("cdcengine.serve.http")

DEFAULT_HOST = "127.0.0.1"
_JSON = "application/json; charset=utf-8"
# stalled: a hang needs someone to look (its stacks are in the body and the log), and a
# supervisor restarting the daemon on 503 resumes it from the last durable position
_UNHEALTHY = frozenset({SourceState.BROKEN, SourceState.PAUSED, SourceState.STALLED})

Stopped = Callable[[], Mapping[str, tuple[CDCError, datetime]]]
"""Sources whose runner the daemon gave up on: name -> (the error, when)."""


def unreachable_status(source: SourceConfig, err: CDCError) -> dict[str, object]:
    """A source `status` could not read, as `status --json` reports it (SPEC §3)."""
    return {"name": source.name, "state": "unreachable", "error": err.to_dict()}


@dataclass(slots=True)
class Endpoints:
    """What the endpoints answer, without sockets (tests call these directly)."""

    sources: Sequence[SourceConfig]
    state: str
    metrics: Metrics
    stopped: Stopped = field(default=lambda: {})

    def health(self) -> tuple[int, dict[str, object]]:
        try:
            records = self._records()
        except Exception as exc:  # noqa: BLE001 - a store that cannot be read is a problem
            err = classify_error(exc)
            problem = {"source": None, "state": "unknown", "reason": str(err.reason),
                       "message": err.message, "at": _now()}
            return 503, {"status": "unhealthy", "sources": {}, "problems": [problem]}
        states = {name: _state(rec) for name, rec in records.items()}
        problems: list[dict[str, object]] = []
        for name, rec in records.items():
            if states[name] is SourceState.STALLED:
                problems.append(_stalled(name, rec))
            elif states[name] in _UNHEALTHY:
                problems.append(_problem(name, states[name], _marker(rec)))
        stopped = self.stopped()
        for name in records:
            if name in stopped and states[name] not in _UNHEALTHY:
                err, at = stopped[name]
                problems.append({"source": name, "state": states[name],
                                 "reason": str(err.reason), "message": err.message,
                                 "at": at.isoformat()})
        body: dict[str, object] = {"status": "unhealthy" if problems else "ok",
                                   "sources": {n: str(s) for n, s in states.items()}}
        if problems:
            body["problems"] = problems
        return (503 if problems else 200), body

    def status(self) -> tuple[int, dict[str, object]]:
        out: list[dict[str, object]] = []
        for src in self.sources:
            try:
                out.append(api.cdc_status(src, state=self.state).to_dict())
            except Exception as exc:  # noqa: BLE001 - reported in the document, like the CLI
                out.append(unreachable_status(src, classify_error(exc)))
        return 200, {"sources": out}

    def render_metrics(self) -> bytes:
        try:
            for name, rec in self._records().items():
                self.metrics.set_source_state(name, str(_state(rec)))
        except Exception as exc:  # noqa: BLE001 - a scrape still gets the other metrics
            log.warning("metrics_state_unreadable", reason=str(classify_error(exc).reason))
        return self.metrics.render()

    def secrets(self) -> list[str]:
        out = [s for src in self.sources for s in src.secrets()]
        out += [s for s in (dsn_password(self.state),) if s]
        return out

    def _records(self) -> dict[str, SourceRecord | None]:
        with api.open_store(self.state) as store:
            return {src.name: store.get_source(src.name) for src in self.sources}


class HttpServer:
    """The endpoints on `host:port`, served by a daemon thread until `close()`."""

    def __init__(self, endpoints: Endpoints, *, port: int, host: str = DEFAULT_HOST) -> None:
        self.endpoints = endpoints
        server = _Server6 if ":" in host else _Server  # an IPv6 address such as ::1 or ::
        try:
            self._server = server((host, port), _handler(endpoints))
        except OSError as exc:
            raise _bind_error(host, port, exc) from None
        self.host, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, name="http",
                                        kwargs={"poll_interval": 0.2}, daemon=True)

    def start(self) -> HttpServer:
        self._thread.start()
        log.info("http_started", host=self.host, port=self.port,
                 endpoints=["/health", "/status", "/metrics"])
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
        self._server.server_close()
        log.info("http_stopped", port=self.port)


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hanging client never keeps the daemon from exiting

    def handle_error(self, request: object, client_address: object) -> None:
        # the default prints a traceback to stderr, which would break JSON log lines
        log.warning("http_request_failed", exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


def _handler(endpoints: Endpoints) -> type[BaseHTTPRequestHandler]:
    secrets = endpoints.secrets()

    class Handler(BaseHTTPRequestHandler):
        server_version = "cdcengine"
        sys_version = ""

        def do_GET(self) -> None:  # the http.server protocol's name
            path = urlsplit(self.path).path.rstrip("/") or "/"
            try:
                if path == "/metrics":
                    self._send(200, METRICS_CONTENT_TYPE, endpoints.render_metrics())
                elif path in ("/health", "/status"):
                    code, body = (endpoints.health() if path == "/health"
                                  else endpoints.status())
                    self._json(code, body)
                else:
                    self._json(404, {"error": "not found",
                                     "endpoints": ["/health", "/status", "/metrics"]})
            except Exception as exc:  # noqa: BLE001 - a reason, never a traceback
                err = classify_error(exc)
                log.warning("http_request_failed", path=path, reason=str(err.reason),
                            message=err.message)
                self._json(500, {"error": err.to_dict()})

        def _json(self, code: int, body: Mapping[str, object]) -> None:
            text = json.dumps(body, default=str, ensure_ascii=False)
            self._send(code, _JSON, (_scrub_json(text, secrets) + "\n").encode())

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            # stderr belongs to structlog (JSON lines when configured); scrapes are debug noise
            log.debug("http_request", client=self.client_address[0], request=self.requestline,
                      status=args[1] if len(args) > 1 else None)

    return Handler


def _bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    why = ("it is already in use" if exc.errno == errno.EADDRINUSE
           else exc.strerror or str(exc))
    fix = ("choose a free port for `http_port` in [engine] (or CDCENGINE__ENGINE__HTTP_PORT) "
           "and an address of this machine for `http_host`, or set http_port to 0 to turn "
           "/health, /status and /metrics off")
    # the CLI prints only the message of a configuration error: it carries the fix too
    return ConfigError(f"[engine] http_port = {port}: cannot listen on {host}:{port}: {why}; "
                       f"{fix}", fix=fix[0].upper() + fix[1:] + ".")


def _state(rec: SourceRecord | None) -> SourceState:
    return shown_state(rec)


def _stalled(name: str, rec: SourceRecord | None) -> dict[str, object]:
    stall = live_stall(rec)
    if stall is None:  # cleared between the two reads
        return _problem(name, SourceState.STALLED, None)
    return {"source": name, "state": str(SourceState.STALLED), "reason": "stalled",
            "message": stall.message, "at": stall.at.isoformat(),
            "since": stall.since.isoformat(),
            "work": [{"lane": w.lane, "what": w.what, "waited_s": w.waited_s}
                     for w in stall.work],
            "threads": [{"name": t.name, "doing": t.doing, "stack": list(t.stack)}
                        for t in stall.threads]}


def _marker(rec: SourceRecord | None) -> Marker | None:
    if rec is None:
        return None
    return rec.broken if rec.state is SourceState.BROKEN else rec.paused


def _problem(name: str, state: SourceState, marker: Marker | None) -> dict[str, object]:
    return {"source": name, "state": str(state),
            "reason": marker.reason if marker else "unknown",
            "message": marker.message if marker else f"the source is {state}",
            "at": marker.at.isoformat() if marker else None}


def _scrub_json(text: str, secrets: Sequence[str]) -> str:
    # a secret with a quote or backslash appears escaped inside JSON strings
    escaped = [json.dumps(s, ensure_ascii=False)[1:-1] for s in secrets]
    return scrub(text, [*secrets, *escaped])


def _now() -> str:
    return datetime.now(UTC).isoformat()


__all__ = ["DEFAULT_HOST", "Endpoints", "HttpServer", "unreachable_status"]
