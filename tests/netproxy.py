"""A TCP proxy between the engine and PostgreSQL, for network-fault tests (like psycopg's
`fix_proxy`): every connection through it can be cut (both sides closed at once), or stalled
(bytes stay in the kernel buffers, nothing moves either way, the sockets stay open), and
resumed. Threads only, no dependencies."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from types import TracebackType

from psycopg.conninfo import conninfo_to_dict, make_conninfo


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self.connections = 0  # accepted so far
        self._thread = threading.Thread(target=self._accept, daemon=True, name="tcp-proxy")

    def dsn(self, dsn: str) -> str:
        """`dsn` with its host and port replaced by the proxy's."""
        params = conninfo_to_dict(dsn)
        params.update(host="127.0.0.1", port=str(self.port))
        params.pop("hostaddr", None)
        return make_conninfo("", **params)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._listener.close()
        self.cut()

    # ---- faults -------------------------------------------------------------------------------
    def cut(self) -> int:
        """Close every connection now (both sides); new ones are accepted. How many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for a, b in pairs:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        return len(pairs)

    def stall(self) -> None:
        """Stop moving bytes on every connection (new ones included) until `resume`."""
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    # ---- plumbing -----------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while not self._closed.is_set():
                self._flowing.wait()
                readable, _, _ = select.select([src], [], [], 0.1)
                if not readable or not self._flowing.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
