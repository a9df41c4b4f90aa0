"""L3: KV pages in storage (a directory, Redis, Mooncake Store), keyed by content.

`open_l3("redis://127.0.0.1:6379", capacity_bytes=...)` parses the `--l3` value, connects (raising
ConfigError at start-up if it cannot) and returns an :class:`L3Store`. See README.md for the rules.
"""

from __future__ import annotations

import functools
from typing import Callable

from hisa.errors import ConfigError
from hisa.kvcache.l3.keys import KVLayout, page_keys
from hisa.kvcache.l3.store import L3Backend, L3Stats, L3Store
from hisa.kvcache.l3.url import FileL3Spec, L3Spec, MooncakeL3Spec, RedisL3Spec, parse_l3_url

__all__ = ["KVLayout", "page_keys", "L3Backend", "L3Stats", "L3Store", "L3Spec", "FileL3Spec", "RedisL3Spec", "MooncakeL3Spec",
           "parse_l3_url", "open_backend", "open_l3"]


def open_backend(spec: L3Spec | str) -> L3Backend:
    """Connect to the backend a spec (or `--l3` string) names; ConfigError if it cannot be reached."""
    if isinstance(spec, str):
        spec = parse_l3_url(spec)
    if isinstance(spec, FileL3Spec):
        from hisa.kvcache.l3.file_backend import FileBackend
        try:
            return FileBackend(spec.path)
        except OSError as e:
            raise ConfigError(f"--l3 file:{spec.path}: cannot use the directory ({e})") from e
    if isinstance(spec, RedisL3Spec):
        try:
            from hisa.kvcache.l3.redis_backend import RedisBackend
        except ImportError as e:
            raise ConfigError(f"--l3 redis:// needs the package redis (pip install redis): {e}") from e

        def redis(host: str, port: int) -> RedisBackend:
            try:
                return RedisBackend(host, port, spec.db)
            except RedisBackend.errors as e:
                raise ConfigError(f"--l3 redis://{host}:{port}: cannot reach the server ({e}); "
                                  f"start redis-server there or drop --l3") from e

        return _one_or_sharded([functools.partial(redis, h, p) for h, p in spec.servers])
    from hisa.kvcache.l3.mooncake_backend import MooncakeBackend, MooncakeError

    def mooncake(one: MooncakeL3Spec) -> MooncakeBackend:
        try:
            return MooncakeBackend(master=one.master, metadata=one.metadata, client=one.client,
                                   pool_bytes=int(one.pool_gb * 2**30))
        except ImportError as e:
            raise ConfigError(f"--l3 mooncake://: {e}") from e
        except MooncakeError as e:
            where = f"the store process at {one.client}" if one.client else "a store process"
            raise ConfigError(f"--l3 mooncake://{one.master}: {e}; start mooncake_master (with "
                              f"--enable_http_metadata_server) and {where}, or drop --l3") from e

    return _one_or_sharded([functools.partial(mooncake, one) for one in spec.stores])


def _one_or_sharded(opens: list[Callable[[], L3Backend]]) -> L3Backend:
    """The backend of each server (`opens`: connect to one, ConfigError if it cannot): the one, or
    all of them as a ShardedBackend (pages spread by key). A failure closes those opened before it."""
    shards: list[L3Backend] = []
    try:
        for open_one in opens:
            shards.append(open_one())
    except ConfigError:
        for shard in shards:
            shard.close()
        raise
    if len(shards) == 1:
        return shards[0]
    from hisa.kvcache.l3.sharded import ShardedBackend
    return ShardedBackend(shards)


def open_l3(spec: L3Spec | str, *, capacity_bytes: int | None = None, retry_after_s: float = 30.0) -> L3Store:
    """An L3Store over the backend `spec` names (see :func:`parse_l3_url`)."""
    return L3Store(open_backend(spec), capacity_bytes=capacity_bytes, retry_after_s=retry_after_s)
