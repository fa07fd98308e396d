#!/usr/bin/env bash
# Install NATTEN (reference neighborhood-attention library) on a CPU-only machine,
# for tests/natten_peer.py.  Must run AFTER torch is installed.
#
# Builds NATTEN from its sdist WITHOUT libnatten (NATTEN's setup.py skips the
# CUDA/CMake build when NATTEN_CUDA_ARCH is empty and torch sees no CUDA
# device), so the result is a pure-Python wheel with only the Flex backend.
#
# Never fails CI: any problem prints a WARNING and exits 0 (tests that need
# NATTEN then skip via natten_peer.natten_available()).
#
# Env overrides: PYTHON (default python3), NATTEN_VERSION (default 0.21.7).

set -u

PYTHON="${PYTHON:-python3}"
NATTEN_VERSION="${NATTEN_VERSION:-0.21.7}"
STEP_TIMEOUT="${NATTEN_STEP_TIMEOUT:-120}"

log()  { echo "[install_natten] $*"; }
warn() {
    echo "[install_natten] WARNING: $*" >&2
    echo "[install_natten] WARNING: NATTEN not installed; NATTEN comparison tests will be skipped." >&2
    exit 0
}
run() {
    log "+ $*"
    if command -v timeout >/dev/null 2>&1; then
        timeout "${STEP_TIMEOUT}" "$@"
    else
        "$@"
    fi
}

start=$(date +%s)

log "python: $(command -v "${PYTHON}" || echo "${PYTHON} (not found)")"
torch_ver=$("${PYTHON}" -c 'import torch; print(torch.__version__)' 2>/dev/null) \
    || warn "torch is not importable with ${PYTHON}; install torch first."
log "torch ${torch_ver}"

have=$("${PYTHON}" -c 'import natten; print(natten.__version__)' 2>/dev/null || true)
if [ "${have}" = "${NATTEN_VERSION}" ]; then
    log "natten ${have} already installed; nothing to do."
    exit 0
fi

# --no-build-isolation needs setuptools>=64 in the current environment.
if ! "${PYTHON}" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 64)' 2>/dev/null; then
    run "${PYTHON}" -m pip install --quiet "setuptools>=64" wheel \
        || warn "could not install setuptools>=64 (needed to build the NATTEN sdist)."
fi

workdir=$(mktemp -d)
trap 'rm -rf "${workdir}"' EXIT

# Force a CPU-only (no libnatten) build even on a machine with a GPU.
export NATTEN_CUDA_ARCH=""
export CUDA_VISIBLE_DEVICES=""

run "${PYTHON}" -m pip download --quiet --no-deps --no-binary natten --no-build-isolation \
        "natten==${NATTEN_VERSION}" -d "${workdir}" \
    || warn "pip download of natten==${NATTEN_VERSION} failed."
sdist=$(ls "${workdir}"/natten-*.tar.gz 2>/dev/null | head -n1)
[ -n "${sdist}" ] || warn "no natten sdist found after download."
log "downloaded $(basename "${sdist}")"

run "${PYTHON}" -m pip wheel --quiet --no-deps --no-build-isolation -w "${workdir}/wheel" "${sdist}" \
    || warn "building the NATTEN wheel failed."
whl=$(ls "${workdir}"/wheel/natten-*.whl 2>/dev/null | head -n1)
[ -n "${whl}" ] || warn "no natten wheel produced."
log "built $(basename "${whl}")"

run "${PYTHON}" -m pip install --quiet --no-deps --force-reinstall "${whl}" \
    || warn "pip install of the NATTEN wheel failed."

# Smoke test: NATTEN's Flex mask_mod on CPU.
"${PYTHON}" - <<'EOF' || warn "natten installed but its Flex backend does not work here."
import natten, torch
from natten.backends.configs.checks import _FLEX_SUPPORTED
from natten.backends.flex import get_na_flex_mask
from torch.nn.attention.flex_attention import create_mask
assert _FLEX_SUPPORTED, "NATTEN Flex backend needs torch >= 2.7"
bm = get_na_flex_mask(device="cpu", na_dim=1, qkv_shape=(8,), kernel_size=(3,),
                      stride=(1,), dilation=(1,), is_causal=(False,))
m = create_mask(bm.mask_mod, None, None, 8, 8, device="cpu")
assert int(m.sum()) == 8 * 3, int(m.sum())
print(f"[install_natten] natten {natten.__version__} OK (HAS_LIBNATTEN={natten.HAS_LIBNATTEN})")
EOF

log "done in $(( $(date +%s) - start ))s"
exit 0
