"""Accuracy grid: {dense + sparse algorithms} × {token budgets} × {context lengths} × {tasks} × {samples}.

The weights load once; every (algorithm, budget, length) gets its own engine over them. The grid
runs in *rounds*: round r holds sample r of every task at every length, run through dense first
(the reference) and then through every sparse row, so a run stopped early (``max_minutes``) still
has the same samples behind every cell. Each reply is scored (RULER string match) and, for sparse
rows, compared token by token with the dense reply to the same prompt. Optionally the mean KL of
the next-token distributions against dense is measured over the last ``kl_tokens`` tokens of one
long document per length, teacher-forced through sparse decode steps.

Budgets are token counts ("256") or fractions of the context length ("1/8" of 4096 = 512 tokens).
Sparse engines get ``min_prompt_len`` 1 unless told otherwise, so every eval prompt runs sparse, and
each sparse run is checked: the cache must report one sparse decode step per generated token after
the first (the first comes from the prefill, which is exact in every algorithm).

Example::

    from hisa.eval.runner import EvalGrid, parse_budgets, run_eval
    grid = EvalGrid(algorithms=["dense", "quest"], budgets=parse_budgets("256,1/8"), lengths=[1024],
                    tasks=["passkey"], samples=1)
    report = run_eval(grid, engine_kwargs=dict(device="cpu"), out="bench/results/eval_demo")
    print(report["rows"][1]["avg"])     # quest@256's mean score in [0, 1]
"""

from __future__ import annotations

import gc
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hisa.errors import ConfigError, check_number
from hisa.eval.fidelity import first_divergence, mean_kl, token_agreement, top1_agreement
from hisa.eval.scoring import score_sample
from hisa.eval.tasks import TASKS, TaskSample, derive_seed

DENSE = "dense"

DEFAULT_MAX_TOKENS: dict[str, int] = {
    "niah_single_1": 32, "niah_single_2": 32, "niah_single_3": 48,
    "niah_multikey_1": 32, "niah_multikey_2": 32, "niah_multikey_3": 48,
    "niah_multivalue": 64, "niah_multiquery": 64,
    "vt": 32, "cwe": 64, "fwe": 32, "passkey": 16,
}
"""Answer tokens generated per task (room for the whole answer; replies stop earlier at EOS)."""


# --------------------------------------------------------------------------- grid description

@dataclass(frozen=True, slots=True)
class Budget:
    """A token budget as the user wrote it: a token count ("256") or a fraction of the context ("1/8").

    Example::

        >>> parse_budget("1/8").resolve(4096), parse_budget("256").resolve(4096)
        (512, 256)
    """

    label: str
    tokens: int | None = None
    fraction: Fraction | None = None

    def resolve(self, length: int) -> int:
        """Tokens attended per step at a context of `length` tokens."""
        return self.tokens if self.tokens is not None else int(self.fraction * length)


def parse_budget(text: str) -> Budget:
    """"256" → 256 tokens; "1/8" or "0.125" → that fraction of each context length.

    Raises ConfigError for anything else (a word, zero, a fraction above 1, a non-whole count).
    """
    label = text.strip()
    try:
        value = Fraction(label)
    except (ValueError, ZeroDivisionError):
        value = None
    if value is None or value <= 0 or (value > 1 and (value.denominator != 1 or "/" in label or "." in label)):
        raise ConfigError(f"budget {text!r} is neither a token count (e.g. 256) nor a fraction of the context "
                          f"length in (0, 1] (e.g. 1/8 or 0.125)")
    if value > 1 or (value == 1 and "/" not in label and "." not in label):
        if value > 2**31:
            raise ConfigError(f"budget {text!r} is larger than any context (at most {2**31} tokens)")
        return Budget(label, tokens=int(value))
    return Budget(label, fraction=value)


def parse_budgets(text: str) -> list[Budget]:
    """A comma-separated list of budgets: "256,512,1/8"."""
    return [parse_budget(t) for t in split_list(text, "budgets")]


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty; give a comma-separated list")
    return items


def parse_lengths(text: str) -> list[int]:
    """A comma-separated list of context lengths in tokens: "2048,4096"."""
    out = []
    for t in split_list(text, "lengths"):
        if not (t.isascii() and t.isdigit()) or int(t) < 1:
            raise ConfigError(f"context length {t!r} is not a positive whole number of tokens")
        out.append(int(t))
    return out


