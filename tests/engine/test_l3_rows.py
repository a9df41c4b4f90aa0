"""LoadRows, the host rows L3 lookups read pages into: taken lowest first, reused once given back,
grown only when no row is in use, and viewed as pages without a copy."""

from __future__ import annotations

import torch

from hisa.engine.l3_rows import LoadedRun, LoadRows, runs


def test_rows_are_reused_and_a_lookup_past_the_capacity_grows_them_only_when_none_is_in_use():
    rows = LoadRows(64, capacity=4, pin=False)
    a = rows.take(3)
    assert a == [0, 1, 2] and rows.in_use == 3
    assert rows.take(2) is None                # not enough free: the lookup waits for a later step
    rows.give_back(a)
    assert rows.take(2) == [0, 1]
    rows.give_back([0, 1])
    assert rows.in_use == 0
    big = rows.take(6)                         # alone and larger than the capacity: grown
    assert big == list(range(6)) and rows.capacity == 6


def test_views_write_the_rows_that_pages_read():
    rows = LoadRows(2 * 3 * 4, capacity=3, pin=False)   # a page: [2, 3] float32
    taken = rows.take(3)
    for i, view in enumerate(rows.views(taken)):
        view[:] = torch.full((2, 3), float(i)).numpy().tobytes()
    pages = rows.pages(1, 3, dtype=torch.float32, shape=(2, 3))
    assert pages.shape == (2, 2, 3) and pages[0].eq(1).all() and pages[1].eq(2).all()


def test_runs_of_consecutive_rows():
    assert runs([4, 5, 6, 9, 0, 1]) == [(0, 4, 7), (3, 9, 10), (4, 0, 2)]
    assert runs([]) == [] and runs([7]) == [(0, 7, 8)]


def test_a_loaded_run_slices_across_landed_pages_and_host_rows():
    landed = [(torch.arange(3.0), "e0"), (torch.arange(3.0, 5.0), "e1")]   # pages 0-2 and 3-4 on the "device"
    run = LoadedRun(landed, [10, 11, 12])                                   # pages 5-7 in host rows
    assert len(run) == 8
    part = run.slice(2, 6)
    assert [t.tolist() for t, _ in part.landed] == [[2.0], [3.0, 4.0]] and [e for _, e in part.landed] == ["e0", "e1"]
    assert part.rows == [10] and len(part) == 4
    assert run.slice(6, 8).landed == [] and run.slice(6, 8).rows == [11, 12]


def test_rows_in_lent_memory_give_it_back_when_they_grow_and_when_closed():
    """Rows that live in memory a backend lent (`host_buffer`, e.g. Mooncake's shared pool) tell it when
    that memory is no longer used (`release_host_buffer`): the old area when the rows grow, the last
    one on close; without a lender the rows are memory of their own."""
    lent, released = [], []

    def host_buffer(nbytes):
        area = memoryview(bytearray(nbytes))
        lent.append(area)
        return area

    rows = LoadRows(8, capacity=2, pin=False, host_buffer=host_buffer, release_host_buffer=released.append)
    rows.reserve()
    assert rows.backend_memory and len(lent) == 1 and released == []
    rows.views(rows.take(2))[1][:] = b"abcdefgh"
    assert bytes(lent[0][8:16]) == b"abcdefgh"   # the rows are the lent area
    rows.give_back([0, 1])
    assert rows.take(3) == [0, 1, 2]             # none in use: grows into a new area, the old one released
    assert len(lent) == 2 and released == [lent[0]]
    rows.give_back([0, 1, 2])
    rows.close()
    assert released == [lent[0], lent[1]]
    own = LoadRows(8, capacity=2, pin=False, host_buffer=lambda n: None, release_host_buffer=released.append)
    own.reserve()
    own.close()
    assert not own.backend_memory and released == [lent[0], lent[1]]
