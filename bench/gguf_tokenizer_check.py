"""How the installed transformers converts a GGUF file's tokenizer, checked against the file.

Prints and writes (to --out, JSON) the installed transformers version, hisa's tokenizer check
(`hisa.models.loader.gguf_tokenizer_problem`), and the eval's first niah_single_3 prompt at
--length tokens: its token count and first pieces. Run it under two transformers versions to see
whether they tokenize the eval prompts the same (the Gemma-3 runs of docs/eval.md on the GPU
machine, whose image has transformers 5.17, did not: see "Gemma-3-270M" there).

Usage::

    python bench/gguf_tokenizer_check.py --model gemma3-270m --out bench/results/gguf_tokenizer_gemma_5.23.json
    PYTHONPATH=/tmp/tf517 python bench/gguf_tokenizer_check.py --model gemma3-270m --out ...  # another version
"""

from __future__ import annotations

import argparse
import datetime
import json

import transformers
from transformers import AutoTokenizer

from hisa.eval.runner import prompt_ids
from hisa.eval.tasks import TASKS, derive_seed
from hisa.models import loader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--out")
    args = ap.parse_args()
    path = loader.resolve_model(args.model).path
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)  # the raw conversion, unchecked
    reader = loader.open_gguf(path)
    problem = loader.gguf_tokenizer_problem(
        tok, loader._field(reader, "tokenizer.ggml.tokens", []), model=loader._field(reader, "tokenizer.ggml.model", ""),
        add_bos=bool(loader._field(reader, "tokenizer.ggml.add_bos_token", False)),
        bos_id=loader._field(reader, "tokenizer.ggml.bos_token_id"))
    sample = TASKS["niah_single_3"](tok, target_tokens=args.length, seed=derive_seed(0, "niah_single_3", args.length, 0))
    ids = prompt_ids(tok, sample)
    report = {"command": f"python bench/gguf_tokenizer_check.py --model {args.model} --length {args.length}",
              "date": datetime.date.today().isoformat(), "model": path.name,
              "transformers": transformers.__version__, "check": problem or "ok",
              "niah_single_3_prompt_tokens": len(ids), "first_pieces": tok.convert_ids_to_tokens(ids[:12])}
    print(json.dumps(report, indent=1, ensure_ascii=False))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, ensure_ascii=False)


if __name__ == "__main__":
    main()
