"""L3 backend `redis`: pages as string values in a Redis server (redis-py), shareable by processes.

Keys are `hisa:l3:<key>`. Batches are one round trip each (MGET, a pipeline of EXISTS, of SET,
one DEL). Replies are parsed by hiredis (C) when it is installed (the `l3` extra pins it): pages
are MiBs each at 8B-model shapes, and `L3Store.get_into` of 2 MiB pages moved 0.45 GB/s with
redis-py's own parser and 1.09 GB/s with hiredis on a 2-core machine, 0.33 and 0.62 GB/s on an
H200 machine's host (`python bench/l3_redis_read.py`, bench/results/l3_redis_read_cpu.json,
_h200.json; the bytes per socket read made no consistent difference with hiredis). The client
does not retry and times out after `timeout_s`, so a server that went away surfaces as one
RedisError that L3Store turns into "no L3" instead of a stalled engine step.
"""

from __future__ import annotations

from typing import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

PREFIX = "hisa:l3:"


class RedisBackend:
    """One Redis database. `redis-server` itself is not started here.

    Example::

        b = RedisBackend("127.0.0.1", 6379)
        b.set(["ab12"], [b"..."]); b.exists(["ab12"])   # [True]
    """
    name = "redis"
    errors: tuple[type[BaseException], ...] = (redis.exceptions.RedisError, OSError)

    def __init__(self, host: str, port: int, db: int = 0, *, timeout_s: float = 2.0, prefix: str = PREFIX):
        self.prefix = prefix
        self.client = redis.Redis(host=host, port=port, db=db, socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0))
        self.client.ping()   # raises at start-up if the server is not there

    def _k(self, key: str) -> str:
        return self.prefix + key

    def exists(self, keys: Sequence[str]) -> list[bool]:
        pipe = self.client.pipeline(transaction=False)
        for key in keys:
            pipe.exists(self._k(key))
        return [bool(n) for n in pipe.execute()]

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        return self.client.mget([self._k(k) for k in keys])

    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for key, value in zip(keys, values, strict=True):
            pipe.set(self._k(key), value)
        pipe.execute()

    def delete(self, keys: Sequence[str]) -> None:
        self.client.delete(*[self._k(k) for k in keys])

    def listing(self) -> list[tuple[str, int]]:
        """(key, bytes) of this prefix's pages, in scan order (Redis keeps no write time)."""
        names = list(self.client.scan_iter(match=self.prefix + "*", count=1000))
        pipe = self.client.pipeline(transaction=False)
        for name in names:
            pipe.strlen(name)
        n = len(self.prefix)
        return [(name.decode()[n:], size) for name, size in zip(names, pipe.execute()) if size]

    def close(self) -> None:
        self.client.close()
