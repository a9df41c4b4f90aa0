"""The README's Python examples, run as written: they print what the README says they print."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)


def test_readme_python_examples_print_what_they_claim():
    api, sparse = _python_blocks()[:2]
    assert "LLM()" in api and "SparseConfig" in sparse
    script = f"{api}\nprint('=== sparse ===')\n{sparse}\n"
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, rest = proc.stdout.split("=== sparse ===\n")
    lines = first.strip().splitlines()
    assert re.fullmatch(r".+ \[[\d, ]+\] (stop|length)", lines[0]), lines[0]  # text, token ids, finish_reason
    assert re.search(r"\| prefill \d+ tok in [\d.]+s \([\d.]+ tok/s\), decode \d+ tok in", lines[-1]), lines[-1]
    answer = rest.strip()
    assert "SKP-7319" in answer, answer  # the same answer as the CLI's (tests/test_cli.py)
    hit_rate = float(answer.split()[-1])
    assert 0.9 < hit_rate < 1.0, answer   # host-backed (residency="host"): some pages crossed PCIe, most were hits
