"""MLA prefill attention (torch): every query of a chunk equals the decode reference for that query,
causal over all tokens and over a per-query selection, for a chunk after a cached prefix too."""

from __future__ import annotations

import pytest
import torch

from hisa.attention.mla_prefill import mla_prefill_attention
from hisa.attention.mla_reference import mla_decode_attention_ref

H, DL, DR, SCALE = 4, 16, 8, 0.2


@pytest.mark.parametrize("n,ctx", [(12, 12), (5, 17)])  # a whole prompt; a chunk after 12 cached tokens
@pytest.mark.parametrize("sparse", [False, True])
def test_each_query_equals_the_decode_reference(n, ctx, sparse):
    gen = torch.Generator().manual_seed(n + ctx)
    q = torch.randn(n, H, DL + DR, generator=gen)
    kv = torch.randn(ctx, DL + DR, generator=gen)
    indices = None
    if sparse:  # 4 picks per query among the tokens it sees, -1 where it sees fewer
        indices = torch.full((n, 4), -1, dtype=torch.int32)
        for i in range(n):
            p = ctx - n + i
            pick = torch.randperm(p + 1, generator=gen)[:4]
            indices[i, : len(pick)] = pick.to(torch.int32)
    out = mla_prefill_attention(q, kv, scale=SCALE, kv_lora_rank=DL, indices=indices)  # [n, H, DL]
    cache = kv[:, None, :]  # pages of one token, in order
    for i in range(n):
        p = ctx - n + i
        table = torch.arange(p + 1, dtype=torch.int32)[None]
        ref = mla_decode_attention_ref(q[i:i + 1], cache, table, torch.tensor([p + 1], dtype=torch.int32),
                                       scale=SCALE, kv_lora_rank=DL,
                                       indices=None if indices is None else indices[i:i + 1])
        torch.testing.assert_close(out[i], ref[0], rtol=1e-5, atol=1e-5)
