"""Every L3 backend against a real store (a directory, redis-server, Mooncake master + store process):
round trip, batches, a deleted page and a corrupted page (one bit flipped where the page is kept),
through `get` and through `get_into` (the load path: pages read into one buffer and checked there)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from hisa.kvcache.l3 import open_l3
from l3_servers import mooncake_url


@pytest.fixture(params=["file", "redis", "redis x2", "mooncake", "mooncake shm", "mooncake shm x2"])
def l3(request, tmp_path):
    """(store, flip_bit(key, bit)) for one backend; flip_bit corrupts the stored page in place."""
    if request.param == "file":
        store = open_l3(f"file:{tmp_path / 'l3'}")

        def flip(key, bit):
            path = store.backend.path(key)
            with open(path, "r+b") as f:
                f.seek(bit // 8)
                byte = f.read(1)[0]
                f.seek(bit // 8)
                f.write(bytes([byte ^ (1 << bit % 8)]))
    elif request.param == "redis":
        server = request.getfixturevalue("redis_server")
        store = open_l3(server.url)
        raw = store.backend.client

        def flip(key, bit):
            name = store.backend.prefix + key
            raw.setbit(name, bit, 1 - raw.getbit(name, bit))
    elif request.param == "redis x2":   # pages spread over two servers by key
        a, b = request.getfixturevalue("redis_servers")
        store = open_l3(f"redis://127.0.0.1:{a.port},127.0.0.1:{b.port}")

        def flip(key, bit):
            shard = store.backend.shards[store.backend.shard_of(key)]
            name = shard.prefix + key
            shard.client.setbit(name, bit, 1 - shard.client.getbit(name, bit))
    else:   # "mooncake" over TCP; "mooncake shm" through the store process's shared memory (its dummy
        # client); "mooncake shm x2": two stores (a master and a store process each), pages spread by key
        if request.param == "mooncake":
            store = open_l3(request.getfixturevalue("mooncake_servers").url)
        elif request.param == "mooncake shm":
            store = open_l3(request.getfixturevalue("mooncake_servers_shm").shm_url)
        else:
            a, b = request.getfixturevalue("mooncake_servers_x2")
            store = open_l3(mooncake_url([a, b], shm=True, pool_gb=0.1))
            assert len(store.backend.shards) == 2

        def flip(key, bit):   # rewrite the stored value with one bit changed, below the checksum layer
            value = bytearray(store.backend.get([key])[0])
            value[bit // 8] ^= 1 << (bit % 8)
            store.backend.set([key], [bytes(value)])
    yield store, flip
    store.close()


def _pages(n, *, seed, size=4096):
    rng = random.Random(seed)
    return [f"{request_tag(seed)}{i:04d}" for i in range(n)], [rng.randbytes(size + 17 * i) for i in range(n)]


def request_tag(seed):
    return f"t{os.getpid()}s{seed}p"


def test_round_trip_and_batch(l3):
    store, _ = l3
    keys, pages = _pages(24, seed=1)
    assert store.exists(keys) == [False] * 24
    assert store.set(keys, pages) == 24
    assert store.exists(keys + ["absent-key"]) == [True] * 24 + [False]
    got = store.get(keys[::-1] + ["absent-key"])
    assert [bytes(g) for g in got[:-1]] == pages[::-1]
    assert got[-1] is None
    assert (store.stats.hits, store.stats.misses, store.stats.corrupt) == (24, 1, 0)
    assert store.stats.bytes_read == sum(map(len, pages))
    # overwrite: the latest value wins
    store.set(keys[:1], [b"new page"])
    assert bytes(store.get(keys[:1])[0]) == b"new page"


def test_deleted_page_reads_as_a_counted_miss(l3):
    store, _ = l3
    keys, pages = _pages(4, seed=2)
    store.set(keys, pages)
    store.delete(keys[1:3])
    got = store.get(keys)
    assert [g is None for g in got] == [False, True, True, False]
    assert bytes(got[3]) == pages[3]
    assert store.stats.misses == 2 and store.stats.hits == 2


@pytest.mark.parametrize("where", ["payload", "header"])
def test_corrupt_page_reads_as_a_counted_miss_and_is_deleted(l3, where):
    store, flip = l3
    keys, pages = _pages(3, seed=3)
    store.set(keys, pages)
    flip(keys[1], 8 * 200 + 3 if where == "payload" else 8 * 5)   # a payload bit / the length field
    got = store.get(keys)
    assert got[1] is None
    assert bytes(got[0]) == pages[0] and bytes(got[2]) == pages[2]
    assert store.stats.corrupt == 1 and store.stats.hits == 2
    assert store.exists(keys) == [True, False, True]      # the corrupt page is gone: it can be rewritten
    store.set(keys[1:2], pages[1:2])
    assert bytes(store.get(keys[1:2])[0]) == pages[1]


def _rows(n, size):
    return np.zeros((n, size), dtype=np.uint8)


def test_get_into_reads_verified_pages_in_place(l3):
    """The load path: each page read straight into its row of one buffer (file: one preadv per page;
    redis, mooncake: get, then a copy) and checked there; an absent page is a counted miss."""
    store, _ = l3
    keys = [f"{request_tag(4)}{i:04d}" for i in range(6)]
    pages = [random.Random(i).randbytes(4096) for i in range(6)]
    store.set(keys, pages)
    rows = _rows(7, 4096)
    assert store.get_into(keys + ["absent-key"], [memoryview(r) for r in rows]) == [True] * 6 + [False]
    assert [bytes(r) for r in rows[:6]] == pages
    assert (store.stats.hits, store.stats.misses, store.stats.corrupt) == (6, 1, 0)
    assert store.stats.bytes_read == 6 * 4096


def _damaged_pages(store, flip, tag: str, *, seed: int) -> tuple[list[str], list[bytes]]:
    """Seven pages of 4 KiB stored under `tag`, then damaged: 1 a flipped payload bit, 2 truncated,
    3 page 0's record under its key, 4 an intact record of another length, 5 deleted; 0 and 6 intact."""
    raw = store.backend
    keys = [f"{tag}{i:04d}" for i in range(7)]
    pages = [random.Random(seed + i).randbytes(4096) for i in range(7)]
    store.set(keys, pages)
    flip(keys[1], 8 * 300 + 5)                                       # a payload bit
    raw.set([keys[2]], [raw.get([keys[2]])[0][:-100]])               # truncated
    raw.set([keys[3]], [raw.get([keys[0]])[0]])                      # page 0's record under page 3's key
    store.set([keys[4]], [pages[4] + b"x" * 16])                     # intact, but not one page long
    store.delete([keys[5]])
    return keys, pages


