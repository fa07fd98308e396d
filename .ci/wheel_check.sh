#!/usr/bin/env bash
# CI step: the wheel works without the source tree. Builds flexna's wheel from a clean copy of
# this checkout, installs it (after torch) into a fresh venv, and runs the command line from an
# unrelated folder: list, show, analyze, verify and demo must all succeed.
#
#   bash .ci/wheel_check.sh            (PYTHON=python3.11 to pick the interpreter)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/flexna-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { printf '\n== wheel check: %s\n' "$*"; }

# 1. a clean copy of the tree (tracked and untracked-but-not-ignored files, as they are now),
#    so no stale build/ or egg-info of the checkout ends up in the wheel
step "copy $ROOT"
mkdir -p "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard \
     | while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done \
     | tar --null -T - -cf -) | tar -xf - -C "$WORK/src"
else
  (cd "$ROOT" && tar --exclude=.git --exclude=build --exclude=dist --exclude='*.egg-info' \
     --exclude=__pycache__ -cf - .) | tar -xf - -C "$WORK/src"
fi

# 2. the wheel
step "build the wheel"
"$PYTHON" -m pip wheel --no-deps -w "$WORK/dist" "$WORK/src"
WHEEL="$(ls "$WORK"/dist/flexna-*.whl)"
"$PYTHON" - "$WHEEL" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = {"flexna/__init__.py", "flexna/__main__.py", "flexna/tools/__init__.py", "flexna/tools/cli.py",
        "flexna/tools/catalogue.py", "flexna/tools/masks/flux-na.json", "flexna/tools/masks/flux-na.png",
        "flexna/tools/masks/hunyuan-gna.json", "flexna/tools/masks/nat-7x7.json"}
missing = sorted(need - names)
stale = sorted(n for n in names if n in {"flexna/cli.py", "flexna/catalogue.py", "flexna/verify.py"}
               or n.startswith(("masks/", "tests/", "benchmarks/")))
if missing or stale:
    sys.exit(f"wheel check: {sys.argv[1]}: missing {missing}, stale {stale}")
print(f"{sys.argv[1]}: {len(names)} files, catalogue "
      f"{sum(n.startswith('flexna/tools/masks/') and n.endswith('.json') for n in names)} entries")
EOF

# 3. a fresh venv: torch first (the CPU build the index has), then the wheel
step "fresh venv"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install --quiet "$TORCH_SPEC"
"$VPY" -m pip install --quiet "$WHEEL"

# 4. the command line from an unrelated folder, with no catalogue override
step "run from an unrelated folder"
RUN="$WORK/elsewhere"
mkdir -p "$RUN"
cd "$RUN"
unset FLEXNA_MASKS PYTHONPATH
FLEXNA="$WORK/venv/bin/flexna"
"$VPY" -c "import flexna, flexna.tools.catalogue as c; assert '$WORK/venv' in flexna.__file__, flexna.__file__; print('flexna from', flexna.__file__, '; catalogue', c.catalogue_dir())"
"$FLEXNA" list
"$FLEXNA" show flux-na --out "$WORK/x.png"
"$VPY" -c "import sys; d = open(sys.argv[1], 'rb').read(); assert d[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'" "$WORK/x.png"
if "$FLEXNA" show flux-na --out "$WORK/x.png" 2>"$WORK/err.txt"; then
  echo "wheel check: show overwrote an existing file without --force" >&2; exit 1
fi
grep -q "already exists" "$WORK/err.txt"
"$FLEXNA" analyze hunyuan-gna
"$FLEXNA" verify --n 5
"$FLEXNA" demo
"$VPY" -m flexna list >/dev/null
if "$FLEXNA" bench 2>"$WORK/err.txt"; then
  echo "wheel check: bench ran without a checkout" >&2; exit 1
fi
grep -q "needs a flexna source checkout" "$WORK/err.txt"
# 5. the sdist: its tests collect (every helper they import ships) against the installed wheel
step "sdist tests import"
"$VPY" -m pip install --quiet build "pytest>=7,<10" "hypothesis>=6"
"$VPY" -m build --sdist --outdir "$WORK/sdist" "$WORK/src" >/dev/null
tar -xzf "$WORK"/sdist/flexna-*.tar.gz -C "$WORK/sdist"
SDIST_DIR="$(ls -d "$WORK"/sdist/flexna-*/)"
rm -rf "$SDIST_DIR/flexna"  # the tests must run against the installed wheel, not the sdist's copy
(cd "$SDIST_DIR" && "$VPY" -m pytest --collect-only -q -p no:cacheprovider tests | tail -1)
(cd "$SDIST_DIR" && "$VPY" -m pytest -q -p no:cacheprovider tests/test_mask_mod.py -x | tail -1)
step "passed"
