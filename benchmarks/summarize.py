"""Merge bench_attention.py's JSON files into one results file with ratios and the targets.

    python benchmarks/summarize.py benchmarks/results/NVIDIA-H200-2026-11-21-*.json \
        --out benchmarks/results/NVIDIA-H200-2026-11-21.md

Per (dtype, direction) a table of times (median ms) and ratios, then the issue's targets
(met / missed, by how much) on every row. Times and ratios come from the same run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

STRIDED_SPARSE_TARGET = 1.05  # flexna kernel <= 1.05 x (Flex dense / FLOP-wise limit)
PLAIN_TARGETS = {"flux-na": 5.0, "hunyuan-na": 3.0}  # x faster than cuDNN
E2E_TARGET, E2E_1D_TARGET = 1.5, 10.0  # x faster than NATTEN's Flex backend per call
BUILD_TARGET_MS = 1.0


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def kernel_best(r: dict) -> float | None:
    times = [r[k] for k in ("rowmajor", "tiled") if k in r]
    return min(times) if times else None


def blocks(r: dict, key: str) -> str:
    return f"{r[key][0]}/{r[key][1]} f/p" if key in r else "not run"


def table(meta: dict, rows: list[dict]) -> str:
    direction = "forward + backward" if meta["backward"] else "forward"
    out = [f"### {meta['dtype']}, {direction}\n",
           f"{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. "
           "Median ms (triton do_bench, CUDA events). Kernel = flexna's fused call on inputs "
           "already in its order; e2e = `flexna.neighborhood_attention(tiles='auto')` on NATTEN-layout "
           "tensors (permutes included, BlockMask cached); cold = BlockMask rebuilt every call.\n",
           "| workload | cuDNN | flash | Flex dense | limit | flexna row-major | flexna tiled (tiles) | "
           "kernel × cuDNN | kernel vs dense/limit | e2e (auto tiles) | e2e cold | NATTEN Flex | "
           "e2e × NATTEN | build ms rm / tiled | permute GB/s |",
           "|" + "---|" * 15]
    for r in rows:
        best = kernel_best(r)
        cud = r.get("cudnn")
        dense = r.get("flex_dense")
        nat = r.get("natten")
        out.append("| " + " | ".join([
            r["name"], fmt(cud), fmt(r.get("flash")), fmt(dense), f"{r['limit']:.2f}×",
            f"{fmt(r.get('rowmajor'))} ({blocks(r, 'rowmajor_blocks')})",
            f"{fmt(r.get('tiled'))} ({r.get('tiles')}, {blocks(r, 'tiled_blocks')})" if "tiles" in r else "—",
            f"{cud / best:.2f}×" if cud and best else "—",
            f"{best / (dense / r['limit']):.2f}" if dense and best else "—",
            f"{fmt(r.get('e2e'))} ({r.get('auto_tiles')})", fmt(r.get("e2e_cold")),
            fmt(nat) if nat else r.get("natten_error", "n/a")[:60],
            f"{nat / r['e2e']:.2f}×" if nat and r.get("e2e") else "—",
            f"{fmt(r.get('build_rowmajor_ms'))} / {fmt(r.get('build_tiled_ms'))}",
            f"{r['permute_gbps']:.0f} / {r['unpermute_gbps']:.0f}" if "permute_gbps" in r else "—",
        ]) + " |")
    errors = [(r["name"], k, v) for r in rows for k, v in r.items() if k.endswith("_error")]
    if errors:
        out.append("\nErrors: " + "; ".join(f"{n} {k}: {v}" for n, k, v in errors))
    return "\n".join(out) + "\n"


def targets(meta: dict, rows: list[dict]) -> list[str]:
    """One line per (target, row): met or missed, by how much."""
    lines = []
    tag = f"{meta['dtype']} {'fwd+bwd' if meta['backward'] else 'fwd'}"
    for r in rows:
        best = kernel_best(r)
        dense = r.get("flex_dense")
        sparse = r.get("tiled_predicted_partial") == 0 or (r["ndim"] == 1 and "rowmajor_blocks" in r
                                                            and r["rowmajor_blocks"][1] == 0)
        if sparse and best and dense:
            ratio = best / (dense / r["limit"])
            lines.append(f"| {tag} | {r['name']} | kernel ≤ {STRIDED_SPARSE_TARGET} × dense/limit | "
                         f"{ratio:.2f} | {'met' if ratio <= STRIDED_SPARSE_TARGET else 'MISSED'} |")
        if r["name"] in PLAIN_TARGETS and best and r.get("cudnn"):
            x = r["cudnn"] / best
            want = PLAIN_TARGETS[r["name"]]
            lines.append(f"| {tag} | {r['name']} | kernel ≥ {want}× faster than cuDNN | {x:.2f}× | "
                         f"{'met' if x >= want else 'MISSED'} |")
        if r.get("natten") and r.get("e2e"):
            want = E2E_1D_TARGET if r["ndim"] == 1 else E2E_TARGET
            for key, label in (("e2e", "cached mask"), ("e2e_cold", "mask rebuilt")):
                if r.get(key):
                    x = r["natten"] / r[key]
                    lines.append(f"| {tag} | {r['name']} | e2e ({label}) ≥ {want}× NATTEN Flex | {x:.2f}× | "
                                 f"{'met' if x >= want else 'MISSED'} |")
        build = r.get("build_rowmajor_ms") if r.get("auto_tiles") == "row-major" else r.get("build_tiled_ms")
        if build is None:
            continue
        lines.append(f"| {tag} | {r['name']} | BlockMask build ≤ {BUILD_TARGET_MS} ms (order flexna runs) | "
                     f"{build:.2f} ms | {'met' if build <= BUILD_TARGET_MS else 'MISSED'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--notes", default="", help="markdown appended after the tables (analysis of misses)")
    a = ap.parse_args()
    runs = [json.loads(Path(f).read_text()) for f in sorted(a.files)]
    runs.sort(key=lambda r: (r["meta"]["backward"], r["meta"]["dtype"]))
    merged: dict[tuple, dict] = {}
    for run in runs:  # several files of one (dtype, direction): concatenate their rows
        key = (run["meta"]["dtype"], run["meta"]["backward"])
        if key in merged:
            merged[key]["rows"] += run["rows"]
        else:
            merged[key] = {"meta": run["meta"], "rows": list(run["rows"])}
    order = ["long-1d", "long-1d-s256", "long-1d-blocked", "flux-na", "flux-gna", "hunyuan-na", "hunyuan-gna"]
    meta0 = runs[0]["meta"]
    parts = [f"# flexna benchmarks — {meta0['device']}, torch {meta0['torch']}, {meta0['date']}\n",
             "Batch 1, heads / head_dim of each catalogue entry (masks/*.json). Produced by "
             "`python benchmarks/run_all.py` (bench_attention.py per dtype × direction, then this "
             "script).\n"]
    target_lines = []
    for run in merged.values():
        run["rows"].sort(key=lambda r: order.index(r["name"]) if r["name"] in order else 99)
        parts.append(table(run["meta"], run["rows"]))
        target_lines += targets(run["meta"], run["rows"])
    parts.append("## Targets\n\n| run | workload | target | measured | |\n|---|---|---|---|---|\n"
                 + "\n".join(target_lines) + "\n")
    val = [(r["name"], c, ms) for run in merged.values() for r in run["rows"]
           for (_, c, ms) in r.get("validate", [])]
    if len(val) > 2:
        import statistics
        corr = statistics.correlation([c for _, c, _ in val], [ms for _, _, ms in val])
        parts.append(f"## Predictor check\n\nPearson correlation of predicted cost vs measured kernel "
                     f"time over {len(val)} (workload, tiles) points: {corr:.3f}\n")
    if a.notes:
        parts.append(Path(a.notes).read_text())
    Path(a.out).write_text("\n".join(parts))
    print("\n".join(parts))


if __name__ == "__main__":
    main()
