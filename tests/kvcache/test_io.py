"""I/O step: row copies host pool <-> device buffer (torch path, Triton path), row resolution, and
the diff + I/O steps together. On a CPU machine the Triton kernel runs in the interpreter with
CPU tensors on both sides; with CUDA the host side is pinned and read through UVA."""

from __future__ import annotations

import random

import pytest
import torch

from hisa.kvcache import diff, io  # on a CPU machine tests/conftest.py runs Triton in the interpreter

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def host_tensor(*shape, dtype, gen=None):
    """Random host data (pinned when CUDA is present, so the Triton path reads it through UVA)."""
    t = torch.empty(*shape, dtype=dtype, pin_memory=CUDA)
    if dtype.is_floating_point:
        t.copy_(torch.randn(*shape, generator=gen) * 100)
    else:
        t.copy_(torch.randint(0, 255, shape, generator=gen))
    return t


def naive_copy(src_kv, dst_kv, src_rows, dst_rows):
    out = dst_kv.clone()
    for s, d in zip(src_rows.tolist(), dst_rows.tolist()):
        if s >= 0 and d >= 0:
            out[d] = src_kv[s]
    return out


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8).cpu()


def random_rows(gen, n: int, src_n: int, dst_n: int, dtype=torch.int32):
    """Pairs with distinct destinations and some -1 entries on either side."""
    src = torch.randint(0, src_n, (n,), generator=gen)
    dst = torch.randperm(dst_n, generator=gen)[:n]
    src[torch.rand(n, generator=gen) < 0.2] = -1
    dst[torch.rand(n, generator=gen) < 0.1] = -1
    return src.to(dtype), dst.to(dtype)


# -- torch path -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_path_matches_loop(dtype):
    gen = torch.Generator().manual_seed(0)
    host = torch.randn(3, 40, 24, generator=gen).to(dtype)[1]  # a layer of a [layers, pages, ROW] pool
    dev = torch.zeros(16, 24, dtype=dtype)
    src, dst = random_rows(gen, 12, 40, 16, torch.int64)
    want = naive_copy(host, dev, src, dst)
    io.load_pages(host, dev, src, dst, backend="torch")
    assert torch.equal(bits(dev), bits(want))
    back = torch.zeros(40, 24, dtype=dtype)
    want_back = naive_copy(dev, back, dst, src)
    io.store_pages(dev, back, dst, src, backend="torch")
    assert torch.equal(bits(back), bits(want_back))


