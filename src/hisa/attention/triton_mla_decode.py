"""Triton kernel of MLA decode attention over the paged latent cache. Launcher: `hisa.attention.mla_decode`.

Algorithm (same result as `mla_reference.mla_decode_attention_ref`):
  * grid (B, cdiv(H, BLOCK_H), num_splits): one program holds BLOCK_H query heads of one request
    as a [BLOCK_H, Dl] latent tile and a [BLOCK_H, Dr] rope tile; every latent row it loads serves
    all BLOCK_H heads (MLA has one latent "head"): score = q_lat·latent + q_pe·k_pe, and the same
    latent values are the V (o = softmax(score) · latent).
  * the items a request attends to are either its DSA selection (SPARSE: `indices[b, j]` are token
    positions, -1 padded, the indexer's top-k) or all of its kv_len tokens (dense). Items are cut
    into blocks of BLOCK_N; split s takes a contiguous run of ceil(n_blocks / num_splits) blocks.
  * each token is found through the page table (page = table[t // S], offset t % S); items < 0,
    >= kv_len or on a -1 page are masked (never dereferenced).
  * online softmax in fp32 in the log2 domain; num_splits == 1 writes the output directly (DIRECT_OUT),
    otherwise (m, l, acc) go to fp32 workspaces merged by `paged_decode_combine_kernel`
    (triton_paged_decode.py, the same merge as the GQA kernel's).
  * masked loads read 0: the cache is allocated uninitialized and 0 * NaN would survive.
  * FP8 (`hisa.kvcache.mla_fp8`): rows are bytes [Dl e4m3 | Dl / 128 fp32 scales | Dr bf16]. Each
    e4m3 byte becomes an fp16 by moving its sign to bit 15 and its 7 other bits to bits 7..13 (the
    fp16 is the e4m3 value / 256, subnormals included), then value = fp16 * (scale * 256) in fp32,
    rounded to q's dtype: the same value as the torch unpacking, bit for bit (one rounding of the
    same exact product). HW_CVT (compiled kernels, set by the launcher off the interpreter, whose
    fp8 conversion differs) takes the GPU's fp8 -> fp32 conversion instead of the integer steps:
    the e4m3 value itself, times the unmultiplied scale (the same product, one multiply fewer).
"""

from __future__ import annotations

import triton
import triton.language as tl

from hisa.ops.triton_fp8 import e4m3_over_256, e4m3_values