@dataclass(slots=True)
class EvalGrid:
    """What to run. Validated at construction (unknown names and empty lists fail here).

    algorithms: "dense" (required: the reference) and registered sparse algorithms.
    budgets: token budgets for the sparse algorithms (dense ignores them).
    lengths: target context lengths in tokens (the user message; the chat template adds a few dozen).
    tasks: names from :data:`hisa.eval.tasks.TASKS`.
    samples: samples per task per length; seed: seeds the samples (and nothing else).
    round_size: samples per task in one round (one engine run per row and length): 1 keeps a run
        stopped early balanced at the finest grain; larger batches decode faster on a GPU.
    max_tokens: answer tokens for every task (None: :data:`DEFAULT_MAX_TOKENS`).
    kl_tokens: teacher-forced positions per length for the KL fidelity (0: off).
    max_minutes: start no round that would end past this (None: run every round).
    """

    algorithms: list[str]
    budgets: list[Budget]
    lengths: list[int]
    tasks: list[str]
    samples: int = 1
    seed: int = 0
    round_size: int = 1
    max_tokens: int | None = None
    kl_tokens: int = 0
    max_minutes: float | None = None

    def __post_init__(self) -> None:
        from hisa.sparse.base import registered_algorithms

        known = [DENSE, *registered_algorithms()]
        unknown = [a for a in self.algorithms if a not in known]
        if unknown:
            raise ConfigError(f"unknown algorithm(s) {', '.join(map(repr, unknown))}; choose from: {', '.join(known)}")
        if DENSE not in self.algorithms:
            raise ConfigError("--algorithms must include dense: it is the reference for scores and fidelity")
        for name, values in (("algorithms", self.algorithms), ("lengths", self.lengths), ("tasks", self.tasks),
                             ("budgets", [(b.tokens, b.fraction) for b in self.budgets])):  # 1/8 = 0.125
            if len(set(values)) != len(values):
                shown = [b.label for b in self.budgets] if name == "budgets" else values
                raise ConfigError(f"--{name} lists a value twice: {shown}")
        if self.sparse_algorithms and not self.budgets:
            raise ConfigError("sparse algorithms need at least one budget (--budgets 256,1/8)")
        if not self.lengths or any(not isinstance(n, int) or n < 1 for n in self.lengths):
            raise ConfigError(f"lengths must be positive token counts, got {self.lengths}")
        unknown = [t for t in self.tasks if t not in TASKS]
        if not self.tasks or unknown:
            raise ConfigError(f"unknown task(s) {unknown or '(none given)'}; choose from: {', '.join(TASKS)}")
        if self.samples < 1 or self.round_size < 1:
            raise ConfigError(f"samples and round_size must be >= 1, got {self.samples}, {self.round_size}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.kl_tokens < 0:
            raise ConfigError(f"kl_tokens must be >= 0, got {self.kl_tokens}")
        if self.max_minutes is not None:
            check_number("max_minutes", self.max_minutes, low=0, open_low=True)

    @property
    def sparse_algorithms(self) -> list[str]:
        return [a for a in self.algorithms if a != DENSE]

    def rows(self) -> list[tuple[str, Budget | None]]:
        """Table rows in order: dense once, then each sparse algorithm at each budget."""
        return [(DENSE, None)] + [(a, b) for a in self.sparse_algorithms for b in self.budgets]

    def answer_tokens(self, task: str) -> int:
        return self.max_tokens if self.max_tokens is not None else DEFAULT_MAX_TOKENS.get(task, 64)

    def to_dict(self) -> dict[str, Any]:
        return dict(algorithms=self.algorithms, budgets=[b.label for b in self.budgets], lengths=self.lengths,
                    tasks=self.tasks, samples=self.samples, seed=self.seed, round_size=self.round_size,
                    max_tokens={t: self.answer_tokens(t) for t in self.tasks}, kl_tokens=self.kl_tokens,
                    max_minutes=self.max_minutes)


def row_label(algorithm: str, budget: Budget | None) -> str:
    """"dense" or "quest@1/8"."""
    return algorithm if budget is None else f"{algorithm}@{budget.label}"


# --------------------------------------------------------------------------- prompts

def prompt_ids(tokenizer, sample: TaskSample) -> list[int]:
    """The sample as the model sees it: the chat template around the question, then the answer prefix
    opening the assistant turn (as RULER does). Without a chat template: prompt, newline, prefix."""
    prefix = tokenizer.encode(sample.answer_prefix, add_special_tokens=False)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": sample.prompt}],
                                            add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids) + prefix
    return tokenizer.encode(sample.prompt + "\n", add_special_tokens=True) + prefix


