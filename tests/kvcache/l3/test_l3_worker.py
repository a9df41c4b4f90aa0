"""L3Worker: calls run in order on one background thread (a lookup sees the writes handed over
before it), pending writes are bounded, a failure reaches the engine thread, close() runs what is
queued and joins the thread. Over a real directory store made slow (slow_backend.py)."""

from __future__ import annotations

import threading
import time

import pytest

from hisa.kvcache.l3 import L3Store
from hisa.kvcache.l3.file_backend import FileBackend
from hisa.kvcache.l3.worker import L3Worker
from slow_backend import SlowBackend


@pytest.fixture
def slow_store(tmp_path):
    store = L3Store(SlowBackend(FileBackend(str(tmp_path / "l3")), delay_s=0.2))
    yield store
    store.close()


def test_calls_run_in_order_off_the_callers_thread(slow_store):
    io = L3Worker()
    t0 = time.monotonic()
    io.submit(lambda: slow_store.set(["page0"], [b"kv" * 100]), nbytes=200)
    found = io.submit(lambda: slow_store.get(["page0"]))
    assert time.monotonic() - t0 < 0.1            # the caller did not wait for the slow backend
    assert io.pending_calls == 2 and io.pending_bytes == 200
    assert bytes(found.result()[0]) == b"kv" * 100   # the lookup ran after the write
    io.drain()
    assert io.pending_calls == 0 and io.pending_bytes == 0
    assert {t.name for t in slow_store.backend.threads} == {"hisa-l3-io_0"}
    io.close()


def test_pending_writes_are_bounded(slow_store):
    io = L3Worker(max_pending_bytes=1000)
    assert io.room_for(5000)                      # nothing pending: a write of any size is taken
    io.submit(lambda: slow_store.set(["big"], [b"x" * 5000]), nbytes=5000)
    assert not io.room_for(1)                     # past the bound: the caller drops what it would write
    io.drain()
    assert io.room_for(10**9)                     # drained: nothing pending
    io.submit(lambda: slow_store.set(["a"], [b"x" * 600]), nbytes=600)
    assert io.room_for(400) and not io.room_for(401)
    io.close()


def test_a_failed_call_is_raised_once_on_the_engine_thread():
    io = L3Worker()
    failed = io.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    with pytest.raises(ZeroDivisionError):
        io.check()
    io.check()                                    # raised once
    io.close()


def test_close_runs_the_queued_calls_and_joins_the_thread(slow_store):
    io = L3Worker()
    for i in range(3):
        io.submit(lambda i=i: slow_store.set([f"page{i}"], [b"kv"]), nbytes=2)
    io.close()
    (thread,) = slow_store.backend.threads
    assert not thread.is_alive() and io.pending_calls == 0
    assert slow_store.exists(["page0", "page1", "page2"]) == [True] * 3


def test_synchronous_mode_runs_on_the_callers_thread(slow_store):
    io = L3Worker(threaded=False)
    io.submit(lambda: slow_store.set(["page0"], [b"kv"]), nbytes=2)
    assert io.pending_calls == 0 and slow_store.exists(["page0"]) == [True]
    assert slow_store.backend.threads == {threading.current_thread()}
    with pytest.raises(ZeroDivisionError):       # at once, to the caller
        io.submit(lambda: 1 / 0)
    io.close()