@triton.jit
def _mla_attend_block(
    start, n_items, kv_len, q_lat, q_pe, m_i, l_i, acc,
    kv_ptr, pt_row_ptr, idx_row_ptr, dl, dl_ok, dr, dr_ok, scale_log2,
    stride_kp, stride_ks,
    DL: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr, SPARSE: tl.constexpr, FP8: tl.constexpr,
    BLOCK_DL: tl.constexpr, HW_CVT: tl.constexpr,
):
    """Fold items [start, min(start + BLOCK_N, n_items)) into the running (m_i, l_i, acc)."""
    j = start + tl.arange(0, BLOCK_N)  # [BLOCK_N] item numbers
    j_ok = j < n_items
    if SPARSE:
        tok = tl.load(idx_row_ptr + j, mask=j_ok, other=-1)  # [BLOCK_N] selected token positions
    else:
        tok = j
    tok_ok = j_ok & (tok >= 0) & (tok < kv_len)
    page = tl.load(pt_row_ptr + tok // S, mask=tok_ok, other=-1).to(tl.int64)  # [BLOCK_N]
    tok_ok = tok_ok & (page >= 0)
    row = kv_ptr + page * stride_kp + (tok % S).to(tl.int64) * stride_ks  # [BLOCK_N] row starts
    if FP8:
        lat, pe = _fp8_rows(row, tok_ok, dl, dl_ok, dr, dr_ok, q_lat.dtype, DL, BLOCK_N, BLOCK_DL, HW_CVT)
    else:
        lat = tl.load(row[:, None] + dl[None, :], mask=tok_ok[:, None] & dl_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DL]
        pe = tl.load(row[:, None] + DL + dr[None, :], mask=tok_ok[:, None] & dr_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DR]

    qk = tl.dot(q_lat, tl.trans(lat), input_precision="ieee")  # [BLOCK_H, BLOCK_N]
    qk += tl.dot(q_pe, tl.trans(pe), input_precision="ieee")
    qk = tl.where(tok_ok[None, :], qk * scale_log2, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # [BLOCK_H]
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # finite: no (-inf) - (-inf)
    alpha = tl.exp2(m_i - m_sub)  # [BLOCK_H]
    p = tl.exp2(qk - m_sub[:, None])  # [BLOCK_H, BLOCK_N]
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision="ieee")  # [BLOCK_H, BLOCK_DL]
    return m_new, l_i, acc


@triton.jit
def _fp8_rows(row, tok_ok, dl, dl_ok, dr, dr_ok, ty, DL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DL: tl.constexpr,
              HW_CVT: tl.constexpr):
    """The latent [BLOCK_N, BLOCK_DL] and rope [BLOCK_N, BLOCK_DR] values of FP8 rows (bytes at `row`), in ty."""
    NT: tl.constexpr = BLOCK_DL // 128  # scale tiles in the block (DL // 128 of them real)
    b = tl.load(row[:, None] + dl[None, :], mask=tok_ok[:, None] & dl_ok[None, :], other=0)
    t = tl.arange(0, NT)
    sc = tl.load((row[:, None] + DL + 4 * t[None, :]).to(tl.pointer_type(tl.float32)),
                 mask=tok_ok[:, None] & (t < DL // 128)[None, :], other=0.0)  # [BLOCK_N, NT]
    if HW_CVT:  # the GPU's own conversion (two values per instruction on sm_89+): the e4m3 value
        v = e4m3_values(b, True)
    else:
        v = e4m3_over_256(b)
        sc = sc * 256.0  # (exact: the same product as e4m3 * scale)
    lat = tl.reshape(tl.reshape(v, (BLOCK_N, NT, 128)) * sc[:, :, None], (BLOCK_N, BLOCK_DL))
    pe = tl.load((row[:, None] + DL + 4 * (DL // 128) + 2 * dr[None, :]).to(tl.pointer_type(tl.bfloat16)),
                 mask=tok_ok[:, None] & dr_ok[None, :], other=0.0)
    return lat.to(ty), pe.to(ty)


@triton.jit
def mla_decode_split_kernel(
    q_ptr,                                  # [B, H, DL + DR]
    kv_ptr,                                 # [P, S, DL + DR] one layer's latent rows, strided
    pt_ptr,                                 # int32 [B, max_pages]
    lens_ptr,                               # int32 [B]
    idx_ptr,                                # int32 [B, K] selected token positions (read when SPARSE)
    out_ptr,                                # [B, H, DL] (written when DIRECT_OUT)
    m_ws_ptr, l_ws_ptr,                     # fp32 [B, H, NUM_SPLITS] (written unless DIRECT_OUT)
    acc_ws_ptr,                             # fp32 [B, H, NUM_SPLITS, DL] (written unless DIRECT_OUT)
    scale_log2,                             # softmax scale * log2(e)
    H, MAX_TOKENS, NUM_ITEMS_SPARSE, NUM_SPLITS,
    stride_qb, stride_qh,
    stride_kp, stride_ks,
    stride_ptb, stride_lens, stride_ib,
    stride_ob, stride_oh,
    DL: tl.constexpr, DR: tl.constexpr, S: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, DIRECT_OUT: tl.constexpr, INTERPRETER: tl.constexpr, FP8: tl.constexpr = False,
    HW_CVT: tl.constexpr = False,
):
    b = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    split = tl.program_id(2)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_ok = heads < H
    dl = tl.arange(0, BLOCK_DL)
    dr = tl.arange(0, BLOCK_DR)
    dl_ok = dl < DL
    dr_ok = dr < DR
    q_row = q_ptr + b * stride_qb + heads[:, None] * stride_qh  # [BLOCK_H, 1]
    q_lat = tl.load(q_row + dl[None, :], mask=h_ok[:, None] & dl_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_DL]
    q_pe = tl.load(q_row + DL + dr[None, :], mask=h_ok[:, None] & dr_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_DR]
    if not FP8:  # (FP8 rows are dequantized into q's dtype)
        q_lat = q_lat.to(kv_ptr.dtype.element_ty)
        q_pe = q_pe.to(kv_ptr.dtype.element_ty)

    # clamped so a kv_len past the page table cannot read outside it
    kv_len = tl.maximum(tl.minimum(tl.load(lens_ptr + b * stride_lens), MAX_TOKENS), 0)
    n_items = NUM_ITEMS_SPARSE if SPARSE else kv_len
    n_items = tl.where(kv_len > 0, n_items, 0)
    blocks_per_split = tl.cdiv(tl.cdiv(n_items, BLOCK_N), NUM_SPLITS)
    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, n_items)
    pt_row_ptr = pt_ptr + b * stride_ptb
    idx_row_ptr = idx_ptr + b * stride_ib

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)  # running sum of 2^(score - m_i)
    acc = tl.zeros([BLOCK_H, BLOCK_DL], dtype=tl.float32)  # running sum of p * latent
    if INTERPRETER:
        # the interpreter cannot run range() with tensor bounds (see triton_paged_decode.py)
        start = lo
        while start < hi:
            m_i, l_i, acc = _mla_attend_block(start, hi, kv_len, q_lat, q_pe, m_i, l_i, acc, kv_ptr, pt_row_ptr,
                                              idx_row_ptr, dl, dl_ok, dr, dr_ok, scale_log2, stride_kp, stride_ks,
                                              DL, S, BLOCK_N, SPARSE, FP8, BLOCK_DL, HW_CVT)
            start += BLOCK_N
    else:
        for start in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _mla_attend_block(start, hi, kv_len, q_lat, q_pe, m_i, l_i, acc, kv_ptr, pt_row_ptr,
                                              idx_row_ptr, dl, dl_ok, dr, dr_ok, scale_log2, stride_kp, stride_ks,
                                              DL, S, BLOCK_N, SPARSE, FP8, BLOCK_DL, HW_CVT)

    if DIRECT_OUT:
        # l_i == 0 only when no item was valid, and then acc == 0: the output is zeros
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # [BLOCK_H, BLOCK_DL]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + dl[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_ok[:, None] & dl_ok[None, :])
    else:
        ws = (b * H + heads) * NUM_SPLITS + split  # [BLOCK_H] row of the [B, H, NUM_SPLITS] workspace
        tl.store(m_ws_ptr + ws, m_i, mask=h_ok)
        tl.store(l_ws_ptr + ws, l_i, mask=h_ok)
        tl.store(acc_ws_ptr + ws[:, None] * DL + dl[None, :], acc, mask=h_ok[:, None] & dl_ok[None, :])
