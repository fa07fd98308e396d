"""The ``flexna`` command line: ``demo``, ``list``, ``show``, ``analyze``, ``verify``, ``bench``."""

from __future__ import annotations

import argparse
import importlib
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

EPILOG_MAIN = """\
examples:
  flexna demo                                    build two patterns, run fused attention, verify
  flexna list                                    the catalogue of named configurations
  flexna show nat-7x7                            summary + nat-7x7.png (neighborhood, block mask)
  flexna show --shape 56 56 --kernel 7 7 --dilation 2 2
  flexna analyze flux-gna --q-tile 16 8 --kv-tile 16 8
  flexna verify --n 100 --device cpu             fuzz-check flexna against the reference
  flexna bench --workloads flux-na               GPU benchmark (CUDA only)

Run `flexna COMMAND --help` for the options of a command.
"""

PATTERN_HELP = """\
A pattern is either a catalogue NAME (see `flexna list`) or --shape with --kernel and
optionally --stride, --dilation, --causal. Each takes one value per layout axis, or a
single value for all axes. --q-tile/--kv-tile choose tiled token orders (one int per axis),
--block-size the BlockMask block sizes in tokens (one value, or q and kv).
"""

EPILOG_SHOW = PATTERN_HELP + """
examples:
  flexna show nat-7x7                                   writes nat-7x7.png here
  flexna show video-causal --query 15 16 16 --out /tmp/video.png
  flexna show --shape 64 --kernel 9 --stride 3          1-D: writes na1d-64-k9-s3.png
  flexna show --shape 32 48 --kernel 7 7 --dilation 2 1 --causal 1 0
  flexna show --shape 16 64 64 --kernel 4 9 9 --q-tile 2 8 8 --kv-tile 2 8 8

The picture shows one query (red; default: the middle token), the queries of its stride
group that share its window (yellow), the keys it attends (blue) on the token layout (1-D:
a strip; 2-D: the grid; 3-D: the frames along axis 0), and the BlockMask: one square per
(query block, key block), full (dark blue), partial (orange, evaluated per element) or
empty (grey, skipped). Large layouts are pooled so pictures stay small.
"""

EPILOG_ANALYZE = PATTERN_HELP + """
examples:
  flexna analyze nat-7x7
  flexna analyze hunyuan-gna --q-tile 2 8 8 --kv-tile 2 8 8
  flexna analyze --shape 32768 --kernel 2048 --stride 256

Prints the density (fraction of query-key pairs attended), the FLOP-wise speed-up limit
over dense attention (1 / density), the full / partial / empty blocks of the BlockMask
in row-major order with 128-token blocks and for the given tiles, and suggested tiles.
"""

EPILOG_VERIFY = """\
examples:
  flexna verify                          100 configurations on CUDA if present, else CPU
  flexna verify --n 20 --device cpu --max-tokens 256 --no-attention
  flexna verify --seed 3 --start 41 --n 1   re-run one configuration of a failed run

Each configuration (random axes, lengths, kernel, stride, dilation, causal axes, token
tiles, block sizes) checks na_mask_mod and na_block_mask against the brute-force
reference mask, the block sets against create_block_mask, and flex_attention with the
BlockMask against float64 reference attention. Exit status 1 when anything differs;
failures print a line of Python that rebuilds the configuration.
"""

EPILOG_BENCH = """\
Runs benchmarks/bench_attention.py of the source checkout with the given arguments
(needs CUDA and the repository checkout, e.g. `pip install -e .`). Its options:
  flexna bench --help
examples:
  flexna bench                               all default workloads, fp16, forward
  flexna bench --workloads flux-na flux-gna --dtype bf16 --backward
"""

# library argument name -> command-line flag, for error messages
FLAGS = {
    "shape": "--shape", "kernel_size": "--kernel", "stride": "--stride", "dilation": "--dilation",
    "is_causal": "--causal", "q_tile": "--q-tile", "kv_tile": "--kv-tile",
    "block_size": "--block-size", "query": "--query", "name": "NAME", "n": "--n",
    "max_tokens": "--max-tokens", "device": "--device",
}
PATTERN_FLAGS = ("shape", "kernel", "stride", "dilation", "causal")


def _bool01(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "t", "yes", "y"):
        return True
    if value in ("0", "false", "f", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"invalid bool {text!r}: use 1/0 (or true/false)")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range: need >= 1")
    return value


