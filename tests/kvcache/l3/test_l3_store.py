"""L3Store's own guarantees: checksums catch every flipped bit, `--l3-gb` evicts least recently used
pages, and a backend that fails (a directory gone, redis-server or the Mooncake master killed)
degrades to "no L3": misses, a warning, a counter, no exception; it is retried later."""

from __future__ import annotations

import logging
import os
import shutil
import time

import pytest

from hisa.errors import ConfigError
from hisa.kvcache.l3 import L3Store, open_l3
from hisa.kvcache.l3 import record
from hisa.kvcache.l3.file_backend import FileBackend


def test_every_single_bit_flip_is_caught():
    rec = bytearray(record.encode("abc123", bytes(range(256)) * 2))
    assert bytes(record.decode("abc123", bytes(rec))) == bytes(range(256)) * 2
    for bit in range(8 * len(rec)):
        rec[bit // 8] ^= 1 << bit % 8
        assert record.decode("abc123", bytes(rec)) is None, bit
        rec[bit // 8] ^= 1 << bit % 8


def test_a_page_under_another_key_or_truncated_is_corrupt():
    rec = record.encode("abc123", b"page")
    assert record.decode("abc124", rec) is None
    assert record.decode("abc123", rec[:-1]) is None
    assert record.decode("abc123", rec + b"x") is None
    assert record.decode("abc123", b"") is None


def _kb(i):
    return bytes([i]) * 1000


def test_capacity_evicts_least_recently_used(tmp_path):
    page = len(record.encode("k000", _kb(0)))
    store = L3Store(FileBackend(str(tmp_path)), capacity_bytes=4 * page)
    store.set(["k000", "k001", "k002", "k003"], [_kb(i) for i in range(4)])
    store.get(["k000"])                                   # k000 is now the most recently used
    store.set(["k004", "k005"], [_kb(4), _kb(5)])        # evicts k001, k002
    assert store.exists(["k000", "k001", "k002", "k003", "k004", "k005"]) == [True, False, False, True, True, True]
    assert store.stats.evictions == 2 and store.used_bytes == 4 * page
    # a batch larger than the capacity keeps its own newest pages, never evicting what it just wrote
    store.set([f"b{i:03d}" for i in range(6)], [_kb(i) for i in range(6)])
    assert store.used_bytes <= 6 * page
    assert sum(store.exists([f"b{i:03d}" for i in range(6)])) == 6
    store.set(["c000"], [_kb(9)])
    assert store.used_bytes <= 4 * page
    # a page larger than the whole capacity is not stored
    assert store.set(["huge"], [bytes(5 * page)]) == 0


def test_capacity_is_enforced_across_restarts(tmp_path):
    page = len(record.encode("k000", _kb(0)))
    first = L3Store(FileBackend(str(tmp_path)))
    for i in range(6):                                    # written one by one: distinct mtimes, oldest first
        first.set([f"k{i:03d}"], [_kb(i)])
        os.utime(first.backend.path(f"k{i:03d}"), (1000 + i, 1000 + i))
    (tmp_path / "k0").mkdir(exist_ok=True)
    (tmp_path / "k0" / "k007.123.deadbeef.tmp").write_bytes(b"half a page")   # a crashed writer's leftover,
    os.utime(tmp_path / "k0" / "k007.123.deadbeef.tmp", (1000, 1000))          # from long ago
    second = L3Store(FileBackend(str(tmp_path)), capacity_bytes=3 * page)
    assert second.exists([f"k{i:03d}" for i in range(6)]) == [False] * 3 + [True] * 3
    assert second.stats.evictions == 3
    assert not (tmp_path / "k0" / "k007.123.deadbeef.tmp").exists()


def test_file_writes_leave_no_temporaries(tmp_path):
    store = L3Store(FileBackend(str(tmp_path)))
    store.set([f"a{i:03d}" for i in range(20)], [_kb(i) for i in range(20)])
    names = [n for _, _, files in os.walk(tmp_path) for n in files]
    assert len(names) == 20 and not [n for n in names if n.endswith(".tmp")]


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_file_backend_failure_degrades_then_recovers(tmp_path, caplog):
    root = tmp_path / "l3"
    clock = Clock()
    store = L3Store(FileBackend(str(root)), retry_after_s=10.0, clock=clock)
    store.set(["k000"], [_kb(0)])
    shutil.rmtree(root)
    root.write_bytes(b"not a directory")                 # the disk went away under us
    with caplog.at_level(logging.WARNING, logger="hisa.l3"):
        assert store.set(["k001"], [_kb(1)]) == 0          # no exception
    assert "running without L3" in caplog.text
    assert store.stats.failures == 1 and not store.available
    assert store.get(["k000", "k001"]) == [None, None]
    assert store.stats.unavailable == 2 and store.stats.failures == 1   # no call while it is down
    root.unlink()
    clock.now = 10.0
    assert store.available
    assert store.set(["k001"], [_kb(1)]) == 1
    assert bytes(store.get(["k001"])[0]) == _kb(1)


def test_redis_killed_mid_run_degrades_and_comes_back(redis_server, caplog):
    clock = Clock()
    store = open_l3(redis_server.url, retry_after_s=5.0)
    store._clock = clock
    keys = [f"r{i:03d}" for i in range(8)]
    assert store.set(keys, [_kb(i) for i in range(8)]) == 8
    assert all(p is not None for p in store.get(keys))
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="hisa.l3"):
        assert store.get(keys) == [None] * 8
        assert store.exists(keys) == [False] * 8
        assert store.set(["r999"], [_kb(9)]) == 0
    assert store.stats.failures == 1 and store.stats.unavailable == 8
    assert "L3 (redis) get failed" in caplog.text
    redis_server.start()                                   # a fresh, empty server on the same port
    assert store.get(keys) == [None] * 8                   # still within retry_after_s: not even tried
    clock.now = 5.0
    assert store.set(keys[:2], [_kb(0), _kb(1)]) == 2
    assert store.exists(keys[:3]) == [True, True, False]
    store.close()


def test_redis_load_path_killed_mid_run_degrades_and_reconnects(redis_server, caplog):
    """`get_into` (the load path: the reader threads' own sockets, not redis-py's pool) fails over
    to "no L3" when the server dies, and reads again through new sockets once it is back."""
    clock = Clock()
    store = open_l3(redis_server.url, retry_after_s=5.0)
    store._clock = clock
    keys = [f"r{i:03d}" for i in range(8)]
    assert store.set(keys, [_kb(i) for i in range(8)]) == 8
    rows = [memoryview(bytearray(1000)) for _ in keys]
    assert store.get_into(keys, rows) == [True] * 8
    assert [bytes(r) for r in rows] == [_kb(i) for i in range(8)]
    assert store.backend._readers                          # the reader threads' sockets, kept
    redis_server.kill()
    with caplog.at_level(logging.WARNING, logger="hisa.l3"):
        assert store.get_into(keys, rows) == [False] * 8
    assert store.stats.failures == 1 and store.stats.unavailable == 8
    assert "L3 (redis) get failed" in caplog.text
    redis_server.start()
    clock.now = 5.0
    assert store.set(keys, [_kb(i + 1) for i in range(8)]) == 8
    assert store.get_into(keys, rows) == [True] * 8        # new sockets where the old ones broke
    assert [bytes(r) for r in rows] == [_kb(i + 1) for i in range(8)]
    store.backend.client.client_kill_filter(_type="normal", skipme=True)   # as a server's idle timeout does
    assert store.get_into(keys, rows) == [True] * 8        # closed sockets are replaced, not failures
    assert store.stats.failures == 1
    store.close()
    assert store.backend._readers == []


def test_redis_reader_closed_by_a_refused_reconnect_is_not_reused(redis_server):
    """The server gone: a thread's socket reads as closed and its reconnect is refused. Its old
    socket must not be taken up again once the server is back, even when its descriptor number now
    belongs to another, healthy socket (which made the old one look idle: EBADF on the next read)."""
    import socket

    from hisa.kvcache.l3.redis_backend import RedisBackend

    backend = RedisBackend("127.0.0.1", redis_server.port)
    backend.set(["p"], [_kb(3)])
    row = bytearray(1000)
    assert backend.get_into(["p"], [[row]]) == [1000]
    old_fd = backend._local.reader.sock.fileno()
    redis_server.kill()
    with pytest.raises(OSError):                           # the socket reads closed; reconnect refused
        backend.get_into(["p"], [[row]])
    redis_server.start()
    backend.set(["p"], [_kb(4)])
    squatters = []                                         # sockets until one holds the old number
    while not squatters or squatters[-1].fileno() < old_fd:
        squatters.append(socket.create_connection(("127.0.0.1", redis_server.port)))
    assert squatters[-1].fileno() == old_fd
    assert backend.get_into(["p"], [[row]]) == [1000]
    assert bytes(row) == _kb(4)
    for s in squatters:
        s.close()
    backend.close()


def test_redis_load_path_stays_in_step_past_odd_values_and_uses_its_db(redis_server):
    """One socket: a value of another length is read past (its length returned, the buffer left
    alone), an absent key is None, a key of another type raises (and the socket is replaced); the
    reads that follow on the same thread get their own values, from the database in the URL."""
    import redis

    from hisa.kvcache.l3.redis_backend import RedisBackend

    backend = RedisBackend("127.0.0.1", redis_server.port, db=3)
    other = RedisBackend("127.0.0.1", redis_server.port, db=0)
    other.set(["a"], [b"from db 0"])
    backend.set(["short", "page", "a"], [b"x" * 10, _kb(5), _kb(6)])
    backend.client.rpush(backend.prefix + "list", b"1")
    head, row = bytearray(24), bytearray(976)
    assert backend.get_into(["short", "missing", "page"], [[head, row]] * 3) == [10, None, 1000]
    assert bytes(head) + bytes(row) == _kb(5)
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        backend.get_into(["list"], [[head, row]])
    assert backend.get_into(["a"], [[head, row]]) == [1000]
    assert bytes(head) + bytes(row) == _kb(6)
    big = os.urandom(3 << 20)                               # a reply longer than the socket's buffers
    backend.set(["big"], [big])
    view = bytearray(len(big))
    assert backend.get_into(["big", "short"], [[view], [head, row]]) == [len(big), 10]
    assert bytes(view) == big
    backend.close()
    other.close()


def test_mooncake_master_killed_degrades(tmp_path_factory, caplog):
    from l3_servers import MooncakeStoreServers, require_mooncake   # its own servers: the master is killed
    require_mooncake()
    servers = MooncakeStoreServers(tmp_path_factory.mktemp("mooncake_kill")).start()
    try:
        store = open_l3(servers.url)
        keys = [f"m{i:03d}" for i in range(4)]
        assert store.set(keys, [_kb(i) for i in range(4)]) == 4
        assert all(p is not None for p in store.get(keys))
        rows = [memoryview(bytearray(1000)) for _ in keys]
        assert store.get_into(keys, rows) == [True] * 4      # the load path: straight into the rows
        assert [bytes(r) for r in rows] == [_kb(i) for i in range(4)]
        servers.kill_master()
        with caplog.at_level(logging.WARNING, logger="hisa.l3"):
            assert store.get_into(keys, rows) == [False] * 4
            assert store.exists(keys) == [False] * 4
            assert store.get(keys) == [None] * 4
        assert store.stats.failures == 1 and not store.available
        assert "L3 (mooncake)" in caplog.text
        store.close()
    finally:
        servers.stop()


def test_unreachable_servers_fail_at_start_up_with_advice():
    pytest.importorskip("redis", reason="redis-py is not installed (the test extra pins it)")
    from l3_servers import free_port
    port = free_port()
    with pytest.raises(ConfigError, match="cannot reach the server"):
        open_l3(f"redis://127.0.0.1:{port}")


def test_file_get_into_misses_files_truncated_emptied_or_gone(tmp_path):
    """The file backend's preadv path: a file cut short in place, an empty file (a crashed writer's
    page renamed in by hand) and a file removed by another process are misses, counted; a directory
    gone from under the store is a failure: misses, no exception, no L3 for a while."""
    store = L3Store(FileBackend(str(tmp_path / "l3")), retry_after_s=10.0, clock=Clock())
    keys = [f"f{i:03d}" for i in range(5)]
    store.set(keys, [_kb(i) for i in range(5)])
    os.truncate(store.backend.path(keys[1]), record.head_bytes(keys[1]) + 500)
    os.truncate(store.backend.path(keys[2]), 0)
    os.unlink(store.backend.path(keys[3]))
    rows = bytearray(5 * 1000)
    views = [memoryview(rows)[i * 1000:(i + 1) * 1000] for i in range(5)]
    assert store.get_into(keys, views) == [True, False, False, False, True]
    assert bytes(views[0]) == _kb(0) and bytes(views[4]) == _kb(4)
    assert (store.stats.hits, store.stats.corrupt, store.stats.misses) == (2, 2, 1)
    shutil.rmtree(tmp_path / "l3")
    (tmp_path / "l3").write_bytes(b"not a directory")
    assert store.get_into(keys, views) == [False] * 5
    assert store.stats.failures == 1 and store.stats.unavailable == 5 and not store.available


def test_the_checksum_is_zlibs_crc32_whichever_library_computes_it():
    """Pages written by a hisa with zlib-ng read in one without it, and back: the same CRC-32."""
    import zlib

    data = bytes(range(256)) * 4099
    for n in (0, 1, 15, 4096, len(data)):
        assert record.crc32(data[:n], 7) == zlib.crc32(data[:n], 7)


def test_a_store_spread_over_two_redis_servers(redis_servers, caplog):
    """redis://A,B: each page lives on the server its key picks (both hold some), every page reads
    back through the load path and is found by exists; a second process given the same list finds
    them; one server killed degrades the whole store to "no L3" (misses, a warning, a counter), and
    it comes back with that server."""
    a, b = redis_servers
    url = f"redis://127.0.0.1:{a.port},127.0.0.1:{b.port}"
    store = open_l3(url, retry_after_s=0.2)
    assert store.backend.name == "redis x2"
    keys = [f"{i:064x}" for i in range(40)]
    assert store.set(keys, [_kb(i) for i in range(40)]) == 40
    on = [sum(1 for k in keys if store.backend.shard_of(k) == s) for s in range(2)]
    assert min(on) >= 10, on                                       # spread over both
    for server, n in zip(redis_servers, on):
        import redis
        client = redis.Redis(port=server.port)
        assert len(client.keys("hisa:l3:*")) == n                  # each page on its server alone
        client.close()
    rows = [bytearray(1000) for _ in keys]
    assert store.get_into(keys, [memoryview(r) for r in rows]) == [True] * 40
    assert [bytes(r) for r in rows] == [_kb(i) for i in range(40)]
    other = open_l3(url)                                           # another process, the same list
    assert other.exists(keys + ["absent"]) == [True] * 40 + [False]
    assert [bytes(v) for v in other.get(keys[:3])] == [_kb(i) for i in range(3)]
    other.close()
    b.kill()
    with caplog.at_level(logging.WARNING, logger="hisa.l3"):
        assert store.exists(keys[:4]) == [False] * 4                # one server gone: no L3 for a while
    assert store.stats.failures == 1 and "failed" in caplog.text
    b.start()                                                      # (its pages are gone with it)
    time.sleep(0.3)
    assert store.exists(keys) == [store.backend.shard_of(k) == 0 for k in keys]
    store.close()


def test_a_redis_url_naming_an_unreachable_server_is_a_config_error(redis_server):
    from l3_servers import free_port

    with pytest.raises(ConfigError, match=f"127.0.0.1:{(port := free_port())}: cannot reach"):
        open_l3(f"redis://127.0.0.1:{redis_server.port},127.0.0.1:{port}")


def _shmem_kib() -> int:
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssShmem"))


def test_mooncake_shared_pool_areas_are_reused_by_the_next_backend_not_mapped_again(mooncake_servers_shm):
    """Mooncake cannot free a shared-pool area, so a closed dummy-client backend's areas (its scratch
    area, the load rows it lent) go to the next backend of the same store process: three backends
    opened and closed in turn use the same two areas, read pages into them correctly, and the
    process maps no more shared memory after the first. A lent area given back is lent again; a
    request past the pool is None (the caller uses memory of its own), not an error."""
    import numpy as np

    from hisa.kvcache.l3.mooncake_backend import MooncakeBackend

    keys = [f"reuse-{i}" for i in range(4)]
    pages = [bytes([i + 7]) * 4096 for i in range(4)]
    seen, shmem = set(), []
    for cycle in range(3):
        store = open_l3(mooncake_servers_shm.shm_url.replace("pool_gb=2.2", "pool_gb=0.1"))
        b = store.backend
        assert isinstance(b, MooncakeBackend)
        if cycle == 0:
            store.set(keys, pages)
        area = b.host_buffer(64 << 20)
        assert area is not None and b.host_buffer(1 << 30) is None   # past pool_gb: None, warned
        rows = np.frombuffer(area, dtype=np.uint8)
        rows[:] = 0
        views = [memoryview(rows[i * 4096:(i + 1) * 4096]) for i in range(4)]
        assert store.get_into(keys, views) == [True] * 4
        assert [bytes(v) for v in views] == pages
        b.release_host_buffer(area)
        again = b.host_buffer(64 << 20)    # the area given back, lent again
        assert np.frombuffer(again, dtype=np.uint8).ctypes.data == rows.ctypes.data
        seen.update(a for a, _ in b._pool)
        del rows, views, area, again
        store.close()
        shmem.append(_shmem_kib())
    assert len(seen) == 2, seen              # the scratch area and the rows' area, every time
    assert shmem[2] - shmem[0] < 8 << 10, shmem   # (KiB) nothing more mapped after the first backend


def test_several_stores_read_at_once_check_each_call_as_it_returns(tmp_path, monkeypatch):
    """Pages spread over stores that read a batch per call (Mooncake) are read by every store at once,
    a few per call (`get_into_chunked`), each call's pages handed over (to be checked) as it returns
    while the rest are read; the results come back in key order and a corrupt page still reads as a
    counted, deleted miss."""
    from hisa.kvcache.l3 import store as store_mod
    from hisa.kvcache.l3.sharded import ShardedBackend

    shards = [FileBackend(str(tmp_path / f"s{i}")) for i in range(2)]
    for shard in shards:
        shard.get_into_batched = True   # (a file store reads a page per call; here it stands for a batched one)
    backend = ShardedBackend(shards)
    assert backend.get_into_batched
    keys = [f"{i:064x}" for i in range(24)]
    calls = []
    buffers = [[bytearray(3), bytearray(5)] for _ in keys]
    for k, (a, b) in zip(keys, buffers):
        shards[backend.shard_of(k)].set([k], [b"abc" + k[-5:].encode()])
    got = backend.get_into_chunked(keys, [[memoryview(a), memoryview(b)] for a, b in buffers], chunk=3,
                                   on_read=lambda idx, sizes: calls.append((list(idx), list(sizes))))
    assert got == [8] * len(keys) and [bytes(b) for _, b in buffers] == [k[-5:].encode() for k in keys]
    assert sorted(i for idx, _ in calls for i in idx) == list(range(len(keys)))
    assert all(1 <= len(idx) <= 3 for idx, _ in calls)
    assert {backend.shard_of(keys[idx[0]]) for idx, _ in calls} == {0, 1}
    for idx, _ in calls:   # each call one store's, in key order
        assert len({backend.shard_of(keys[i]) for i in idx}) == 1 and idx == sorted(idx)

    monkeypatch.setattr(store_mod, "CHUNK_BYTES", 2 * 1000)   # two pages of 1,000 bytes per call
    store = L3Store(backend)
    pages = [_kb(i) for i in range(len(keys))]
    assert store.set(keys, pages) == len(keys)
    victim = keys[9]
    with open(shards[backend.shard_of(victim)].path(victim), "r+b") as f:
        f.seek(-10, os.SEEK_END)
        byte = f.read(1)[0]
        f.seek(-10, os.SEEK_END)
        f.write(bytes([byte ^ 1]))
    rows = [bytearray(1000) for _ in keys]
    ok = store.get_into(keys, [memoryview(r) for r in rows])
    assert ok == [i != 9 for i in range(len(keys))]
    assert [bytes(r) for i, r in enumerate(rows) if i != 9] == [p for i, p in enumerate(pages) if i != 9]
    assert store.stats.corrupt == 1 and store.exists([victim]) == [False]
    store.close()
