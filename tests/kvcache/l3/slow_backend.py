"""A slow store for the tests: a real backend (a directory, a Redis server) whose every exists, get and
set (or only those named) first sleeps, as on a slow disk or a far server. It also records which
threads called it."""

from __future__ import annotations

import threading
import time
from typing import Sequence


class SlowBackend:
    """Wraps a real L3 backend; `delay_s` seconds before each call named in `slow`.

    Example::

        store.backend = SlowBackend(store.backend, delay_s=0.5)
        store.backend = SlowBackend(store.backend, delay_s=2.0, slow=("get",))   # slow reads only
    """

    def __init__(self, inner, *, delay_s: float, slow: tuple[str, ...] = ("exists", "get", "set")):
        self.inner, self.delay_s, self.slow = inner, delay_s, slow
        self.name, self.errors = f"slow {inner.name}", inner.errors
        self.threads: set[threading.Thread] = set()

    def _wait(self, call: str) -> None:
        self.threads.add(threading.current_thread())
        if call in self.slow:
            time.sleep(self.delay_s)

    def exists(self, keys: Sequence[str]) -> list[bool]:
        self._wait("exists")
        return self.inner.exists(keys)

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        self._wait("get")
        return self.inner.get(keys)

    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        self._wait("set")
        self.inner.set(keys, values)

    def delete(self, keys: Sequence[str]) -> None:
        self.inner.delete(keys)

    def listing(self) -> list[tuple[str, int]]:
        return self.inner.listing()

    def close(self) -> None:
        self.inner.close()
