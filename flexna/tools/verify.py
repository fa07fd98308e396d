"""``flexna verify``: fuzz-check flexna on your device against the brute-force reference.

For ``n`` random configurations drawn from a seed (1 to 3 axes, kernel, stride,
dilation, causal axes, token orders/tiles, block sizes; one in five a sliding tile
attention (STA) configuration with text tokens instead, and of the 2-3 axis ones some in
a Hilbert or Morton curve order, or a radial rule: the authors' on 2 axes, the 3-D-window
variant on 3; some NA ones also check adaptive blocks on their window), each check compares
flexna (through its public ``flexna.na_mask_mod`` / ``flexna.na_block_mask``) with
:mod:`flexna.reference` (an independent NumPy statement of the rule):

1. ``na_mask_mod`` evaluated on every pair (``create_mask``) == the reference mask
   (permuted into the tiled order here, independently of ``flexna.layout``);
2. ``na_block_mask``'s dense expansion (full blocks all True, partial blocks
   through its mask_mod, other blocks False; the block lists decoded by
   ``BlockMask.to_dense()``) == the reference mask;
3. ``na_block_mask``'s full and partial block sets == those of
   ``create_block_mask(na_mask_mod(...))`` (the documented guarantee);
4. (``attention=True``) ``flex_attention`` with that BlockMask == float64
   ``reference_attention`` within a tolerance: compiled on CUDA (one compiled
   function for all configurations, with automatic dynamic shapes, and block
   size 128 there), eager on CPU unless ``compiled=True``. Eager FlexAttention
   ignores block sparsity, so on CPU step 2 is what checks the blocks.

``run_verify(...)`` prints progress and a summary and returns True when every
configuration passed; failures are printed with a line of Python that rebuilds
the configuration.
"""

from __future__ import annotations

import math
import random
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import IO, Any

import numpy as np
import torch

import flexna
from flexna.reference import (
    reference_attention,
    reference_mask,
    reference_radial_mask,
    reference_radial_window_mask,
    reference_sliding_tile_mask,
)
from flexna.tools.blockmaps import block_maps

HEADS = 2
HEAD_DIM = 16
FLASH_HEAD_DIM = 64  # flash-attn-4's CuTe kernels take head dims from 64 on Hopper
FLASH_TOL = 1e-2  # fp16 inputs, fp32 accumulation: errors are about 1e-3
CUDA_BLOCK = 128  # one block size on CUDA: compiled kernels are specialised on it


@dataclass(frozen=True)
class Config:
    """One random configuration: a pattern, token orders and BlockMask block sizes."""

    index: int
    shape: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    q_tile: tuple[int, ...] | None
    kv_tile: tuple[int, ...] | None
    block_size: tuple[int, int] | None
    rule: str = "na"  # or "sliding_tile": STA with sta_tile / window and text tokens
    sta_tile: tuple[int, ...] | None = None
    window: tuple[int, ...] | None = None
    text: int = 0
    curve: str | None = None  # "hilbert" / "morton": both sides in that curve order
    # rule "radial": (model, decay, threshold); "radial_window": (radius, min_radius, dense, sink)
    radial: tuple | None = None
    adaptive: tuple | None = None  # ("threshold", p) or ("top_k", k): adaptive blocks on the window

    def pattern(self) -> flexna.NAPattern:
        """The pattern of a radial configuration."""
        assert self.radial is not None
        if self.rule == "radial":
            model, decay, threshold = self.radial
            return flexna.radial_pattern(self.shape[0], self.shape[1], model=model, decay_factor=decay,
                                  block_size=threshold)
        radius, low, dense, sink = self.radial
        return flexna.radial_window_pattern(self.shape, radius, min_radius=low, dense_frames=dense, sink=sink)

    def pattern_args(self) -> tuple:
        return self.shape, self.kernel_size, self.stride, self.dilation, self.is_causal

    def call(self) -> str:
        """A line of Python that builds this configuration's BlockMask."""
        if self.rule in ("radial", "radial_window"):
            return f"flexna.MaskSpec.create({self.pattern()!r}, block_size={self.block_size})"
        if self.rule == "sliding_tile":
            return (f"flexna.sta_block_mask({self.shape}, {self.sta_tile}, {self.window}, "
                    f"text_length={self.text}, block_size={self.block_size})")
        order = (f"curve={self.curve!r}" if self.curve else
                 f"q_tile={self.q_tile}, kv_tile={self.kv_tile}")
        extra = "" if self.adaptive is None else (
            f"  # with flexna.adaptive_block_mask(q, k, spec, {self.adaptive[0]}={self.adaptive[1]})")
        return (f"flexna.na_block_mask({self.shape}, {self.kernel_size}, stride={self.stride}, "
                f"dilation={self.dilation}, is_causal={self.is_causal}, {order}, "
                f"block_size={self.block_size}){extra}")