# -- Triton path ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,row,block_bytes", [
    (torch.float32, 96, 128),      # 4-byte units, several chunks per row
    (torch.float16, 64, 16384),    # one chunk per row
    (torch.bfloat16, 48, 64),      # a pure copy: exact for bf16 even in the interpreter
    (torch.float16, 7, 16),        # odd row of 2-byte elements: 2-byte units
    (torch.uint8, 13, 16),         # 1-byte units
])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_triton_load_matches_loop(dtype, row, block_bytes, index_dtype):
    gen = torch.Generator().manual_seed(row)
    pool = host_tensor(2, 30, 2, row, dtype=dtype, gen=gen)  # [layers, pages, 2, ROW]
    host = pool[1, :, 1]  # strided rows: stride(0) = 2 * ROW
    dev = torch.zeros(3, 12, row, dtype=dtype, device=DEV)[2]  # a layer of the device buffer
    src, dst = random_rows(gen, 10, 30, 12, index_dtype)
    want = naive_copy(host, dev.cpu(), src, dst)
    io.load_pages(host, dev, src.to(DEV), dst.to(DEV), backend="triton", block_bytes=block_bytes)
    assert torch.equal(bits(dev), bits(want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_store_matches_loop(dtype):
    gen = torch.Generator().manual_seed(3)
    dev = (torch.randn(10, 40, generator=gen) * 10).to(dtype).to(DEV)
    host = host_tensor(25, 40, dtype=dtype, gen=gen)
    src, dst = random_rows(gen, 8, 10, 25)
    want = naive_copy(dev.cpu(), host.clone(), src, dst)
    io.store_pages(dev, host, src.to(DEV), dst.to(DEV), backend="triton", block_bytes=32)
    if CUDA:
        torch.cuda.synchronize()
    assert torch.equal(bits(host), bits(want))


def test_all_skipped_and_empty_are_noops():
    host = host_tensor(5, 8, dtype=torch.float32)
    dev = torch.zeros(4, 8, device=DEV)
    io.load_pages(host, dev, torch.full((3,), -1, device=DEV), torch.tensor([0, 1, 2], device=DEV), backend="triton")
    io.load_pages(host, dev, torch.empty(0, dtype=torch.int64, device=DEV),
                  torch.empty(0, dtype=torch.int64, device=DEV), backend="triton")
    assert torch.count_nonzero(dev) == 0


def test_validation_errors():
    host, dev = torch.zeros(5, 8), torch.zeros(4, 8)
    rows = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="rows differ"):
        io.load_pages(host, torch.zeros(4, 6), rows, rows)
    with pytest.raises(ValueError, match="rows differ"):
        io.load_pages(host, dev.half(), rows, rows)
    with pytest.raises(ValueError, match="contiguous last dim"):
        io.load_pages(torch.zeros(8, 5).t(), dev, rows, rows)
    with pytest.raises(ValueError, match="src_rows"):
        io.load_pages(host, dev, rows.float(), rows)
    with pytest.raises(ValueError, match="must match"):
        io.load_pages(host, dev, rows, torch.zeros(3, dtype=torch.int64))


# -- mapping misses to rows, and the diff + I/O steps together --------------------------------------
def test_resolve_host_rows():
    load_pages = torch.tensor([[2, 0, -1], [1, -1, -1]], dtype=torch.int32)
    load_slots = torch.tensor([[3, 1, -1], [0, -1, -1]], dtype=torch.int32)
    table = torch.tensor([[40, 41, 42, -1], [50, -1, 52, 53]], dtype=torch.int32)
    src, dst = io.resolve_host_rows(load_pages, load_slots, host_page_table=table,
                                    slot_base=torch.tensor([0, 4], dtype=torch.int32))
    # row 1's page 1 has no host row: nothing to load there
    assert src.tolist() == [42, 40, -1, -1, -1, -1]
    assert dst.tolist() == [3, 1, -1, -1, -1, -1]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_diff_then_load_keeps_selection_resident(backend):
    """After every step, the device slot of each selected page holds that page's host data."""
    R, NS, K, P, ROW = 3, 6, 4, 12, 8
    rng = random.Random(5)
    host = host_tensor(R * P, ROW, dtype=torch.float32)  # request r's logical page p -> host row r*P+p
    table = (torch.arange(R)[:, None] * P + torch.arange(P)).to(torch.int32).to(DEV)  # [R, P]
    slot_base = (torch.arange(R, dtype=torch.int32) * NS).to(DEV)
    dev = torch.zeros(R * NS, ROW, device=DEV)
    bp = torch.full((R, NS), -1, dtype=torch.int32, device=DEV)
    lu = torch.zeros((R, NS), dtype=torch.int32, device=DEV)
    moved = 0
    for step in range(1, 9):
        topk = torch.tensor([rng.sample(range(P), K) for _ in range(R)], dtype=torch.int32)
        topk[0, rng.randrange(K)] = -1
        res = diff.lru_diff(bp, lu, topk.to(DEV), step, backend=backend)
        src, dst = io.resolve_host_rows(res.load_pages, res.load_slots, host_page_table=table, slot_base=slot_base)
        io.load_pages(host, dev, src, dst, backend=backend)
        assert int((src >= 0).sum()) == int(res.num_misses.sum())  # every miss is loaded once
        moved += int(res.num_misses.sum())
        phys = diff.to_physical(res.slot_table, slot_base).cpu()
        for r in range(R):
            for k in range(K):
                p = int(topk[r, k])
                if p >= 0:
                    assert torch.equal(dev[int(phys[r, k])].cpu(), host[r * P + p])
    assert 0 < moved < 8 * R * K  # hits were not reloaded


# -- GPU only: UVA from pinned memory, fallbacks, CUDA graphs --------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [1, 16])
def test_uva_load_real_rows(page_size):
    row = 2 * page_size * 8 * 128  # Llama-3.1-8B: 8 KV heads x 128 dims, bf16
    host = host_tensor(2, 256, row, dtype=torch.bfloat16)[1]
    dev = torch.zeros(64, row, dtype=torch.bfloat16, device="cuda")
    gen = torch.Generator().manual_seed(0)
    src, dst = random_rows(gen, 48, 256, 64)
    want = naive_copy(host, dev.cpu(), src, dst)
    io.load_pages(host, dev, src.cuda(), dst.cuda())  # auto: Triton, host read in place
    assert torch.equal(bits(dev), bits(want))


@gpu
@pytest.mark.gpu
def test_unpinned_host_falls_back_to_torch():
    host = torch.randn(20, 32)  # pageable: not addressable from the GPU
    dev = torch.zeros(8, 32, device="cuda")
    src, dst = torch.tensor([3, -1, 7], device="cuda"), torch.tensor([0, 1, 5], device="cuda")
    io.load_pages(host, dev, src, dst)
    assert torch.equal(dev[0].cpu(), host[3]) and torch.equal(dev[5].cpu(), host[7])
    assert torch.count_nonzero(dev[1]) == 0


@gpu
@pytest.mark.gpu
def test_uva_load_in_cuda_graph():
    host = host_tensor(64, 2048, dtype=torch.float16)
    dev = torch.zeros(16, 2048, dtype=torch.float16, device="cuda")
    src = torch.full((8,), -1, dtype=torch.int64, device="cuda")
    dst = torch.full((8,), -1, dtype=torch.int64, device="cuda")
    io.load_pages(host, dev, src, dst)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        io.load_pages(host, dev, src, dst)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        s, d = random_rows(gen, 8, 64, 16, torch.int64)
        want = naive_copy(host, dev.cpu(), s, d)
        src.copy_(s), dst.copy_(d)
        graph.replay()
        assert torch.equal(bits(dev), bits(want))


@gpu
@pytest.mark.gpu
def test_host_pool_is_pinned_at_its_exact_size_and_unpinned_when_dropped():
    """The pool registers plain memory with CUDA: no power-of-two rounding or caching by torch's
    pinned allocator (a 2.9 GiB layer used to take 4 GiB and stay pinned after the pool was gone),
    and the Triton UVA gather reads it in place."""
    import gc

    from hisa.kvcache.host_pool import HostKVPool

    before = torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0)
    pool = HostKVPool(num_layers=2, num_pages=3 * 2**12 + 5, page_shape=(2, 16, 8, 128),
                      dtype=torch.bfloat16, device=torch.device("cpu"), pin=True)  # 1.5 GiB per layer, not 2^k
    rows = pool.layer_rows(1)
    assert rows.is_pinned() and all(t.is_pinned() for t in pool.layers)
    assert torch.cuda.host_memory_stats().get("allocated_bytes.all.current", 0) == before
    rows[:64].copy_(torch.randn(64, pool.row).to(torch.bfloat16))
    dev = torch.zeros(32, pool.row, dtype=torch.bfloat16, device="cuda")
    src, dst = torch.arange(0, 64, 2, device="cuda"), torch.arange(32, device="cuda")
    io.load_pages(rows, dev, src, dst)  # auto: the Triton UVA path (needs pinned, mapped memory)
    assert torch.equal(bits(dev.cpu()), bits(rows[0:64:2]))
    keep = rows[:4]  # a view that outlives the pool: the memory stays valid, but no longer pinned
    del pool, rows
    gc.collect()
    assert not keep.is_pinned(), "the pool's memory is still registered after the pool was dropped"


