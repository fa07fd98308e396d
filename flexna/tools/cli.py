"""The ``flexna`` command line: ``demo``, ``list``, ``show``, ``analyze``, ``verify``, ``bench``.

Every failure ends in one line on stderr and a non-zero exit: argparse's usage errors
(exit 2) for a bad command-line argument, ``flexna COMMAND: error: ...`` (exit 1) for a
bad catalogue file or an output path that cannot be written. Errors name a command-line
flag only when the user passed it.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

EPILOG_MAIN = """\
examples:
  flexna demo                                    build two patterns, run fused attention, verify
  flexna list                                    the catalogue of named configurations
  flexna show nat-7x7                            summary + nat-7x7.png (neighborhood, block mask)
  flexna show --shape 56 56 --kernel 7 7 --dilation 2 2
  flexna analyze flux-gna --q-tile 16 8 --kv-tile 16 8
  flexna verify --n 100 --device cpu             fuzz-check flexna against the reference
  flexna bench --workloads flux-na               GPU benchmark of a source checkout (CUDA only)

The catalogue ships in the package; `list`, `show` and `analyze` take `--catalogue DIR`
(or $FLEXNA_MASKS) to read another folder of NAME.json files instead.
Run `flexna COMMAND --help` for the options of a command.
"""

PATTERN_HELP = """\
A pattern is either a catalogue NAME (see `flexna list`) or --shape with --kernel and
optionally --stride, --dilation, --causal. Each takes one value per layout axis, or a
single value for all axes. --q-tile/--kv-tile choose tiled token orders (one int per axis),
--block-size the BlockMask block sizes in tokens (one value, or q and kv). NAME is a plain
name of the catalogue (the one shipped in the package, or --catalogue DIR).
"""

EPILOG_SHOW = PATTERN_HELP + """
examples:
  flexna show nat-7x7                                   writes nat-7x7.png here
  flexna show video-causal --query 15 16 16 --out /tmp/video.png
  flexna show --shape 64 --kernel 9 --stride 3          1-D: writes na1d-64-k9-s3.png
  flexna show --shape 32 48 --kernel 7 7 --dilation 2 1 --causal 1 0
  flexna show --shape 16 64 64 --kernel 4 9 9 --q-tile 2 8 8 --kv-tile 2 8 8
  flexna show nat-7x7 --out pics/ --force               replace pics/nat-7x7.png
  flexna show flux-na-adaptive                          window + adaptive blocks (one seeded draw)

The picture shows one query (red; default: the middle token), the queries of its stride
group that share its window (yellow), the keys it attends (blue) on the token layout (1-D:
a strip; 2-D: the grid; 3-D: the frames along axis 0), and the BlockMask: one square per
(query block, key block), full (dark blue), partial (orange, evaluated per element) or
empty (grey, skipped). Large layouts are pooled so pictures stay small. The file is named
after the pattern (the catalogue NAME, or one built from the parameters); an existing
file is never overwritten without --force.

A catalogue entry with an "adaptive" object (threshold or top_k, and seed; e.g.
flux-na-adaptive) draws the BlockMask of flexna.adaptive_block_mask on seeded synthetic
q/k with spatial locality (flexna.adaptive.local_qk): the window's blocks as above, the
blocks the selection adds beyond it in green (dark: full, light: partial). The selection
is data-dependent: the picture and the printed counts are of that one seeded draw.
"""

EPILOG_ANALYZE = PATTERN_HELP + """
examples:
  flexna analyze nat-7x7
  flexna analyze hunyuan-gna --q-tile 2 8 8 --kv-tile 2 8 8
  flexna analyze --shape 32768 --kernel 2048 --stride 256
  flexna analyze flux-gna --backend flash
  flexna analyze hunyuan-gna --backend flash --block-size 256 128   (FLASH on Blackwell)

Prints the density (fraction of query-key pairs attended), the FLOP-wise speed-up limit
over dense attention (1 / density), the full / partial / empty blocks of the BlockMask
in row-major order with 128-token blocks and for the given tiles, and suggested tiles.
--backend picks the kernel whose cost model prices partial blocks (Triton's or FLASH's) and
ranks the tiles; a call with backend="auto" uses FLASH where it is installed and faster.
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

