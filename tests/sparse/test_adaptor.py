"""BackendAdaptor: layout bounds and the compose kernel (Triton, interpreter on the CPU) against the
torch reference and against the layout written out by hand."""

from __future__ import annotations

import pytest
import torch

from hisa.sparse.adaptor import DENSE, HOST_BACKED, PAD, RESIDENT, BackendAdaptor

I32 = dict(dtype=torch.int32)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU runs Triton in the interpreter


def _case(adaptor, windowed, seed=0):
    g = torch.Generator().manual_seed(seed)
    s, maxp = adaptor.page_size, 40
    kind = torch.tensor([RESIDENT, HOST_BACKED, DENSE, RESIDENT, HOST_BACKED, PAD], **I32)
    t = torch.tensor([300, 181, 50, 17, 33, 0], **I32)  # pages 19, 12, 4, 2, 3
    slot = torch.tensor([4, 0, 2, 1, 3, 6], **I32)
    write_page = torch.tensor([90, 77, 5, 91, 78, -1], **I32)
    block_table = torch.randperm(7 * maxp, generator=g).view(7, maxp).to(torch.int32)
    bounds = adaptor.bounds(t, kind)
    topk = None
    if not windowed:  # distinct middle picks, best first (random order), -1 beyond what exists
        rows = []
        for lo, hi in zip(bounds.lo.tolist(), bounds.hi.tolist()):
            mid = torch.arange(lo, hi)[torch.randperm(max(0, hi - lo), generator=g)].tolist()
            rows.append((mid + [-1] * adaptor.num_select)[: adaptor.num_select])
        topk = torch.tensor(rows, dtype=torch.int64)
    return dict(kind=kind, slot=slot, t=t, write_page=write_page, bounds=bounds, topk=topk, block_table=block_table)


