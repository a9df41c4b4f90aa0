"""Diff (LRU) step: the torch reference against a pure-Python LRU oracle (property tests), and the
Triton kernel against the reference, bitwise, over multi-step random top-k sequences."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hisa.kvcache import diff  # on a CPU machine tests/conftest.py runs Triton in the interpreter

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
I32 = torch.int32


# -- the oracle: one request's LRU buffer in plain Python -----------------------------------------
def oracle_step(pages: list[int], used: list[int], topk: list[int], step: int):
    """Apply one step in place; return (slot per top-k entry, [(slot, page)] loads in miss order)."""
    resident = {p: s for s, p in enumerate(pages) if p >= 0}
    selected = {p for p in topk if p >= 0}
    victims = iter(sorted((s for s in range(len(pages)) if pages[s] not in selected),
                          key=lambda s: (pages[s] >= 0, used[s], s)))
    slots, loads = [], []
    for p in topk:
        if p < 0:
            slots.append(-1)
            continue
        s = resident[p] if p in resident else next(victims)
        if p not in resident:
            loads.append((s, p))
            pages[s] = p
        used[s] = step
        slots.append(s)
    return slots, loads


def topk_sequence(rng: random.Random, *, R: int, K: int, universe: int, steps: int, overlap: float):
    """Random top-k rows with temporal locality: each step keeps ~overlap of the previous pages."""
    prev = [[] for _ in range(R)]
    for _ in range(steps):
        rows = []
        for r in range(R):
            n = rng.randint(0, K)
            keep = [p for p in prev[r] if rng.random() < overlap][:n]
            fresh = [p for p in rng.sample(range(universe), min(universe, K + n)) if p not in keep]
            pages = keep + fresh[:n - len(keep)]
            prev[r] = pages
            row = pages + [-1] * (K - len(pages))
            rng.shuffle(row)  # padding anywhere in the row
            rows.append(row)
        active = [rng.random() < 0.85 for _ in range(R)]
        yield torch.tensor(rows, dtype=I32).reshape(R, K), torch.tensor(active)


def random_state(rng: random.Random, R: int, NS: int, universe: int):
    """Buffers with distinct pages, some empty slots, and clocks in 0..5 (ties included)."""
    pages = [[p if rng.random() < 0.7 else -1 for p in rng.sample(range(universe), NS)] for _ in range(R)]
    used = [[rng.randint(0, 5) for _ in range(NS)] for _ in range(R)]
    return torch.tensor(pages, dtype=I32).reshape(R, NS), torch.tensor(used, dtype=I32).reshape(R, NS)


def new_state(R: int, NS: int, device=DEV):
    return (torch.full((R, NS), -1, dtype=I32, device=device), torch.zeros((R, NS), dtype=I32, device=device))


# -- reference vs oracle ------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reference_matches_python_lru(data):
    R = data.draw(st.integers(1, 4), label="R")
    NS = data.draw(st.integers(1, 12), label="NS")
    K = data.draw(st.integers(0, NS), label="K")
    universe = data.draw(st.integers(max(NS, 1), 3 * NS + 2), label="universe")
    overlap = data.draw(st.sampled_from([0.0, 0.5, 0.85, 0.9, 1.0]), label="overlap")
    rng = random.Random(data.draw(st.integers(0, 2**32 - 1), label="seed"))
    bp, lu = random_state(rng, R, NS, universe)  # any valid state, e.g. empty slots with a late clock
    o_pages, o_used = bp.tolist(), lu.tolist()
    for step, (topk, active) in enumerate(topk_sequence(rng, R=R, K=K, universe=universe, steps=10,
                                                        overlap=overlap), start=6):
        before_pages, before_used = bp.clone(), lu.clone()
        res = diff.lru_diff_reference(bp, lu, topk, step, active=active)
        for r in range(R):
            row = topk[r].tolist()
            if not active[r]:
                assert res.slot_table[r].tolist() == [-1] * K and res.num_misses[r] == 0
                assert torch.equal(bp[r], before_pages[r]) and torch.equal(lu[r], before_used[r])
                continue
            slots, loads = oracle_step(o_pages[r], o_used[r], row, step)
            n = len(loads)
            assert res.slot_table[r].tolist() == slots
            assert res.num_misses[r].item() == n
            assert res.load_slots[r].tolist() == [s for s, _ in loads] + [-1] * (K - n)
            assert res.load_pages[r].tolist() == [p for _, p in loads] + [-1] * (K - n)
            assert bp[r].tolist() == o_pages[r] and lu[r].tolist() == o_used[r]
            check_invariants(before_pages[r].tolist(), bp[r].tolist(), lu[r].tolist(), row, slots, loads, step)


def check_invariants(before, after, used, topk, slots, loads, step):
    """Policy-free properties of one step of one row."""
    sel = [p for p in topk if p >= 0]
    for p, s in zip(topk, slots):  # the buffer holds the selection at slot_table
        assert (s == -1) == (p == -1)
        if p >= 0:
            assert after[s] == p and used[s] == step
    picked = [s for s in slots if s >= 0]
    assert len(picked) == len(set(picked))  # no slot double-booked
    assert {p for _, p in loads} == set(sel) - set(before)  # loads == misses; hits never reloaded
    assert len(loads) == len(set(sel) - set(before))
    for s, p in enumerate(before):  # hits keep their slot
        if p in sel:
            assert after[s] == p and (s, p) not in loads
    loaded_slots = {s for s, _ in loads}
    for s, p in enumerate(before):  # unselected pages stay unless their slot was a victim
        assert after[s] == p or s in loaded_slots


def test_eviction_picks_empty_then_lru():
    bp = torch.tensor([[10, -1, 11, 12, -1]], dtype=I32)
    lu = torch.tensor([[5, 0, 3, 3, 9]], dtype=I32)
    res = diff.lru_diff_reference(bp, lu, torch.tensor([[12, 20, 21, 22, 23]], dtype=I32), 7)
    # empties (1, 4) first by (last_used, slot), then 11 (used 3, slot 2) before 10 (used 5)
    assert res.load_slots.tolist() == [[1, 4, 2, 0, -1]]
    assert res.slot_table.tolist() == [[3, 1, 4, 2, 0]]
    assert bp.tolist() == [[23, 20, 22, 12, 21]] and lu.tolist() == [[7] * 5]


def test_to_physical():
    table = torch.tensor([[0, -1, 3], [2, 1, -1]], dtype=I32)
    phys = diff.to_physical(table, torch.tensor([0, 8], dtype=I32))
    assert phys.tolist() == [[0, -1, 3], [10, 9, -1]] and phys.dtype == I32


def test_validation_errors():
    bp, lu = new_state(2, 4, "cpu")
    with pytest.raises(ValueError, match="exceeds"):
        diff.lru_diff(bp, lu, torch.zeros(2, 5, dtype=I32), 1)
    with pytest.raises(ValueError, match="int32"):
        diff.lru_diff(bp, lu, torch.zeros(2, 3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="active"):
        diff.lru_diff(bp, lu, torch.zeros(2, 3, dtype=I32), 1, active=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out.slot_table"):
        bad = diff.DiffResult(*(torch.empty(s, dtype=I32) for s in ((2, 2), (2, 3), (2, 3), (2,))))
        diff.lru_diff(bp, lu, torch.zeros(2, 3, dtype=I32), 1, out=bad)


# -- Triton kernel vs reference -------------------------------------------------------------------
@pytest.mark.parametrize("R,NS,K,overlap,tile", [
    (3, 8, 8, 0.85, None),     # K == NS
    (4, 6, 3, 0.5, None),
    (2, 13, 7, 0.9, None),     # NS not a power of two
    (3, 8, 6, 0.85, 16),       # a small tile: the top-k row streams in several chunks
    (1, 1, 1, 0.5, None),
    (2, 4, 0, 0.5, None),      # empty top-k
])
@pytest.mark.parametrize("backend", ["triton", "sorted"])
def test_triton_matches_reference(R, NS, K, overlap, tile, backend, monkeypatch):
    if tile is not None:
        monkeypatch.setattr(diff, "_TILE", tile)
    rng = random.Random(R * 1000 + NS * 10 + K)
    ref_bp, ref_lu = random_state(rng, R, NS, 3 * NS)
    tri_bp, tri_lu = ref_bp.to(DEV, copy=True), ref_lu.to(DEV, copy=True)
    out = diff._allocate(R, K, DEV)
    for step, (topk, active) in enumerate(topk_sequence(rng, R=R, K=K, universe=3 * NS, steps=6,
                                                        overlap=overlap), start=6):
        ref = diff.lru_diff_reference(ref_bp, ref_lu, topk, step, active=active)
        use_tensor_step = step % 2 == 0  # both ways of passing the clock
        tri_step = torch.tensor(step, device=DEV) if use_tensor_step else step
        tri = diff.lru_diff(tri_bp, tri_lu, topk.to(DEV), tri_step, active=active.to(DEV), out=out,
                            backend=backend)
        for name, a, b in zip(diff.DiffResult._fields, ref, tri):
            assert torch.equal(a, b.cpu()), f"step {step}: {name}\n{a}\n{b}"
        assert torch.equal(ref_bp, tri_bp.cpu()) and torch.equal(ref_lu, tri_lu.cpu()), f"state, step {step}"


def test_triton_without_active_and_strided_state():
    """State rows are a view of a [layers, R, NS] tensor; no active mask."""
    R, NS, K = 3, 8, 5
    rng = random.Random(7)
    big = torch.full((2, R, NS), -1, dtype=I32, device=DEV)
    tri_bp, tri_lu = big[1], torch.zeros((2, R, NS), dtype=I32, device=DEV)[0]
    ref_bp, ref_lu = new_state(R, NS, "cpu")
    for step, (topk, _) in enumerate(topk_sequence(rng, R=R, K=K, universe=20, steps=4, overlap=0.8), start=1):
        ref = diff.lru_diff_reference(ref_bp, ref_lu, topk, step)
        tri = diff.lru_diff(tri_bp, tri_lu, topk.to(DEV), step, backend="triton")
        assert all(torch.equal(a, b.cpu()) for a, b in zip(ref, tri))
        assert torch.equal(ref_bp, tri_bp.cpu()) and torch.equal(ref_lu, tri_lu.cpu())
    assert torch.equal(big[0].cpu(), torch.full((R, NS), -1, dtype=I32))  # the other layer untouched


def test_sorted_at_token_granularity_matches_reference():
    """DSA's shape, scaled down: K = NS / 2 token rows, where "auto" takes the sorted implementation."""
    R, NS, K = 3, 1024, 1024
    assert diff._auto_backend(torch.empty(0), NS, K) == "sorted"
    assert diff._auto_backend(torch.empty(0), 128, 64) == "torch"
    rng = random.Random(11)
    ref_bp, ref_lu = new_state(R, NS, "cpu")
    bp, lu = new_state(R, NS, "cpu")
    for step, (topk, active) in enumerate(topk_sequence(rng, R=R, K=K, universe=4 * NS, steps=3, overlap=0.5), 1):
        ref = diff.lru_diff_reference(ref_bp, ref_lu, topk, step, active=active)
        got = diff.lru_diff(bp, lu, topk, step, active=active)
        assert all(torch.equal(a, b) for a, b in zip(ref, got))
        assert torch.equal(ref_bp, bp) and torch.equal(ref_lu, lu)
    assert int(ref.num_misses.sum()) > 0