BENCH_SCRIPT = Path("benchmarks") / "bench_attention.py"
EPILOG_BENCH = f"""\
Runs {BENCH_SCRIPT.as_posix()} of a flexna source checkout (the benchmark does not ship in
the package) with all further arguments, under the flexna this command belongs to. Needs
CUDA. The checkout is the current folder, or --checkout PATH. Its options:
  flexna bench --help
examples:
  flexna bench                               all default workloads, fp16, forward
  flexna bench --checkout ~/src/flexna --workloads flux-na flux-gna --dtype bf16 --backward
"""

CATALOGUE_HELP = ("folder of NAME.json catalogue files to use instead of the catalogue shipped "
                  "in the package (default: $FLEXNA_MASKS when set)")

# library argument name -> (argparse dest, command-line flag), for error messages
FLAGS = {
    "shape": ("shape", "--shape"), "kernel_size": ("kernel", "--kernel"),
    "stride": ("stride", "--stride"), "dilation": ("dilation", "--dilation"),
    "is_causal": ("causal", "--causal"), "q_tile": ("q_tile", "--q-tile"),
    "kv_tile": ("kv_tile", "--kv-tile"), "block_size": ("block_size", "--block-size"),
    "query": ("query", "--query"), "name": ("name", "NAME"), "n": ("n", "--n"),
    "max_tokens": ("max_tokens", "--max-tokens"), "device": ("device", "--device"),
}
PATTERN_FLAGS = ("shape", "kernel", "stride", "dilation", "causal")
MAX_BLOCK = 2**31 - 1  # FlexAttention indexes tokens with int32


class CliError(Exception):
    """A failure reported as one line ``flexna COMMAND: error: MESSAGE`` with exit status 1."""


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


def _add_catalogue_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--catalogue", metavar="DIR", default=None, help=CATALOGUE_HELP)


