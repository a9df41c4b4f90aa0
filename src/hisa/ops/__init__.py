"""Fused elementwise kernels of the model's dense parts (Triton on CUDA, torch elsewhere).

rms_norm.py          `rms_norm`: RMSNorm, optionally fused with the residual add (and, for Gemma,
                     with the sublayer's post-norm before the add); returns (normed, new residual).
                     `NormedRows`: a norm left to the projection after it (see linear.py)
triton_rms_norm.py   its @triton.jit kernel
linear.py            `linear`, `gate_up_act`, `linear_add_norm`: decode-batch projections (few rows,
                     bound by the weight's bytes), the residual add and the next norm in them
triton_linear.py     their @triton.jit kernels
argmax.py            `argmax`: greedy sampling's token (triton_argmax.py: its kernels)
qkv_rope.py          `qkv_rope`: split a fused q|k|v projection, (Gemma) QK-norm, RoPE on q and k
triton_qkv_rope.py   its @triton.jit kernel
act_mul.py           `act_mul`: act(gate) * up of a fused gate|up projection (SiLU, GELU-tanh)
triton_act_mul.py    its @triton.jit kernel
crc32.py             `crc32_pages`: zlib's CRC-32 of many equal pages on the device (L3 pages landed there)
triton_crc32.py      its @triton.jit kernel
pdl.py               programmatic dependent launch for the decode step's kernels (HISA_PDL; off)

Each launcher checks its arguments, runs the Triton kernel for CUDA tensors and a torch path
otherwise, and has a plain-torch reference (`*_ref`) that the kernels are tested against
(tests/ops/, under TRITON_INTERPRET=1 on a CPU). Import from the submodules; this file re-exports
nothing, so importing the package does not import Triton.
"""
