"""The `hisa` command line: help, a real generation, and clear errors instead of tracebacks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from hisa.cli import main


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "generate" in out and "SmolLM2" in out and "examples:" in out


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/model.gguf", "--prompt", "hi"], "does not exist"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "max_tokens must be an integer >= 1"),
    (["generate", "--prompt-file", "/no/such/prompt.txt"], "cannot read prompt file"),
    (["generate"], "give a prompt"),
    (["generate", "--prompt", "hi", "--device", "tpu"], "device must be cpu, cuda, cuda:N or auto"),
    (["generate", "--prompt", "hi", "--temperature", "1e-40"], "temperature 1e-40 cannot be applied in fp32"),
    (["generate", "--prompt", "hi", "--sample-seed", "18446744073709551616"],
     "seed must be an integer in [0, 2**64 - 1]"),
    (["generate", "--prompt", "hi", "--chat-template", "/no/such/template.jinja"], "does not exist"),
    (["generate", "--prompt", "hi", "--chat-template", "{% if %}"], "the chat template does not compile"),
    (["generate", "--prompt", "hi", "--residency", "host", "--token-budget", "64"],
     "--token-budget, --residency are settings of the sparse cache, which is off: add --sparse ALGORITHM"),
    (["generate", "--prompt", "hi", "--system", "Answer in French", "--raw"], "--system goes into the chat template"),
    (["generate", "--prompt", "hi", "--model", "random:tiny-llama"], "has no tokenizer and hisa generate takes text"),
])
def test_bad_input_gets_one_line_error(capsys, argv, message):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_prompt_file_that_is_not_utf8_gets_one_line_error(capsys, tmp_path):
    path = tmp_path / "binary.bin"
    path.write_bytes(b"caf\xe9 \x00\xff\xfe")
    code, _, err = _run(capsys, "generate", "--prompt-file", str(path))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"prompt file '{path}' is not UTF-8 text: byte 0xe9 at offset 3" in err


def test_an_empty_prompt_is_refused_before_the_model_loads(capsys, tmp_path):
    """An empty file (a wrong path, an unfinished pipe) used to run: the chat template wrapped nothing."""
    empty, blank = tmp_path / "empty.txt", tmp_path / "blank.txt"
    empty.write_bytes(b"")
    blank.write_text(" \n\t\n")
    for argv, message in ((["--prompt-file", str(empty)], f"prompt file '{empty}' is empty"),
                          (["--prompt-file", str(blank)], "is empty (only whitespace)"),
                          (["--prompt", "  "], "--prompt is empty")):
        code, _, err = _run(capsys, "generate", *argv)
        assert code == 2 and message in err and "Traceback" not in err


def test_prompt_file_utf8_with_bom_is_read(tmp_path):
    from hisa.cli import decode_utf8

    assert decode_utf8("\ufeffcafé".encode("utf-8"), what="x") == "café"


def test_engine_flags_users_expect_reach_the_engine_config():
    from hisa.cli import build_parser, engine_kwargs

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--gpu-memory-utilization", "0.5",
                                      "--chat-template", "t.jinja"])
    assert engine_kwargs(args)["gpu_memory_utilization"] == 0.5 and args.chat_template == "t.jinja"
    serve = build_parser().parse_args(["serve", "--api-key", "k", "--gpu-memory-utilization", "0.6"])
    assert serve.api_key == "k" and engine_kwargs(serve)["gpu_memory_utilization"] == 0.6
    assert engine_kwargs(args)["prefix_cache"] is True  # on unless turned off
    off = build_parser().parse_args(["serve", "--no-prefix-cache"])
    assert engine_kwargs(off)["prefix_cache"] is False
    assert engine_kwargs(args)["overlap"] == "auto"  # on for CUDA, off on the CPU
    assert engine_kwargs(build_parser().parse_args(["serve", "--overlap"]))["overlap"] is True
    assert engine_kwargs(build_parser().parse_args(["serve", "--no-overlap"]))["overlap"] is False
    assert engine_kwargs(args)["kv_cache_dtype"] == "auto"
    assert engine_kwargs(build_parser().parse_args(["serve", "--kv-cache-dtype", "fp8"]))["kv_cache_dtype"] == "fp8"


def test_unsupported_architecture(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon"}))
    code, _, err = _run(capsys, "generate", "--model", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "unsupported architecture 'falcon'" in err and "llama" in err


def test_prompt_longer_than_context(capsys):
    code, _, err = _run(capsys, "generate", "--prompt", "word " * 400, "--max-model-len", "256", "--quiet")
    assert code == 2 and "tokens but the model's context is 256 tokens" in err


def test_generate_end_to_end_in_a_subprocess():
    """The installed entry point answers a question with the embedded model and its chat template."""
    proc = subprocess.run(
        [sys.executable, "-m", "hisa.cli", "generate", "--prompt", "What is the capital of France?",
         "--max-tokens", "24", "--json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in result["text"] and result["finish_reason"] == "stop"
    summary = proc.stderr.strip().splitlines()[-1]  # what happened: prefill and decode, each with its rate
    assert re.search(r"\d+ prompt \+ \d+ output tokens: prefill \d+ tok in [\d.]+s \([\d.]+ tok/s\), "
                     r"decode \d+ tok in [\d.]+s \([\d.]+ tok/s\); finish: stop", summary), summary


def test_readme_main_command_answers_with_the_sparse_cache():
    """The README's main command, as written there, answers from the bundled document and prints stats."""
    import re
    import shlex
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    first = re.search(r"```bash\n(.*?)\n```", readme, re.S).group(1)
    setup, command = first.split(" && ", 1)
    assert setup == "bash scripts/setup.sh"
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/hisa" and "--sparse" in argv and "--stats" in argv
    proc = subprocess.run([sys.executable, "-m", "hisa.cli", *argv[1:], "--max-tokens", "24"], cwd=root,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "SKP-7319" in proc.stdout
    hit_rate = float(re.search(r"hit rate ([\d.]+)%", proc.stdout + proc.stderr).group(1))
    assert hit_rate > 50, proc.stdout


@pytest.mark.parametrize("algorithm", ["lowbit", "lowbit-2bit"])
def test_lowbit_is_selectable_in_generate_and_eval(algorithm):
    """`--sparse lowbit` reaches the engine's SparseConfig; `hisa eval --algorithms dense,lowbit` is a valid grid."""
    from hisa.cli import build_parser, engine_kwargs
    from hisa.eval.runner import EvalGrid, parse_budgets

    args = build_parser().parse_args(["generate", "--prompt", "hi", "--sparse", algorithm, "--token-budget", "256"])
    assert engine_kwargs(args)["sparse"].algorithm == algorithm
    args = build_parser().parse_args(["eval", "--algorithms", f"dense,quest,{algorithm}", "--budgets", "1/8"])
    grid = EvalGrid(algorithms=args.algorithms.split(","), budgets=parse_budgets(args.budgets), lengths=[2048],
                    tasks=["passkey"])
    assert grid.sparse_algorithms == ["quest", algorithm]


def test_dense_layers_flag_reaches_the_sparse_config(capsys):
    from hisa.cli import build_parser, engine_kwargs

    argv = ["generate", "--prompt", "hi", "--sparse", "lowbit", "--dense-layers", "2", "--residency", "device"]
    assert engine_kwargs(build_parser().parse_args(argv))["sparse"].dense_layers == 2
    code, _, err = _run(capsys, "generate", "--prompt", "hi", "--sparse", "quest", "--dense-layers", "2")
    assert code == 2 and "needs residency='device'" in err and "Traceback" not in err


def test_without_max_tokens_a_long_prompt_gets_what_the_context_has_left(capsys):
    """--max-tokens left out: at most 256 new tokens, and no more than the context leaves (not a refusal)."""
    code, out, err = _run(capsys, "generate", "--prompt", "one two three four five six seven eight nine ten " * 4,
                          "--raw", "--max-model-len", "64", "--device", "cpu", "--json", "--quiet")
    assert code == 0, err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["prompt_tokens"] + len(row["token_ids"]) == 64 and row["finish_reason"] == "length"
