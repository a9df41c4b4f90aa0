"""`hisa eval`: accuracy of dense and sparse attention on the synthetic long-context tasks.

`add_eval_parser(sub)` adds the subcommand to hisa's argparse subparsers and sets `func` to
:func:`run_eval_command`. The engine flags come from :func:`hisa.cli.add_engine_args` and reach the
engine through :func:`hisa.cli.engine_kwargs`; the three per-run sparse flags (--sparse,
--token-budget) are replaced by the grid's --algorithms and --budgets. Also runs alone:

    python -m hisa.eval.cli --device cpu --lengths 1024 --tasks passkey --samples 2
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from hisa.errors import HisaError

EXAMPLES = """\
examples:
  hisa eval --lengths 2048,4096 --budgets 256,512,1/8 --samples 10      # writes bench/results/eval_smollm2.*
  hisa eval --algorithms dense,quest --budgets 1/8 --lengths 1024 --tasks passkey,vt --samples 2 --device cpu
  hisa eval --device cuda --round-size 10 --samples 20 --kl-tokens 128 --max-minutes 30

Budgets are token counts (256) or fractions of each context length (1/8 of 4096 = 512 tokens).
Tasks: niah_single_1..3, niah_multikey_1..3, niah_multivalue, niah_multiquery, vt, cwe, fwe, passkey.
"""

DEFAULT_TASKS = "niah_single_1,niah_single_2,niah_single_3,niah_multikey_1,niah_multivalue,niah_multiquery,fwe"
"""The tasks SmolLM2-135M scores above zero on with dense attention (docs/eval.md)."""


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Add `eval` to hisa's subparsers."""
    from hisa.cli import add_engine_args

    p = subparsers.add_parser(
        "eval", help="accuracy of dense vs sparse attention on long-context tasks (RULER-style)",
        description="Run a grid of algorithms x token budgets x context lengths x tasks x samples on one model, "
                    "score every reply, compare sparse replies with dense ones, and write JSON, a markdown "
                    "table and a plot. See docs/eval.md.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("grid")
    g.add_argument("--algorithms", default="dense,quest,oracle,streaming",
                   help="comma-separated; dense is required (the reference) (default: dense,quest,oracle,streaming)")
    g.add_argument("--budgets", default="1/16,1/8,1/4",
                   help="token budgets for the sparse algorithms: tokens (256) or fractions of the context "
                        "(1/8) (default: 1/16,1/8,1/4)")
    g.add_argument("--lengths", default="2048,4096", help="context lengths in tokens (default: 2048,4096)")
    g.add_argument("--tasks", default=DEFAULT_TASKS, help=f"comma-separated task names (default: {DEFAULT_TASKS})")
    g.add_argument("--samples", type=int, default=4, help="samples per task per length (default: 4)")
    g.add_argument("--round-size", type=int, default=1,
                   help="samples per task run together in one round; larger is faster on a GPU (default: 1)")
    g.add_argument("--max-tokens", type=int, default=None,
                   help="answer tokens for every task (default: per task, 16 to 64)")
    g.add_argument("--kl-tokens", type=int, default=0,
                   help="also measure mean KL to dense over the last N tokens of one prompt per length, "
                        "teacher-forced (default: 0, off)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="start no round that would end after this many minutes; cells report their n "
                        "(default: no limit)")
    g.add_argument("--out", default=None,
                   help="output path prefix: writes PREFIX.json, PREFIX.md, PREFIX.png "
                        "(default: bench/results/eval_<model>)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_engine_args(p)
    for action in p._actions:  # per-run sparse flags: the grid sets them for each row
        if action.dest in ("sparse", "token_budget"):
            action.help = argparse.SUPPRESS
        elif action.dest == "seed":
            action.help = "seeds the task samples and the engine (default: 0)"
        elif action.dest == "sparse_min_prompt_len":
            action.help = "shorter prompts run dense (default for eval: 1, so every eval prompt runs sparse)"
    p.set_defaults(func=run_eval_command, sparse=None, token_budget=None, sparse_min_prompt_len=1)
    return p


def default_out(model: str | None) -> str:
    """bench/results/eval_<model>: smollm2 for the embedded default, else the name or file stem."""
    if not model:
        name = "smollm2"
    else:
        name = re.sub(r"\.(gguf|safetensors)$", "", model.rstrip("/").split("/")[-1])
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-").lower() or "model"
    return f"bench/results/eval_{name}"


def run_eval_command(args: argparse.Namespace) -> int:
    """Parse the grid, run it, print the table and where the files went."""
    from hisa.cli import engine_kwargs, writable_out
    from hisa.eval.runner import EvalGrid, parse_budgets, parse_lengths, run_eval, split_list

    if args.sparse is not None or args.token_budget is not None:
        raise HisaError("hisa eval takes --algorithms and --budgets (it runs every combination), "
                        "not --sparse / --token-budget")
    grid = EvalGrid(algorithms=split_list(args.algorithms, "algorithms"), budgets=parse_budgets(args.budgets),
                    lengths=parse_lengths(args.lengths), tasks=split_list(args.tasks, "tasks"),
                    samples=args.samples, seed=args.seed, round_size=args.round_size, max_tokens=args.max_tokens,
                    kl_tokens=args.kl_tokens, max_minutes=args.max_minutes)
    kwargs = engine_kwargs(args, sparse_flags_need_sparse=False)   # (its sparse rows take them)
    kwargs["progress"] = not args.quiet
    sparse_kwargs = dict(buffer_ratio=args.buffer_ratio, sink_pages=args.sink_pages, recent_pages=args.recent_pages,
                         min_prompt_len=args.sparse_min_prompt_len, host_pool_gb=args.host_pool_gb,
                         residency=args.residency, max_sparse_requests=args.max_sparse_requests,
                         dense_layers=args.dense_layers, decode_streams=args.decode_streams)
    out = args.out or default_out(args.model)
    if Path(out).name in ("", ".", "..") or Path(out).is_dir():
        raise HisaError(f"--out {out} is a directory; give a path prefix, e.g. {Path(out) / 'eval'}")
    for ext in ("json", "md", "png"):   # before the run: a bad path must not lose its results
        writable_out(f"{out}.{ext}")
    report = run_eval(grid, engine_kwargs=kwargs, sparse_kwargs=sparse_kwargs, out=out, progress=not args.quiet,
                      command=_command_line(args), chat_template=args.chat_template)
    from hisa.eval.report import markdown

    print(markdown(report))
    print(f"[hisa] wrote {out}.json, {out}.md, {out}.png ({report['wall_seconds'] / 60:.1f} min)", file=sys.stderr)
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (`hisa eval ...` or `python -m hisa.eval.cli ...`), else the grid spelled out."""
    if sys.argv[1:2] == ["eval"]:
        return "hisa " + shlex.join(sys.argv[1:])
    if sys.argv[0].endswith(("eval/cli.py", "eval\\cli.py")):
        return "python -m hisa.eval.cli " + shlex.join(sys.argv[1:])
    return "hisa eval " + _spelled_out(args)


def _spelled_out(args: argparse.Namespace) -> str:
    """The grid options as flags (when called from Python with an argv of its own)."""
    opts = [f"--algorithms {args.algorithms}", f"--budgets {args.budgets}", f"--lengths {args.lengths}",
            f"--tasks {args.tasks}", f"--samples {args.samples}", f"--seed {args.seed}",
            f"--round-size {args.round_size}", f"--device {args.device}", f"--dtype {args.dtype}"]
    if args.model:
        opts.insert(0, f"--model {shlex.quote(args.model)}")
    if args.kl_tokens:
        opts.append(f"--kl-tokens {args.kl_tokens}")
    if args.max_tokens:
        opts.append(f"--max-tokens {args.max_tokens}")
    return " ".join(opts)


def main(argv: list[str] | None = None) -> int:
    from hisa.cli import run_parser

    parser = argparse.ArgumentParser(prog="python -m hisa.eval.cli")
    add_eval_parser(parser.add_subparsers(dest="command"))
    return run_parser(parser, ["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
