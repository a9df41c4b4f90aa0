"""FP8 rows of a DSA model's cache, DeepSeek's layouts: latent rows (656 bytes) and indexer keys (144).

A latent row [normed compressed KV (Dl) | roped shared key (Dr)] is stored as bytes:

    [ Dl values as float8 e4m3 | Dl / 128 fp32 scales | Dr values as bf16 ]

Each tile of 128 latent values has its own scale, amax / 448 (448: e4m3's largest finite value), and
holds round-to-nearest e4m3 of value / scale; the rope part stays bf16 (it carries position, and is
an eighth of the row). For DeepSeek-V3.2 (Dl 512, Dr 64) a row is 512 + 16 + 128 = 656 bytes
instead of 1,152 in bf16: the device buffer, the host pool and every miss moved over PCIe shrink
by 43%. A value comes back as e4m3(value / scale) * scale, rounded once to the compute dtype; the
Triton decode kernel (`hisa.attention.triton_mla_decode`, FP8) dequantizes the same way, bit for bit.

An indexer key [ID] is stored as [ ID values as e4m3 | one fp32 scale ] (amax / 448 over the key),
DeepSeek's own indexer cache, each part padded to 16 bytes (`index_key_width`): 144 bytes for
ID = 128 instead of 256 in bf16. The padding keeps every key 16-byte aligned, so a kernel loads its
values 16 bytes at a time: unpadded 132-byte keys made the 128K decode step 2.1x slower on an H200
(docs/dsa.md, "FP8 indexer keys"). The indexer's score is
a sum over heads of w_h * relu(q_h . k), and relu(q . (e * s)) = s * relu(q . e) for s > 0, so the
decode kernel scales each token's score once instead of every key value
(`hisa.attention.triton_dsa_indexer`). As in DeepSeek's own inference, the decode indexer over FP8
keys takes its queries in FP8 too (`quantize_index_queries`: one scale per head, folded into the
head's weight), so the products run on the FP8 tensor cores: the indexer is bound by its products,
not its bytes, at 64 heads.

Example::

    packed = pack_latent(rows, kv_lora_rank=512)              # [T, 576] bf16 -> [T, 656] uint8
    rows2 = unpack_latent(packed, kv_lora_rank=512, dtype=torch.bfloat16)   # [T, 576]
    keys8 = pack_index_keys(keys)                             # [T, 128] -> [T, 144] uint8
"""

from __future__ import annotations

import torch

TILE = 128  # latent values per scale
FP8_MAX = 448.0  # the largest finite float8 e4m3 (fn) value
LATENT_FORMATS = ("auto", "fp8")  # "auto": rows in the model's dtype


