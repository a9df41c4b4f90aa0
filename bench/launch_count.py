"""Kernel launches per decoder layer of a decode step: the model's own ops, attention left out.

Counted with the torch profiler on the CPU (CPU activities record every aten op): a launch is a
leaf aten op that computes (views, reshapes, `empty` and no-op casts launch nothing), plus each
Triton kernel the model would launch on CUDA. Two paths are counted:
  * `cpu`: what runs on the CPU (torch ops only), in fp32 (the CPU's default dtype);
  * `cuda`: what runs on CUDA, in bf16 (its casts are real kernels, fp32's are no-ops): the
    `hisa.ops` launchers take their Triton branch, replaced by a
    stand-in that allocates the outputs and counts one launch (nothing is computed: the counts
    do not depend on values). A tree without `hisa.ops` (before the fusion) runs the same torch code on both paths.
The model runs one decode token (T=1) with an attention stand-in that returns q; per-layer
figures are the difference between 4-layer and 2-layer models of one shape, divided by 2, so
the embedding, the rotary lookup and the final norm are counted apart ("per forward").

    python bench/launch_count.py --out bench/results/launch_count_cpu.json
    git archive e36fb60 src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src python bench/launch_count.py \
        --git-commit e36fb60 --label "before the fusion" --out bench/results/launch_count_cpu_before.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

# aten ops that launch no kernel (views, allocation, no-op casts); their children still count
NON_KERNEL = frozenset(f"aten::{n}" for n in (
    "view", "reshape", "_reshape_alias", "_unsafe_view", "as_strided", "transpose", "t", "permute", "select",
    "slice", "split", "split_with_sizes", "chunk", "unsqueeze", "squeeze", "expand", "narrow", "detach", "alias",
    "unbind", "contiguous", "to", "empty", "empty_like", "empty_strided", "resize_", "lift_fresh", "result_type",
    "numpy_T", "matmul", "linear", "dropout", "lift", "_to_copy", "clone", "type_as", "resolve_conj",
    "resolve_neg", "conj"))


def leaf_kernels(events) -> Counter:
    """aten ops that compute and have no computing descendant, by name."""
    out: Counter = Counter()

    def visit(evt) -> bool:  # True when evt or a descendant computes
        below = [visit(c) for c in evt.cpu_children]
        if any(below):
            return True
        if evt.name.startswith("aten::") and evt.name not in NON_KERNEL:
            out[evt.name] += 1
            return True
        return False

    for evt in events:
        if evt.cpu_parent is None:
            visit(evt)
    return out


class _ReturnQ:
    """Attention stand-in: returns q (no op), so only the model's own launches are counted."""

    def forward(self, layer_idx, q, k, v):
        return q


@contextlib.contextmanager
def as_on_cuda(counter: Counter):
    """The `hisa.ops` launchers take their Triton branch; each launch is counted, not computed."""
    def fake_rms_norm(x, weight, *, residual, **_):
        counter["triton:rms_norm"] += 1
        return torch.empty_like(x), (torch.empty_like(x) if residual is not None else x)

    def fake_qkv_rope(qkv, cos_sin, *, num_heads, num_kv_heads, head_dim, **_):
        counter["triton:qkv_rope"] += 1
        t = qkv.shape[0]
        new = (lambda h: torch.empty(t, h, head_dim, dtype=qkv.dtype))
        return new(num_heads), new(num_kv_heads), new(num_kv_heads)

    def fake_act_mul(gate_up, act):
        counter["triton:act_mul"] += 1
        return torch.empty(gate_up.shape[0], gate_up.shape[1] // 2, dtype=gate_up.dtype)

    patches = []
    for name, fake in (("rms_norm", fake_rms_norm), ("qkv_rope", fake_qkv_rope), ("act_mul", fake_act_mul)):
        mod = importlib.import_module(f"hisa.ops.{name}")
        patches.append((mod, "want_triton", mod.want_triton))
        patches.append((mod, "_launch_triton", mod._launch_triton))
        mod.want_triton = lambda use_triton, x: True
        mod._launch_triton = fake
    try:
        yield
    finally:
        for mod, attr, value in patches:
            setattr(mod, attr, value)


def has_fused_ops() -> bool:
    return importlib.util.find_spec("hisa.ops") is not None


def count_decode_forward(model, *, path: str) -> Counter:
    """Launches of one decode-token forward of `model` (path "cpu" or "cuda")."""
    ids, pos = torch.tensor([7]), torch.tensor([5])
    counts: Counter = Counter()
    ctx = as_on_cuda(counts) if path == "cuda" and has_fused_ops() else contextlib.nullcontext()
    with ctx, torch.inference_mode():
        model(ids, pos, _ReturnQ(), 5)  # warm-up: rotary table, lazy inits
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, pos, _ReturnQ(), 5)
    triton = Counter({k: v // 2 for k, v in counts.items()})  # the warm-up launched as many
    return leaf_kernels(prof.events()) + triton


def _model(family: str, layers: int, dtype: torch.dtype):
    from hisa.models.config import PRESETS, ModelConfig
    from hisa.models.factory import random_model

    if family == "llama":
        cfg = dict(PRESETS["tiny-llama"], num_layers=layers)
    else:
        cfg = dict(PRESETS["tiny-gemma3"], num_layers=layers,
                   layer_types=["sliding_attention", "full_attention"] * (layers // 2))
    return random_model(ModelConfig(**cfg), device=torch.device("cpu"), dtype=dtype).model


def per_layer(family: str, *, path: str, dtype: torch.dtype) -> dict:
    """{"per_layer": launches per decoder layer, "per_forward": the rest, "ops": per-layer breakdown}."""
    two, four = (count_decode_forward(_model(family, n, dtype), path=path) for n in (2, 4))
    layer = Counter({k: (four[k] - two[k]) // 2 for k in four if four[k] != two[k]})
    rest = sum(two.values()) - 2 * sum(layer.values())
    return dict(per_layer=sum(layer.values()), per_forward=rest, ops=dict(sorted(layer.items())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    ap.add_argument("--label", default="", help="a name for this tree in the JSON (e.g. before / after)")
    ap.add_argument("--git-commit", default=None, help="the commit of the hisa tree counted, when not this checkout's")
    args = ap.parse_args()
    import hisa

    rows = {}
    for family in ("llama", "gemma3"):
        for path, dtype in (("cpu", torch.float32), ("cuda", torch.bfloat16)):
            r = per_layer(family, path=path, dtype=dtype)
            rows[f"{family}/{path}"] = dict(dtype=str(dtype).removeprefix("torch."), **r)
            print(f"{family:7s} {path:4s} ({rows[f'{family}/{path}']['dtype']}): {r['per_layer']:3d} launches per "
                  f"layer, {r['per_forward']:3d} per forward  {r['ops']}")
    if args.out:
        from _common import header, write_json

        write_json(args.out, dict(**header(torch.device("cpu"), args.git_commit), label=args.label, hisa=str(Path(hisa.__file__).parent),
                                  fused_ops=has_fused_ops(), counts=rows))


if __name__ == "__main__":
    main()
