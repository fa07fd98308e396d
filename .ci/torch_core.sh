#!/usr/bin/env bash
# CI step: flexna's core on one torch release, on the CPU. A fresh venv, that torch first, then
# flexna exactly as the README installs it; the core mask, BlockMask and attention tests and the
# demo. .ci/run calls it for the oldest torch pyproject.toml declares and for the newest release.
# PyPI has only CUDA builds of most releases (about 4.6 GB); they run on the CPU too.
#
#   bash .ci/torch_core.sh 2.11.0      (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VERSION="${1:?usage: torch_core.sh TORCH_VERSION}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flexna-torch-core.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
cd "$ROOT"

"$PYTHON" -m venv "$WORK/venv"
# shellcheck disable=SC1091
source "$WORK/venv/bin/activate"
python -m pip install --quiet --upgrade pip
# This machine's pip may cap torch through a constraint file; the pin here is exact anyway.
export PIP_CONSTRAINT=/dev/null
python -m pip install --quiet "torch==$VERSION"
check='import sys, torch; v = torch.__version__.split("+")[0]; sys.exit(0 if v == sys.argv[1] else f"torch {v}, not {sys.argv[1]}")'
python -c "$check" "$VERSION"

# README, command 1 (core install), with the torch above kept.
pip install --quiet -e ".[test]"
python -c "$check" "$VERSION"
flexna demo --device cpu
# the recompile-limit tests: dynamo's config is shared by all threads on older torch (2.11),
# per thread on 2.13; both ways flexna must restore the caller's values
python -m pytest -q -p no:cacheprovider tests/test_mask_mod.py tests/test_block_mask.py tests/test_attention.py \
    tests/test_compile.py::test_calls_leave_dynamo_config_as_they_found_it \
    tests/test_compile.py::test_overlapping_calls_in_threads_restore_dynamo_config
echo "torch_core: passed on torch $VERSION"