# -- GPU only: real sizes, CUDA graphs -------------------------------------------------------------
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("R,NS,K", [(64, 256, 128), (8, 2048, 1024), (16, 4096, 4096), (8, 4098, 2048)])
def test_triton_real_sizes(R, NS, K):  # "auto": Triton for the first, sorted for the others
    rng = random.Random(0)
    ref_bp, ref_lu = new_state(R, NS, "cpu")
    tri_bp, tri_lu = new_state(R, NS)
    for step, (topk, active) in enumerate(topk_sequence(rng, R=R, K=K, universe=4 * NS, steps=4,
                                                        overlap=0.85), start=1):
        ref = diff.lru_diff_reference(ref_bp, ref_lu, topk, step, active=active)
        tri = diff.lru_diff(tri_bp, tri_lu, topk.cuda(), step, active=active.cuda())
        assert all(torch.equal(a, b.cpu()) for a, b in zip(ref, tri))
        assert torch.equal(ref_bp, tri_bp.cpu()) and torch.equal(ref_lu, tri_lu.cpu())


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("R,NS,K", [(16, 64, 32), (16, 4098, 2048)])  # Triton, sorted
def test_triton_in_cuda_graph(R, NS, K):
    rng = random.Random(1)
    seq = list(topk_sequence(rng, R=R, K=K, universe=max(200, 4 * K), steps=5, overlap=0.85))
    bp, lu = new_state(R, NS)
    topk, active = torch.full((R, K), -1, dtype=I32, device=DEV), torch.ones(R, dtype=torch.bool, device=DEV)
    step = torch.zeros((), dtype=I32, device=DEV)
    out = diff._allocate(R, K, DEV)
    diff.lru_diff(bp, lu, topk, step, active=active, out=out)  # compile outside the capture
    bp.fill_(-1), lu.zero_()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        diff.lru_diff(bp, lu, topk, step, active=active, out=out)
    ref_bp, ref_lu = new_state(R, NS, "cpu")
    for i, (tk, act) in enumerate(seq, start=1):
        topk.copy_(tk), active.copy_(act), step.fill_(i)
        graph.replay()
        ref = diff.lru_diff_reference(ref_bp, ref_lu, tk, i, active=act)
        assert all(torch.equal(a, b.cpu()) for a, b in zip(ref, out))
        assert torch.equal(ref_bp, bp.cpu()) and torch.equal(ref_lu, lu.cpu())


