"""The decode write of new K/V into device pages and, through, into host pages: Triton (interpreter on
the CPU) against the torch reference."""

from __future__ import annotations

import pytest
import torch

from hisa.kvcache.write import write_token_kv

I32 = dict(dtype=torch.int32)
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the CPU runs Triton in the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_host", [False, True])
def test_triton_write_matches_reference(dtype, with_host):
    torch.manual_seed(0)
    S, KVH, D, R = 4, 2, 8, 5
    row = 2 * S * KVH * D
    qkv = torch.randn(R, 3 * KVH, D).to(dtype)  # k and v as strided views of a fused projection
    k, v = qkv[:, KVH:2 * KVH], qkv[:, 2 * KVH:]
    pages = torch.tensor([3, 0, -1, 5, 2], **I32)
    t = torch.tensor([9, 1, 7, 16, 0], **I32)  # offsets 0, 0, -, 3, (padding)
    host_pages = torch.tensor([7, -1, 2, 1, 0], **I32)
    k, v, pages, t, host_pages = (x.to(DEV) for x in (k, v, pages, t, host_pages))
    outs = []
    for use_triton in (False, True):
        dev = torch.zeros(6, row, dtype=dtype, device=DEV)
        # the host side: pinned CPU memory on CUDA (the kernel writes it through UVA)
        host = torch.zeros(8, row, dtype=dtype, pin_memory=DEV.type == "cuda") if with_host else None
        write_token_kv(k, v, dev, pages, t, host_rows=host, host_pages=host_pages if with_host else None,
                       page_size=S, use_triton=use_triton)
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        outs.append((dev.cpu(), host))
    k, v = k.cpu(), v.cpu()
    assert torch.equal(outs[0][0], outs[1][0])
    dev = outs[0][0].view(6, 2, S, KVH, D)
    assert torch.equal(dev[3, 0, 0], k[0]) and torch.equal(dev[5, 1, 3], v[3])
    assert dev[2].abs().sum() == 0  # padding row (t == 0) wrote nothing
    if with_host:
        assert torch.equal(outs[0][1], outs[1][1])
        host = outs[0][1].view(8, 2, S, KVH, D)
        assert torch.equal(host[7, 0, 0], k[0]) and torch.equal(host[2, 1, 2], v[2]) and host[1].abs().sum() > 0
        assert host[0].abs().sum() == 0


def test_bad_shapes_fail_with_a_message():
    k = torch.zeros(2, 2, 8)
    with pytest.raises(ValueError, match="dev_rows must be"):
        write_token_kv(k, k, torch.zeros(4, 10), torch.zeros(2, **I32), torch.ones(2, **I32), page_size=4)
