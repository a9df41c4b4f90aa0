"""LoadRows, the host rows L3 lookups read pages into: taken lowest first, reused once given back,
grown only when no row is in use, and viewed as pages without a copy."""

from __future__ import annotations

import torch

from hisa.engine.l3_rows import LoadRows, runs


def test_rows_are_reused_and_a_lookup_past_the_capacity_grows_them_only_when_none_is_in_use():
    rows = LoadRows(64, capacity=4, pin=False)
    a = rows.take(3)
    assert a == [0, 1, 2] and rows.in_use == 3
    assert rows.take(3) == [3]                 # only one free: a lookup reads the leading pages it got rows for
    rows.give_back(a)
    assert rows.take(2) == [0, 1]
    rows.give_back([0, 1, 3])
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
