"""hisa.ops.crc32.crc32_pages (the device check of L3 pages) against zlib.crc32."""

from __future__ import annotations

import zlib

import pytest
import torch

from hisa.ops.crc32 import crc32_pages

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"  # on a CPU machine tests/conftest.py runs Triton in the interpreter


def _zlib(pages: torch.Tensor, values: torch.Tensor) -> list[int]:
    flat = pages.reshape(pages.shape[0], -1).cpu().contiguous()
    return [zlib.crc32(flat[i].view(torch.uint8).numpy().tobytes(), int(v)) for i, v in enumerate(values.tolist())]


@pytest.mark.parametrize("nbytes,lanes,pieces", [(4, 256, None), (64, 4, None), (1000, 8, 3), (4096, 16, 4), (36, 4, 2), (2052, 32, 5), (8192, 8, None)])
def test_kernel_matches_zlib_for_any_page_length_and_start_value(nbytes, lanes, pieces):
    """Pages whose words fill the lanes and pieces exactly, and pages the kernel pads in front (1000
    bytes in 3 pieces of 8 lanes, 2052 in 5 of 32, a 4-byte page on 256 lanes); start values 0, all
    ones and arbitrary."""
    g = torch.Generator().manual_seed(nbytes)
    pages = torch.randint(0, 256, (4, nbytes), dtype=torch.uint8, generator=g).to(DEV)
    values = torch.tensor([0, 0xFFFFFFFF, 0x12345678, 77], dtype=torch.int64, device=DEV)
    assert crc32_pages(pages, values, use_triton=True, lanes=lanes, pieces=pieces).tolist() == _zlib(pages, values)


def test_pages_of_any_dtype_and_strided_rows():
    """A KV page as it lands ([n, layers, 2, S, KVH, D] bf16), and every other page of a bigger tensor."""
    g = torch.Generator().manual_seed(1)
    kv = torch.randn(3, 2, 2, 4, 2, 8, generator=g).to(torch.bfloat16).to(DEV)
    values = torch.tensor([1, 2, 3], dtype=torch.int64, device=DEV)
    assert crc32_pages(kv, values, use_triton=True, lanes=16).tolist() == _zlib(kv, values)
    big = torch.randint(-2**31, 2**31 - 1, (6, 40), dtype=torch.int32, generator=g).to(DEV)
    some = big[::2, :32]
    v3 = torch.zeros(3, dtype=torch.int64, device=DEV)
    assert crc32_pages(some, v3, use_triton=True, lanes=8).tolist() == _zlib(some, v3)


def test_a_flipped_bit_anywhere_changes_the_crc():
    g = torch.Generator().manual_seed(2)
    page = torch.randint(0, 256, (1, 512), dtype=torch.uint8, generator=g)
    pages = page.repeat(9, 1)
    for i, pos in enumerate([0, 1, 3, 4, 100, 255, 256, 510, 511][1:], start=1):
        pages[i, pos] ^= 1 << (i % 8)
    got = crc32_pages(pages.to(DEV), torch.zeros(9, dtype=torch.int64, device=DEV), use_triton=True, lanes=16)
    assert len(set(got.tolist())) == 9


def test_bad_input_is_refused():
    z = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="multiple of 4"):
        crc32_pages(torch.zeros(2, 6, dtype=torch.uint8), z)
    with pytest.raises(ValueError, match="int64 tensor of shape"):
        crc32_pages(torch.zeros(2, 8, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="contiguous"):
        crc32_pages(torch.zeros(2, 8, dtype=torch.int32).t(), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="power of two"):
        crc32_pages(torch.zeros(2, 8, dtype=torch.uint8), z, lanes=3)
    with pytest.raises(ValueError, match="pieces"):
        crc32_pages(torch.zeros(2, 8, dtype=torch.uint8), z, pieces=0)
