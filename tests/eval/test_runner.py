"""`hisa eval`'s runner: a tiny grid end to end on the embedded SmolLM2, budgets, and clear errors."""

from __future__ import annotations

import json

import pytest

from hisa.cli import main
from hisa.errors import ConfigError
from hisa.eval.runner import EvalGrid, parse_budget, parse_budgets, parse_lengths, run_eval

LENGTH = 512  # ~1K would be closer to real use, but costs minutes on a shared 2-core CPU
TASKS = ["passkey", "niah_single_1"]
FULL, SMALL = "1024", "1/8"  # 1024 tokens cover prompt + answer; 1/8 of 512 = 64 tokens (4 pages)


@pytest.fixture(scope="module")
def grid_run(smollm2, tmp_path_factory):
    """dense + quest + oracle at a full and a small budget, one sample of two tasks at ~512 tokens."""
    out = tmp_path_factory.mktemp("eval") / "eval_tiny"
    grid = EvalGrid(algorithms=["dense", "quest", "oracle"], budgets=parse_budgets(f"{FULL},{SMALL}"),
                    lengths=[LENGTH], tasks=TASKS, samples=1, max_tokens=5, kl_tokens=2)
    report = run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=smollm2, out=out,
                      progress=False, command="pytest")
    return report, out


@pytest.mark.slow
def test_writes_json_markdown_and_plot(grid_run):
    report, out = grid_run
    saved = json.loads(out.with_name(out.name + ".json").read_text())
    for key in ("command", "model", "device", "date", "git", "samples", "cells", "rows"):
        assert key in saved
    assert saved["device"] == "cpu" and saved["model"]["context"] == 8192
    assert len(saved["samples"]) == 5 * len(TASKS)  # dense once + 2 algorithms x 2 budgets
    md = out.with_name(out.name + ".md").read_text()
    assert "| quest@1/8 | 64 |" in md and f"{LENGTH} passkey" in md and "Δ vs dense" in md
    assert out.with_name(out.name + ".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cells_carry_n_and_budgets_resolve(grid_run):
    report, _ = grid_run
    assert {c["row"] for c in report["cells"]} == {"dense", f"quest@{FULL}", "quest@1/8", f"oracle@{FULL}", "oracle@1/8"}
    assert all(c["n"] == 1 for c in report["cells"])
    assert all(r["n"] == len(TASKS) for r in report["rows"])
    assert report["budget_tokens"] == {FULL: {str(LENGTH): 1024}, SMALL: {str(LENGTH): LENGTH // 8}}
    for run in report["runs"]:  # every sparse run really decoded sparse
        assert run["algorithm"] == "dense" or run["sparse_stats"]["decode_steps"] > 0
    meta = {r["row"]: r["metadata_bytes_per_request"] for r in report["rows"]}
    assert meta["dense"] == 0 and meta["oracle@1/8"] == 0 and meta["quest@1/8"] > 0  # device bytes per request
    assert all(r["kv_bytes_per_request"] > 0 for r in report["rows"])


@pytest.mark.slow
def test_full_budget_matches_dense(grid_run):
    report, _ = grid_run
    dense = {r["task"]: r for r in report["samples"] if r["row"] == "dense"}
    for rec in report["samples"]:
        if rec["budget"] == FULL:
            assert rec["agreement"] == 1.0 and rec["first_divergence"] is None
            assert rec["output_token_ids"] == dense[rec["task"]]["output_token_ids"]
            assert rec["score"] == dense[rec["task"]]["score"]
    for kl in report["kl"]:
        assert kl["positions"] == 2   # the decoded positions only (not the prefill's, dense in every row)
        if kl["row"].endswith(f"@{FULL}"):
            assert kl["mean_kl"] < 1e-4 and kl["top1_agreement"] == 1.0


@pytest.mark.parametrize("text, tokens_at_4096", [("256", 256), ("1/8", 512), ("0.125", 512), ("1/1", 4096)])
def test_budget_parsing(text, tokens_at_4096):
    assert parse_budget(text).resolve(4096) == tokens_at_4096


@pytest.mark.parametrize("text", ["abc", "0", "-8", "2.5", "1/0", "3/2", "2/1", "8/4", ""])
def test_bad_budget_is_a_config_error(text):
    with pytest.raises(ConfigError, match="neither a token count"):
        parse_budget(text)


def test_a_budget_larger_than_any_context_is_refused():
    with pytest.raises(ConfigError, match="larger than any context"):
        parse_budget("1e400")   # (it ran the whole grid, then the plot failed on it)


@pytest.mark.parametrize("kwargs, message", [
    (dict(algorithms=["dense", "magic"]), "unknown algorithm(s) 'magic'; choose from: dense, dsa, lowbit, lowbit-2bit, lowbit-best, lowbit-max, oracle, quest, quest-mean, streaming"),
    (dict(algorithms=["quest"]), "must include dense"),
    (dict(tasks=["niah_none"]), "unknown task(s)"),
    (dict(budgets=[]), "need at least one budget"),
    (dict(samples=0), "must be >= 1"),
    (dict(budgets=parse_budgets("1/8,0.125")), "--budgets lists a value twice: ['1/8', '0.125']"),
    (dict(max_minutes=float("nan")), "max_minutes must be a finite number > 0"),
])
def test_bad_grid_is_a_config_error(kwargs, message):
    args = dict(algorithms=["dense", "quest"], budgets=parse_budgets("256"), lengths=[1024], tasks=["passkey"])
    with pytest.raises(ConfigError) as e:
        EvalGrid(**{**args, **kwargs})
    assert message in str(e.value)


def test_length_beyond_the_context_fails_before_running(smollm2):
    grid = EvalGrid(algorithms=["dense"], budgets=[], lengths=[2048, 9000], tasks=["passkey"])
    with pytest.raises(ConfigError, match="length 9000 .* beyond the model's context of 8192 tokens"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=smollm2, progress=False)


def test_budget_below_the_window_fails_before_running(smollm2):
    grid = EvalGrid(algorithms=["dense", "quest"], budgets=parse_budgets("1/64"), lengths=[1024], tasks=["passkey"])
    with pytest.raises(ConfigError, match=r"budget 1/64 at length 1024 \(16 tokens\)"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=smollm2, progress=False)


@pytest.mark.parametrize("argv, message", [
    (["eval", "--budgets", "256,abc"], "budget 'abc' is neither a token count"),
    (["eval", "--algorithms", "dense,magic"], "unknown algorithm(s) 'magic'"),
    (["eval", "--lengths", "2k"], "context length '2k' is not a positive whole number"),
    (["eval", "--lengths", "512,\u00b2"], "is not a positive whole number"),
    (["eval", "--sparse", "quest"], "takes --algorithms and --budgets"),
])
def test_cli_errors_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_kl_tokens_that_leave_too_short_a_prefill_fail_before_running(smollm2):
    """Checked on the real document (the chat template included), not the target length."""
    grid = EvalGrid(algorithms=["dense", "quest"], budgets=parse_budgets("1/8"), lengths=[512], tasks=["passkey"],
                    max_tokens=2, kl_tokens=32)
    with pytest.raises(ConfigError, match="kl_tokens=32 leaves a prefill of .* below min_prompt_len=480"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), sparse_kwargs=dict(min_prompt_len=480),
                 loaded=smollm2, progress=False)


def test_prompts_of_every_round_are_checked_before_running(smollm2, tmp_path):
    """A length too short for a task's own text fails at once with one line, not after the first
    rounds have run (the task generator's ValueError escaped as a traceback)."""
    grid = EvalGrid(algorithms=["dense"], budgets=[], lengths=[84], tasks=["niah_multiquery"], samples=3,
                    round_size=1, max_tokens=2)
    with pytest.raises(ConfigError, match="length 84, task niah_multiquery: the prompt without filler"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=smollm2, progress=False,
                 out=tmp_path / "e")
    assert not list(tmp_path.iterdir())   # nothing ran, nothing written


def test_sparse_rows_whose_prompts_would_run_dense_fail_before_running(smollm2):
    grid = EvalGrid(algorithms=["dense", "quest"], budgets=parse_budgets("64"), lengths=[128],
                    tasks=["niah_single_1"], max_tokens=2, kl_tokens=0)
    with pytest.raises(ConfigError, match="under --sparse-min-prompt-len 5000: its sparse rows would run dense"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), sparse_kwargs=dict(min_prompt_len=5000),
                 loaded=smollm2, progress=False)


def test_dsa_on_a_model_without_an_indexer_fails_before_running(smollm2):
    grid = EvalGrid(algorithms=["dense", "dsa"], budgets=parse_budgets("64"), lengths=[128],
                    tasks=["niah_single_1"], max_tokens=2)
    with pytest.raises(ConfigError, match="--algorithms dsa: it needs a model with DSA's indexer"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=smollm2, progress=False)


def test_the_chat_template_given_is_the_one_applied(smollm2, tmp_path):
    """--chat-template was accepted by `hisa eval` and ignored (the results said it was used)."""
    import copy

    loaded = copy.copy(smollm2)
    loaded.tokenizer = copy.deepcopy(smollm2.tokenizer)   # (the session's model keeps its own template)
    grid = EvalGrid(algorithms=["dense"], budgets=[], lengths=[128], tasks=["niah_single_1"], max_tokens=1,
                    kl_tokens=0)
    with pytest.raises(ConfigError, match="does not compile"):
        run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=loaded, progress=False,
                 chat_template="{{broken")
    plain = run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=loaded, progress=False)
    mine = run_eval(grid, engine_kwargs=dict(device="cpu", dtype="float32"), loaded=loaded, progress=False,
                    chat_template="{% for m in messages %}[{{ m['content'] }}]{% endfor %}ANSWER:")
    def prompt_tokens(report):
        return [s["prompt_tokens"] for s in report["samples"]]
    assert prompt_tokens(mine) != prompt_tokens(plain)


