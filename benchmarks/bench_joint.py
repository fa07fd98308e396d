"""Where a FLUX joint-attention call's time goes (issue 14): the bare pattern, + text keys,
+ text queries, text query rows first or last, and the diffusers processor's whole call.

    PYTHONPATH=$PWD FLEXNA_MASKS=$PWD/masks python benchmarks/bench_joint.py [--entry flux-gna] [--text 512]

fp16 forward, batch 1, the catalogue entry's heads and head_dim, on each backend available
(Triton; FLASH where flash-attn-4 is installed). Rows (median ms of ``do_bench``):

* ``bare``: the pattern alone, inputs already in tile order (kernel only);
* ``+text kv``: every layout query also attends the text keys;
* ``+text q,kv (last)``: and the text queries attend everything, their block rows last in
  the query order (how :class:`flexna.MaskSpec` lays extra queries out);
* ``+text q,kv (first)``: the same pairs with the text query rows moved to the front of the
  query order (a hand-permuted BlockMask), to see whether the heavy rows' position matters;
* ``processor core``: :func:`flexna.tiled_neighborhood_attention` on the joint sequence the
  FLUX processor hands it (image tokens in the model's tiled order, then the text:
  ``num_extra_tokens``), through the public API (plan, cached BlockMask, kernel).

Prints a markdown table; ``--out FILE`` writes it too.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.backends import backend_options, flash_unavailable
from flexna.blockmask import spec_block_mask
from flexna.tools.catalogue import load_entry


def bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def text_rows_first(bm: BlockMask, layout_q: int, text_q: int) -> BlockMask:
    """``bm`` (extra query rows last) with the extra query rows moved to the front: query index
    ``i < text_q`` is extra query ``i``, the rest are the layout's in their order."""
    qb = bm.BLOCK_SIZE[0]
    assert layout_q % qb == 0 and text_q % qb == 0, "needs block-aligned text rows"
    nl, nt = layout_q // qb, text_q // qb
    perm = torch.cat([torch.arange(nl, nl + nt), torch.arange(nl)]).to(bm.kv_num_blocks.device)
    inner = bm.mask_mod

    def mask_mod(b, h, q_idx, kv_idx):
        q = torch.where(q_idx < text_q, q_idx + layout_q, q_idx - text_q)
        return inner(b, h, q, kv_idx)

    return BlockMask.from_kv_blocks(bm.kv_num_blocks[:, :, perm], bm.kv_indices[:, :, perm],
                                    bm.full_kv_num_blocks[:, :, perm], bm.full_kv_indices[:, :, perm],
                                    BLOCK_SIZE=bm.BLOCK_SIZE, mask_mod=mask_mod, seq_lengths=bm.seq_lengths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", default="flux-gna")
    ap.add_argument("--text", type=int, default=512)
    ap.add_argument("--out")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_joint.py: no CUDA device, nothing measured")
        return
    dev = torch.device("cuda")
    e = load_entry(a.entry)
    pattern, heads, dim, m = e.pattern, e.heads, e.head_dim, a.text
    tiles = flexna.choose_tiles(pattern)
    qt, kt = tiles if tiles else (None, None)
    flex = torch.compile(flex_attention, dynamic=False)
    backends = ["triton"] + ([] if flash_unavailable(dev) else ["flash"])
    lines = [f"# FLUX joint attention, where the time goes: {torch.cuda.get_device_name()}, torch "
             f"{torch.__version__}, {datetime.date.today()}", "",
             f"`{a.entry}` ({pattern}), tiles {qt} / {kt}, {heads} heads x {dim}, {m} text tokens, fp16 "
             "forward, batch 1, median ms (do_bench).", "",
             "| row | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    results: dict[str, dict[str, float]] = {}
    for backend in backends:
        opts = backend_options(backend, dev) or None
        for name, mq, mk in (("bare", 0, 0), ("+text kv", 0, m), ("+text q,kv (last)", m, m)):
            spec = flexna.MaskSpec.create(pattern, q_tile=qt, kv_tile=kt, num_extra_q=mq, num_extra_kv=mk)
            bm = spec_block_mask(spec, dev)
            q = torch.randn(1, heads, spec.q_len, dim, device=dev, dtype=torch.float16)
            k = torch.randn(1, heads, spec.kv_len, dim, device=dev, dtype=torch.float16)
            results.setdefault(name, {})[backend] = bench(
                lambda q=q, k=k, bm=bm, o=opts: flex(q, k, k, block_mask=bm, kernel_options=o))
            if mq:
                first = text_rows_first(bm, spec.q_len - mq, mq)
                qf = torch.cat([q[:, :, -mq:], q[:, :, :-mq]], 2)
                ref = flex(q, k, k, block_mask=bm, kernel_options=opts)
                got = flex(qf, k, k, block_mask=first, kernel_options=opts)
                err = (torch.cat([got[:, :, mq:], got[:, :, :mq]], 2) - ref).abs().max().item()
                assert err < 1e-2, f"text-first mask differs from text-last by {err}"
                results.setdefault("+text q,kv (first)", {})[backend] = bench(
                    lambda qf=qf, k=k, first=first, o=opts: flex(qf, k, k, block_mask=first, kernel_options=o))
        # what the FLUX processor runs: the joint sequence [image tokens in the model's order, text]
        layout = flexna.TokenLayout.create(pattern.shape, qt if qt == kt else None)
        x = torch.randn(1, layout.length + m, heads, dim, device=dev, dtype=torch.float16)
        with torch.no_grad():
            results.setdefault(f"processor core (joint, tile {layout.tile})", {})[backend] = bench(
                lambda x=x, layout=layout, b=backend: flexna.tiled_neighborhood_attention(
                    x, x, x, layout, pattern.kernel_size, pattern.stride, pattern.dilation, pattern.is_causal,
                    num_extra_tokens=m, backend=b))
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(b, float('nan')):.3f}" for b in backends) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
