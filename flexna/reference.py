"""Brute-force reference: the dense mask straight from the definition, float64 attention.

This module deliberately shares no code with the mask builders: it restates
the per-axis rule of ``docs/SEMANTICS.md`` literally over all ``N x N`` pairs with
NumPy, so that tests and ``flexna verify`` compare the fast paths against an
independent statement of the contract. It is O(N^2) in time and memory: use
it on small layouts only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _per_axis(value: int | bool | Sequence, n: int) -> list:
    if isinstance(value, (int, bool, np.integer)):
        return [value] * n
    return list(value)


def reference_mask(
    shape: int | Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
) -> torch.Tensor:
    """Dense ``[N, N]`` bool mask in row-major token order: ``[q, k]`` True iff q attends k.

    Inputs are taken as given (no validation beyond what the rule needs);
    pass only valid patterns.
    """
    shape = [shape] if isinstance(shape, (int, np.integer)) else list(shape)
    n = len(shape)
    ks, ss, ds, cs = (_per_axis(v, n) for v in (kernel_size, stride, dilation, is_causal))
    total = int(np.prod(shape))
    coords = np.stack(np.unravel_index(np.arange(total), shape), axis=1)  # [N, n]
    allowed = np.ones((total, total), dtype=bool)
    for a in range(n):
        length, k, s, d, causal = shape[a], ks[a], ss[a], ds[a], bool(cs[a])
        x = coords[:, a][:, None]  # query coordinate, column vector
        y = coords[:, a][None, :]  # key coordinate, row vector
        same_group = (x % d) == (y % d)
        g = x % d
        xg, yg = x // d, y // d
        group_len = -(-(length - g) // d)  # ceil((L - g) / d)
        if causal:
            leader = np.minimum((xg // s) * s + s - 1, group_len - 1)
            ok = (yg <= xg) & (leader - yg < k)
        else:
            left = k // 2
            right = k // 2 + (k % 2) - 1
            leader = np.minimum((xg // s) * s + s // 2, group_len - 1)
            centre = np.clip(leader, left, group_len - 1 - right)
            ok = (centre - left <= yg) & (yg <= centre + right)
        allowed &= same_group & ok
    return torch.from_numpy(allowed)


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention in float64 on the CPU.

    ``query`` ``[B, H, Nq, D]``, ``key``/``value`` ``[B, H, Nkv, D(v)]``,
    ``mask`` broadcastable to ``[B, H, Nq, Nkv]`` (True = attend). Returns
    ``(out, lse)`` like ``flex_attention(..., return_lse=True)``: rows with no
    key attended give output 0 and lse ``-inf``.
    """
    q, k, v = (t.detach().to("cpu", torch.float64) for t in (query, key, value))
    mask = mask.to("cpu")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0)[..., None])
    probs = probs.masked_fill(~mask, 0.0)
    return probs @ v, lse


def reference_sliding_tile_mask(
    shape: int | Sequence[int],
    tile: int | Sequence[int],
    window: int | Sequence[int],
) -> torch.Tensor:
    """Dense ``[N, N]`` mask of sliding tile attention (STA) in row-major token order.

    Restates STA literally: per axis the query's tile ``X = x // t`` picks the centre tile
    ``clamp(X, w // 2, G - 1 - (w - 1 - w // 2))`` (``G = L // t`` tiles, ``w`` window tiles)
    and the key's tile must lie within ``w // 2`` tiles before and ``w - 1 - w // 2`` after it.
    """
    shape = [shape] if isinstance(shape, (int, np.integer)) else list(shape)
    n = len(shape)
    ts, ws = _per_axis(tile, n), _per_axis(window, n)
    total = int(np.prod(shape))
    coords = np.stack(np.unravel_index(np.arange(total), shape), axis=1)
    allowed = np.ones((total, total), dtype=bool)
    for a in range(n):
        t, w, tiles = ts[a], ws[a], shape[a] // ts[a]
        before, after = w // 2, w - 1 - w // 2
        centre = np.clip(coords[:, a] // t, before, tiles - 1 - after)[:, None]
        key_tile = (coords[:, a] // t)[None, :]
        allowed &= (centre - before <= key_tile) & (key_tile <= centre + after)
    return torch.from_numpy(allowed)


def reference_radial_mask(num_frames: int, tokens_per_frame: int, model: str = "hunyuan",
                          decay_factor: float = 1.0, block_size: int = 128) -> torch.Tensor:
    """Dense ``[N, N]`` token-level mask of radial attention (row-major: frame, then token).

    Restates the authors' construction (``gen_log_mask_shrinked`` before its block shrinking)
    literally, one frame pair at a time: ``get_window_width`` (float widths) and
    ``get_diagonal_split_mask`` (threshold 128), the sink on frame 0 for ``"wan"``.
    """
    t = tokens_per_frame
    rows = np.arange(t)[:, None]
    cols = np.arange(t)[None, :]
    out = np.zeros((num_frames * t, num_frames * t), dtype=bool)
    for i in range(num_frames):
        for j in range(num_frames):
            dist = abs(i - j)
            group = dist.bit_length()
            if j == 0 and model == "wan":
                local = np.ones((t, t), dtype=bool)
            else:
                if model == "wan" and dist < 1:
                    width: float = t
                elif model == "wan" and dist == 1:
                    width = t // 2
                elif model == "hunyuan" and dist <= 1:
                    width = t
                else:
                    decay = 2 ** t.bit_length() / 2**group * decay_factor
                    width = decay if decay >= block_size else block_size
                local = np.abs(cols - rows) <= width
                split_decay = 2 ** t.bit_length() / 2**group
                if split_decay < 128 and dist % int(128 / split_decay) != 0:
                    local = np.zeros((t, t), dtype=bool)
            out[i * t:(i + 1) * t, j * t:(j + 1) * t] = local
    return torch.from_numpy(out)


def reference_radial_window_mask(shape: Sequence[int], radius: Sequence[int], min_radius: Sequence[int],
                                 dense_frames: int = 1, sink: bool = False) -> torch.Tensor:
    """Dense ``[N, N]`` mask of the 3-D-window radial variant (row-major over ``(frames, *spatial)``).

    Per frame pair at distance ``d``: the spatial half-widths are ``radius`` halved once per
    doubling of ``d`` past ``dense_frames`` (``max(radius >> max(0, bitlen(d) - bitlen(dense)),
    min_radius)``); ``sink``: frame 0 is attended whole.
    """
    frames, *spatial = (int(v) for v in shape)
    per_frame = int(np.prod(spatial))
    coords = np.stack(np.unravel_index(np.arange(per_frame), spatial), axis=1)
    out = np.zeros((frames * per_frame, frames * per_frame), dtype=bool)
    for i in range(frames):
        for j in range(frames):
            halvings = max(0, abs(i - j).bit_length() - int(dense_frames).bit_length())
            local = np.ones((per_frame, per_frame), dtype=bool)
            for a, (r, low) in enumerate(zip(radius, min_radius, strict=True)):
                width = max(int(r) >> halvings, int(low))
                local &= np.abs(coords[:, None, a] - coords[None, :, a]) <= width
            if sink and j == 0:
                local[:] = True
            out[i * per_frame:(i + 1) * per_frame, j * per_frame:(j + 1) * per_frame] = local
    return torch.from_numpy(out)
