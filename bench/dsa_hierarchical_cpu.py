"""Hierarchical DSA vs all-on-device DSA on the CPU (tiny random DeepSeek-V3.2, fp32): tokens, hits, misses, bytes.

Not a speed benchmark (the CPU runs torch references): it records what the host-backed path moved
for one request, and checks its tokens against DSA with everything on the device.

    PYTHONPATH=src python bench/dsa_hierarchical_cpu.py --page-size 1 --buffer-ratio 2 --prompt-len 200 --steps 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hisa import LLM, SamplingParams
from hisa.models.config import PRESETS, ModelConfig
from hisa.models.factory import random_model
from hisa.sparse.config import SparseConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--buffer-ratio", type=float, default=2.0)
    p.add_argument("--prompt-len", type=int, default=200)
    p.add_argument("--steps", type=int, default=64, help="decode steps")
    p.add_argument("--max-model-len", type=int, default=320)
    p.add_argument("--out", default="bench/results/dsa_hierarchical_cpu.json")
    a = p.parse_args()
    loaded = random_model(ModelConfig(**PRESETS["tiny-deepseek-v3.2"]), device=torch.device("cpu"),
                          dtype=torch.float32, seed=3)
    with torch.no_grad():
        for _, w in loaded.model.named_parameters():
            if w.ndim >= 2:
                w.mul_(5.0)  # as the tests: attention and routing matter
    prompt = torch.randint(2, loaded.config.vocab_size, (a.prompt_len,), generator=torch.Generator().manual_seed(7)).tolist()
    params = SamplingParams(max_tokens=a.steps + 1, ignore_eos=True)
    runs = {}
    for name, sparse in (("all_on_device", None),
                         ("hierarchical", SparseConfig(algorithm="dsa", residency="host", buffer_ratio=a.buffer_ratio,
                                                       min_prompt_len=64, host_pool_gb=0.01))):
        llm = LLM(loaded=loaded, device="cpu", dtype="float32", progress=False, page_size=a.page_size,
                  max_model_len=a.max_model_len, max_num_batched_tokens=128, sparse=sparse)
        t0 = time.perf_counter()
        tokens = llm.generate([prompt], params, use_tqdm=False)[0].token_ids
        runs[name] = {"tokens": tokens, "seconds": time.perf_counter() - t0}
        if sparse is not None:
            st = llm.engine.sparse.summary()
            m = llm.engine.sparse.manager
            runs[name]["stats"] = {k: st[k] for k in ("decode_steps", "selected_pages", "hits", "misses", "hit_rate",
                                                       "bytes_h2d", "bytes_h2d_per_step", "misses_per_layer",
                                                       "selected_per_layer",
                                                       "device_kv_bytes_per_host_backed_request")}
            runs[name]["buffer_tokens"] = m.ns * a.page_size
    same = runs["hierarchical"]["tokens"] == runs["all_on_device"]["tokens"]
    result = {"device": "cpu", "model": "random:tiny-deepseek-v3.2 (weights x5)", "dtype": "float32",
              "index_topk": loaded.config.dsa.index_topk, **vars(a), "same_tokens": same, **runs}
    st = runs["hierarchical"]["stats"]
    print(f"page {a.page_size}, buffer {runs['hierarchical']['buffer_tokens']} tokens of a {a.prompt_len + a.steps}-token "
          f"context, index_topk {result['index_topk']}: same tokens {same}; {st['decode_steps']} decode steps, "
          f"pages selected {st['selected_pages']}, hits {st['hits']}, misses {st['misses']} (hit rate "
          f"{st['hit_rate']:.3f}), {st['bytes_h2d']} bytes H2D ({st['bytes_h2d_per_step']:.0f}/step)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
