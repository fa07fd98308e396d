"""Which FlexAttention kernel backend a call runs on, and what that backend needs.

FlexAttention lowers the same ``mask_mod`` / ``score_mod`` / ``BlockMask`` to two CUDA
backends: its Triton kernels (every GPU, forward and backward, gradients to captured
tensors) and, with ``kernel_options={"BACKEND": "FLASH"}``, flash-attn-4's CuTe DSL kernels
(Hopper and Blackwell, faster on large forward calls; see
``benchmarks/results/flash-backend-*.md``). flexna's masks and score_mods use only operations
both lower (``tests/test_flash_safe.py`` guards that on the CPU).

``backend="auto"`` (every entry point's default) picks FLASH where it is installed, the GPU
supports it and the call is large enough to pay for FLASH's fixed cost per call; for calls
that will be differentiated, only where most blocks are full (FLASH's backward is slower than
Triton's where partial blocks dominate, e.g. 3-D NA) and no captured tensor needs gradients.
Triton otherwise (CPU, older GPUs, deterministic mode, small calls, a trainable rpb).
``backend="flash"`` where FLASH cannot run is a :class:`BackendError` saying why; flexna
never switches backend silently.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch

Backend = Literal["auto", "triton", "flash"]
BACKENDS: tuple[str, ...] = ("auto", "triton", "flash")

FLASH_INSTALL = ('install flash-attn-4 (pip install "flexna[flash]", or pip install --pre '
                 'flash-attn-4; "flash-attn-4[cu13]" for CUDA 13)')

# Below this many (query block, key block) pairs per call (times batch and heads) "auto" keeps
# Triton: FLASH's forward carries a fixed cost of 0.2-0.3 ms per call on an H200, so small calls
# run faster on Triton (crossover 10-17k pairs at head_dim 128;
# benchmarks/results/flash-backend-NVIDIA-H200-2026-12-02.md).
FLASH_MIN_BLOCK_PAIRS = 12_000
# Calls that will be differentiated: FLASH's forward + backward won where at most 42% of the
# attended blocks were partial (2-D NA and every GNA row) and lost at 78% (3-D NA), and lost on
# the 4.3k-pair 1-D row; so at most half partial, and a larger minimum size.
FLASH_MAX_PARTIAL_SHARE_TRAINING = 0.5
FLASH_MIN_BLOCK_PAIRS_TRAINING = 50_000


class BackendError(RuntimeError):
    """The requested kernel backend cannot run this call (the message says why and what to do)."""


def check_backend(backend: object) -> Backend:
    """``backend`` if it is one of :data:`BACKENDS`, else a ``ValueError`` naming it."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r} is not one of {', '.join(map(repr, BACKENDS))}")
    return backend  # type: ignore[return-value]  # one of the Literal's values, checked above


@functools.lru_cache(maxsize=1)
def _torch_has_flash() -> bool:
    """Whether this torch's Flex lowering has the FLASH backend (torch >= 2.10)."""
    return importlib.util.find_spec("torch._inductor.kernel.flex.flex_flash_attention") is not None


@functools.lru_cache(maxsize=1)
def _flash_attn_installed() -> bool:
    try:
        return importlib.util.find_spec("flash_attn.cute") is not None
    except (ImportError, ValueError):
        return False


@functools.lru_cache(maxsize=16)
def flash_unavailable(device: torch.device) -> str | None:
    """Why FLASH cannot run on ``device`` (``None``: it can)."""
    if device.type != "cuda":
        return f"the tensors are on {device.type}; FLASH runs on CUDA GPUs only"
    if not _torch_has_flash():
        return f"torch {torch.__version__} has no FLASH backend for FlexAttention (torch >= 2.10 has)"
    major, minor = torch.cuda.get_device_capability(device)
    if major not in (9, 10):
        return (f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) is not "
                "supported by flash-attn-4's CuTe kernels (Hopper sm90 or Blackwell sm100)")
    if not _flash_attn_installed():
        return f"flash-attn-4 is not installed: {FLASH_INSTALL}"
    return None


def block_sizes(backend: str, device: torch.device) -> tuple[int, int]:
    """(query, key) BlockMask block sizes the backend's kernels run in on ``device``.

    Triton: 128 x 128 everywhere. FLASH: 128 x 128 on Hopper; on Blackwell its query tile is
    256 tokens (two 128-row warpgroups), so the BlockMask's query block must be 256.
    """
    if backend == "flash" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10:
        return 256, 128
    return 128, 128


def resolve_backend(backend: str, device: torch.device, *, grads: bool, captured_grads: bool = False,
                    block_pairs: int | None = None, partial_share: float = 0.0) -> str:
    """The backend (``"triton"`` or ``"flash"``) a call runs on; ``BackendError`` where the
    requested one cannot run it.

    ``grads``: whether the call will be differentiated; ``captured_grads``: whether a tensor its
    score_mod captures may need gradients (a trainable rpb, or any user score_mod), which FLASH's
    backward rejects. ``block_pairs``: the call's attended (query block, key block) pairs times
    batch and heads, and ``partial_share`` the share of them that are partial; ``None`` when not
    known (then "auto" goes by availability alone).
    """
    check_backend(backend)
    if device.type != "cuda":
        if backend == "flash":
            raise BackendError(f"backend='flash': {flash_unavailable(device)}; use backend='auto' "
                               "or 'triton'")
        return "triton"
    if backend == "triton":
        return "triton"
    reason = flash_unavailable(device)
    if backend == "flash":
        if reason is not None:
            raise BackendError(f"backend='flash' cannot run: {reason}. Use backend='auto' (Triton "
                               "where FLASH cannot run) or 'triton'")
        if grads and torch.are_deterministic_algorithms_enabled():
            raise BackendError("backend='flash': its block-sparse backward is not deterministic and "
                               "torch.use_deterministic_algorithms(True) is set; use 'triton'")
        return "flash"
    if reason is not None or (grads and (captured_grads or torch.are_deterministic_algorithms_enabled())):
        return "triton"
    if block_pairs is None:
        return "flash"
    if grads:
        pays = (block_pairs >= FLASH_MIN_BLOCK_PAIRS_TRAINING
                and partial_share <= FLASH_MAX_PARTIAL_SHARE_TRAINING)
    else:
        pays = block_pairs >= FLASH_MIN_BLOCK_PAIRS
    return "flash" if pays else "triton"


