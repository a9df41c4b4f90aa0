"""LoadRows, the host rows L3 lookups read pages into: taken lowest first, reused once given back,
grown only when no row is in use, and viewed as pages without a copy."""

from __future__ import annotations

import pytest
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


class _Lender:
    """A backend that lends memory (as Mooncake's shared pool does): every area it lent and released."""

    def __init__(self, lends: bool = True):
        self.lends, self.lent, self.released = lends, [], []

    def host_buffer(self, nbytes):
        if not self.lends:
            return None
        area = memoryview(bytearray(nbytes))
        self.lent.append(area)
        return area

    def release_host_buffer(self, view):
        self.released.append(view)


def test_rows_in_lent_memory_give_it_back_when_they_grow_and_when_closed():
    """Rows that live in memory a backend lent (`host_buffer`, e.g. Mooncake's shared pool) tell it when
    that memory is no longer used (`release_host_buffer`): the old area when the rows grow, the last
    one on close; a lender that lends nothing leaves the rows in memory of their own."""
    lender = _Lender()
    rows = LoadRows(8, capacity=2, pin=False, lenders=[lender])
    rows.reserve()
    assert rows.backend_memory and rows.all_lent and len(lender.lent) == 1 and lender.released == []
    rows.views(rows.take(2))[1][:] = b"abcdefgh"
    assert bytes(lender.lent[0][8:16]) == b"abcdefgh"   # the rows are the lent area
    rows.give_back([0, 1])
    assert rows.take(3) == [0, 1, 2]             # none in use: grows into a new area, the old one released
    assert len(lender.lent) == 2 and lender.released == [lender.lent[0]]
    rows.give_back([0, 1, 2])
    rows.close()
    assert lender.released == lender.lent
    stingy = _Lender(lends=False)
    own = LoadRows(8, capacity=2, pin=False, lenders=[stingy])
    own.reserve()
    own.close()
    assert not own.backend_memory and not own.all_lent and stingy.released == []
    mixed = LoadRows(8, capacity=2, pin=False, lenders=[_Lender(), None])
    mixed.reserve()
    assert mixed.backend_memory and not mixed.all_lent   # one area is ours: the pages are checked on the host


def test_has_free_says_whether_take_would_find_the_rows_without_taking_them():
    """A lookup asks before it computes its pages' keys and stores (with several areas) whether the rows
    it needs are free: the answer `take` would give, and nothing is taken."""
    rows = LoadRows(4, capacity=4, pin=False, lenders=[_Lender(), _Lender()])
    assert rows.has_free(100)          # nothing allocated yet: take would allocate (or grow) at once
    rows.reserve()
    held = rows.take(5, areas=[0, 1, 0, 1, 0])
    assert rows.has_free(1) and not rows.has_free(2) and rows.in_use == 5
    assert rows.take(2) is None        # as has_free said
    rows.give_back(held)
    assert rows.has_free(6) and rows.has_free(10)   # all free: take grows the rows


def test_rows_over_several_lenders_take_each_page_from_its_own_area():
    """Pages spread over several stores that lend memory (Mooncake stores' shared pools) each get a row
    in their own store's area, lowest first; an area that has none left lends a row of another; runs
    never cross from one area into the next; each area's memory is its own store's."""
    a, b = _Lender(), _Lender()
    rows = LoadRows(4, capacity=4, pin=False, lenders=[a, b])
    assert rows.areas == 2 and rows.per_area == 3 and rows.capacity == 6   # 4 x 1.25 / 2 = 2.5 -> 3 each
    taken = rows.take(4, areas=[1, 0, 1, 0])
    assert taken == [3, 0, 4, 1]
    views = rows.views(taken)
    for i, v in enumerate(views):
        v[:] = bytes([i]) * 4
    assert bytes(b.lent[0][:8]) == bytes([0]) * 4 + bytes([2]) * 4   # pages 0 and 2: store b's rows 3, 4
    assert bytes(a.lent[0][:8]) == bytes([1]) * 4 + bytes([3]) * 4
    assert rows.take(2, areas=[1, 1]) == [5, 2]    # b has one left: the other from a
    assert rows.take(1, areas=[0]) is None          # all six taken
    assert rows.runs([1, 2, 3, 4, 7]) == [(0, 1, 3), (2, 3, 5), (4, 7, 8)]   # 2 -> 3 crosses into b
    with pytest.raises(ValueError, match="cross"):
        rows.pages(2, 4, dtype=torch.uint8, shape=(4,))
    assert rows.pages(3, 5, dtype=torch.uint8, shape=(4,)).tolist() == [[0] * 4, [2] * 4]
    # the four pages' rows [3, 0, 4, 1] are four runs in page order, one per area in row order
    assert rows.runs(taken) == [(0, 3, 4), (1, 0, 1), (2, 4, 5), (3, 1, 2)]
    assert rows.spans(taken) == [([1, 3], 0, 2), ([0, 2], 3, 5)]
    with pytest.raises(ValueError, match="areas"):
        rows.take(2, areas=[0])
    rows.give_back(list(range(6)))
    assert rows.take(8, areas=[0, 1] * 4) == [0, 5, 1, 6, 2, 7, 3, 8]   # alone past the capacity: grown (5 each)
    assert len(a.released) == 1 and len(b.released) == 1 and rows.capacity == 10
    rows.give_back(list(range(10)))
    rows.close()
    assert a.released == a.lent and b.released == b.lent