@dataclass(slots=True)
class _Item:
    sample: TaskSample
    length: int
    index: int
    ids: list[int]
    max_tokens: int


def _round_items(grid: EvalGrid, tokenizer, indices: range, context: int) -> dict[int, list[_Item]]:
    """Samples `indices` of every task at every length (seeds as generate_suite derives them)."""
    items: dict[int, list[_Item]] = {}
    for length in grid.lengths:
        items[length] = []
        for task in grid.tasks:
            for index in indices:
                seed = derive_seed(grid.seed, task, length, index)
                try:
                    sample = TASKS[task](tokenizer, target_tokens=length, seed=seed)
                except ValueError as e:   # the task's own text does not fit the length
                    raise ConfigError(f"length {length}, task {task}: {e}") from None
                ids = prompt_ids(tokenizer, sample)
                need = len(ids) + grid.answer_tokens(task)
                if need > context:
                    raise ConfigError(
                        f"length {length}: a {task} prompt is {len(ids)} tokens with the chat template, plus "
                        f"{grid.answer_tokens(task)} answer tokens = {need}, beyond the model's context of "
                        f"{context} tokens; use lengths up to about {context - (need - length)}")
                items[length].append(_Item(sample, length, index, ids, grid.answer_tokens(task)))
    return items


# --------------------------------------------------------------------------- running

class _Runner:
    """Holds the loaded model and builds one engine per (algorithm, budget, length)."""

    def __init__(self, grid: EvalGrid, *, engine_kwargs: dict, sparse_kwargs: dict, loaded, progress: bool):
        from hisa.config import EngineConfig
        from hisa.models.factory import load_model

        self.grid, self.progress = grid, progress
        self.engine_kwargs = {**engine_kwargs, "sparse": None}
        self.engine_kwargs.setdefault("progress", False)
        self.sparse_kwargs = dict(sparse_kwargs)
        self.sparse_kwargs.setdefault("min_prompt_len", 1)
        self.config = EngineConfig(**self.engine_kwargs)  # resolves device "auto" and validates
        self.loaded = loaded or load_model(self.config.model, device=self.config.torch_device,
                                           dtype=self.config.torch_dtype, progress=progress, seed=self.config.seed)
        if self.loaded.tokenizer is None:
            raise ConfigError("hisa eval needs a model with a tokenizer (the tasks are text); random:<preset> "
                              "models have none")
        mcfg = self.loaded.config
        self.context = self.config.max_model_len or mcfg.max_position_embeddings
        for length in grid.lengths:
            need = length + max(grid.answer_tokens(t) for t in grid.tasks)
            if need >= self.context:
                raise ConfigError(f"length {length} (+ answer tokens) is beyond the model's context of "
                                  f"{self.context} tokens; pick lengths below {self.context - need + length}")
        from hisa.engine.llm_engine import _check_sparse_algorithm

        for algorithm in grid.sparse_algorithms:   # (dsa needs a model with its indexer, and only dsa suits one)
            try:
                _check_sparse_algorithm(algorithm, mcfg)
            except ConfigError as e:
                raise ConfigError(f"--algorithms {algorithm}: {e}".replace("use --sparse dsa", "use dsa")
                                  .replace("--sparse dsa needs", "it needs")) from None
        for algorithm, budget in grid.rows()[1:]:  # every budget must fit sinks + window + one page
            for length in grid.lengths:
                self.sparse_config(algorithm, budget, length, batch=1)

    def sparse_config(self, algorithm: str, budget: Budget, length: int, *, batch: int):
        from hisa.sparse.config import SparseConfig

        tokens = budget.resolve(length)
        kwargs = dict(self.sparse_kwargs)
        kwargs["max_sparse_requests"] = max(1, min(kwargs.get("max_sparse_requests", batch), batch))
        try:
            cfg = SparseConfig(algorithm=algorithm, token_budget=max(tokens, 1), **kwargs)
            cfg.budget_pages(self.config.page_size)
        except ConfigError as e:   # (it says --token-budget, the flag of `hisa generate`: here it is --budgets)
            msg = str(e).replace("raise --token-budget", "raise the budget (--budgets)")
            raise ConfigError(f"budget {budget.label} at length {length} ({tokens} tokens): {msg}") from None
        return cfg

    def llm(self, algorithm: str, budget: Budget | None, length: int, *, batch: int):
        from hisa.llm import LLM

        sparse = None if budget is None else self.sparse_config(algorithm, budget, length, batch=batch)
        return LLM(loaded=self.loaded, **{**self.engine_kwargs, "sparse": sparse})

    def generate(self, llm, items: list[_Item]):
        from hisa.engine.sampling_params import SamplingParams

        params = [SamplingParams(max_tokens=it.max_tokens, temperature=0.0) for it in items]
        return llm.generate([it.ids for it in items], params, use_tqdm=self.progress)


