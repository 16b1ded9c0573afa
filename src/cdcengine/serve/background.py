"""A daemon-side loop on its own thread: `start()` runs `run()` there, `join()` waits."""

from __future__ import annotations

import threading
from typing import ClassVar, Self


class BackgroundLoop:
    """Subclasses set `thread_name` and define `run()` (which returns when told to stop)."""

    thread_name: ClassVar[str] = "background"
    _thread: threading.Thread | None = None

    def run(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