def test_a_failed_write_keeps_the_last_round_written(tmp_path, monkeypatch):
    """The files are renamed over whole: a write that fails (a full disk) leaves the previous round's
    JSON readable, and the error is a HisaError (one line), not a traceback."""
    from hisa.errors import HisaError
    from hisa.eval import report as report_mod

    good = {"model": {"name": "m"}, "device": "cpu", "dtype": "float32", "samples_completed": 1, "rows": []}
    monkeypatch.setattr(report_mod, "markdown", lambda r: "table\n")
    monkeypatch.setattr(report_mod, "plot", lambda r, path: path.write_bytes(b"png"))
    report_mod.write_report(good, tmp_path / "e")

    def full_disk(report, path):
        path.write_bytes(b"half a pl")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report_mod, "plot", full_disk)
    with pytest.raises(HisaError, match="No space left on device"):
        report_mod.write_report({**good, "samples_completed": 2}, tmp_path / "e")
    assert json.loads((tmp_path / "e.json").read_text())["samples_completed"] == 2   # (the json went first)
    assert (tmp_path / "e.png").read_bytes() == b"png"                               # the old plot, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.json", "e.md", "e.png"]  # no temporary left


@pytest.mark.parametrize("argv, message", [
    (["eval", "--out", "{file}/sub/e"], "cannot make the folder of --out"),
])
def test_an_unwritable_out_fails_before_loading(capsys, tmp_path, argv, message):
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_parse_lengths():
    assert parse_lengths("2048, 4096") == [2048, 4096]