def _check_ran_sparse(llm, outputs, label: str, length: int) -> dict[str, Any]:
    """The sparse cache's statistics for this run; raises if any generated token was decoded dense."""
    stats = llm.engine.sparse.summary()
    expected = sum(max(0, o.num_output_tokens - 1) for o in outputs)
    # overlap mode sees a stop one step late: a request that stopped on a token ran one more step,
    # whose token was dropped (hisa.engine.overlap); a preempted request recomputed some steps
    late = sum(o.finish_reason == "stop" for o in outputs) if llm.engine.overlap else 0
    preempted = any(o.num_preemptions for o in outputs)
    ran = stats["request_steps"]
    if ran < expected or (not preempted and ran > expected + late):
        raise RuntimeError(f"{label} at length {length}: {expected} sparse decode request-steps expected"
                           f"{f' (+ up to {late} for stops seen one step late)' if late else ''}, the sparse "
                           f"cache ran {ran}: " + ("some prompts ran dense (min_prompt_len too high?)"
                                                   if ran < expected else "steps counted that produced no token"))
    keep = ("decode_steps", "request_steps", "selected_pages", "hits", "misses", "hit_rate", "bytes_h2d")
    return {k: stats[k] for k in keep}


def _check_prompts(grid: EvalGrid, tokenizer, rounds: list[range], runner, *, progress: bool):
    """Before anything runs: every round's prompts can be made at every length, fit the context, and
    (where sparse rows are compared) reach min_prompt_len, so that a bad grid fails at once instead of
    after hours of rounds. The prompts are rebuilt per round (not kept: hundreds of 128K-token prompts);
    returns the first round's items."""
    min_prompt_len = runner.sparse_kwargs["min_prompt_len"]
    first = None
    for r, indices in enumerate(tqdm(rounds, desc="checking prompts", unit="round",
                                     disable=not progress or len(rounds) < 2)):
        items = _round_items(grid, tokenizer, indices, runner.context)
        if grid.sparse_algorithms:
            short = min((it for its in items.values() for it in its), key=lambda it: len(it.ids))
            if len(short.ids) < min_prompt_len:
                raise ConfigError(f"a {short.sample.task} prompt at length {short.length} is {len(short.ids)} "
                                  f"tokens, under --sparse-min-prompt-len {min_prompt_len}: its sparse rows would "
                                  f"run dense; lower it or raise --lengths")
        if r == 0:
            _check_kl_prefill(grid, items, min_prompt_len)
            first = items
    return first


