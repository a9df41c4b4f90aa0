"""Float8 e4m3 bytes to values inside Triton kernels (the FP8 rows of `hisa.kvcache.mla_fp8`).

`e4m3_values(b, HW_CVT)`: uint8 bytes -> the exact e4m3 (fn) values in fp32. HW_CVT (compiled kernels)
uses the GPU's fp8 -> fp32 conversion (two values per instruction on sm_89+). Otherwise integer
steps that the interpreter runs too (its fp8 conversion differs from the GPU's): the sign goes to
bit 15 and the 7 other bits to bits 7..13 of an fp16, which is then the e4m3 value / 256,
subnormals included (e4m3 biases its exponent by 7, fp16 by 15), and * 256 is exact. Every e4m3
value is exact in fp16, bf16 and fp32, so the values can go on to any of them unrounded.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e4m3_values(b, HW_CVT: tl.constexpr):
    """uint8 tensor -> fp32 tensor of the same shape: the e4m3 values those bytes hold."""
    if HW_CVT:
        v = b.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = e4m3_over_256(b) * 256.0
    return v


@triton.jit
def e4m3_over_256(b):
    """uint8 tensor -> fp32 tensor: the e4m3 values / 256, by integer steps (exact; a caller that
    scales the values anyway can fold the 256 into its scale)."""
    h = b.to(tl.uint16)
    return (((h & 0x80) << 8) | ((h & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32)