def _add_pattern_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", metavar="NAME",
                   help="catalogue name (see `flexna list`); or describe the pattern with --shape ...")
    _add_catalogue_arg(p)
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
    b.add_argument("--curve", choices=("hilbert", "morton"),
                   help="both sides in a space-filling curve order instead of tiles (2-3 axes)")
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

    listing = sub.add_parser(
        "list", help="list the catalogue of named configurations",
        description="Lists the named configurations of the catalogue (the NAME.json files shipped "
        "in the package, or those of --catalogue DIR / $FLEXNA_MASKS) with their pattern and "
        "description. A file that is not a valid entry is reported on stderr and skipped; the "
        "exit status is then 1.")
    _add_catalogue_arg(listing)

    show = sub.add_parser(
        "show", help="summary and a PNG picture of a pattern (neighborhood and block mask)",
        description="Prints a summary of a pattern (layout, parameters, tokens, density, "
        "FLOP-wise limit, BlockMask block counts) and writes a PNG picture of one query's "
        "neighborhood and of the BlockMask.", epilog=EPILOG_SHOW, formatter_class=raw)
    _add_pattern_args(show)
    show.add_argument("--query", type=int, nargs="+", metavar="X",
                      help="coordinate of the query to draw, one per axis (default: the middle)")
    show.add_argument("--out", metavar="PATH",
                      help="PNG file, or an existing folder for NAME.png (default: NAME.png in the "
                      "current folder)")
    show.add_argument("--force", action="store_true",
                      help="replace the output file if it exists (default: refuse)")

    analyze = sub.add_parser(
        "analyze", help="density, FLOP-wise limit, block counts and suggested tiles of a pattern",
        description="Prints the density, FLOP-wise limit and BlockMask block counts of a pattern, "
        "row-major with 128-token blocks and for the given tiles, and the best tiles of the "
        "tile search.", epilog=EPILOG_ANALYZE, formatter_class=raw)
    _add_pattern_args(analyze)
    analyze.add_argument("--top", type=_positive, default=3, metavar="K",
                         help="number of suggested tile pairs to print (default 3)")
    analyze.add_argument("--backend", choices=("triton", "flash"), default="triton",
                         help="kernel backend whose cost model prices the blocks and ranks the "
                         "tiles (default triton); with --block-size, the tile search uses those "
                         "block sizes (e.g. flash on Blackwell: --block-size 256 128)")

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

    for command in (demo, listing, show, analyze, verify):
        command.set_defaults(command_parser=command)
    sub.add_parser(
        "bench", help=f"run the GPU benchmark ({BENCH_SCRIPT.as_posix()} of a source checkout); "
        "CUDA only",
        usage="flexna bench [--checkout PATH] [BENCHMARK OPTIONS ...]",
        description=f"Runs {BENCH_SCRIPT.as_posix()}, passing all further arguments through.",
        epilog=EPILOG_BENCH, formatter_class=raw, add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------

def _passed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> set[str]:
    """The argparse dests the user set (not left at their defaults)."""
    return {dest for dest, value in vars(args).items()
            if value is not None and value != parser.get_default(dest)}


def _fail(parser: argparse.ArgumentParser, exc: ValueError, passed: set[str]) -> None:
    """A library ValueError as an argparse error, naming the command-line argument if it was given."""
    msg = str(exc)
    match = re.match(r"(\w+)", msg)
    dest, flag = FLAGS.get(match.group(1), (None, None)) if match else (None, None)
    parser.error(f"argument {flag}: {msg}" if dest in passed else msg)


def _one_or_all(values: Sequence | None) -> Any:
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _catalogue_hint(args: argparse.Namespace) -> str:
    return "flexna list" + (f" --catalogue {args.catalogue}" if args.catalogue is not None else "")


def _pattern_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser, passed: set[str]):
    """(pattern, file-name-safe name, description, catalogue entry or None) from NAME or --shape ...

    argparse errors on bad command-line input; :class:`~flexna.tools.catalogue.CatalogueError`
    when the catalogue folder or the NAME's file is bad.
    """
    from flexna.pattern import NAPattern
    from flexna.tools.catalogue import UnknownNameError, list_entries, load_entry

    given = [f for f in PATTERN_FLAGS if getattr(args, f) is not None]
    if args.name is not None:
        if given:
            parser.error(f"argument --{given[0]}: not allowed with a catalogue NAME "
                         f"({args.name!r}); use either NAME or --shape/--kernel/...")
        try:
            entry = load_entry(args.name, args.catalogue)
        except UnknownNameError:
            shown = args.name if len(args.name) <= 60 else args.name[:40] + "..."
            parser.error(f"argument NAME: {shown!r} is not a catalogue name; the names are "
                         f"plain file stems, see them with `{_catalogue_hint(args)}`")
        # the validated NAME (the file stem, which the entry's "name" equals) names the output
        return entry.pattern, args.name, f"{entry.description} ({entry.source})", entry
    if args.shape is None:
        names = ", ".join(list_entries(args.catalogue)) or "none"
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
        _fail(parser, exc, passed)
    return pattern, adhoc_name(pattern), None, None


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


def _order_args(args: argparse.Namespace, parser: argparse.ArgumentParser, pattern, passed: set[str]):
    """Validated (q_tile, kv_tile, block_size) from the options, or argparse errors."""
    from flexna.blockmask import resolve_block_sizes
    from flexna.layout import as_tile

    block = args.block_size
    if block is not None and len(block) not in (1, 2):
        parser.error(f"argument --block-size: give one value or two (q kv), got {len(block)}")
    if block is not None and any(b > MAX_BLOCK for b in block):
        parser.error(f"argument --block-size: {max(block)} is out of range: need at most {MAX_BLOCK} "
                     "tokens per block")
    try:
        q_tile = None if args.q_tile is None else as_tile("q_tile", _one_or_all(args.q_tile),
                                                          pattern.shape)
        kv_tile = None if args.kv_tile is None else as_tile("kv_tile", _one_or_all(args.kv_tile),
                                                            pattern.shape)
        block_size = None if block is None else _one_or_all(block)
        ones = (1,) * pattern.ndim
        resolve_block_sizes(block_size, q_tile or ones, kv_tile or ones)
        if args.curve is not None:  # checked as the spec checks it (axes, tiles, rule)
            import flexna

            flexna.MaskSpec.create(pattern, q_tile=q_tile, kv_tile=kv_tile, q_curve=args.curve,
                                   kv_curve=args.curve)
    except ValueError as exc:
        _fail(parser, exc, passed)
    return q_tile, kv_tile, block_size


