"""The FP8 latent row layout (`hisa.kvcache.mla_fp8`) and the MLA cache that stores it."""

from __future__ import annotations

import pytest
import torch

from hisa.kvcache.mla_cache import MLAKVCache
from hisa.kvcache.mla_fp8 import (FP8_MAX, index_key_width, index_scale_offset, pack_index_keys, pack_latent,
                                  packed_width, unpack_index_keys, unpack_latent)


def test_deepseek_row_is_656_bytes_laid_out_as_values_scales_rope():
    assert packed_width(512, 64) == 656
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 576, generator=g, dtype=torch.float32) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    packed = pack_latent(rows, kv_lora_rank=512)
    assert packed.shape == (3, 656) and packed.dtype == torch.uint8
    scales = packed[:, 512:528].contiguous().view(torch.float32)  # one per 128 latent values
    amax = rows[:, :512].reshape(3, 4, 128).abs().amax(-1)
    torch.testing.assert_close(scales, amax / FP8_MAX)
    want = (rows[:, :512].reshape(3, 4, 128) / scales[..., None]).to(torch.float8_e4m3fn).reshape(3, 512)
    assert torch.equal(packed[:, :512], want.view(torch.uint8))  # round to nearest e4m3 of value / scale
    assert torch.equal(packed[:, 528:].contiguous().view(torch.bfloat16), rows[:, 512:].to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpacked_values_are_within_e4m3_rounding(dtype):
    """Every latent value comes back within half an e4m3 step (a relative 2^-4 for normal values, and
    2^-10 of its tile's scale for the subnormal ones), the rope part as bf16, in the asked dtype."""
    g = torch.Generator().manual_seed(1)
    rows = (torch.randn(64, 2, 256 + 32, generator=g) * torch.logspace(-3, 3, 64)[:, None, None]).to(dtype)
    back = unpack_latent(pack_latent(rows, kv_lora_rank=256), kv_lora_rank=256, dtype=dtype)
    assert back.shape == rows.shape and back.dtype == dtype
    lat, got = rows[..., :256].float(), back[..., :256].float()
    scale = lat.reshape(64, 2, 2, 128).abs().amax(-1, keepdim=True) / FP8_MAX
    bound = torch.maximum(lat.abs().reshape(64, 2, 2, 128) * 2.0**-4, scale * 2.0**-10).reshape(64, 2, 256)
    slack = 1.01 if dtype == torch.float32 else 1.02  # (bf16: one more rounding of the result)
    assert ((got - lat).abs() <= bound * slack).all()
    assert torch.equal(back[..., 256:], rows[..., 256:].to(torch.bfloat16).to(dtype))


def test_index_keys_are_e4m3_with_one_scale_per_key_each_part_16_byte_aligned():
    """An indexer key [ID] -> ID e4m3 bytes, zeros to a 16-byte boundary, its fp32 scale (amax / 448),
    zeros to the next: 144 bytes at V3.2's 128, so every key and every scale starts 16-byte aligned."""
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(5, 3, 128, generator=g) * torch.logspace(-2, 2, 5)[:, None, None]
    packed = pack_index_keys(keys)
    assert packed.shape == (5, 3, 144) == (5, 3, index_key_width(128)) and packed.dtype == torch.uint8
    scale = packed[..., 128:132].contiguous().view(torch.float32)
    torch.testing.assert_close(scale, keys.abs().amax(-1, keepdim=True) / FP8_MAX)
    assert not packed[..., 132:].any()
    torch.testing.assert_close(packed[..., :128].view(torch.float8_e4m3fn).float() * scale,
                               unpack_index_keys(packed, index_head_dim=128, dtype=torch.float32))
    back = unpack_index_keys(packed, index_head_dim=128, dtype=torch.float32)
    assert ((back - keys).abs() <= torch.maximum(keys.abs() * 2.0**-4, scale * 2.0**-10) * 1.01).all()
    odd = torch.randn(4, 24, generator=g)   # 24 values: scale at byte 32, 48 bytes
    p24 = pack_index_keys(odd)
    assert p24.shape == (4, 48) and index_scale_offset(24) == 32 and not p24[:, 24:32].any()
    torch.testing.assert_close(unpack_index_keys(p24, index_head_dim=24, dtype=torch.float32), odd, rtol=0.07, atol=1e-3)
    assert torch.equal(unpack_index_keys(pack_index_keys(torch.zeros(2, 16)), index_head_dim=16, dtype=torch.float32),
                       torch.zeros(2, 16))
    with pytest.raises(ValueError, match="uint8"):
        unpack_index_keys(keys, index_head_dim=128, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"uint8 \[..., 144\]"):
        unpack_index_keys(packed[..., :132], index_head_dim=128, dtype=torch.float32)


def test_zero_tiles_and_bad_shapes():
    zeros = torch.zeros(2, 128 + 8)
    assert torch.equal(unpack_latent(pack_latent(zeros, kv_lora_rank=128), kv_lora_rank=128, dtype=torch.float32), zeros)
    with pytest.raises(ValueError, match="multiple of 128"):
        pack_latent(torch.zeros(2, 96), kv_lora_rank=64)
    with pytest.raises(ValueError, match="Dr > 0"):
        pack_latent(torch.zeros(2, 128), kv_lora_rank=128)
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_latent(torch.zeros(2, 164), kv_lora_rank=128, dtype=torch.float32)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_latent(torch.zeros(2, 131, dtype=torch.uint8), kv_lora_rank=128, dtype=torch.float32)


def test_cache_stores_packed_rows_and_counts_their_bytes():
    kw = dict(num_layers=2, num_pages=5, page_size=4, latent_dim=128 + 16, index_head_dim=32,
              dtype=torch.float32, device=torch.device("cpu"), kv_lora_rank=128)
    cache = MLAKVCache(**kw, latent_format="fp8")
    plain = MLAKVCache(**kw)
    assert cache.page_shape == (4, 164) and cache.dtype == torch.uint8 and plain.page_shape == (4, 144)
    assert cache.nbytes == 2 * 5 * 4 * (164 + 32 + 16)  # FP8 rows and FP8 indexer keys (32 values, scale, padding)
    page = {k: v for k, v in kw.items() if k not in ("num_pages", "device")}
    assert MLAKVCache.page_bytes(**page, latent_format="fp8") * 5 == cache.nbytes
    assert MLAKVCache.page_bytes(**page) * 5 == plain.nbytes
    rows = torch.randn(3, 144)
    pages, offsets = torch.tensor([0, 4, 4]), torch.tensor([1, 0, 3])
    keys = torch.randn(3, 32)
    cache.write(1, pages, offsets, cache.pack(rows), cache.pack_index(keys))
    stored = cache.latent_rows(1)[pages, offsets]
    assert torch.equal(cache.unpack(stored), unpack_latent(pack_latent(rows, kv_lora_rank=128), kv_lora_rank=128,
                                                           dtype=torch.float32))
    assert torch.equal(cache.unpack_index(cache.index_keys(1)[pages, offsets]),
                       unpack_index_keys(pack_index_keys(keys), index_head_dim=32, dtype=torch.float32))
    with pytest.raises(ValueError, match="stored rows"):
        cache.write(1, pages, offsets, rows, None)  # unpacked rows
    with pytest.raises(ValueError, match="stored keys"):
        cache.write(1, pages, offsets, cache.pack(rows), keys)  # unpacked keys
    with pytest.raises(ValueError, match="latent_format"):
        MLAKVCache(**kw, latent_format="int4")
