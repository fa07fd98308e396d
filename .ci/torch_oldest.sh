#!/usr/bin/env bash
# CI step: the oldest torch flexna declares (pyproject.toml: torch>=2.11), on the CPU.
# A fresh venv, torch 2.11.0 first (PyPI has only its CUDA build: about 4.6 GB, it runs on the
# CPU too), then flexna exactly as the README installs it; the core mask, BlockMask and
# attention tests and the demo.
#
#   bash .ci/torch_oldest.sh           (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
OLDEST="${OLDEST:-2.11.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flexna-torch-oldest.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"
grep -q "\"torch>=${OLDEST%.*}\"" pyproject.toml || {
  echo "torch_oldest: pyproject.toml no longer declares torch>=${OLDEST%.*}; update OLDEST" >&2; exit 1; }

"$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
python -m pip install --quiet --upgrade pip
# This machine's pip may cap torch through a constraint file; the pin here is exact anyway.
PIP_CONSTRAINT=/dev/null python -m pip install --quiet "torch==$OLDEST"
python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$OLDEST' else f'torch {v}, not $OLDEST')"

# README, command 1 (core install), with the torch above kept.
PIP_CONSTRAINT=/dev/null pip install --quiet -e ".[test]"
python -c "import torch; print('torch', torch.__version__)"
flexna demo --device cpu
python -m pytest -q -p no:cacheprovider tests/test_mask_mod.py tests/test_block_mask.py tests/test_attention.py
python -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '$OLDEST' else f'the install replaced torch: {v}')"
echo "torch_oldest: passed on torch $OLDEST"