def test_get_into_misses_corrupt_truncated_misplaced_and_deleted_pages(l3):
    """A flipped bit, a truncated value, a value stored under another page's key, a value of another
    page size and a deleted page each read as a miss (counted; the corrupt ones are deleted), never
    as KV; the intact pages around them are read."""
    store, flip = l3
    keys, pages = _damaged_pages(store, flip, request_tag(5), seed=10)
    rows = _rows(7, 4096)
    got = store.get_into(keys, [memoryview(r) for r in rows])
    assert got == [True, False, False, False, False, False, True]
    assert bytes(rows[0]) == pages[0] and bytes(rows[6]) == pages[6]
    assert (store.stats.hits, store.stats.corrupt, store.stats.misses) == (2, 4, 1)
    assert store.exists(keys) == [True] + [False] * 5 + [True]      # the corrupt ones are gone


def test_get_into_unchecked_leaves_the_payload_checksum_to_the_caller(l3):
    """The load path with the check on the device: heads are checked on read (a truncated value, a
    misplaced record, another page size and a deleted page are misses at once); a payload's flipped
    bit is not, but the crc returned for it disagrees with the payload's (what `crc32_pages` computes
    after landing), and `corrupt_found` turns it into a counted, deleted corrupt page."""
    import torch

    from hisa.kvcache.l3.record import key_crc
    from hisa.ops.crc32 import crc32_pages

    store, flip = l3
    keys, _ = _damaged_pages(store, flip, request_tag(6), seed=20)
    rows = _rows(7, 4096)
    wants = store.get_into_unchecked(keys, [memoryview(r) for r in rows])
    assert [w is not None for w in wants] == [True, True, False, False, False, False, True]
    got = crc32_pages(torch.from_numpy(rows), torch.tensor([key_crc(k) for k in keys])).tolist()
    assert [g == w for g, w in zip(got, wants)] == [True, False, False, False, False, False, True]
    assert (store.stats.hits, store.stats.corrupt, store.stats.misses) == (3, 3, 1)
    store.corrupt_found([keys[1]], 4096)
    assert (store.stats.hits, store.stats.corrupt, store.stats.bytes_read) == (2, 4, 2 * 4096)
    assert store.exists(keys) == [True] + [False] * 5 + [True]


def test_a_start_up_listing_removes_a_crashs_temporaries_but_not_a_write_in_flight(tmp_path):
    """Another process sharing the directory may be writing a page (its `.tmp` file is fresh): removing
    it made that process's rename fail and turned its L3 off."""
    from hisa.kvcache.l3.file_backend import STALE_TMP_S, FileBackend

    backend = FileBackend(str(tmp_path))
    sub = tmp_path / "ab"
    sub.mkdir(exist_ok=True)
    stale, fresh = sub / "abcd.1.tmp", sub / "abce.2.tmp"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"y")
    old = os.path.getmtime(stale) - STALE_TMP_S - 60
    os.utime(stale, (old, old))
    backend.listing()
    assert not stale.exists() and fresh.exists()