def test_device_metadata_bytes_per_request_per_algorithm():
    """What `hisa eval` reports beside each score: a request's representation bytes on the device.
    Quest keeps 2 key summaries per page (1/page_size of the KV in the same dtype); lowbit a 4-bit
    key per token plus an fp16 (step, min) per group of channels; dense and oracle keep nothing."""
    import torch

    from hisa.eval.runner import _device_bytes
    from hisa.llm import LLM
    from hisa.models.factory import load_model
    from hisa.sparse.config import SparseConfig

    tiny = load_model("random:tiny-llama", device=torch.device("cpu"), dtype=torch.float32, progress=False)
    d = tiny.config.head_dim  # 16: lowbit has one group of 16 channels per key
    ratio = {}
    for algorithm in ("dense", "quest", "lowbit", "oracle"):
        sparse = None if algorithm == "dense" else SparseConfig(algorithm=algorithm, token_budget=96,
                                                                 host_pool_gb=0.01)
        llm = LLM(loaded=tiny, device="cpu", dtype="float32", progress=False, page_size=16, max_model_len=512,
                  sparse=sparse)
        got = _device_bytes(llm, 1000)  # 63 pages
        assert got["kv_bytes"] == 63 * tiny.config.num_layers * 2 * 16 * tiny.config.num_kv_heads * d * 4
        ratio[algorithm] = got["metadata_bytes"] / got["kv_bytes"]
    assert ratio["dense"] == ratio["oracle"] == 0
    assert ratio["quest"] == pytest.approx(1 / 16)
    assert ratio["lowbit"] == pytest.approx((d // 2 + 4) / (2 * d * 4))  # 12 of the 128 bytes of fp32 K+V


def test_the_sparse_check_allows_the_step_overlap_mode_runs_after_a_stop(smollm2):
    """Overlap mode sees a stop token one step late: the request ran one more (dropped) step. The
    check that every sparse row decoded sparse counts it as such instead of failing the grid (it
    failed a SmolLM2 grid on the GPU, where overlap is on by default, 820 steps against 801)."""
    from hisa.engine.sampling_params import SamplingParams
    from hisa.eval.runner import _check_ran_sparse
    from hisa.llm import LLM
    from hisa.sparse.config import SparseConfig

    prompt = smollm2.tokenizer.encode("Repeat the word once and stop: apple. " * 12)
    llm = LLM(loaded=smollm2, device="cpu", dtype="float32", progress=False, overlap=True,
              sparse=SparseConfig(algorithm="quest", token_budget=64, min_prompt_len=32))
    outs = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0.0), use_tqdm=False)
    assert llm.engine.overlap and outs[0].finish_reason == "stop"  # the case under test
    stats = _check_ran_sparse(llm, outs, "quest@64", len(prompt))
    assert stats["request_steps"] == outs[0].num_output_tokens  # the one late step counted, no more
    llm.close()
