"""What every benchmark records next to its figures: command, device, date, git commit."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def git_commit(given: str | None = None) -> dict:
    """HEAD and whether tracked files differ from it; `given` wins (a copied tree has no .git)."""
    if given:
        return dict(commit=given, dirty=None, source="--git-commit")
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

        return dict(commit=git("rev-parse", "HEAD"), dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                    source="git rev-parse HEAD")
    except (OSError, subprocess.CalledProcessError) as e:
        return dict(commit="unknown", dirty=None, source=f"git failed: {e}")


def device_info(device: torch.device) -> dict:
    info = dict(type=device.type, torch=torch.__version__, python=platform.python_version(),
                host_cpus=__import__("os").cpu_count())
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            pass
    else:
        info["name"] = platform.processor() or "cpu"
    return info


def header(device: torch.device, git: str | None = None) -> dict:
    return dict(command=" ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                git=git_commit(git), device=device_info(device))


def checked_step(engine) -> list:
    """engine.step()'s outputs, or a RuntimeError for the first request the engine failed: the engine
    ends a failed step's requests and goes on (a server must), and a benchmark must not time or
    count that (a compile error once read as 1,000 ms steps)."""
    outputs = engine.step()
    for o in outputs:
        if o.finish_reason == "error":
            raise RuntimeError(f"request {o.request_id} failed in the engine: {o.error!r}") from o.error
    return outputs


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results written to {path}")


def bar_pair_plot(path: Path, labels: list[str], before: list[float], after: list[float], *, before_label: str,
                  after_label: str, ylabel: str, title: str, xlabel: str | None = None, log: bool = False) -> None:
    """Two bars per label (a side-by-side comparison), saved as a PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = range(len(labels))
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar([i - 0.2 for i in x], before, 0.4, label=before_label)
    ax.bar([i + 0.2 for i in x], after, 0.4, label=after_label)
    ax.set_xticks(list(x), labels, rotation=15 if max(map(len, labels), default=0) > 12 else 0)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def step_weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step of `batch` requests reads: every parameter once, except an
    input embedding table that is not also a projection's weight (a step reads one row of it per
    request). Every expert of an MoE layer counts (an upper bound when a batch leaves some unused)."""
    linear_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    total = 0
    for p in model.parameters():  # (each shared parameter once)
        total += p.numel() * p.element_size()
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding) and id(m.weight) not in linear_ids:
            w = m.weight
            total -= w.numel() * w.element_size() - batch * w.shape[1] * w.element_size()
    return total
