"""The ``flexna`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexna",
        description="Neighborhood attention as FlexAttention masks: demos and tools.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="build a 2-D and a 3-D pattern, run fused attention, verify against the reference",
        description="Builds two neighborhood patterns (2-D dilated; 3-D strided and causal in "
        "time), prints their density, FLOP-wise limit and block counts, runs fused "
        "flex_attention and compares it with a float64 brute-force reference. Exits 1 on FAIL.",
    )
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the inputs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from flexna.demo import run_demo

        return 0 if run_demo(device=args.device, seed=args.seed) else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