def _add_pattern_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="catalogue name (see `flexna list`); or describe the pattern with --shape ...")
    g = p.add_argument_group("pattern (instead of NAME)")
    g.add_argument("--shape", type=int, nargs="+", metavar="L", help="token layout, 1 to 3 axes")
    g.add_argument("--kernel", type=int, nargs="+", metavar="K", help="window size per axis")
    g.add_argument("--stride", type=int, nargs="+", metavar="S", help="stride per axis (default 1)")
    g.add_argument("--dilation", type=int, nargs="+", metavar="D", help="dilation per axis (default 1)")
    g.add_argument("--causal", type=_bool01, nargs="+", metavar="0|1",
                   help="causal per axis, 1 or 0 (default 0)")
    b = p.add_argument_group("token order and blocks")
    b.add_argument("--q-tile", type=int, nargs="+", metavar="T", help="query tile per axis")
    b.add_argument("--kv-tile", type=int, nargs="+", metavar="T", help="key/value tile per axis")
    b.add_argument("--block-size", type=int, nargs="+", metavar="B",
                   help="BlockMask block size in tokens: one value or q kv (default: 128 "
                   "row-major, one tile when tiled)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexna",
        description="Neighborhood attention as FlexAttention masks: demos, pictures, analysis, "
        "verification and benchmarks.",
        epilog=EPILOG_MAIN, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    raw = argparse.RawDescriptionHelpFormatter
    demo = sub.add_parser(
        "demo",
        help="build a 2-D and a 3-D pattern, run fused attention, verify against the reference",
        description="Builds two neighborhood patterns (2-D dilated; 3-D strided and causal in "
        "time), prints their density, FLOP-wise limit and block counts, runs fused "
        "flex_attention and compares it with a float64 brute-force reference. Exits 1 on FAIL.",
    )
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for the inputs")

    sub.add_parser("list", help="list the catalogue of named configurations",
                   description="Lists the named configurations of the catalogue (masks/*.json) "
                   "with their pattern and description.")

    show = sub.add_parser(
        "show", help="summary and a PNG picture of a pattern (neighborhood and block mask)",
        description="Prints a summary of a pattern (layout, parameters, tokens, density, "
        "FLOP-wise limit, BlockMask block counts) and writes a PNG picture of one query's "
        "neighborhood and of the BlockMask.", epilog=EPILOG_SHOW, formatter_class=raw)
    _add_pattern_args(show)
    show.add_argument("--query", type=int, nargs="+", metavar="X",
                      help="coordinate of the query to draw, one per axis (default: the middle)")
    show.add_argument("--out", metavar="PATH",
                      help="PNG file or folder (default: NAME.png in the current folder)")

    analyze = sub.add_parser(
        "analyze", help="density, FLOP-wise limit, block counts and suggested tiles of a pattern",
        description="Prints the density, FLOP-wise limit and BlockMask block counts of a pattern, "
        "row-major with 128-token blocks and for the given tiles, and the best tiles of the "
        "tile search.", epilog=EPILOG_ANALYZE, formatter_class=raw)
    _add_pattern_args(analyze)
    analyze.add_argument("--top", type=_positive, default=3, metavar="K",
                         help="number of suggested tile pairs to print (default 3)")

    verify = sub.add_parser(
        "verify", help="fuzz-check flexna on this machine against the brute-force reference",
        description="Checks flexna's masks and attention on N random configurations against "
        "an independent brute-force reference. Exits 1 on any mismatch.",
        epilog=EPILOG_VERIFY, formatter_class=raw)
    verify.add_argument("--n", type=_positive, default=100, help="number of configurations (default 100)")
    verify.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    verify.add_argument("--start", type=int, default=0, metavar="I",
                        help="index of the first configuration (default 0)")
    verify.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where to run (default: cuda when available, else cpu)")
    verify.add_argument("--max-tokens", type=_positive, default=1024, metavar="N",
                        help="largest layout, in tokens (default 1024; the reference is O(N^2))")
    verify.add_argument("--attention", action=argparse.BooleanOptionalAction, default=True,
                        help="also compare flex_attention outputs (default: yes)")
    verify.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="compile flex_attention (default: on CUDA yes, on CPU no; a CPU "
                        "compile takes a few seconds per configuration)")

    for command in (show, analyze, verify):
        command.set_defaults(command_parser=command)
    sub.add_parser(
        "bench", help="run the GPU benchmark (benchmarks/bench_attention.py); CUDA only",
        description="Runs benchmarks/bench_attention.py, passing all further arguments through.",
        epilog=EPILOG_BENCH, formatter_class=raw, add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------

def _fail(parser: argparse.ArgumentParser, exc: ValueError) -> None:
    """Turn a library ValueError into an argparse error naming the command-line argument."""
    msg = str(exc)
    match = re.match(r"(\w+)", msg)
    flag = FLAGS.get(match.group(1)) if match else None
    parser.error(f"argument {flag}: {msg}" if flag else msg)


def _one_or_all(values: Sequence | None) -> object:
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _pattern_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """(pattern, name, description) from NAME or --shape ...; argparse errors on bad input."""
    from flexna.catalogue import list_entries, load_entry
    from flexna.pattern import NAPattern

    given = [f for f in PATTERN_FLAGS if getattr(args, f) is not None]
    if args.name is not None:
        if given:
            parser.error(f"argument --{given[0]}: not allowed with a catalogue NAME "
                         f"({args.name!r}); use either NAME or --shape/--kernel/...")
        try:
            entry = load_entry(args.name)
        except ValueError as exc:
            _fail(parser, exc)
        return entry.pattern, entry.name, f"{entry.description} ({entry.source})"
    if args.shape is None:
        names = ", ".join(list_entries()) or "none"
        parser.error(f"give a catalogue NAME ({names}) or --shape with --kernel")
    if args.kernel is None:
        parser.error("argument --kernel: required with --shape")
    try:
        pattern = NAPattern.create(
            tuple(args.shape), _one_or_all(args.kernel),
            _one_or_all(args.stride) if args.stride else 1,
            _one_or_all(args.dilation) if args.dilation else 1,
            _one_or_all(args.causal) if args.causal else False)
    except ValueError as exc:
        _fail(parser, exc)
    return pattern, adhoc_name(pattern), None


def adhoc_name(pattern) -> str:
    """File-name-safe name of a pattern from its parameters, e.g. ``na2d-56x56-k7x7-d2x2``."""
    def fmt(t: Sequence) -> str:
        return "x".join(str(int(v)) for v in t)

    name = f"na{pattern.ndim}d-{fmt(pattern.shape)}-k{fmt(pattern.kernel_size)}"
    if any(s != 1 for s in pattern.stride):
        name += f"-s{fmt(pattern.stride)}"
    if any(d != 1 for d in pattern.dilation):
        name += f"-d{fmt(pattern.dilation)}"
    if any(pattern.is_causal):
        name += f"-c{''.join('1' if c else '0' for c in pattern.is_causal)}"
    return name


def _order_args(args: argparse.Namespace, parser: argparse.ArgumentParser, pattern):
    """Validated (q_tile, kv_tile, block_size) from the options, or argparse errors."""
    from flexna.blockmask import resolve_block_sizes
    from flexna.layout import as_tile

    block = args.block_size
    if block is not None and len(block) not in (1, 2):
        parser.error(f"argument --block-size: give one value or two (q kv), got {len(block)}")
    try:
        q_tile = None if args.q_tile is None else as_tile("q_tile", _one_or_all(args.q_tile),
                                                          pattern.shape)
        kv_tile = None if args.kv_tile is None else as_tile("kv_tile", _one_or_all(args.kv_tile),
                                                            pattern.shape)
        block_size = None if block is None else _one_or_all(block)
        ones = (1,) * pattern.ndim
        resolve_block_sizes(block_size, q_tile or ones, kv_tile or ones)
    except ValueError as exc:
        _fail(parser, exc)
    return q_tile, kv_tile, block_size


def _fmt(t: Sequence) -> str:
    return "x".join(str(int(v)) for v in t)


def _pattern_lines(pattern, name: str, description: str | None) -> list[str]:
    lines = [f"{name}: {description}" if description else name]
    causal = ("none" if not any(pattern.is_causal)
              else " ".join(f"axis {a}" for a, c in enumerate(pattern.is_causal) if c))
    lines.append(f"  layout {_fmt(pattern.shape)} ({pattern.ndim}-D, {pattern.num_tokens} tokens); "
                 f"kernel {_fmt(pattern.kernel_size)}, stride {_fmt(pattern.stride)}, "
                 f"dilation {_fmt(pattern.dilation)}, causal {causal}")
    keys = ("every query attends" if not any(pattern.is_causal) else "at most")
    lines.append(f"  {keys} {pattern.keys_per_query} keys; density {pattern.density():.6g} "
                 f"({100 * pattern.density():.4g}% of query-key pairs); FLOP-wise limit "
                 f"{pattern.flop_limit():.2f}x over dense attention")
    return lines


def _cmd_list() -> int:
    from flexna.catalogue import catalogue_dir, list_entries, load_entry

    names = list_entries()
    print(f"catalogue {catalogue_dir()}: {len(names)} configurations")
    width = max((len(n) for n in names), default=0)
    for name in names:
        entry = load_entry(name)
        print(f"  {name:<{width}}  {entry.pattern}")
        print(f"  {'':<{width}}  {entry.description}")
    return 0


def _cmd_show(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from flexna.png import write_png
    from flexna.render import block_stats, check_query, render_pattern

    pattern, name, description = _pattern_from_args(args, parser)
    q_tile, kv_tile, block_size = _order_args(args, parser, pattern)
    try:
        query = check_query(pattern, args.query)
    except ValueError as exc:
        _fail(parser, exc)
    file_name = name
    ones = (1,) * pattern.ndim
    if q_tile is not None or kv_tile is not None:
        file_name += f"-qt{'x'.join(map(str, q_tile or ones))}-kvt{'x'.join(map(str, kv_tile or ones))}"
    if block_size is not None:
        file_name += f"-b{'x'.join(map(str, args.block_size))}"
    out = Path(f"{file_name}.png") if args.out is None else Path(args.out)
    if out.is_dir():
        out = out / f"{file_name}.png"
    stats = block_stats(pattern, q_tile, kv_tile, block_size)
    rendering = render_pattern(pattern, query, title=name, stats=stats)
    size = write_png(out, rendering.image)
    for line in _pattern_lines(pattern, name, description):
        print(line)
    print(f"  BlockMask, {stats.describe()}")
    keys = _count_keys(pattern, query)
    print(f"  query {query} attends {keys} keys")
    height, width = rendering.image.shape[:2]
    print(f"wrote {out} ({width}x{height} px, {size / 1024:.1f} KiB)")
    return 0


def _count_keys(pattern, query: Sequence[int]) -> int:
    from flexna.render import axis_flags

    return math.prod(int(axis_flags(pattern, a, query[a])["attended"].sum())
                     for a in range(pattern.ndim))


def _analysis_module():
    """``flexna.analysis`` when it is there (it provides the tile search), else None."""
    try:
        return importlib.import_module("flexna.analysis")
    except ImportError:
        return None


def _cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from flexna.render import block_stats

    pattern, name, description = _pattern_from_args(args, parser)
    q_tile, kv_tile, block_size = _order_args(args, parser, pattern)
    for line in _pattern_lines(pattern, name, description):
        print(line)
    analysis = _analysis_module()
    orders = [(None, None, None)]
    if q_tile is not None or kv_tile is not None or block_size is not None:
        orders.append((q_tile, kv_tile, block_size))
    print("BlockMask blocks:")
    for qt, kt, bs in orders:
        if analysis is not None and hasattr(analysis, "analyze"):
            print(f"  {analysis.analyze(pattern, qt, kt, bs).summary()}")
        else:
            print(f"  {block_stats(pattern, qt, kt, bs).describe()}")
    if analysis is not None and hasattr(analysis, "search_tiles"):
        print(f"suggested tiles (flexna.analysis.search_tiles, best {args.top} by predicted cost):")
        for result in analysis.search_tiles(pattern, top=args.top):
            print(f"  {result.summary()}")
            print(f"    --q-tile {' '.join(map(str, result.q_tile))} "
                  f"--kv-tile {' '.join(map(str, result.kv_tile))}")
    else:
        print("suggested tiles: not available (no tile search in this flexna: flexna.analysis is "
              "missing); block counts above come from flexna.na_block_mask")
    return 0


def _cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from flexna.verify import run_verify

    try:
        ok = run_verify(n=args.n, seed=args.seed, device=args.device, max_tokens=args.max_tokens,
                        attention=args.attention, compiled=args.compile, start=args.start)
    except ValueError as exc:
        _fail(parser, exc)
    return 0 if ok else 1


def bench_script() -> Path:
    """benchmarks/bench_attention.py of the source checkout flexna is installed from."""
    return Path(__file__).resolve().parent.parent / "benchmarks" / "bench_attention.py"


def _cmd_bench(rest: Sequence[str]) -> int:
    import torch

    script = bench_script()
    wants_help = any(a in ("-h", "--help") for a in rest)
    if not script.is_file():
        print(f"flexna bench: error: {script} not found; the benchmark ships with the source "
              "repository: clone it and `pip install -e .` there", file=sys.stderr)
        return 1
    if not wants_help and not torch.cuda.is_available():
        print("flexna bench: error: the benchmark needs a CUDA GPU, and torch.cuda.is_available() "
              f"is False (torch {torch.__version__}). Run it on a machine with an NVIDIA GPU and a "
              "CUDA build of torch; `flexna verify` and `flexna analyze` work on the CPU.",
              file=sys.stderr)
        return 1
    return subprocess.call([sys.executable, str(script), *rest])


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":  # everything after `bench` belongs to the benchmark script
        return _cmd_bench(argv[1:])
    args = parser.parse_args(argv)
    sub = getattr(args, "command_parser", parser)
    if args.command == "demo":
        from flexna.demo import run_demo

        return 0 if run_demo(device=args.device, seed=args.seed) else 1
    if args.command == "list":
        return _cmd_list()
    if args.command == "show":
        return _cmd_show(args, sub)
    if args.command == "analyze":
        return _cmd_analyze(args, sub)
    if args.command == "verify":
        return _cmd_verify(args, sub)
    return 2


if __name__ == "__main__":
    sys.exit(main())
