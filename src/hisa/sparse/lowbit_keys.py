"""Low-bit copies of the keys: quantization, packing, and the per-step update (one Triton launch on CUDA).

Each token's key of each KV head is cut into groups of `group_size` channels; a group keeps its
minimum and its step ((max - min) / (2^bits - 1)) in fp16 and one `bits`-wide code per channel,
code = floor((k - min) / step + 1/2) clamped to [0, 2^bits - 1], so k ≈ code * step + min.

Why asymmetric (min + step) and not symmetric (a signed code around zero): a key group is rarely
centred on zero (RoPE'd keys carry large per-channel offsets), and a symmetric code spends half its
levels on the side the group does not reach; at 2 bits a symmetric code has only {-1, 0, 1}. The
zero point costs 2 bytes per group (4 bytes of 20 per group of 32 channels at 4 bits).
bench/selection_recall.py measures both (docs/eval.md).

Packing (`bits` in {2, 4}, NP = 8 // bits codes per byte, GB = group_size // NP bytes per group):
byte j of group g holds channels g * group_size + i * GB + j for i = 0..NP-1, channel i in bits
[i * bits, (i + 1) * bits). Each code sub-position i is then a contiguous run of GB channels, so a
kernel unpacks it with one shift and one mask, no interleaving.

Shapes: keys [T, KVH, D]; codes uint8 [T, KVH, D * bits // 8]; scales fp16 [T, KVH, D // group_size, 2]
(step, min).
"""

from __future__ import annotations

import torch


def check_layout(head_dim: int, bits: int, group_size: int) -> None:
    """Raise ValueError unless (bits, group_size) packs `head_dim` channels as described above."""
    if bits not in (2, 4):
        raise ValueError(f"lowbit keys are 2 or 4 bits, got {bits}")
    if group_size < 8 // bits or group_size & (group_size - 1) or head_dim % group_size:
        raise ValueError(f"group_size {group_size} must be a power of two >= {8 // bits} dividing head_dim {head_dim}")


def quantize_keys(keys: torch.Tensor, *, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [T, KVH, D] (any float dtype; NaN rows, a partial page's unwritten tail, become zeros)
    -> (codes uint8 [T, KVH, D * bits // 8], scales fp16 [T, KVH, D // group_size, 2])."""
    T, KVH, D = keys.shape
    check_layout(D, bits, group_size)
    ng, npk = D // group_size, 8 // bits
    gb = group_size // npk
    levels = (1 << bits) - 1
    k = keys.float().nan_to_num(0.0).view(T, KVH, ng, group_size)
    lo, hi = k.amin(-1), k.amax(-1)
    step16, min16 = ((hi - lo) / levels).to(torch.float16), lo.to(torch.float16)
    step, mn = step16.float(), min16.float()
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, 1.0), 0.0)
    codes = torch.floor((k - mn[..., None]) * inv[..., None] + 0.5).clamp(0, levels).to(torch.int32)
    codes = codes.view(T, KVH, ng, npk, gb)
    packed = torch.zeros(T, KVH, ng, gb, dtype=torch.int32, device=keys.device)
    for i in range(npk):
        packed |= codes[..., i, :] << (i * bits)
    return packed.to(torch.uint8).view(T, KVH, ng * gb), torch.stack([step16, min16], dim=-1)


def dequantize_keys(codes: torch.Tensor, scales: torch.Tensor, *, bits: int, group_size: int) -> torch.Tensor:
    """The inverse up to rounding: codes [..., KVH, DB], scales [..., KVH, NG, 2] -> fp32 [..., KVH, D]."""
    *lead, KVH, DB = codes.shape
    ng, npk = scales.shape[-2], 8 // bits
    gb = group_size // npk
    c = codes.to(torch.int32).view(*lead, KVH, ng, 1, gb)
    shifts = torch.arange(npk, device=codes.device, dtype=torch.int32).view(npk, 1) * bits
    vals = ((c >> shifts) & ((1 << bits) - 1)).float()  # [..., KVH, NG, NP, GB]
    s = scales.float()
    k = vals * s[..., 0, None, None] + s[..., 1, None, None]
    return k.reshape(*lead, KVH, ng * group_size)


def lowbit_update(codes: torch.Tensor, scales: torch.Tensor, keys: torch.Tensor, sparse_slots: torch.Tensor,
                  t: torch.Tensor, *, bits: int, group_size: int, sentinel: int,
                  use_triton: bool | None = None) -> None:
    """Quantize each decode row's new key into its token's entry, in place (one layer).

    codes: uint8 [SS, MAXT, KVH, DB]; scales: fp16 [SS, MAXT, KVH, NG, 2]; keys [R, KVH, D] (rows may
    be strided, each row contiguous); sparse_slots, t: int32 [R]. Row r's key is token t - 1 of the
    request in slot sparse_slots[r]; rows of the sentinel slot or with t == 0 are skipped. One
    Triton launch on CUDA (no sync), the torch reference elsewhere.
    """
    R, KVH, D = keys.shape
    if R == 0:
        return
    if keys.stride(2) != 1 or keys.stride(1) != D:
        raise ValueError(f"keys must be contiguous within a row, got strides {keys.stride()}")
    if codes.dtype != torch.uint8 or scales.dtype != torch.float16 or not (codes.is_contiguous()
                                                                        and scales.is_contiguous()):
        raise ValueError("codes must be contiguous uint8 and scales contiguous fp16")
    if use_triton is None:
        use_triton = keys.is_cuda
    if use_triton:
        from hisa.sparse.triton_lowbit import lowbit_update_kernel

        check_layout(D, bits, group_size)
        groups = KVH * (D // group_size)
        lowbit_update_kernel[(R,)](
            keys, codes, scales, sparse_slots, t, keys.stride(0), codes.stride(0), codes.stride(1),
            scales.stride(0), scales.stride(1), sentinel,
            NGROUPS=groups, BLOCK_G=_next_pow2(groups), GROUP=group_size, BITS=bits, num_warps=1)
        return
    keep = (sparse_slots != sentinel) & (t > 0)
    s, tok = sparse_slots[keep].long(), (t[keep] - 1).long()
    c, sc = quantize_keys(keys[keep], bits=bits, group_size=group_size)
    codes[s, tok] = c
    scales[s, tok] = sc


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