def _fmt(t: Sequence) -> str:
    return "x".join(str(int(v)) for v in t)


def _pattern_lines(pattern, name: str, description: str | None) -> list[str]:
    lines = [f"{name}: {description}" if description else name]
    causal = ("none" if not any(pattern.is_causal)
              else " ".join(f"axis {a}" for a, c in enumerate(pattern.is_causal) if c))
    if type(pattern).__name__ != "NAPattern":  # another rule: its own parameters
        lines.append(f"  {pattern} ({pattern.ndim}-D, {pattern.num_tokens} tokens); as GNA fields: "
                     f"kernel {_fmt(pattern.kernel_size)}, stride {_fmt(pattern.stride)}")
    else:
        lines.append(f"  layout {_fmt(pattern.shape)} ({pattern.ndim}-D, {pattern.num_tokens} tokens); "
                     f"kernel {_fmt(pattern.kernel_size)}, stride {_fmt(pattern.stride)}, "
                     f"dilation {_fmt(pattern.dilation)}, causal {causal}")
    keys = ("every query attends" if not any(pattern.is_causal) else "at most")
    if not pattern.separable:
        keys = "on average a query attends"
    lines.append(f"  {keys} {pattern.keys_per_query} keys; density {pattern.density():.6g} "
                 f"({100 * pattern.density():.4g}% of query-key pairs); FLOP-wise limit "
                 f"{pattern.flop_limit():.2f}x over dense attention")
    return lines


def _cmd_list(args: argparse.Namespace) -> int:
    from flexna.tools.catalogue import catalogue_dir, load_all

    root = catalogue_dir(args.catalogue)
    entries, bad = load_all(args.catalogue)
    skipped = f" ({len(bad)} bad files skipped, see stderr)" if bad else ""
    print(f"catalogue {root}: {len(entries)} configurations{skipped}")
    width = max((len(e.name) for e in entries), default=0)
    for entry in entries:
        adaptive = "" if entry.adaptive is None else f" + adaptive blocks ({entry.adaptive.describe()})"
        print(f"  {entry.name:<{width}}  {entry.pattern}{adaptive}")
        print(f"  {'':<{width}}  {entry.description}")
    for exc in bad:
        print(f"flexna list: skipped {exc}", file=sys.stderr)
    return 1 if bad else 0


