"""Prefill attention (a chunk of queries over the whole context so far) against a plain softmax reference."""

from __future__ import annotations

import pytest
import torch

from hisa.attention.prefill import prefill_attention


def reference(q, k, v, scale, window=None):
    """Per-query loop over explicit scores, fp32: the definition of causal (windowed) GQA attention."""
    n, h, _ = q.shape
    ctx, kvh, _ = k.shape
    g = h // kvh
    out = torch.empty(n, h, v.shape[-1], dtype=torch.float32)
    for i in range(n):
        pos = ctx - n + i
        lo = 0 if window is None else max(0, pos - window + 1)
        for head in range(h):
            s = (k[lo:pos + 1, head // g].float() @ q[i, head].float()) * scale
            out[i, head] = torch.softmax(s, 0) @ v[lo:pos + 1, head // g].float()
    return out


CASES = [(24, 24, None), (7, 40, None), (1, 33, None), (16, 48, 20), (48, 48, 16)]


def _check(device, dtype, atol):
    gen = torch.Generator().manual_seed(0)
    for n, ctx, window in CASES:
        q = torch.randn(n, 8, 32, generator=gen)
        k, v = torch.randn(ctx, 2, 32, generator=gen), torch.randn(ctx, 2, 32, generator=gen)
        got = prefill_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), scale=32 ** -0.5,
                                window=window)
        torch.testing.assert_close(got.float().cpu(), reference(q, k, v, 32 ** -0.5, window), atol=atol, rtol=0,
                                   msg=lambda m: f"n={n} ctx={ctx} window={window}: {m}")


def test_prefill_attention_matches_reference_on_cpu():
    _check(torch.device("cpu"), torch.float32, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, atol", [(torch.float16, 3e-3), (torch.bfloat16, 2e-2)])
def test_prefill_attention_matches_reference_on_cuda(dtype, atol):
    """The CUDA path (4-D inputs, expanded K/V, lower-right causal bias) computes the same thing."""
    _check(torch.device("cuda"), dtype, atol)