# -- the decode step's form: state rows by sparse slot, device / host pages out ---------------------------
@pytest.mark.parametrize("seed,backend", [(0, "triton"), (1, "triton"), (2, "triton"), (3, "sorted"), (4, "sorted")])
def test_mapped_triton_matches_torch_over_steps(seed, backend):
    """lru_diff_mapped (Triton, interpreter on the CPU) against its torch path over 8 steps of random
    selections: same state, same physical table (pre-written entries kept), same (device, host)
    miss pairs, same miss counter; rows in step order point at state rows by slot."""
    rng = random.Random(seed)
    N, NS, K, universe, maxp = 5, 6, 4, 14, 20  # 4 request slots + the sentinel row
    slot_pages = torch.tensor([rng.sample(range(100), NS) for _ in range(N)], dtype=I32)
    host_table = torch.tensor([rng.sample(range(200), maxp) for _ in range(N)], dtype=I32)
    rows = torch.tensor([2, 4, 0, 3], dtype=I32)  # the second row is padding (sentinel)
    active = torch.tensor([1, 0, 1, 1], dtype=torch.uint8)
    slot_pages, host_table, rows, active = (x.to(DEV) for x in (slot_pages, host_table, rows, active))
    states = [new_state(N, NS, DEV) for _ in range(2)]
    counters = [torch.zeros(1, dtype=torch.int64, device=DEV) for _ in range(2)]
    for step, (topk, _) in enumerate(topk_sequence(rng, R=4, K=K, universe=universe, steps=8, overlap=0.7), 1):
        results = []
        for (bp, lu), counter, impl in zip(states, counters, ("torch", backend)):
            table = torch.full((4, K + 2), -9, dtype=I32, device=DEV)
            table[:, K - 1] = 555  # a pre-written entry (the tail page): kept where the top-k has no page
            out = diff.DiffResult(table[:, :K], torch.empty(4, K, dtype=I32, device=DEV),
                                  torch.empty(4, K, dtype=I32, device=DEV), torch.empty(4, dtype=I32, device=DEV))
            tk = topk.clone().to(DEV)
            tk[:, K - 1] = -1
            diff.lru_diff_mapped(bp, lu, tk, torch.tensor(step, dtype=I32, device=DEV), rows=rows, active=active,
                                 slot_pages=slot_pages, host_table=host_table, out=out, counter=counter,
                                 backend=impl)
            results.append((table, out))
        (t0, o0), (t1, o1) = results
        assert torch.equal(t0, t1) and (t0[:, K - 1] == 555).all()
        for a, b in zip(o0[1:], o1[1:]):
            assert torch.equal(a, b)
        assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
        assert (o0.num_misses[1] == 0) and (o0.load_slots[1] == -1).all()  # the padding row did nothing
        for r in (0, 2, 3):  # each miss reads the row's host page of the loaded logical page
            for j in range(int(o0.num_misses[r])):
                assert int(o0.load_pages[r, j]) in host_table[int(rows[r])].tolist()
    assert counters[0].item() == counters[1].item() > 0
    assert (states[0][0][4] == -1).all()  # the sentinel state row was never written