def kernel_options(backend: str = "auto", device: torch.device | str | None = None, *,
                   grads: bool = False, captured_grads: bool = False, block_pairs: int | None = None,
                   partial_share: float = 0.0, block_size: tuple[int, int] | None = None
                   ) -> dict[str, bool | str | int]:
    """The ``kernel_options`` to pass to ``flex_attention`` with flexna's masks on ``device``.

    For direct FlexAttention users: the backend choice of :func:`resolve_backend` plus the
    Triton options flexna uses (see :func:`flexna.flex.cuda_kernel_options`). Build the
    BlockMask with ``block_size=flexna.backends.block_sizes(backend, device)``, or pass the
    BlockMask's ``block_size`` (``bm.BLOCK_SIZE``, e.g. a :class:`flexna.MaskSpec` with small
    tiles): then ``"auto"`` keeps Triton where FLASH cannot run those blocks, and Triton's
    kernel tiles are chosen to divide them (:func:`triton_block_options`).

    Example::

        opts = flexna.kernel_options("auto", "cuda", block_size=bm.BLOCK_SIZE)
        out = torch.compile(flex_attention)(q, k, v, block_mask=bm, kernel_options=opts)
    """
    dev = torch.device("cuda") if device is None and torch.cuda.is_available() else torch.device(
        device if device is not None else "cpu")
    blocks = None if block_size is None else (int(block_size[0]), int(block_size[1]))
    chosen = resolve_backend(backend, dev, grads=grads, captured_grads=captured_grads,
                             block_pairs=block_pairs, partial_share=partial_share)
    if chosen == "flash" and blocks is not None and blocks != block_sizes("flash", dev):
        if backend == "flash":
            raise BackendError(f"backend='flash' runs BlockMasks of block_size {block_sizes('flash', dev)} "
                               f"on this GPU, got block_size = {blocks}; build the mask with "
                               "block_size=flexna.backends.block_sizes('flash', device) or use 'triton'")
        chosen = "triton"
    return backend_options(chosen, dev, blocks)


def triton_block_options(q_block: int, kv_block: int) -> dict[str, int]:
    """Triton kernel tile sizes for a BlockMask whose blocks 128 does not divide.

    Flex's Triton kernels run fixed tiles (128 x 64 forward on Hopper at head_dim 128) that
    must divide the BlockMask's blocks; for smaller blocks (tiles of fewer than 128 tokens)
    this picks the largest power-of-two tiles that do, forward and backward (``fwd_`` /
    ``bwd_`` options; the backward's dK/dV and dQ loops need ``N1 % M1 == M2 % N2 == 0``).
    Blocks that no power of two >= 16 divides cannot run on Triton: a ``ValueError``.
    """
    if q_block % 128 == 0 and kv_block % 128 == 0:
        return {}
    bq, bkv = (min(128, b & -b) for b in (q_block, kv_block))  # largest power-of-two divisor
    if min(bq, bkv) < 16:
        raise ValueError(f"block_size = ({q_block}, {kv_block}) is out of range on CUDA: Flex's Triton "
                         "kernels need blocks that are multiples of 16 tokens (a tile of at least 16 "
                         "tokens, or block_size a multiple of 16 of the tile's token count)")
    small = min(bq, bkv, 32)
    return {"fwd_BLOCK_M": bq, "fwd_BLOCK_N": min(bkv, 64), "bwd_BLOCK_M1": small,
            "bwd_BLOCK_N1": min(bkv, 64), "bwd_BLOCK_M2": min(bq, 64), "bwd_BLOCK_N2": small}


def backend_options(chosen: str, device: torch.device, block_size: tuple[int, int] | None = None
                    ) -> dict[str, bool | str | int]:
    """The ``kernel_options`` that run a resolved backend (``"triton"`` / ``"flash"``) on
    ``device``: FLASH's selector, or the Triton options flexna passes on CUDA (with kernel tiles
    dividing ``block_size``, the BlockMask's ``(q, kv)`` blocks); none on the CPU."""
    from flexna.flex import cuda_kernel_options

    if device.type != "cuda":
        return {}
    if chosen == "flash":
        return {"BACKEND": "FLASH"}
    options: dict[str, bool | str | int] = dict(cuda_kernel_options(device))
    if block_size is not None:
        options.update(triton_block_options(*block_size))
    return options


__all__ = ["BACKENDS", "Backend", "BackendError", "backend_options", "block_sizes", "check_backend",
           "flash_unavailable", "kernel_options", "resolve_backend", "triton_block_options"]