def _tile_tokens(tile: tuple[int, ...] | None) -> int:
    return 1 if tile is None else math.prod(tile)


def _padded_len(shape: tuple[int, ...], tile: tuple[int, ...] | None) -> int:
    if tile is None:
        return math.prod(shape)
    return math.prod(-(-length // t) * t for length, t in zip(shape, tile, strict=True))


def random_config(rng: random.Random, index: int, max_tokens: int, cuda: bool) -> Config:
    """Draw one valid configuration with at most ``max_tokens`` layout tokens."""
    n = rng.choice((1, 2, 3))
    shape, remaining = [], max(1, max_tokens)
    for a in range(n):
        cap = max(1, min(remaining, round(remaining ** (1 / (n - a)) * 1.5)))
        length = rng.randint(1 if rng.random() < 0.05 else min(cap, 2), cap)
        shape.append(length)
        remaining = max(1, remaining // length)
    kernel, stride, dilation, causal = [], [], [], []
    for length in shape:
        d = 1 if length < 2 or rng.random() < 0.5 else rng.randint(2, max(2, length // 2))
        k = rng.randint(1, length // d)
        s = 1 if rng.random() < 0.4 else rng.randint(1, k)
        kernel.append(k)
        stride.append(s)
        dilation.append(d)
        causal.append(rng.random() < 0.3)
    shape_t = tuple(shape)

    def draw_tile() -> tuple[int, ...] | None:
        if rng.random() < 0.35:
            return None
        for _ in range(20):
            tile = tuple(rng.choice([t for t in (1, 2, 4, 8, 16) if t < 2 * length] or [1])
                         for length in shape_t)
            if math.prod(tile) <= CUDA_BLOCK and _padded_len(shape_t, tile) <= 2 * max_tokens:
                return tile
        return None

    q_tile = draw_tile()
    kv_tile = q_tile if rng.random() < 0.5 else draw_tile()
    block: tuple[int, ...] | None
    if cuda:
        block = (CUDA_BLOCK, CUDA_BLOCK)
    elif rng.random() < 0.4:
        block = None
    else:
        block = tuple(_tile_tokens(t) * rng.choice((1, 2, 3, 4, 8, 16)) if t is not None
                      else rng.choice((16, 32, 48, 64, 128)) for t in (q_tile, kv_tile))
    cfg = Config(index, shape_t, tuple(kernel), tuple(stride), tuple(dilation), tuple(causal),
                 q_tile, kv_tile, block)  # type: ignore[arg-type]
    kind = rng.random()  # drawn after the NA config, so NA configs stay those of earlier versions
    if kind < 0.2:
        return _sliding_tile_config(rng, cfg, cuda)
    if kind < 0.45 and n > 1:  # a radial rule (not separable per axis) on this layout
        if n == 2:
            radial: tuple = (rng.choice(("hunyuan", "wan")), rng.choice((0.5, 1.0, 2.0)),
                             rng.choice((1, 2, 4, 8, 128)))
        else:
            radius = tuple(rng.randint(0, length) for length in shape_t[1:])
            radial = (radius, tuple(rng.randint(0, r) for r in radius), rng.randint(0, 3),
                      rng.random() < 0.3)
        return replace(cfg, rule="radial" if n == 2 else "radial_window", radial=radial)
    if kind < 0.55 and n > 1:  # a space-filling curve order instead of the tiles
        curve_block = block if cuda else (None if rng.random() < 0.5 else
                                          (rng.choice((16, 32, 64, 128)),) * 2)
        return replace(cfg, q_tile=None, kv_tile=None, block_size=curve_block,  # type: ignore[arg-type]
                       curve=rng.choice(("hilbert", "morton")))
    if kind < 0.7:  # adaptive blocks united with this NA window
        if rng.random() < 0.5:
            return replace(cfg, adaptive=("threshold", rng.choice((0.5, 0.8, 0.95))))
        return replace(cfg, adaptive=("top_k", rng.randint(1, 4)))
    return cfg


def _sliding_tile_config(rng: random.Random, cfg: Config, cuda: bool) -> Config:
    """An STA configuration on ``cfg``'s layout: per axis a tile dividing the length (its token
    count dividing the CUDA block on CUDA), a window of 1 to all tiles, 0 to 8 text tokens."""
    tile: list[int] = []
    for length in cfg.shape:
        divisors = [t for t in range(1, min(length, 16) + 1) if length % t == 0]
        if cuda:
            divisors = [t for t in divisors if CUDA_BLOCK % (t * math.prod(tile)) == 0] or [1]
        tile.append(rng.choice(divisors))
    window = tuple(rng.randint(1, length // t) for length, t in zip(cfg.shape, tile, strict=True))
    block: tuple[int, ...] | None = (CUDA_BLOCK, CUDA_BLOCK) if cuda else (
        None if rng.random() < 0.5 else (math.prod(tile) * rng.choice((1, 2, 3)),) * 2)
    return replace(cfg, q_tile=tuple(tile), kv_tile=tuple(tile), block_size=block,  # type: ignore[arg-type]
                   rule="sliding_tile", sta_tile=tuple(tile), window=window, text=rng.randint(0, 8))


def token_order(shape: tuple[int, ...], tile: tuple[int, ...] | None) -> np.ndarray:
    """Row-major token index at each position of the tiled order (-1 for padding).

    Restated here with NumPy rather than imported, so the check stays independent.
    """
    if tile is None:
        return np.arange(math.prod(shape))
    grid = tuple(-(-length // t) for length, t in zip(shape, tile, strict=True))
    pos = np.arange(math.prod(grid) * math.prod(tile))
    tile_coord = np.stack(np.unravel_index(pos // math.prod(tile), grid), axis=1)
    inner = np.stack(np.unravel_index(pos % math.prod(tile), tile), axis=1)
    coord = tile_coord * np.array(tile) + inner
    inside = (coord < np.array(shape)).all(axis=1)
    flat = np.ravel_multi_index(tuple(np.minimum(coord, np.array(shape) - 1).T), shape)
    return np.where(inside, flat, -1)


def expected_mask(cfg: Config) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The reference mask in the configuration's orders: ``[Nq, Nkv]`` bool, and both orders
    (extra/text positions marked -1 there too)."""
    if cfg.rule == "sliding_tile":
        ref = reference_sliding_tile_mask(cfg.shape, cfg.sta_tile, cfg.window).numpy()  # type: ignore[arg-type]
    elif cfg.rule == "radial":
        model, decay, threshold = cfg.radial  # type: ignore[misc]
        ref = reference_radial_mask(cfg.shape[0], cfg.shape[1], model, decay, threshold).numpy()
    elif cfg.rule == "radial_window":
        radius, low, dense, sink = cfg.radial  # type: ignore[misc]
        ref = reference_radial_window_mask(cfg.shape, radius, low, dense, sink).numpy()
    else:
        ref = reference_mask(*cfg.pattern_args()).numpy()
    if cfg.curve is not None:  # the curve itself is tested on its own (tests/test_curves.py)
        q_ord = kv_ord = np.array(flexna.CurveOrder.create(cfg.shape, cfg.curve).order())
    else:
        q_ord, kv_ord = token_order(cfg.shape, cfg.q_tile), token_order(cfg.shape, cfg.kv_tile)
    out = np.zeros((q_ord.size + cfg.text, kv_ord.size + cfg.text), dtype=bool)
    qv, kv = q_ord >= 0, kv_ord >= 0
    out[:q_ord.size, :kv_ord.size][np.ix_(qv, kv)] = ref[np.ix_(q_ord[qv], kv_ord[kv])]
    out[:, kv_ord.size:] = True  # text keys: attended by every query
    out[q_ord.size:, :kv_ord.size] = kv[None, :]  # text queries: every real key
    extra = np.full(cfg.text, -1)
    return torch.from_numpy(out), np.concatenate([q_ord, extra]), np.concatenate([kv_ord, extra])


def _expand_blocks(blocks: torch.Tensor, qb: int, kb: int, nq: int, nkv: int) -> torch.Tensor:
    """A ``[q blocks, kv blocks]`` map -> the ``[nq, nkv]`` token pairs its blocks cover."""
    return blocks.repeat_interleave(qb, 0).repeat_interleave(kb, 1)[:nq, :nkv]


def _maps(bm: Any, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, str | None]:
    """``(partial, full, problem)``: the ``[rows, cols]`` block maps of ``bm`` (``to_dense``)."""
    partial, full = (m[0, 0].cpu() for m in block_maps(bm))
    if partial.shape != (rows, cols) or full.shape != (rows, cols):
        return partial, full, (f"block maps are {tuple(partial.shape)} (partial) and "
                               f"{tuple(full.shape)} (full), expected {(rows, cols)}")
    return partial, full, None


class Check:
    """Runs one configuration; collects failure messages and the attention error."""

    def __init__(self, cfg: Config, device: torch.device, attention: bool,
                 flex: Callable[..., Any], tol: float, flash: bool = False) -> None:
        self.cfg, self.device, self.attention, self.flex, self.tol = cfg, device, attention, flex, tol
        self.flash = flash  # also run the FLASH-vs-Triton differential
        self.flash_checked = False
        self.failures: list[str] = []
        self.error = 0.0

    def _where(self, got: torch.Tensor, want: torch.Tensor, q_ord: np.ndarray,
               kv_ord: np.ndarray) -> str:
        diff = (got != want).nonzero()
        qi, ki = (int(v) for v in diff[0])

        def coord(order: np.ndarray, i: int) -> str:
            return "padding" if order[i] < 0 else str(
                tuple(int(c) for c in np.unravel_index(order[i], self.cfg.shape)))

        return (f"{diff.shape[0]} pairs differ; first: q position {qi} {coord(q_ord, qi)}, "
                f"kv position {ki} {coord(kv_ord, ki)}: got {bool(got[qi, ki])}, "
                f"reference {bool(want[qi, ki])}")

    def run(self) -> None:
        from torch.nn.attention.flex_attention import create_block_mask, create_mask

        cfg, dev = self.cfg, self.device
        want, q_ord, kv_ord = expected_mask(cfg)
        nq, nkv = want.shape
        mask_mod, bm = self._masks(cfg.block_size)
        got = create_mask(mask_mod, 1, 1, nq, nkv, device=dev)[0, 0].cpu()
        if not torch.equal(got, want):
            self.failures.append("na_mask_mod: " + self._where(got, want, q_ord, kv_ord))

        qb, kb = (int(b) for b in bm.BLOCK_SIZE)
        if tuple(bm.seq_lengths) != (nq, nkv):
            self.failures.append(f"na_block_mask: seq_lengths {tuple(bm.seq_lengths)}, "
                                 f"expected {(nq, nkv)}")
            return
        rows, cols = -(-nq // qb), -(-nkv // kb)
        partial, full, problem = _maps(bm, rows, cols)
        if problem is not None:
            self.failures.append(f"na_block_mask: {problem}")
            return
        if (partial & full).any():
            self.failures.append(f"na_block_mask: {int((partial & full).sum())} blocks are listed "
                                 "as both full and partial")
        inner = create_mask(bm.mask_mod, 1, 1, nq, nkv, device=dev)[0, 0].cpu()
        dense = _expand_blocks(full, qb, kb, nq, nkv) | (_expand_blocks(partial, qb, kb, nq, nkv)
                                                          & inner)
        if not torch.equal(dense, want):
            self.failures.append("na_block_mask (dense expansion): "
                                 + self._where(dense, want, q_ord, kv_ord))

        ref_bm = create_block_mask(mask_mod, None, None, nq, nkv, device=dev, BLOCK_SIZE=(qb, kb))
        ref_partial, ref_full, problem = _maps(ref_bm, rows, cols)
        if problem is not None:
            self.failures.append(f"create_block_mask: {problem}")
            return
        for what, mine, theirs in (("partial", partial, ref_partial), ("full", full, ref_full)):
            if not torch.equal(mine, theirs):
                self.failures.append(
                    f"na_block_mask: {what} blocks differ from create_block_mask's: "
                    f"{int((mine & ~theirs).sum())} extra, {int((theirs & ~mine).sum())} missing")

        if cfg.adaptive is not None:
            self._check_adaptive(want, q_ord, kv_ord, (qb, kb))
        if self.attention:
            gen = torch.Generator().manual_seed(1000 + cfg.index)
            q = torch.randn(1, HEADS, nq, HEAD_DIM, generator=gen)
            k, v = (torch.randn(1, HEADS, nkv, HEAD_DIM, generator=gen) for _ in range(2))
            out = self.flex(q.to(dev), k.to(dev), v.to(dev), block_mask=bm)
            ref, _ = reference_attention(q, k, v, want)
            out = out.double().cpu()
            self.error = float((out - ref).abs().max()) if out.shape == ref.shape else math.inf
            if not (torch.isfinite(out).all() and self.error <= self.tol):
                self.failures.append(f"flex_attention: max |out - reference| = {self.error:.3g} "
                                     f"> tolerance {self.tol:g}")
            if self.flash:
                self._flash_differential(want)

    def _masks(self, block_size: tuple[int, int] | None) -> tuple[Any, Any]:
        """The config's mask_mod and its BlockMask for ``block_size``, built by the call a user
        makes for that kind of rule (STA, radial, NA)."""
        cfg, dev = self.cfg, self.device
        if cfg.rule == "sliding_tile":
            assert cfg.sta_tile is not None and cfg.window is not None
            sta = (cfg.shape, cfg.sta_tile, cfg.window)
            return (flexna.sta_mask_mod(*sta, text_length=cfg.text, device=dev),
                    flexna.sta_block_mask(*sta, text_length=cfg.text, block_size=block_size, device=dev))
        if cfg.radial is not None:
            spec = flexna.MaskSpec.create(cfg.pattern(), q_tile=cfg.q_tile, kv_tile=cfg.kv_tile,
                                          block_size=block_size)
            return flexna.spec_mask_mod(spec, dev), flexna.spec_block_mask(spec, dev)
        kwargs: dict[str, Any] = {"q_tile": cfg.q_tile, "kv_tile": cfg.kv_tile, "device": dev,
                                  "curve": cfg.curve}
        return (flexna.na_mask_mod(*cfg.pattern_args(), **kwargs),
                flexna.na_block_mask(*cfg.pattern_args(), block_size=block_size, **kwargs))

    def _flash_differential(self, want: torch.Tensor) -> None:
        """FLASH and Triton on the same half-precision inputs and FLASH-sized blocks, each against
        the float64 reference (FLASH has had silently wrong code generation upstream)."""
        from flexna.backends import block_sizes

        cfg, dev = self.cfg, self.device
        blocks = block_sizes("flash", dev)
        if any(b % _tile_tokens(t) for b, t in zip(blocks, (cfg.q_tile, cfg.kv_tile), strict=True)):
            return  # tiles that do not divide FLASH's blocks: no FLASH BlockMask for this config
        try:
            bm = self._masks(blocks)[1]
        except ValueError:  # e.g. STA tiles that do not divide FLASH's blocks: no FLASH BlockMask
            return
        nq, nkv = want.shape
        gen = torch.Generator().manual_seed(2000 + cfg.index)
        q = torch.randn(1, HEADS, nq, FLASH_HEAD_DIM, generator=gen)
        k, v = (torch.randn(1, HEADS, nkv, FLASH_HEAD_DIM, generator=gen) for _ in range(2))
        ref, _ = reference_attention(q.half().double(), k.half().double(), v.half().double(), want)
        outs = {}
        for name, options in (("triton", {}), ("flash", {"BACKEND": "FLASH"})):
            out = self.flex(*(t.to(dev, torch.float16) for t in (q, k, v)), block_mask=bm,
                            kernel_options=options)
            outs[name] = out.double().cpu()
            err = float((outs[name] - ref).abs().max())
            if not (torch.isfinite(outs[name]).all() and err <= FLASH_TOL):
                self.failures.append(f"flex_attention BACKEND={name.upper()} (fp16): max |out - "
                                     f"reference| = {err:.3g} > tolerance {FLASH_TOL:g}")
        diff = float((outs["flash"] - outs["triton"]).abs().max())
        if diff > FLASH_TOL:
            self.failures.append(f"FLASH vs Triton (fp16): max difference {diff:.3g} > {FLASH_TOL:g}")
        self.flash_checked = True


    def _check_adaptive(self, window: torch.Tensor, q_ord: np.ndarray, kv_ord: np.ndarray,
                        blocks: tuple[int, int]) -> None:
        """``adaptive_block_mask`` == the window OR the blocks a NumPy restatement of the
        selection picks (pooled means of real tokens, softmax, ascending cumulative sum / top-k),
        on every pair of every (batch, head), and its block lists cover exactly that."""
        from torch.nn.attention.flex_attention import create_mask

        cfg, dev = self.cfg, self.device
        assert cfg.adaptive is not None
        mode, value = cfg.adaptive
        gen = torch.Generator().manual_seed(2000 + cfg.index)
        nq, nkv = window.shape
        q = torch.randn(1, HEADS, nq, HEAD_DIM, generator=gen, dtype=torch.float64)
        k = torch.randn(1, HEADS, nkv, HEAD_DIM, generator=gen, dtype=torch.float64)
        spec = flexna.MaskSpec.create(flexna.NAPattern.create(*cfg.pattern_args()), q_tile=cfg.q_tile,
                                      kv_tile=cfg.kv_tile, block_size=cfg.block_size)
        bm = flexna.adaptive_block_mask(q.to(dev), k.to(dev), spec, **{mode: value})
        qb, kb = blocks
        rows, cols = -(-nq // qb), -(-nkv // kb)
        q_real, kv_real = q_ord >= 0, kv_ord >= 0

        def pooled(x: np.ndarray, real: np.ndarray, block: int, count: int) -> tuple[np.ndarray, np.ndarray]:
            out, has = np.zeros((count, x.shape[-1])), np.zeros(count, dtype=bool)
            for r in range(count):
                idx = np.arange(r * block, min(len(real), (r + 1) * block))
                idx = idx[real[idx]]
                has[r] = idx.size > 0
                out[r] = x[idx].mean(0) if idx.size else 0
            return out, has

        want = window.clone()[None].repeat(HEADS, 1, 1)
        for h in range(HEADS):
            pq, q_has = pooled(q[0, h].numpy(), q_real, qb, rows)
            pk, k_has = pooled(k[0, h].numpy(), kv_real, kb, cols)
            scores = np.where(k_has[None, :], pq @ pk.T / math.sqrt(HEAD_DIM), -np.inf)
            sel = np.zeros((rows, cols), dtype=bool)
            for r in np.flatnonzero(q_has):
                if mode == "top_k":
                    sel[r, np.argsort(-scores[r], kind="stable")[:value]] = True
                else:
                    p = np.exp(scores[r] - scores[r].max())
                    p /= p.sum()
                    asc = np.argsort(p, kind="stable")
                    sel[r, asc[np.cumsum(p[asc]) >= 1 - value]] = True
            sel &= k_has[None, :]
            tokens = torch.from_numpy(sel).repeat_interleave(qb, 0).repeat_interleave(kb, 1)[:nq, :nkv]
            want[h] |= tokens & torch.from_numpy(q_real[:, None] & kv_real[None, :])
        got = create_mask(bm.mask_mod, 1, HEADS, nq, nkv, device=dev)[0].cpu()
        if not torch.equal(got, want):
            self.failures.append(f"adaptive_block_mask ({mode}={value}): mask_mod differs from the "
                                 f"brute force on {int((got != want).sum())} pairs")
            return
        partial, full = (m[0].cpu() for m in block_maps(bm))
        for h in range(HEADS):
            cover = _expand_blocks(full[h], qb, kb, nq, nkv) | (_expand_blocks(partial[h], qb, kb, nq, nkv)
                                                                 & want[h])
            if not torch.equal(cover, want[h]):
                self.failures.append(f"adaptive_block_mask ({mode}={value}): head {h}'s blocks do not "
                                     f"cover the brute force ({int((cover != want[h]).sum())} pairs differ)")


class _Progress:
    """A ``\\r`` bar on a terminal, a plain line every 10% otherwise."""

    def __init__(self, total: int, out: IO[str]) -> None:
        self.total, self.out = total, out
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.last_line = 0

    def update(self, done: int, failed: int) -> None:
        if self.tty:
            width = 30
            fill = width * done // max(1, self.total)
            self.out.write(f"\r  [{'#' * fill}{'.' * (width - fill)}] {done}/{self.total} configs, "
                           f"{failed} failed")
            if done == self.total:
                self.out.write("\n")
            self.out.flush()
        elif done == self.total or done * 10 // max(1, self.total) > self.last_line:
            self.last_line = done * 10 // max(1, self.total)
            print(f"  {done}/{self.total} configs checked, {failed} failed", file=self.out,
                  flush=True)


@contextmanager
def _quiet_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


@contextmanager
def _recompile_limit(limit: int):
    """Raise dynamo's per-function recompile limit, so no config silently falls back to eager."""
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    old = getattr(cfg, name)
    setattr(cfg, name, max(old, limit))
    try:
        yield
    finally:
        setattr(cfg, name, old)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``: CUDA when available, else CPU. ``ValueError`` for CUDA without a GPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device = {str(device)!r} is not available: torch.cuda.is_available() is "
                         "False (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device = {str(device)!r} is not supported: use cpu or cuda")
    return dev


def run_verify(
    n: int = 100,
    seed: int = 0,
    device: str | torch.device | None = None,
    max_tokens: int = 1024,
    attention: bool = True,
    compiled: bool | None = None,
    start: int = 0,
    out: IO[str] | None = None,
) -> bool:
    """Check ``n`` random configurations (indices ``start .. start + n - 1`` of ``seed``).

    ``compiled=None`` compiles FlexAttention on CUDA and runs it eagerly on CPU.
    Prints progress, a summary and every failure; returns True when all passed.
    """
    out = out or sys.stdout
    if n < 1:
        raise ValueError(f"n = {n} is out of range: need n >= 1")
    if max_tokens < 1:
        raise ValueError(f"max_tokens = {max_tokens} is out of range: need max_tokens >= 1")
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    use_compile = cuda if compiled is None else compiled
    from torch.nn.attention.flex_attention import flex_attention

    # one compiled function for every configuration: after the first recompile torch marks the
    # changing sizes dynamic, so a run compiles a handful of graphs (about 6), not one per config
    flex = torch.compile(flex_attention) if use_compile else flex_attention
    tol = 2e-4 if cuda else 1e-4
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    from flexna import flash_unavailable

    no_flash = flash_unavailable(dev) if attention and use_compile else "attention not compiled"
    print(f"flexna verify: {n} random configurations (seed {seed}"
          f"{f', from index {start}' if start else ''}) on {dev} ({name}), torch {torch.__version__}, "
          f"at most {max_tokens} tokens; attention "
          f"{('compiled' if use_compile else 'eager') if attention else 'not checked'}; FLASH-vs-Triton "
          f"differential: {'on' if no_flash is None else 'off (' + no_flash + ')'}", file=out)
    flash_runs = 0
    progress = _Progress(n, out)
    failed: list[Check] = []
    max_err = 0.0
    t0 = time.perf_counter()
    with _quiet_flex(), _recompile_limit(256):
        for i, index in enumerate(range(start, start + n)):
            rng = random.Random(seed * 1_000_003 + index)
            cfg = random_config(rng, index, max_tokens, cuda)
            check = Check(cfg, dev, attention, flex, tol, flash=no_flash is None)
            try:
                check.run()
            except Exception as exc:  # a crash is a failure of this config, not of the run
                check.failures.append(f"raised {type(exc).__name__}: {exc}")
            max_err = max(max_err, check.error)
            flash_runs += check.flash_checked
            if check.failures:
                failed.append(check)
            progress.update(i + 1, len(failed))
    seconds = time.perf_counter() - t0
    print(f"\n{n - len(failed)}/{n} configurations passed, {len(failed)} failed in {seconds:.1f} s"
          + (f"; max |attention - float64 reference| = {max_err:.2e} (tolerance {tol:g})"
             if attention else "")
          + (f"; FLASH differential on {flash_runs} of them" if no_flash is None else ""), file=out)
    for check in failed:
        cfg = check.cfg
        print(f"\nFAILED config {cfg.index} (reproduce: flexna verify --seed {seed} --start {cfg.index} "
              f"--n 1 --max-tokens {max_tokens} --device {dev.type}):\n  {cfg.call()}", file=out)
        for msg in check.failures:
            print(f"  - {msg}", file=out)
    print("all PASS" if not failed else "FAIL", file=out)
    return not failed
