"""CPU decode over per-request contiguous K/V (`hisa.engine.cpu_decode_kv`): the same attention as the
paged path at every step, bounded memory, freed when requests stop, and the same tokens end to end."""

from __future__ import annotations

import pytest
import torch

from hisa import LLM, SamplingParams
from hisa.attention.paged_decode import paged_decode_attention
from hisa.attention.reference import paged_decode_attention_ref
from hisa.engine.cpu_decode_kv import GROW_TOKENS, CpuDecodeKV
from hisa.models.factory import load_model

S, KVH, D, H, LAYERS = 8, 2, 16, 6, 2


def _pool(num_pages: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(LAYERS, num_pages, 2, S, KVH, D, generator=g)  # [L, P, 2, S, KVH, D]


def _steps(kv: CpuDecodeKV, lens: list[int], steps: int, *, window: int | None, keys=None):
    """Decode `steps` tokens for requests of prompt lengths `lens` (pages scattered in one pool): each
    step writes the new K/V to the pool, then compares plan+attend with the paged reference per layer."""
    g = torch.Generator().manual_seed(0)
    max_pages = -(-(max(lens) + steps) // S)
    pool = _pool(len(lens) * max_pages + 3, g)
    perm = torch.randperm(pool.shape[1], generator=g)
    table = perm[: len(lens) * max_pages].view(len(lens), max_pages).to(torch.int32)  # [B, max_pages]
    keys = keys or [f"r{i}" for i in range(len(lens))]
    for step in range(steps):
        t = torch.tensor([n + step + 1 for n in lens], dtype=torch.int32)  # tokens after this step's token
        plan = kv.plan([(b, keys[b], int(t[b])) for b in range(len(lens))])
        for layer in range(LAYERS):
            k, v = torch.randn(len(lens), KVH, D, generator=g), torch.randn(len(lens), KVH, D, generator=g)
            for b in range(len(lens)):  # the step's write of the new token, as write_token_kv does
                pos = int(t[b]) - 1
                pool[layer, table[b, pos // S], 0, pos % S] = k[b]
                pool[layer, table[b, pos // S], 1, pos % S] = v[b]
            q = torch.randn(len(lens), H, D, generator=g)
            kc, vc = pool[layer, :, 0], pool[layer, :, 1]
            want = paged_decode_attention_ref(q, kc, vc, table, t, scale=D ** -0.5, window=window)
            got = plan.attend(layer, q, k, v, kc, vc, table, t, scale=D ** -0.5, window=window,
                              paged=paged_decode_attention)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    return plan


@pytest.mark.parametrize("window", [None, 12])
def test_attention_equals_the_paged_path_at_every_step(window):
    kv = CpuDecodeKV(num_layers=LAYERS, num_kv_heads=KVH, head_dim=D, budget_bytes=2**30)
    plan = _steps(kv, [37, 5, 64], steps=6, window=window)
    assert len(plan.rows) == 3  # every row attended over its copy


def test_rows_past_the_budget_take_the_paged_path_with_the_same_result():
    one = GROW_TOKENS * CpuDecodeKV(num_layers=LAYERS, num_kv_heads=KVH, head_dim=D, budget_bytes=0).token_bytes()
    kv = CpuDecodeKV(num_layers=LAYERS, num_kv_heads=KVH, head_dim=D, budget_bytes=one)  # room for one request
    plan = _steps(kv, [30, 20], steps=3, window=None)
    assert [r.row for r in plan.rows] == [0] and kv.nbytes <= one


def test_copies_are_freed_when_requests_stop_decoding():
    kv = CpuDecodeKV(num_layers=LAYERS, num_kv_heads=KVH, head_dim=D, budget_bytes=2**30)
    _steps(kv, [30, 20], steps=2, window=None, keys=["a", "b"])
    assert kv.nbytes == 2 * GROW_TOKENS * kv.token_bytes()
    kv.forget("a")  # finished or aborted
    assert kv.nbytes == GROW_TOKENS * kv.token_bytes()
    kv.plan([])  # a step where "b" does not decode (preempted)
    assert kv.nbytes == 0


def test_a_request_growing_past_its_capacity_keeps_its_tokens():
    kv = CpuDecodeKV(num_layers=LAYERS, num_kv_heads=KVH, head_dim=D, budget_bytes=2**30)
    _steps(kv, [GROW_TOKENS - 2], steps=4, window=None)  # crosses GROW_TOKENS on the third step
    assert kv.nbytes == 2 * GROW_TOKENS * kv.token_bytes()


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_engine_tokens_do_not_change(preset):
    """Greedy tokens with the contiguous copies equal the paged path's (cpu_decode_kv_gb=0), for
    requests of several lengths decoding together, joined mid-run, with Gemma-3's sliding layers."""
    tiny = load_model(f"random:{preset}", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (200, 45, 130, 7)]
    runs = {}
    for gb in (0.0, 1.0):
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  max_num_batched_tokens=128, cpu_decode_kv_gb=gb)
        outs = llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True), use_tqdm=False)
        runs[gb] = [o.token_ids for o in outs]
        kv = llm.engine.runner.cpu_kv
        assert (kv is None) == (gb == 0.0)
        if kv is not None:
            assert kv.nbytes == 0  # every request finished: nothing held
    assert runs[1.0] == runs[0.0]
