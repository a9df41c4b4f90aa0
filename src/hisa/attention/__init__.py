"""Attention over the paged KV cache.

paged_decode.py           public launcher `paged_decode_attention` (Triton on CUDA, torch elsewhere)
triton_paged_decode.py    its @triton.jit kernels (split-KV + combine)
reference.py              `paged_decode_attention_ref`, the plain-torch reference
prefill.py                prefill attention over gathered pages

Import from the submodules; this file re-exports nothing, so importing the package stays cheap.
"""