def run_eval(grid: EvalGrid, *, engine_kwargs: dict | None = None, sparse_kwargs: dict | None = None,
             loaded=None, out: str | os.PathLike | None = None, progress: bool = True,
             command: str | None = None, chat_template: str | None = None) -> dict[str, Any]:
    """Run the grid; returns the report (and writes ``out``.json/.md/.png after every round when given).

    engine_kwargs: :class:`hisa.config.EngineConfig` fields (model, device, dtype, page_size, ...);
        its "sparse" is ignored. sparse_kwargs: :class:`hisa.sparse.config.SparseConfig` fields other
        than algorithm and token_budget (sink_pages, buffer_ratio, min_prompt_len, ...).
    loaded: a :class:`hisa.models.factory.LoadedModel` to reuse (e.g. a test's session model).
    chat_template: a Jinja template (or a file holding one) replacing the model's (`--chat-template`).
    Raises ConfigError (a HisaError) for a grid the model cannot run, before running anything.
    """
    from hisa.eval.report import summarize, write_report

    t_start = time.perf_counter()
    runner = _Runner(grid, engine_kwargs=dict(engine_kwargs or {}), sparse_kwargs=dict(sparse_kwargs or {}),
                     loaded=loaded, progress=progress)
    tokenizer = runner.loaded.tokenizer
    if chat_template is not None:
        from hisa.chat_template import load_chat_template, set_chat_template

        set_chat_template(tokenizer, load_chat_template(chat_template))
    report = _header(grid, runner, command)
    rows = grid.rows()
    rounds = [range(i, min(i + grid.round_size, grid.samples)) for i in range(0, grid.samples, grid.round_size)]
    first_items = _check_prompts(grid, tokenizer, rounds, runner, progress=progress)
    bar = tqdm(total=len(rounds) * len(grid.lengths) * len(rows), desc="eval", unit="run", disable=not progress)
    round_seconds: list[float] = []
    try:
        for r, indices in enumerate(rounds):
            elapsed = time.perf_counter() - t_start
            if r and grid.max_minutes is not None and elapsed + max(round_seconds) > grid.max_minutes * 60:
                report["stopped_early"] = (f"after {indices.start} of {grid.samples} samples: another round "
                                           f"(~{max(round_seconds):.0f} s) would pass max_minutes={grid.max_minutes}")
                break
            t_round = time.perf_counter()
            items = first_items if r == 0 else _round_items(grid, tokenizer, indices, runner.context)
            for length in grid.lengths:
                dense: dict[str, Any] = {}  # the reference: token ids per (task, index), KL logits
                for algorithm, budget in rows:
                    bar.set_postfix_str(f"samples {indices.start}-{indices.stop - 1} length {length} "
                                        f"{row_label(algorithm, budget)}")
                    _run_row(runner, report, algorithm, budget, items[length], dense, kl=r == 0)
                    bar.update(1)
            round_seconds.append(time.perf_counter() - t_round)
            report["samples_completed"] = indices.stop
            report["wall_seconds"] = time.perf_counter() - t_start
            report.update(summarize(report))
            if out is not None:
                write_report(report, out)
    finally:
        bar.close()
    report["wall_seconds"] = time.perf_counter() - t_start
    report.update(summarize(report))
    if out is not None:
        write_report(report, out)
    return report


def _check_kl_prefill(grid: EvalGrid, items: dict[int, list[_Item]], min_prompt_len: int) -> None:
    """Before anything runs: the KL's document (each length's first prompt, the chat template included)
    must leave a prefill once its last kl_tokens are decoded, of at least min_prompt_len tokens where
    sparse rows are compared (shorter would run dense)."""
    if not grid.kl_tokens:
        return
    least = max(1, min_prompt_len) if grid.sparse_algorithms else 1
    for length, batch in items.items():
        doc = len(batch[0].ids)
        if doc - grid.kl_tokens < least:
            why = (f"below min_prompt_len={min_prompt_len} (it would not run sparse)" if grid.sparse_algorithms
                   else "too short to prefill")
            raise ConfigError(f"kl_tokens={grid.kl_tokens} leaves a prefill of {doc - grid.kl_tokens} tokens of the "
                              f"{doc}-token document at length {length}, {why}; lower --kl-tokens to at most "
                              f"{doc - least}")