@pytest.mark.parametrize("ptr,size,piece", [(64, 10 * 2**30, 4 * 2**30), (0, 8 * 2**30, 4 * 2**30),
                                            (4096 * 3 + 80, 5 * 4096 + 7, 2 * 4096), (128, 100, 4 * 2**30)])
def test_pin_ranges_cover_the_tensor_in_pieces_cut_at_page_boundaries(ptr, size, piece):
    """The host pool pins a layer in pieces (one 22 GiB registration is what fails on the lent
    machines): the pieces tile the range exactly, none is over the piece size, and every cut is at an
    OS page boundary, so no page is registered twice."""
    from hisa.kvcache.host_pool import pin_ranges

    ranges = pin_ranges(ptr, size, piece_bytes=piece)
    assert ranges[0][0] == ptr and sum(n for _, n in ranges) == size
    assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    assert all(0 < n <= piece for _, n in ranges)
    assert all(a % 4096 == 0 for a, _ in ranges[1:])


@gpu
@pytest.mark.gpu
def test_host_pool_pinned_in_pieces_is_read_across_the_cuts():
    """A layer registered in several pieces (16 MiB here, 4 GiB in the engine) is still one tensor the
    UVA gather reads anywhere, rows straddling a cut included."""
    from hisa.kvcache.host_pool import host_tensor

    class Owner:
        pass

    owner = Owner()
    rows = host_tensor((9000, 5000), torch.float16, pin=True, owner=owner, piece_bytes=16 * 2**20)  # ~86 MiB
    assert rows.is_pinned()
    rows.copy_(torch.randn(9000, 5000).to(torch.float16))
    src = torch.arange(0, 9000, 7, device="cuda")
    dev = torch.zeros(src.numel(), 5000, dtype=torch.float16, device="cuda")
    io.load_pages(rows, dev, src, torch.arange(src.numel(), device="cuda"))
    assert torch.equal(bits(dev.cpu()), bits(rows[0:9000:7]))