def _output_path(out_arg: str | None, file_name: str, force: bool) -> Path:
    """The PNG file to write: checked to be creatable (and absent unless ``force``) before rendering."""
    out = Path(f"{file_name}.png")
    if out_arg is not None:
        out = Path(out_arg)
        if out.is_dir():
            out = out / f"{file_name}.png"
        elif out_arg.endswith(("/", os.sep)) or out.name in ("", ".", ".."):
            raise CliError(f"cannot write into {out_arg}: no such folder")
    folder = out.parent
    if not folder.exists():
        raise CliError(f"cannot write {out}: no such folder {folder}")
    if not folder.is_dir():
        raise CliError(f"cannot write {out}: {folder} is not a folder")
    if out.is_dir():
        raise CliError(f"cannot write {out}: it is a folder")
    if (out.exists() or out.is_symlink()) and not force:
        raise CliError(f"{out} already exists; pass --force to replace it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"cannot write {out}: {folder} is not writable")
    return out


def _write_file(out: Path, data: bytes, force: bool) -> None:
    """Write ``data`` to ``out``: a new file (never through an existing one or a symlink).

    Without ``force`` the file is created exclusively; with it the bytes go to a new file
    beside it that then replaces ``out`` (a symlink there is replaced, not followed).
    """
    target = out
    if force:
        target = out.with_name(f".{out.name}.{secrets.token_hex(4)}.png.tmp")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            if force:
                os.replace(target, out)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    except FileExistsError:
        raise CliError(f"{out} already exists; pass --force to replace it") from None
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None


def _cmd_show(args: argparse.Namespace, parser: argparse.ArgumentParser, passed: set[str]) -> int:
    from flexna.tools.png import encode_png
    from flexna.tools.render import block_stats, check_query, render_pattern

    pattern, name, description, entry = _pattern_from_args(args, parser, passed)
    q_tile, kv_tile, block_size = _order_args(args, parser, pattern, passed)
    try:
        query = check_query(pattern, args.query)
    except ValueError as exc:
        _fail(parser, exc, passed)
    file_name = name
    ones = (1,) * pattern.ndim
    if q_tile is not None or kv_tile is not None:
        file_name += f"-qt{'x'.join(map(str, q_tile or ones))}-kvt{'x'.join(map(str, kv_tile or ones))}"
    if block_size is not None:
        file_name += f"-b{'x'.join(map(str, args.block_size))}"
    if args.curve is not None:
        file_name += f"-{args.curve}"
    out = _output_path(args.out, file_name, args.force)
    sta_tile = getattr(pattern, "tile", None)  # STA is defined on its tiles: drawn in its own tiled order
    if q_tile is None and kv_tile is None and args.curve is None and sta_tile:
        q_tile = kv_tile = tuple(sta_tile)
    adaptive = entry.adaptive if entry is not None else None
    stats = block_stats(pattern, q_tile, kv_tile, block_size, args.curve, adaptive=adaptive,
                        head_dim=entry.head_dim if entry is not None else 64)
    rendering = render_pattern(pattern, query, title=name, stats=stats)
    data = encode_png(rendering.image)
    _write_file(out, data, args.force)
    for line in _pattern_lines(pattern, name, description):
        print(line)
    print(f"  BlockMask, {stats.describe(adaptive=False)}")
    if adaptive is not None:
        print(f"  {stats.adaptive_line()}")
    keys = _count_keys(pattern, query)
    print(f"  query {query} attends {keys} keys" + (" of its window" if adaptive is not None else ""))
    height, width = rendering.image.shape[:2]
    print(f"wrote {out} ({width}x{height} px, {len(data) / 1024:.1f} KiB)")
    return 0


def _count_keys(pattern, query: Sequence[int]) -> int:
    from flexna.tools.render import axis_flags, neighborhood_categories

    if not pattern.separable:
        return int((neighborhood_categories(pattern, query) % 2).sum())  # attended 1, query 3
    return math.prod(int(axis_flags(pattern, a, query[a])["attended"].sum())
                     for a in range(pattern.ndim))


def _cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser, passed: set[str]) -> int:
    import flexna

    pattern, name, description, entry = _pattern_from_args(args, parser, passed)
    q_tile, kv_tile, block_size = _order_args(args, parser, pattern, passed)
    for line in _pattern_lines(pattern, name, description):
        print(line)
    if entry is not None and entry.adaptive is not None:
        print(f"  adaptive blocks ({entry.adaptive.describe()}) on the window are data-dependent and "
              f"not counted here; `flexna show {name}` draws one seeded selection")
    orders = [(None, None, None, None)]
    if q_tile is not None or kv_tile is not None or block_size is not None or args.curve is not None:
        orders.append((q_tile, kv_tile, block_size, args.curve))
    backend = args.backend
    print(f"BlockMask blocks (cost model: {backend} backend):")
    for qt, kt, bs, curve in orders:
        print(f"  {flexna.analyze(pattern, qt, kt, bs, curve=curve, backend=backend).summary()}")
    if pattern.ndim > 1 and pattern.separable:
        print("space-filling curve orders (flexna.CurveOrder, 128-token blocks):")
        for curve in ("hilbert", "morton"):
            print(f"  {flexna.analyze(pattern, curve=curve, backend=backend).summary()}")
    q_tokens = kv_tokens = None  # the backend's block sizes
    if args.block_size is not None:  # the tile search's candidates have one tile per block
        q_block, kv_block = (args.block_size * 2)[:2]
        q_tokens, kv_tokens = (q_block,), (kv_block,)
    print(f"suggested tiles for the {backend} backend (flexna.search_tiles, best {args.top} "
          f"by predicted cost):")
    suggested = flexna.search_tiles(pattern, q_tokens, kv_tokens, top=args.top, backend=backend)
    if not suggested:
        print(f"  none: no power-of-two tiles of {q_tokens} / {kv_tokens} tokens (--block-size)")
    for result in suggested:
        print(f"  {result.summary()}")
        print(f"    --q-tile {' '.join(map(str, result.q_tile))} "
              f"--kv-tile {' '.join(map(str, result.kv_tile))}")
    return 0