def _run_row(runner: _Runner, report: dict[str, Any], algorithm: str, budget: Budget | None, batch: list[_Item],
             dense: dict[str, Any], *, kl: bool) -> None:
    """One engine over one batch (one length): generate, score, compare with dense; maybe the KL."""
    label, length = row_label(algorithm, budget), batch[0].length
    t0 = time.perf_counter()
    llm = runner.llm(algorithm, budget, length, batch=len(batch))
    outputs = runner.generate(llm, batch)
    unit = dict(row=label, algorithm=algorithm, budget=budget.label if budget else None,
                budget_tokens=budget.resolve(length) if budget else None, length=length,
                indices=[batch[0].index, batch[-1].index], prompts=len(batch))
    if runner.config.device.startswith("cuda"):  # what this engine and the shared weights hold: flat across runs
        unit["device_allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 3)
    if budget is not None:
        unit["sparse_stats"] = _check_ran_sparse(llm, outputs, label, length)
    for item, o in zip(batch, outputs):
        rec = _record(item, o, unit)
        rec.update(_device_bytes(llm, len(item.ids) + o.num_output_tokens))
        key = (item.sample.task, item.index)
        if budget is None:
            dense[key] = list(o.token_ids)
        else:
            rec["agreement"] = token_agreement(dense[key], o.token_ids)
            rec["first_divergence"] = first_divergence(dense[key], o.token_ids)
        report["samples"].append(rec)
    kl_tokens = runner.grid.kl_tokens
    if kl and kl_tokens:
        doc = batch[0].ids  # a long document: the first prompt at this length
        steps = llm.engine.sparse.summary()["request_steps"] if budget is not None else 0
        # [kl_tokens + 1, V] fp32; row 0 comes from the prefill, dense in every row of the table: left out
        logits = llm.engine.score(doc, prefill_tokens=len(doc) - kl_tokens)[1:]
        if budget is not None and llm.engine.sparse.summary()["request_steps"] - steps != kl_tokens:
            raise RuntimeError(f"{label} at length {length}: the KL's {kl_tokens} decode steps did not all run "
                               f"sparse (min_prompt_len above the prefill of {len(doc) - kl_tokens} tokens?)")
        if budget is None:
            dense["logits"] = logits
        else:
            report["kl"].append(dict(row=label, length=length, positions=len(logits),
                                     document_task=batch[0].sample.task,
                                     mean_kl=mean_kl(dense["logits"], logits),
                                     top1_agreement=top1_agreement(dense["logits"], logits)))
    unit["seconds"] = time.perf_counter() - t0
    report["runs"].append(unit)
    del llm, outputs
    gc.collect()
    if runner.config.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the next engine sizes its KV pool from free memory


def _device_bytes(llm, tokens: int) -> dict[str, int]:
    """Device bytes one request of `tokens` tokens holds at its end: its whole KV (dense, or a resident
    sparse request) and the algorithm's representations (0 for dense; a host-backed request would
    hold its buffer instead of the KV, the same representations)."""
    engine = llm.engine
    data = engine.cache.data  # [layers, pages + 1, 2, S, KVH, D]
    pages = -(-tokens // engine.config.page_size)
    page_bytes = data[:, 0].numel() * data.element_size()
    meta = engine.sparse.algorithm.metadata_bytes_per_page() if engine.sparse is not None else 0
    return {"kv_bytes": pages * page_bytes, "metadata_bytes": pages * meta}


def _record(item: _Item, output, unit: dict[str, Any]) -> dict[str, Any]:
    s = item.sample
    return dict(row=unit["row"], algorithm=unit["algorithm"], budget=unit["budget"],
                budget_tokens=unit["budget_tokens"], length=item.length, task=s.task, index=item.index,
                seed=s.seed, depth=s.depth, prompt_tokens=len(item.ids), expected=s.expected,
                prediction=output.text, score=score_sample(s, output.text), output_token_ids=list(output.token_ids),
                finish_reason=output.finish_reason)


# --------------------------------------------------------------------------- provenance

def _header(grid: EvalGrid, runner: _Runner, command: str | None) -> dict[str, Any]:
    cfg, mcfg, src = runner.config, runner.loaded.config, runner.loaded.source
    device = cfg.device
    if device.startswith("cuda"):
        device_name = torch.cuda.get_device_name(cfg.torch_device)
    else:
        device_name = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, " \
                      f"{torch.get_num_threads()} torch threads"
    sk = runner.sparse_kwargs
    return {
        "command": command if command is not None else " ".join(sys.argv),
        "model": dict(name=mcfg.name, source=str(src.path) if src.path else src.preset, arch=mcfg.arch,
                      context=runner.context),
        "device": device, "device_name": device_name, "dtype": str(cfg.torch_dtype).replace("torch.", ""),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git": _git_state(), "versions": _versions(),
        "grid": grid.to_dict(),
        "sparse": dict(page_size=cfg.page_size, min_prompt_len=sk["min_prompt_len"],
                       **{k: v for k, v in sk.items() if k != "min_prompt_len"}),
        "budget_tokens": {b.label: {str(n): b.resolve(n) for n in grid.lengths} for b in grid.budgets},
        "samples_completed": 0, "stopped_early": None, "wall_seconds": 0.0,
        "samples": [], "runs": [], "kl": [],
    }


def _versions() -> dict[str, str | None]:
    """Versions of what decides the numbers: the tokenizer's converter (transformers) as much as torch."""
    from importlib.metadata import PackageNotFoundError, version

    from hisa import __version__

    out: dict[str, str | None] = {"hisa": __version__, "torch": torch.__version__}
    for name in ("triton", "transformers", "tokenizers", "gguf", "numpy"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _git_state() -> dict[str, Any]:
    """The commit of the hisa checkout this runs from (None outside a git checkout) and whether it is dirty.
    HISA_GIT_COMMIT, where set, wins: a copied tree may carry no .git, or a stale one."""
    given = os.environ.get("HISA_GIT_COMMIT")
    if given:
        return {"commit": given, "dirty": None, "source": "HISA_GIT_COMMIT"}
    where = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


__all__ = ["DENSE", "DEFAULT_MAX_TOKENS", "Budget", "EvalGrid", "parse_budget", "parse_budgets", "parse_lengths",
           "prompt_ids", "row_label", "run_eval"]