def packed_width(kv_lora_rank: int, rope_dim: int) -> int:
    """Bytes of one packed row: Dl (e4m3) + 4 * Dl / 128 (scales) + 2 * Dr (bf16)."""
    _check_rank(kv_lora_rank)
    return kv_lora_rank + 4 * (kv_lora_rank // TILE) + 2 * rope_dim


def pack_latent(rows: torch.Tensor, *, kv_lora_rank: int) -> torch.Tensor:
    """rows [..., Dl + Dr] (any float dtype) -> uint8 [..., packed_width(Dl, Dr)]. Graph-safe (no host sync)."""
    _check_rank(kv_lora_rank)
    if rows.shape[-1] <= kv_lora_rank:
        raise ValueError(f"rows must be [..., Dl + Dr] with Dl = {kv_lora_rank} and Dr > 0, got {tuple(rows.shape)}")
    lead, dl = rows.shape[:-1], kv_lora_rank
    q, scale = _e4m3(rows[..., :dl].reshape(*lead, dl // TILE, TILE))
    q = q.reshape(*lead, dl)
    sc = scale.reshape(*lead, dl // TILE).contiguous().view(torch.uint8)  # fp32 bytes
    pe = rows[..., dl:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return torch.cat([q, sc, pe], dim=-1)


def unpack_latent(packed: torch.Tensor, *, kv_lora_rank: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., packed_width] -> [..., Dl + Dr] in dtype: e4m3 * scale in fp32, then rounded to dtype."""
    _check_rank(kv_lora_rank)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed latent rows must be uint8, got {packed.dtype}")
    dl, nt = kv_lora_rank, kv_lora_rank // TILE
    rope_bytes = packed.shape[-1] - dl - 4 * nt
    if rope_bytes <= 0 or rope_bytes % 2:
        raise ValueError(f"a packed row of {packed.shape[-1]} bytes does not fit Dl = {dl} (FP8 layout "
                         f"{dl} + {4 * nt} + 2 * Dr bytes)")
    lead = packed.shape[:-1]
    p = packed.contiguous()
    q = p[..., :dl].contiguous().view(torch.float8_e4m3fn).float().reshape(*lead, nt, TILE)
    scale = p[..., dl:dl + 4 * nt].contiguous().view(torch.float32).reshape(*lead, nt, 1)
    pe = p[..., dl + 4 * nt:].contiguous().view(torch.bfloat16)
    return torch.cat([(q * scale).reshape(*lead, dl).to(dtype), pe.to(dtype)], dim=-1)


ALIGN = 16  # bytes: an FP8 indexer key's values and its scale each start on a multiple of it


def index_scale_offset(index_head_dim: int) -> int:
    """Where an FP8 indexer key's fp32 scale starts: past its values, rounded up to ALIGN bytes."""
    return -(-index_head_dim // ALIGN) * ALIGN


def index_key_width(index_head_dim: int) -> int:
    """Bytes of one FP8 indexer key: its e4m3 values, then its fp32 scale, each padded to ALIGN bytes
    (144 for ID = 128)."""
    return index_scale_offset(index_head_dim) + ALIGN


def pack_index_keys(keys: torch.Tensor) -> torch.Tensor:
    """Indexer keys [..., ID] (any float dtype) -> uint8 [..., index_key_width(ID)]: e4m3 values, zeros
    to the scale's offset, the key's fp32 scale (amax / 448; 1 for an all-zero key), zeros.
    Graph-safe (no host sync)."""
    idim = keys.shape[-1]
    q, scale = _e4m3(keys)
    lead = q.shape[:-1]
    gap = q.new_zeros(*lead, index_scale_offset(idim) - idim)
    tail = q.new_zeros(*lead, ALIGN - 4)
    return torch.cat([q, gap, scale.contiguous().view(torch.uint8), tail], dim=-1)


def quantize_index_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indexer queries [..., IH, ID] -> (uint8 e4m3 [..., IH, ID], fp32 scales [..., IH]): each head's
    query over its own scale (amax / 448; 1 for an all-zero head), DeepSeek's FP8 indexer, which
    scores FP8 queries against FP8 keys. Graph-safe."""
    q8, scale = _e4m3(q)
    return q8, scale.squeeze(-1)


def fp8_index_queries(q: torch.Tensor) -> torch.Tensor:
    """The values FP8 queries stand for, fp32 [..., IH, ID]: e4m3 * the head's scale
    (`quantize_index_queries`, then back)."""
    q8, scale = quantize_index_queries(q)
    return q8.view(torch.float8_e4m3fn).float() * scale.unsqueeze(-1)


def unpack_index_keys(packed: torch.Tensor, *, index_head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., index_key_width(ID)] -> [..., ID] in dtype: e4m3 * scale in fp32, then rounded to dtype."""
    width = index_key_width(index_head_dim)
    if packed.dtype != torch.uint8 or packed.shape[-1] != width:
        raise ValueError(f"packed indexer keys of {index_head_dim} values must be uint8 [..., {width}], got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    p = packed.contiguous()
    at = index_scale_offset(index_head_dim)
    q = p[..., :index_head_dim].contiguous().view(torch.float8_e4m3fn).float()
    scale = p[..., at:at + 4].contiguous().view(torch.float32)
    return (q * scale).to(dtype)


def _e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., n] (any float dtype) -> (uint8 [..., n]: round-to-nearest e4m3 of x / scale, fp32 scale
    [..., 1]: amax / 448 over the last dim, 1 where it is all zeros). Graph-safe."""
    x = x.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8), scale


def _check_rank(kv_lora_rank: int) -> None:
    if not (isinstance(kv_lora_rank, int) and kv_lora_rank > 0 and kv_lora_rank % TILE == 0):
        raise ValueError(f"an FP8 latent cache needs kv_lora_rank to be a positive multiple of {TILE}, "
                         f"got {kv_lora_rank!r}")
