"""An L3 backend spread over several servers: each page lives on one of them, chosen by its key.

`--l3 redis://HOST:PORT,HOST:PORT[/DB]` stores pages on several Redis servers. One redis-server
answers every GET on one thread, so its pages come out at what that thread can write: 2.5-3.7 GB/s
for 2 MiB pages on an H200 machine's loopback (bench/results/l3_redis_read_h200_direct.json), about
the rate at which the H200 prefills Llama-3.1-8B (~28K tokens/s = 3.7 GB/s of KV). Spread over N
servers the load path's reader threads read from N threads on the server side.

A key's server is crc32(key) mod N: keys are content hashes, so pages spread evenly, and every
process given the same list in the same order finds the same page on the same server (the list is
the store's identity: reorder it and the pages are still there, but looked for on other servers).
A failing server fails the call that touched it (its errors are the shards'): `L3Store` then runs
without L3 for a while, as with one server. Torch-free.

`--l3 mooncake://MASTER,MASTER...` does the same over Mooncake Stores (a master and a store process
each). Their reads come a batch per call (`get_into_batched`), so a batch's shards are read at once,
one thread per shard: a store process serves one client's calls one after another (6.2-6.7 GB/s on
an H200 machine whatever the number of calls at once, bench/results/l3_mooncake_parallel_probe_h200.json),
while two of them read 13-18 GB/s together on a 2-core machine against 9-10 for one.
"""

from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Callable, Sequence


class ShardedBackend:
    """Pages spread over `shards` (backends of one kind) by crc32(key) mod len(shards).

    Example::

        b = ShardedBackend([RedisBackend("127.0.0.1", 6379), RedisBackend("127.0.0.1", 6380)])
        b.set(["ab12", "cd34"], [b"x", b"y"]); b.exists(["ab12"])   # [True], on one server of the two
    """

    def __init__(self, shards: Sequence[Any]):
        if len(shards) < 2:
            raise ValueError(f"a sharded backend needs at least 2 shards, got {len(shards)}")
        kinds = {s.name for s in shards}
        if len(kinds) != 1:
            raise ValueError(f"the shards must be of one kind, got {sorted(kinds)}")
        self.shards = list(shards)
        self.name = f"{shards[0].name} x{len(shards)}"
        self.errors = tuple({e for s in shards for e in s.errors})
        if all(getattr(s, "get_into", None) is not None for s in shards):
            self.get_into = self._get_into
            self.get_into_batched = all(getattr(s, "get_into_batched", False) for s in shards)
        self._pool: ThreadPoolExecutor | None = None   # batched reads: one thread per shard, made on first use

    def shard_of(self, key: str) -> int:
        """The index of the shard that holds `key`."""
        return zlib.crc32(key.encode()) % len(self.shards)

    def _spread(self, keys: Sequence[str], fn: Callable[[Any, list[str], list[int]], list | None], *,
                at_once: bool = False) -> list:
        """Call fn(shard, its keys, their positions) for each shard that has keys (`at_once`: each on a
        thread of its own, all ended before this returns or raises the first error); results put back
        in the order of `keys` (fn returning None: no results)."""
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.shard_of(key), []).append(i)
        out: list = [None] * len(keys)
        calls = [(s, idx, lambda s=s, idx=idx: fn(self.shards[s], [keys[i] for i in idx], idx))
                 for s, idx in groups.items()]
        if at_once and len(calls) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=len(self.shards), thread_name_prefix="hisa-l3-shard")
            futures = [self._pool.submit(call) for _, _, call in calls]
            wait(futures)
            results = [f.result() for f in futures]
        else:
            results = [call() for _, _, call in calls]
        for (s, idx, _), got in zip(calls, results):
            if got is not None:
                if len(got) != len(idx):
                    raise RuntimeError(f"L3 shard {s} ({self.shards[s].name}) answered {len(got)} of {len(idx)} keys")
                for i, v in zip(idx, got):
                    out[i] = v
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        return self._spread(keys, lambda shard, ks, _: shard.exists(ks))

    def get(self, keys: Sequence[str]) -> list[bytes | None]:
        return self._spread(keys, lambda shard, ks, _: shard.get(ks))

    def _get_into(self, keys: Sequence[str], buffers: Sequence[Sequence[memoryview]]) -> list[int | None]:
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys for {len(buffers)} buffers")
        return self._spread(keys, lambda shard, ks, idx: shard.get_into(ks, [buffers[i] for i in idx]),
                            at_once=self.get_into_batched)

    def get_into_chunked(self, keys: Sequence[str], buffers: Sequence[Sequence[memoryview]], *, chunk: int,
                         on_read: Callable[[list[int], list], None]) -> list[int | None]:
        """`get_into` (batched shards only), each shard's pages read `chunk` at a time, all shards at
        once, one thread each; after each call that shard's thread calls on_read(positions in `keys`,
        what the call returned for them), e.g. to start checking those pages while the rest are read."""
        if len(keys) != len(buffers):
            raise ValueError(f"{len(keys)} keys for {len(buffers)} buffers")
        if chunk < 1:
            raise ValueError(f"chunk must be at least 1, got {chunk}")

        def read(shard, ks: list[str], idx: list[int]) -> list:
            out: list = []
            for a in range(0, len(ks), chunk):
                got = shard.get_into(ks[a:a + chunk], [buffers[i] for i in idx[a:a + chunk]])
                if len(got) != len(ks[a:a + chunk]):
                    raise RuntimeError(f"L3 shard {shard.name} answered {len(got)} of {len(ks[a:a + chunk])} keys")
                on_read(idx[a:a + chunk], got)
                out += got
            return out

        return self._spread(keys, read, at_once=True)

    def set(self, keys: Sequence[str], values: Sequence[bytes]) -> None:
        if len(keys) != len(values):
            raise ValueError(f"{len(keys)} keys for {len(values)} values")
        self._spread(keys, lambda shard, ks, idx: shard.set(ks, [values[i] for i in idx]))

    def delete(self, keys: Sequence[str]) -> None:
        self._spread(keys, lambda shard, ks, _: shard.delete(ks))

    def listing(self) -> list[tuple[str, int]]:
        """Every shard's listing, one after the other (no shard keeps a time that orders them across)."""
        return [entry for shard in self.shards for entry in shard.listing()]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        first: BaseException | None = None
        for shard in self.shards:
            try:
                shard.close()
            except BaseException as e:  # noqa: BLE001 — close the others, then raise the first
                first = first or e
        if first is not None:
            raise first
