"""hisa.ops.argmax (greedy decoding's token) against torch.argmax: first maximum, NaN first."""

from __future__ import annotations

import pytest
import torch

from hisa.ops.argmax import argmax

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # on a CPU machine tests/conftest.py runs Triton in the interpreter


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("b,v,chunk", [(1, 1, 16), (3, 100, 16), (5, 1000, 64), (2, 64, 64)])
def test_kernels_match_torch_argmax(dtype, b, v, chunk):
    torch.manual_seed(b * v)
    x = torch.randn(b, v, device=DEV).to(dtype)
    assert argmax(x, use_triton=True, chunk=chunk).tolist() == x.float().argmax(-1).tolist()


def test_ties_keep_the_first_column_across_chunks_and_nan_wins():
    """Rows whose maximum repeats inside a chunk and in later chunks; a row with +inf then NaN
    (torch's CUDA argmax takes the NaN); a row of -inf only (column 0); a strided row."""
    x = torch.zeros(5, 200, device=DEV)
    x[0, [37, 38, 150]] = 3.0
    x[1, [5, 70, 71]] = 2.0
    x[2, 10] = float("inf")
    x[2, [90, 120]] = float("nan")
    x[3] = float("-inf")
    x[4, 199] = 1.0
    got = argmax(x, use_triton=True, chunk=32).tolist()
    assert got == [37, 5, 90, 0, 199]
    wide = torch.randn(3, 300, device=DEV)
    assert argmax(wide[:, :250], use_triton=True, chunk=64).tolist() == wide[:, :250].argmax(-1).tolist()


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        argmax(torch.randn(4))
    with pytest.raises(ValueError, match="empty row"):
        argmax(torch.randn(2, 0))
    with pytest.raises(ValueError, match="chunk"):
        argmax(torch.randn(2, 3), chunk=100)
    assert argmax(torch.tensor([[1.0, 3.0, 3.0]])).tolist() == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("b", [1, 8, 64])
def test_llama_vocabulary_in_bf16(b):
    x = torch.randn(b, 128256, device="cuda").to(torch.bfloat16)
    x[0, 128000] = x[0].max() + 1  # the best token in the last chunk
    assert torch.equal(argmax(x), x.float().argmax(-1))