def _run(adaptor, case, windowed, use_triton):
    R, K = case["kind"].shape[0], adaptor.width(windowed)
    table = torch.full((R, 48), -7, **I32, device=DEV)
    logical = torch.full((R, K), -7, **I32, device=DEV)
    kv_lens = torch.full((R,), -7, **I32, device=DEV)
    case = {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    b = case["bounds"]
    case["bounds"] = type(b)(*(x.to(DEV) if x is not None else None for x in (b.lo, b.hi, b.window_lo)))
    adaptor.compose(**case, table=table, logical=logical, kv_lens=kv_lens, windowed=windowed, use_triton=use_triton)
    return table.cpu(), logical.cpu(), kv_lens.cpu()


@pytest.mark.parametrize("windowed", [False, True])
def test_compose_triton_matches_reference_and_hand_layout(windowed):
    adaptor = BackendAdaptor(page_size=16, sink_pages=1, recent_pages=2, budget_pages=7, window=40)
    case = _case(adaptor, windowed)
    want = _run(adaptor, case, windowed, use_triton=False)
    got = _run(adaptor, case, windowed, use_triton=True)
    host = case["kind"] == HOST_BACKED
    sparse = case["kind"] > 0
    assert torch.equal(got[2][sparse], want[2][sparse])  # kv_lens of sparse rows
    assert torch.equal(got[1][host], want[1][host])  # logical pages of host-backed rows
    for r in range(len(case["t"])):
        if sparse[r]:
            n = -(-int(want[2][r]) // 16)
            assert torch.equal(got[0][r, :n], want[0][r, :n])
    # by hand, row 0 (resident, 300 tokens = 19 pages, budget 7 = sink + 4 picks + 2 recent)
    bt, t0 = case["block_table"], 300
    if not windowed:
        pages = [0] + case["topk"][0, :4].tolist() + [17, 18]
        assert want[2][0] == 6 * 16 + (t0 - 18 * 16)
    else:  # the window's pages: tokens 260..299 live in pages 16..18
        pages = [16, 17, 18]
        assert want[2][0] == 2 * 16 + (t0 - 18 * 16)
    assert want[0][0, : len(pages)].tolist() == bt[4, pages].tolist()
    # row 1 (host-backed, 181 tokens = 12 pages): the tail page is last, the rest go to the diff
    assert want[0][1, want[2][1] // 16 if want[2][1] % 16 else want[2][1] // 16 - 1] == 77
    assert (want[1][1] >= 0).sum() == -(-int(want[2][1]) // 16) - 1
    # untouched rows (dense, padding)
    assert (got[0][2] == -7).all() and got[2][2] == -7 and got[2][5] == -7


def test_bounds_short_contexts():
    """A context shorter than sinks + recent pages has an empty middle; non-sparse rows select nothing."""
    a = BackendAdaptor(page_size=4, sink_pages=1, recent_pages=2, budget_pages=5)
    b = a.bounds(torch.tensor([3, 9, 40, 40], **I32), torch.tensor([RESIDENT, HOST_BACKED, RESIDENT, DENSE], **I32))
    assert b.lo.tolist() == [1, 1, 1, 0] and b.hi.tolist() == [1, 1, 8, 0]


@pytest.mark.parametrize("page_size", [1, 4])
def test_token_pages_and_remap_read_exactly_the_selected_tokens(page_size):
    """DSA's token-level layout: the pages holding a row's picks (distinct, ascending, the current page
    left out), and each pick remapped into [those pages | the tail page] lands on the same token."""
    g = torch.Generator().manual_seed(page_size)
    s, k_pages, R, N = page_size, 12, 5, 12  # N <= K: the engine sizes K = min(index_topk, pages - 1)
    a = BackendAdaptor(page_size=s, sink_pages=0, recent_pages=1, budget_pages=k_pages + 1)
    t = torch.tensor([7, 60, 200, 1, 45], **I32)
    tokens = torch.full((R, N), -1, **I32)
    for r, tt in enumerate(t.tolist()):
        n = min(N, tt)
        tokens[r, :n] = torch.randperm(tt, generator=g)[:n].to(torch.int32)  # picks in score order, -1 padded
    pages = a.token_pages(tokens, t)
    logical = a.pages_or_pad(pages)
    remapped = a.remap_tokens(tokens, pages, t)
    for r, tt in enumerate(t.tolist()):
        cur = (tt - 1) // s
        picks = [p for p in tokens[r].tolist() if p >= 0]
        want = sorted({p // s for p in picks} - {cur})
        assert logical[r].tolist() == (want + [-1] * k_pages)[:k_pages]
        table = want + [-1] * (k_pages - len(want)) + [cur]  # buffer entries, then the tail page
        for p, q in zip(tokens[r].tolist(), remapped[r].tolist()):
            if p < 0:
                assert q == -1
            else:  # the same logical page and offset, read through the row's table
                assert 0 <= q < (k_pages + 1) * s and table[q // s] == p // s and q % s == p % s


@pytest.mark.parametrize("use_triton", [False, True])
def test_select_pages_with_a_table_layout_writes_what_compose_writes(use_triton):
    """The top-k kernel laying resident rows out itself (TableLayout, no compose launch) gives the
    table and kv_lens compose gives from the same picks; other rows (host-backed, dense, padding)
    are left alone."""
    from hisa.sparse.page_scores import TableLayout, select_pages

    adaptor = BackendAdaptor(page_size=16, sink_pages=1, recent_pages=2, budget_pages=7)
    case = _case(adaptor, windowed=False, seed=3)
    g = torch.Generator().manual_seed(4)
    lo, hi = case["bounds"].lo, case["bounds"].hi
    p = torch.arange(40)
    valid = (p[None] >= lo[:, None]) & (p[None] < hi[:, None])
    scores = torch.where(valid, torch.rand(6, 40, generator=g), float("-inf"))
    picks = select_pages(scores, lo, hi, adaptor.num_select, use_triton=False)
    case["topk"] = picks
    want_table, _, want_lens = _run(adaptor, case, False, use_triton=False)

    table = torch.full((6, 48), -7, **I32, device=DEV)
    kv_lens = torch.full((6,), -7, **I32, device=DEV)
    lay = TableLayout(kind=case["kind"].to(DEV), slot=case["slot"].to(DEV), t=case["t"].to(DEV),
                      block_table=case["block_table"].to(DEV), table=table, kv_lens=kv_lens, page_size=16)
    got = select_pages(scores.to(DEV), lo.to(DEV), hi.to(DEV), adaptor.num_select, use_triton=use_triton,
                       layout=lay)
    assert torch.equal(got.cpu(), picks)
    table, kv_lens = table.cpu(), kv_lens.cpu()
    for r in range(6):
        if case["kind"][r] == RESIDENT:
            n = -(-int(want_lens[r]) // 16)
            assert kv_lens[r] == want_lens[r]
            assert torch.equal(table[r, :n], want_table[r, :n])
            assert (table[r, n:] == -7).all()
        else:
            assert (table[r] == -7).all() and kv_lens[r] == -7
