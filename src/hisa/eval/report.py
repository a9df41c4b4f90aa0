"""Aggregates, the markdown table, the plot and the JSON of an eval run (see :mod:`hisa.eval.runner`).

Pure functions over the report dict the runner builds: ``summarize`` turns its per-sample records
into per-cell and per-row aggregates (each with the number of samples behind it), ``markdown``
renders them, ``plot`` draws score against budget, ``write_report`` writes all three.

Scores are kept in [0, 1] in the JSON and shown ×100 (points) in the table and the plot. A row's
average at one length is the mean of its task scores there (every task weighs the same, as RULER
averages); its overall average is the mean over lengths.

Example::

    report = run_eval(grid, engine_kwargs=dict(device="cpu"))
    print(markdown(report))
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from hisa.errors import HisaError

DENSE = "dense"


def _row_labels(grid: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """(label, algorithm, budget label) for every row, dense first."""
    rows = [(DENSE, DENSE, None)]
    rows += [(f"{a}@{b}", a, b) for a in grid["algorithms"] if a != DENSE for b in grid["budgets"]]
    return rows


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """{"cells": [...], "rows": [...]} from ``report["samples"]``.

    A cell is (row, length, task): mean score, n, and for sparse rows the mean token agreement with
    dense. A row holds per-length averages and the overall average, its difference from dense with
    a paired standard error (over the same prompts), and the KL fidelity where measured.
    """
    grid = report["grid"]
    by_cell: dict[tuple[str, int, str], list[dict]] = defaultdict(list)
    for rec in report["samples"]:
        by_cell[(rec["row"], rec["length"], rec["task"])].append(rec)
    dense_score = {(r["length"], r["task"], r["index"]): r["score"] for r in report["samples"] if r["row"] == DENSE}
    kl = {(k["row"], k["length"]): k for k in report.get("kl", [])}

    cells, rows = [], []
    for label, algorithm, budget in _row_labels(grid):
        per_length: dict[str, dict[str, Any]] = {}
        diffs: list[float] = []
        for length in grid["lengths"]:
            task_scores, agreements, n = [], [], 0
            for task in grid["tasks"]:
                recs = by_cell.get((label, length, task), [])
                if not recs:
                    continue
                cell = dict(row=label, algorithm=algorithm, budget=budget, budget_tokens=recs[0]["budget_tokens"],
                            length=length, task=task, score=mean(r["score"] for r in recs), n=len(recs))
                if budget is not None:
                    cell["agreement"] = mean(r["agreement"] for r in recs)
                    agreements += [r["agreement"] for r in recs]
                    diffs += [r["score"] - dense_score[(length, task, r["index"])] for r in recs
                              if (length, task, r["index"]) in dense_score]
                cells.append(cell)
                task_scores.append(cell["score"])
                n += len(recs)
            if not task_scores:
                continue
            entry: dict[str, Any] = dict(avg=mean(task_scores), n=n,
                                         budget_tokens=report["budget_tokens"][budget][str(length)] if budget else None)
            if agreements:
                entry["agreement"] = mean(agreements)
            if (label, length) in kl:
                entry["mean_kl"] = kl[(label, length)]["mean_kl"]
                entry["top1_agreement"] = kl[(label, length)]["top1_agreement"]
            per_length[str(length)] = entry
        if not per_length:
            continue
        row: dict[str, Any] = dict(row=label, algorithm=algorithm, budget=budget, lengths=per_length,
                                   avg=mean(e["avg"] for e in per_length.values()),
                                   n=sum(e["n"] for e in per_length.values()))
        recs = [r for r in report["samples"] if r["row"] == label and "metadata_bytes" in r]
        if recs:  # device bytes per request: the algorithm's representations next to the request's KV
            row["metadata_bytes_per_request"] = mean(r["metadata_bytes"] for r in recs)
            row["kv_bytes_per_request"] = mean(r["kv_bytes"] for r in recs)
        rows.append(row)
    dense = next((r for r in rows if r["row"] == DENSE), None)
    for row in rows:
        if row["row"] == DENSE or dense is None:
            continue
        row["delta_vs_dense"] = row["avg"] - dense["avg"]
        d = [rec["score"] - dense_score[(rec["length"], rec["task"], rec["index"])]
             for rec in report["samples"] if rec["row"] == row["row"]
             and (rec["length"], rec["task"], rec["index"]) in dense_score]
        row["delta_paired_se"] = stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None
        row["agreement"] = mean(e["agreement"] for e in row["lengths"].values() if "agreement" in e)
    return {"cells": cells, "rows": rows}


def _pts(x: float) -> str:
    return f"{100 * x:.1f}"


def summary_table(report: dict[str, Any]) -> list[str]:
    """One line per row: the task average at each length, overall, Δ vs dense, token agreement."""
    lengths = report["grid"]["lengths"]
    head = (["row", "budget tokens at " + " / ".join(map(str, lengths))] + [f"{n} avg (n)" for n in lengths]
            + ["all (n)", "Δ vs dense ± SE", "token agreement", "device metadata per request (of its KV)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        per = row["lengths"]
        budget = " / ".join(str(per[str(n)]["budget_tokens"]) if str(n) in per else "–" for n in lengths) \
            if row["budget"] else "all"
        out = [row["row"], budget]
        out += [f"{_pts(per[str(n)]['avg'])} ({per[str(n)]['n']})" if str(n) in per else "–" for n in lengths]
        out.append(f"**{_pts(row['avg'])}** ({row['n']})")
        if "delta_vs_dense" in row:
            se = row["delta_paired_se"]
            out.append(f"{100 * row['delta_vs_dense']:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else ""))
            out.append(f"{row['agreement']:.2f}")
        else:
            out += ["", ""]
        out.append(_metadata(row))
        lines.append("| " + " | ".join(out) + " |")
    return lines


def _metadata(row: dict[str, Any]) -> str:
    """'1.2 MiB (15.6%)': a request's representation bytes on the device (mean over prompts) and
    their share of the request's KV bytes; '–' for a report without byte counts."""
    if "metadata_bytes_per_request" not in row:
        return "–"
    meta, kv = row["metadata_bytes_per_request"], row["kv_bytes_per_request"]
    return f"{meta / 2**20:.2f} MiB ({100 * meta / kv:.1f}%)" if kv else f"{meta / 2**20:.2f} MiB"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: provenance, the score table (cells "score (n)"), and fidelity to dense."""
    grid, model = report["grid"], report["model"]
    lengths, tasks = grid["lengths"], grid["tasks"]
    cell = {(c["row"], c["length"], c["task"]): c for c in report["cells"]}
    git = report["git"]
    commit = f"{git['commit'][:12]}{' (with uncommitted changes)' if git['dirty'] else ''}" if git["commit"] else "n/a"
    done = report["samples_completed"]
    lines = [
        f"# hisa eval: {model['name']}",
        "",
        f"- command: `{report['command']}`",
        f"- model: {model['name']} ({model['source']}), context {model['context']} tokens",
        f"- device: {report['device']} ({report['device_name']}), {report['dtype']}",
        f"- date: {report['date']}; commit {commit}; wall time {report['wall_seconds'] / 60:.1f} min",
        f"- samples per task per length: {done} of {grid['samples']} requested"
        + (f" (stopped early: {report['stopped_early']})" if report.get("stopped_early") else ""),
    ]
    if any(r["budget"] for r in report["rows"]):
        sp = report["sparse"]
        lines.append(f"- sparse: page size {sp['page_size']}, sink pages {sp.get('sink_pages', 1)}, recent pages "
                     f"{sp.get('recent_pages', 2)}, min_prompt_len {sp['min_prompt_len']} (every eval prompt ran "
                     "sparse: checked against the cache's decode-step count)")
    lines += [
        "",
        "Scores are RULER string match ×100. A cell is `score (n)`: the mean over n samples. `avg` is the "
        "mean of the task scores at that length; `all` the mean over lengths; `Δ` is `all` minus dense's, "
        "± the paired standard error over the same prompts. Device metadata: the algorithm's representations "
        "of one request (mean over prompts), and their share of that request's KV.",
        "",
    ]
    lines += summary_table(report) + ["", "Per task:", ""]
    head = ["row", "budget (tokens)"] + [f"{n} {t}" for n in lengths for t in tasks + ["avg"]] + ["all", "Δ vs dense"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        budget = ", ".join(str(row["lengths"][str(n)]["budget_tokens"]) for n in lengths
                           if str(n) in row["lengths"]) if row["budget"] else "all"
        out = [row["row"], budget]
        for n in lengths:
            for t in tasks:
                c = cell.get((row["row"], n, t))
                out.append(f"{_pts(c['score'])} ({c['n']})" if c else "–")
            e = row["lengths"].get(str(n))
            out.append(f"**{_pts(e['avg'])}** ({e['n']})" if e else "–")
        out.append(f"**{_pts(row['avg'])}** ({row['n']})")
        if "delta_vs_dense" in row:
            se = row["delta_paired_se"]
            out.append(f"{100 * row['delta_vs_dense']:+.1f}" + (f" ± {100 * se:.1f}" if se is not None else ""))
        else:
            out.append("")
        lines.append("| " + " | ".join(out) + " |")
    sparse_rows = [r for r in report["rows"] if r["budget"]]
    if sparse_rows:
        has_kl = any("mean_kl" in e for r in sparse_rows for e in r["lengths"].values())
        lines += ["", "Fidelity to dense: greedy token agreement over the generated tokens (mean over samples)"
                  + ("; mean KL(dense ‖ sparse) in nats and top-1 agreement of the next-token distributions over "
                     f"the last {grid['kl_tokens']} tokens of one long prompt per length, teacher-forced through "
                     "sparse decode steps" if has_kl else "") + ".", ""]
        head = ["row"] + [f"{n} {what}" for n in lengths
                          for what in (["agreement", "KL", "top-1"] if has_kl else ["agreement"])]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in sparse_rows:
            out = [row["row"]]
            for n in lengths:
                e = row["lengths"].get(str(n), {})
                out.append(f"{e['agreement']:.3f}" if "agreement" in e else "–")
                if has_kl:
                    out.append(f"{e['mean_kl']:.4f}" if "mean_kl" in e else "–")
                    out.append(f"{e['top1_agreement']:.3f}" if "top1_agreement" in e else "–")
            lines.append("| " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: str | os.PathLike) -> None:
    """Average score (points) against budget tokens, one line per sparse algorithm, dense as a
    dashed horizontal line; one panel per context length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = report["grid"]["lengths"]
    rows = report["rows"]
    fig, axes = plt.subplots(1, len(lengths), figsize=(4.6 * len(lengths), 3.8), squeeze=False, sharey=True)
    algorithms = [a for a in report["grid"]["algorithms"] if a != DENSE]
    for ax, length in zip(axes[0], lengths):
        key = str(length)
        dense = next((r for r in rows if r["row"] == DENSE and key in r["lengths"]), None)
        if dense is not None:
            ax.axhline(100 * dense["lengths"][key]["avg"], color="black", linestyle="--",
                       label=f"dense (n={dense['lengths'][key]['n']})")
        for algorithm in algorithms:
            pts = sorted((r["lengths"][key]["budget_tokens"], 100 * r["lengths"][key]["avg"])
                         for r in rows if r["algorithm"] == algorithm and key in r["lengths"])
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=algorithm)
        ax.set_xscale("log", base=2)
        ax.set_title(f"context {length} tokens")
        ax.set_xlabel("token budget")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("task average (RULER score)")
    axes[0][0].set_ylim(-2, 102)
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{report['model']['name']} on {report['device']} ({report['dtype']}): score vs budget "
                 f"({report['samples_completed']} samples per task per length)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def write_report(report: dict[str, Any], prefix: str | os.PathLike) -> dict[str, Path]:
    """Write PREFIX.json, PREFIX.md and PREFIX.png; returns their paths.

    Each file is written beside its name and renamed over it, so a run killed or failing mid-write
    (a full disk) keeps the files of the last round written whole. Raises HisaError if they cannot
    be written."""
    prefix = Path(prefix)
    paths = {ext: prefix.with_name(prefix.name + "." + ext) for ext in ("json", "md", "png")}
    writers = {"json": lambda tmp: tmp.write_text(json.dumps(report, indent=1) + "\n"),
               "md": lambda tmp: tmp.write_text(markdown(report)),
               "png": lambda tmp: plot(report, tmp)}
    try:
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for ext, write in writers.items():
            tmp = paths[ext].with_name(f"{paths[ext].name}.{os.getpid()}.tmp")
            try:
                write(tmp)
                os.replace(tmp, paths[ext])
            finally:
                tmp.unlink(missing_ok=True)
    except OSError as e:
        raise HisaError(f"cannot write the eval results to {prefix}.json/.md/.png: {e.strerror or e}") from None
    return paths


__all__ = ["summarize", "summary_table", "markdown", "plot", "write_report"]