@gpu
@pytest.mark.gpu
def test_mapped_sorted_in_cuda_graph():
    """The decode step's diff at DSA's shape (token rows, K = NS / 2) replayed from a CUDA graph gives
    the eager torch path's tables, loads and state, step after step (no host sync inside)."""
    rng = random.Random(5)
    N, NS, K, maxp = 9, 2048, 1024, 8192
    rows = torch.tensor([3, 8, 0, 5, 8, 1, 2, 7], dtype=I32, device=DEV)  # two padding rows on the sentinel 8
    active = (rows != 8).to(torch.uint8)
    slot_pages = torch.randperm(N * NS, device=DEV).to(I32).view(N, NS)
    host_table = torch.randperm(N * maxp, device=DEV).to(I32).view(N, maxp)
    seq = [tk.to(DEV) for tk, _ in topk_sequence(rng, R=8, K=K, universe=maxp, steps=5, overlap=0.6)]
    states = [new_state(N, NS) for _ in range(2)]
    outs = [diff.DiffResult(*(torch.full((8, K), -1, dtype=I32, device=DEV) for _ in range(3)),
                            torch.zeros(8, dtype=I32, device=DEV)) for _ in range(2)]
    counters = [torch.zeros(1, dtype=torch.int64, device=DEV) for _ in range(2)]
    topk, step = torch.full((8, K), -1, dtype=I32, device=DEV), torch.zeros((), dtype=I32, device=DEV)

    def call(i, tk, backend):
        diff.lru_diff_mapped(*states[i], tk, step, rows=rows, active=active, slot_pages=slot_pages,
                             host_table=host_table, out=outs[i], counter=counters[i], backend=backend)

    call(1, topk, "sorted")  # warm-up outside the capture (an all -1 selection changes nothing)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call(1, topk, "sorted")
    for i, tk in enumerate(seq, start=1):
        step.fill_(i)
        call(0, tk, "torch")
        topk.copy_(tk)
        graph.replay()
        for a, b in zip(outs[0], outs[1]):
            assert torch.equal(a, b), f"step {i}"
        assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    assert counters[0].item() == counters[1].item() > 0
    assert (states[1][0][8] == -1).all()  # the sentinel row was never written
