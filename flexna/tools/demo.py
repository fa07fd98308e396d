"""``flexna demo``: build two patterns, run fused attention, check it against the reference."""

from __future__ import annotations

import time

import torch

import flexna
from flexna.reference import reference_attention, reference_mask
from flexna.tools.blockmaps import block_maps

# (title, layout, kernel, stride, dilation, causal); small enough for the O(N^2) reference.
DEMO_PATTERNS = [
    ("2-D image, dilated", (40, 48), (7, 7), (1, 1), (2, 3), (False, False)),
    ("3-D video, strided, causal in time", (8, 16, 20), (4, 6, 8), (2, 3, 4), (1, 1, 1),
     (True, False, False)),
]


def _block_stats(mask: torch.nn.attention.flex_attention.BlockMask) -> tuple[int, int, int]:
    """``(full, partial, total)`` blocks of the mask (``BlockMask.to_dense()`` of each list)."""
    partial, full = block_maps(mask)
    return int(full.sum()), int(partial.sum()), partial[0, 0].numel()


def run_demo(device: str | None = None, heads: int = 4, head_dim: int = 64, seed: int = 0) -> bool:
    """Run the demo; print a report per pattern; return True when all passed."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    tol = 2e-2 if dtype == torch.float16 else 1e-4
    print(f"flexna demo on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, {dtype}, {heads} heads x {head_dim}")
    gen = torch.Generator().manual_seed(seed)
    all_ok = True
    for title, shape, kernel, stride, dilation, causal in DEMO_PATTERNS:
        pattern = flexna.NAPattern.create(shape, kernel, stride, dilation, causal)
        print(f"\n== {title}: {pattern}")
        flexna.na_block_mask(shape, kernel, stride, dilation, causal, device=dev)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mask = flexna.na_block_mask(shape, kernel, stride, dilation, causal, device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        build_ms = (time.perf_counter() - t0) * 1e3
        full, partial, total = _block_stats(mask)
        n = pattern.num_tokens
        print(f"   tokens {n}, density {pattern.density():.4f}, FLOP-wise limit "
              f"{pattern.flop_limit():.1f}x over dense")
        print(f"   BlockMask 128x128: {full} full + {partial} partial blocks of {total}, "
              f"built in {build_ms:.1f} ms")
        q, k, v = (torch.randn(1, *shape, heads, head_dim, generator=gen).to(dev, dtype)
                   for _ in range(3))
        t0 = time.perf_counter()
        out = flexna.neighborhood_attention(q, k, v, kernel, stride, dilation, causal)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        dense = reference_mask(shape, kernel, stride, dilation, causal)
        q_r, k_r, v_r = (t.reshape(1, n, heads, -1).transpose(1, 2) for t in (q, k, v))
        ref, _ = reference_attention(q_r, k_r, v_r, dense)
        ref = ref.transpose(1, 2).reshape(out.shape)
        err = (out.double().cpu() - ref).abs().max().item()
        ok = bool(torch.isfinite(out).all()) and err < tol
        all_ok &= ok
        print(f"   fused flex_attention (first call, compile included): {first_s:.1f} s")
        print(f"   max |out - float64 reference| = {err:.2e} (tolerance {tol:.0e}): "
              f"{'PASS' if ok else 'FAIL'}")
    print("\nall PASS" if all_ok else "\nFAIL")
    return all_ok