def _cmd_verify(args: argparse.Namespace, parser: argparse.ArgumentParser, passed: set[str]) -> int:
    from flexna.tools.verify import run_verify

    try:
        ok = run_verify(n=args.n, seed=args.seed, device=args.device, max_tokens=args.max_tokens,
                        attention=args.attention, compiled=args.compile, start=args.start)
    except ValueError as exc:
        _fail(parser, exc, passed)
    return 0 if ok else 1


def _split_checkout(rest: Sequence[str]) -> tuple[str | None, list[str]]:
    """``--checkout PATH`` / ``--checkout=PATH`` taken out of the benchmark's arguments."""
    checkout, others, items = None, [], list(rest)
    while items:
        item = items.pop(0)
        if item == "--checkout":
            if not items:
                raise CliError("argument --checkout: expected a PATH (a flexna source checkout)")
            checkout = items.pop(0)
        elif item.startswith("--checkout="):
            checkout = item.split("=", 1)[1]
        else:
            others.append(item)
    return checkout, others


def bench_script(checkout: str | os.PathLike | None = None) -> Path:
    """The benchmark script of the source checkout ``checkout`` (default: the current folder)."""
    return Path(checkout if checkout is not None else ".") / BENCH_SCRIPT


def _cmd_bench(rest: Sequence[str]) -> int:
    import torch

    checkout, rest = _split_checkout(rest)
    script = bench_script(checkout)
    wants_help = any(a in ("-h", "--help") for a in rest)
    if not script.is_file():
        where = (f"{checkout} is not one (no {BENCH_SCRIPT.as_posix()} there)" if checkout is not None
                 else f"the current folder is not one (no {BENCH_SCRIPT.as_posix()} here)")
        raise CliError(f"needs a flexna source checkout (the benchmarks do not ship in the package) "
                       f"and {where}: run it from the repository root or pass --checkout PATH")
    if not wants_help and not torch.cuda.is_available():
        raise CliError("the benchmark needs a CUDA GPU, and torch.cuda.is_available() is False "
                       f"(torch {torch.__version__}). Run it on a machine with an NVIDIA GPU and a "
                       "CUDA build of torch; `flexna verify` and `flexna analyze` work on the CPU.")
    return subprocess.call([sys.executable, str(script.resolve()), *rest])


def _run(command: str, args: argparse.Namespace, sub: argparse.ArgumentParser) -> int:
    passed = _passed(args, sub)
    if command == "demo":
        from flexna.tools.demo import run_demo

        return 0 if run_demo(device=args.device, seed=args.seed) else 1
    if command == "list":
        return _cmd_list(args)
    if command == "show":
        return _cmd_show(args, sub, passed)
    if command == "analyze":
        return _cmd_analyze(args, sub, passed)
    if command == "verify":
        return _cmd_verify(args, sub, passed)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from flexna.tools.catalogue import CatalogueError

    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else None
    try:
        if command == "bench":  # everything after `bench` belongs to the benchmark script
            return _cmd_bench(argv[1:])
        args = parser.parse_args(argv)
        return _run(args.command, args, getattr(args, "command_parser", parser))
    except (CliError, CatalogueError) as exc:
        print(f"flexna {command}: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # the reader went away (`flexna list | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit's flush
        return 1


if __name__ == "__main__":
    sys.exit(main())
