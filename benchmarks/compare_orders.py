"""Block counts of the catalogue's 2-D / 3-D rows in each token order (host only, no GPU).

For every 2-D / 3-D entry of ``masks/``: row-major, the tile search's best one-tile-per-block
order, and the Hilbert and Morton curve orders (:class:`flexna.CurveOrder`), all with
128-token blocks, and the cost model's predicted speed-up over dense Flex. Writes a Markdown
table (default ``benchmarks/results/orders-cpu-<date>.md``)::

    python benchmarks/compare_orders.py [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flexna
from flexna.tools.catalogue import load_all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    today = datetime.date.today().isoformat()
    parser.add_argument("--out", default=f"benchmarks/results/orders-cpu-{today}.md")
    args = parser.parse_args()
    lines = [f"# Token orders on the catalogue rows ({today}, host-side analysis)", "",
             "128-token blocks on both sides; predicted speed-up over dense Flex by the cost model "
             "of `flexna.analysis` (full + alpha * partial blocks).", "",
             "| workload | order | full | partial | empty | predicted | build (s) |",
             "|---|---|---|---|---|---|---|"]
    entries, _ = load_all()
    for entry in entries:
        if entry.pattern.ndim < 2:
            continue
        for a in flexna.compare_orders(entry.pattern):
            build = ""
            if a.curve is not None:  # time the per-token block maps (cache cleared)
                flexna.clear_cache()
                t0 = time.perf_counter()
                a = flexna.analyze(entry.pattern, curve=a.curve)
                build = f"{time.perf_counter() - t0:.2f}"
            order = a.curve or ("row-major" if a.q_tile == (1,) * entry.pattern.ndim else
                                f"tiles {'x'.join(map(str, a.q_tile))} / {'x'.join(map(str, a.kv_tile))}")
            lines.append(f"| {entry.name} | {order} | {a.full_blocks} | {a.partial_blocks} | "
                         f"{a.empty_blocks} | {a.predicted_speedup:.2f}x | {build} |")
        print(entry.name, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
