"""CPU speed, side by side in one process: hisa vs transformers on SmolLM2-135M-Instruct at ~4K tokens.

Both run the embedded GGUF (hisa.models.loader.default_model_path(), dequantized to fp32) with the
same prompt token ids and the same torch intra-op threads:
  * hisa: `LLM(device="cpu").engine`: add_request(prompt, max_tokens = decode + 1, ignore_eos), then
    step() to the end (chunked prefill of `max_num_batched_tokens`, then one decode step per token);
  * transformers: `generate(ids, max_new_tokens = decode + 1, greedy)` on
    `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (SDPA attention, DynamicCache).
Prefill time is the time to the first generated token (prompt tokens / it = prefill tok/s); decode
time is from the first to the last generated token (decode tokens / it = decode tok/s); a logits
processor stamps transformers' tokens. Rounds are interleaved (the order alternates each round),
after one short warm-up run of each; medians over the rounds. Also checked: both generate the
same greedy tokens. Writes JSON (command, machine and its load, date, git commit, versions, every
round) and a plot beside it; prints a table.

    python bench/cpu_speed.py --out bench/results/cpu_speed.json
    python bench/cpu_speed.py --prompt-tokens 256 --decode-tokens 4 --rounds 1 --out /tmp/cpu_speed.json  # smoke
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, checked_step, header, write_json  # noqa: E402


def prompt_ids(tokenizer, n: int) -> list[int]:
    """`n` token ids of real English text (the bundled station logbook, repeated as needed)."""
    text = (REPO / "examples" / "station_log.txt").read_text()
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(text, add_special_tokens=not ids)
    return ids[:n]


def run_hisa(llm, ids: list[int], decode: int) -> dict:
    from hisa import SamplingParams

    engine = llm.engine
    t0 = time.perf_counter()
    engine.add_request(ids, SamplingParams(max_tokens=decode + 1, ignore_eos=True))
    stamps, tokens, steps = [], [], 0
    while engine.has_unfinished_requests():
        outs = checked_step(engine)
        steps += 1
        if outs:
            stamps.append(time.perf_counter())
            tokens = outs[0].token_ids
    return dict(prefill_s=stamps[0] - t0, decode_s=stamps[-1] - stamps[0], tokens=tokens, steps=steps)


def run_transformers(model, ids: list[int], decode: int) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    stamp = Stamp()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=decode + 1, min_new_tokens=decode + 1,
                             do_sample=False, logits_processor=LogitsProcessorList([stamp]), pad_token_id=0)
    return dict(prefill_s=stamp.times[0] - t0, decode_s=stamp.times[-1] - stamp.times[0],
                tokens=out[0, len(ids):].tolist())


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    return dict(cpu=model, logical_cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
                loadavg_1_5_15=[round(x, 2) for x in os.getloadavg()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=4096)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both (default: torch's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="hisa's prefill chunk (default: the engine's)")
    p.add_argument("--git-commit", default=None)
    p.add_argument("--out", type=Path, default=REPO / "bench/results/cpu_speed.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = machine()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    import transformers
    from hisa import LLM
    from hisa.models.loader import default_model_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = default_model_path()
    engine_kwargs = dict(device="cpu", dtype="float32", progress=False,
                         prefix_cache=False)  # each round re-sends the prompt: it must be prefilled
    if a.max_num_batched_tokens:
        engine_kwargs["max_num_batched_tokens"] = a.max_num_batched_tokens
    llm = LLM(**engine_kwargs)
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    ids = prompt_ids(llm.tokenizer, a.prompt_tokens)
    runners = {"hisa": lambda: run_hisa(llm, ids, a.decode_tokens),
               "transformers": lambda: run_transformers(hf, ids, a.decode_tokens)}
    run_hisa(llm, ids[:64], 2), run_transformers(hf, ids[:64], 2)  # warm-up: allocations, lazy inits
    rounds = []
    for r in range(a.rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        row = {"round": r, "order": order, "loadavg_1": round(os.getloadavg()[0], 2)}
        for name in order:
            res = runners[name]()
            row[name] = dict(prefill_s=round(res["prefill_s"], 3), decode_s=round(res["decode_s"], 3),
                             prefill_tok_s=round(len(ids) / res["prefill_s"], 1),
                             decode_tok_s=round(a.decode_tokens / res["decode_s"], 2))
            row[f"{name}_tokens"] = res["tokens"]
        row["same_tokens"] = sum(x == y for x, y in zip(row["hisa_tokens"], row["transformers_tokens"]))
        rounds.append(row)
        print(f"round {r}: " + "  ".join(f"{n} prefill {row[n]['prefill_tok_s']:.1f} tok/s decode "
                                        f"{row[n]['decode_tok_s']:.2f} tok/s" for n in runners)
              + f"  (load {row['loadavg_1']})", flush=True)
    med = {n: {k: statistics.median(r[n][k] for r in rounds) for k in ("prefill_tok_s", "decode_tok_s")}
           for n in runners}
    ratio = {k: round(med["hisa"][k] / med["transformers"][k], 3) for k in ("prefill_tok_s", "decode_tok_s")}
    print(f"\nSmolLM2-135M-Instruct (fp32, {torch.get_num_threads()} threads), {len(ids)}-token prompt, "
          f"{a.decode_tokens} decode tokens, median of {a.rounds} interleaved rounds:")
    print(f"{'':14s}{'prefill tok/s':>15s}{'decode tok/s':>15s}")
    for n in runners:
        print(f"{n:14s}{med[n]['prefill_tok_s']:15.1f}{med[n]['decode_tok_s']:15.2f}")
    print(f"{'hisa / hf':14s}{ratio['prefill_tok_s']:14.2f}x{ratio['decode_tok_s']:14.2f}x")
    print(f"greedy tokens equal: {[r['same_tokens'] for r in rounds]} of {a.decode_tokens + 1}")
    payload = dict(
        **header(torch.device("cpu"), a.git_commit),
        machine=dict(**machine(), loadavg_at_start=load_before["loadavg_1_5_15"]),
        versions=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version()),
        config=dict(model=str(path.name), dtype="float32", prompt_tokens=len(ids), decode_tokens=a.decode_tokens,
                    rounds=a.rounds, hisa_engine=engine_kwargs | {"max_num_batched_tokens": llm.engine.config.max_num_batched_tokens},
                    transformers_attn=getattr(hf.config, "_attn_implementation", None)),
        median=med, hisa_over_transformers=ratio,
        rounds=[{k: v for k, v in r.items() if not k.endswith("_tokens")} | {"same_tokens": r["same_tokens"]} for r in rounds],
    )
    write_json(a.out, payload)
    _plot(rounds, med, len(ids), a.out.with_suffix(".png"))
    return 0


def _plot(rounds, med, prompt_tokens: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for ax, key, title in ((axes[0], "prefill_tok_s", f"prefill ({prompt_tokens} tokens)"),
                           (axes[1], "decode_tok_s", "decode")):
        names = list(med)
        values = [med[n][key] for n in names]
        lo = [med[n][key] - min(r[n][key] for r in rounds) for n in names]
        hi = [max(r[n][key] for r in rounds) - med[n][key] for n in names]
        ax.bar(names, values, yerr=[lo, hi], capsize=6, color=["tab:blue", "tab:gray"])
        ax.set_title(title)
        ax.set_ylabel("tokens/s (median, min-max)")
    fig.suptitle(f"CPU, SmolLM2-135M fp32, {torch.get_num_threads()} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
