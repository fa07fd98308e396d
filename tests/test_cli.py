"""The ``flexna`` command line, run in-process through ``flexna.tools.cli.main``."""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import flexna
from flexna.pattern import NAPattern
from flexna.reference import reference_mask
from flexna.tools import render
from flexna.tools.cli import adhoc_name, main
from flexna.tools.png import decode_png, encode_png

REPO = Path(__file__).resolve().parent.parent


def decode(data: bytes) -> np.ndarray:
    """Minimal independent PNG decoder (8-bit RGB, filters None and Up, as flexna writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, ihdr = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = ihdr
    assert (depth, colour, interlace) == (8, 2, 0)
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    rows = np.zeros((height, 3 * width), np.uint8)
    for y in range(height):
        assert raw[y, 0] in (0, 2)
        rows[y] = raw[y, 1:] if raw[y, 0] == 0 or y == 0 else raw[y, 1:] + rows[y - 1]
    return rows.reshape(height, width, 3)


def flag_values(argv: list[str]) -> dict[str, list[int]]:
    """``["--shape", "4", "6", "--kernel", "3"]`` -> ``{"--shape": [4, 6], "--kernel": [3]}``."""
    out: dict[str, list[int]] = {}
    for item in argv:
        if item.startswith("--"):
            key = item
            out[key] = []
        else:
            out[key].append(int(item))
    return out


def ihdr_size(data: bytes) -> tuple[int, int]:
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_show_picture_matches_reference(tmp_path, capsys):
    shape, kernel, stride, dilation, causal = (12, 16), (3, 5), (1, 2), (2, 1), (False, True)
    query = (5, 9)
    out = tmp_path / "pic.png"
    assert main(["show", "--shape", "12", "16", "--kernel", "3", "5", "--stride", "1", "2",
                 "--dilation", "2", "1", "--causal", "0", "1", "--query", "5", "9",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "wrote" in text and "query (5, 9) attends" in text
    data = out.read_bytes()
    image = decode(data)
    assert ihdr_size(data) == (image.shape[1], image.shape[0])
    np.testing.assert_array_equal(image, decode_png(data))

    pattern = NAPattern.create(shape, kernel, stride, dilation, causal)
    layout = render.render_pattern(pattern, query, title="na2d-12x16-k3x5-s1x2-d2x1-c01")
    assert layout.image.shape == image.shape
    row = reference_mask(shape, kernel, stride, dilation, causal)[np.ravel_multi_index(query, shape)]
    attended = row.reshape(shape).numpy()
    seen = {"query": 0, "attended": 0, "other": 0, "group": 0}
    for y in range(shape[0]):
        for x in range(shape[1]):
            r0, c0, r1, c1 = layout.token_box((y, x))
            pixel = tuple(image[(r0 + r1) // 2, (c0 + c1) // 2])
            group = all(c % d == q % d and (c // d) // s == (q // d) // s
                        for c, q, d, s in zip((y, x), query, dilation, stride, strict=True))
            if (y, x) == query:
                want, key = render.QUERY, "query"
            elif group:
                want, key = render.GROUP, "group"
            elif attended[y, x]:
                want, key = render.ATTENDED, "attended"
            else:
                want, key = render.OTHER, "other"
            assert pixel == want, (y, x)
            seen[key] += 1
    assert seen["query"] == 1 and seen["group"] == 1 and seen["attended"] == int(attended.sum()) - 2
    assert seen["attended"] > 0 and seen["other"] > 0


@pytest.mark.parametrize("argv, query", [
    (["--shape", "64", "--kernel", "9", "--stride", "3"], (32,)),
    (["--shape", "4", "6", "8", "--kernel", "3", "3", "5", "--causal", "1", "0", "0"], (2, 3, 4)),
    (["--shape", "3000", "--kernel", "100", "--dilation", "7"], (1500,)),
])
def test_show_1d_3d_and_pooled(tmp_path, monkeypatch, capsys, argv, query):
    monkeypatch.chdir(tmp_path)
    assert main(["show", *argv]) == 0
    name = re.search(r"wrote (\S+\.png)", capsys.readouterr().out).group(1)
    data = (tmp_path / name).read_bytes()
    image = decode(data)
    args = flag_values(argv)
    pattern = NAPattern.create(args["--shape"], args["--kernel"], args.get("--stride", 1),
                               args.get("--dilation", 1), [bool(c) for c in args["--causal"]]
                               if "--causal" in args else False)
    assert name == f"{adhoc_name(pattern)}.png"
    layout = render.render_pattern(pattern, title=name[:-4])
    assert image.shape == layout.image.shape and max(image.shape) <= 2048
    r0, c0, r1, c1 = layout.token_box(query)
    assert tuple(image[(r0 + r1) // 2, (c0 + c1) // 2]) == render.QUERY


def test_show_catalogue_entry(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["show", "nat-7x7"]) == 0
    text = capsys.readouterr().out
    assert "density 0.015625" in text and "full 0, partial 121, empty 504" in text
    data = (tmp_path / "nat-7x7.png").read_bytes()
    assert len(data) < 200_000 and ihdr_size(data)[0] <= 2048


def test_block_panel_pools_huge_masks():
    stats = render.BlockStats(np.random.default_rng(0).integers(0, 3, (3000, 2500)), 128, 128,
                              (1,), (1,))
    panel = render.block_panel(stats, query_row=1500)
    assert max(panel.image.shape[:2]) <= 1100


@pytest.mark.parametrize("argv", [
    ["--shape", "56", "56", "--kernel", "7", "7"],
    ["--shape", "9", "20", "--kernel", "4", "6", "--stride", "2", "3", "--dilation", "2", "3",
     "--causal", "1", "0"],
    ["--shape", "5", "6", "7", "--kernel", "3", "--causal", "0", "1", "1", "--q-tile", "2", "2", "4",
     "--kv-tile", "1", "2", "4"],
])
def test_analyze_prints_density_and_blocks(capsys, argv):
    assert main(["analyze", *argv]) == 0
    text = capsys.readouterr().out
    values = flag_values(argv)
    n = len(values["--shape"])
    causal = [bool(c) for c in values.get("--causal", [0] * n)]
    kernel = values["--kernel"] if len(values["--kernel"]) == n else values["--kernel"][0]
    ref = reference_mask(values["--shape"], kernel, values.get("--stride", [1] * n),
                         values.get("--dilation", [1] * n), causal)
    density = float(re.search(r"density (\S+)", text).group(1))
    assert math.isclose(density, ref.double().mean().item(), rel_tol=1e-5)
    assert f"FLOP-wise limit {1 / ref.double().mean().item():.2f}" in text
    # block counts: row-major 128 and, when given, the tiles, as na_block_mask builds them
    orders = [(None, None)]
    if "--q-tile" in values:
        orders.append((values["--q-tile"], values["--kv-tile"]))
    for q_tile, kv_tile in orders:
        bm = flexna.na_block_mask(values["--shape"], kernel, values.get("--stride", 1),
                                  values.get("--dilation", 1), causal, q_tile=q_tile, kv_tile=kv_tile)
        full, partial = int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())
        total = bm.kv_indices.shape[-2] * bm.kv_indices.shape[-1]
        assert f"{full} full, {partial} partial, {total - full - partial} empty" in text


def test_verify_passes(capsys):
    assert main(["verify", "--n", "10", "--seed", "0", "--device", "cpu", "--max-tokens", "256"]) == 0
    text = capsys.readouterr().out
    assert "10/10 configurations passed" in text and "all PASS" in text


def test_verify_api_returns_bool():
    import io

    from flexna.tools.verify import run_verify

    buf = io.StringIO()
    assert run_verify(n=3, seed=5, device="cpu", max_tokens=128, attention=False, out=buf) is True
    assert "3/3 configurations passed" in buf.getvalue()


def test_verify_fails_on_flipped_pair(monkeypatch, capsys):
    real = flexna.na_mask_mod

    def flipped(*args, **kwargs):  # verify reaches the mask_mod through flexna.na_mask_mod
        inner = real(*args, **kwargs)

        def mask(b, h, q_idx, kv_idx):
            return inner(b, h, q_idx, kv_idx) ^ ((q_idx == 0) & (kv_idx == 0))
        return mask

    monkeypatch.setattr(flexna, "na_mask_mod", flipped)
    assert main(["verify", "--n", "2", "--device", "cpu", "--max-tokens", "128"]) == 1
    text = capsys.readouterr().out
    assert "FAILED config 0" in text and "na_mask_mod: 1 pairs differ" in text
    assert "flexna.na_block_mask(" in text and text.rstrip().endswith("FAIL")


def test_verify_fails_on_dropped_block(monkeypatch, capsys):
    from torch.nn.attention.flex_attention import BlockMask

    real = flexna.na_block_mask

    def dropped(*args, **kwargs):  # forget the last partial block of the first row that has one
        bm = real(*args, **kwargs)
        num = bm.kv_num_blocks.clone()
        row = int((num[0, 0] > 0).nonzero()[0])
        num[0, 0, row] -= 1
        return BlockMask.from_kv_blocks(num, bm.kv_indices, bm.full_kv_num_blocks,
                                        bm.full_kv_indices, BLOCK_SIZE=bm.BLOCK_SIZE,
                                        mask_mod=bm.mask_mod, seq_lengths=bm.seq_lengths)

    monkeypatch.setattr(flexna, "na_block_mask", dropped)  # what flexna.tools.verify calls
    assert main(["verify", "--n", "2", "--device", "cpu", "--max-tokens", "128",
                 "--no-attention"]) == 1
    assert "na_block_mask (dense expansion)" in capsys.readouterr().out


def test_bench_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--checkout", str(REPO), "--workloads", "flux-na"]) == 1
    err = capsys.readouterr().err
    assert "flexna bench: error" in err and "CUDA" in err


def test_list(capsys):
    assert main(["list"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no file of the shipped catalogue is skipped
    for path in sorted((REPO / "masks").glob("*.json")):
        assert f"  {path.stem} " in captured.out


@pytest.mark.parametrize("argv, flag", [
    (["show", "--shape", "10", "10", "--kernel", "20", "20"], "--kernel"),
    (["show", "--shape", "10", "10", "--kernel", "3", "3", "3"], "--kernel"),
    (["show", "--shape", "10", "10", "--kernel", "3", "--stride", "4"], "--stride"),
    (["show", "--shape", "10", "10", "--kernel", "3", "--dilation", "0"], "--dilation"),
    (["show", "--shape", "10", "--kernel", "3", "--causal", "maybe"], "--causal"),
    (["show", "--shape", "10", "10", "--kernel", "3", "--query", "10", "0"], "--query"),
    (["show", "--shape", "10", "10", "--kernel", "3", "--query", "1"], "--query"),
    (["show", "--shape", "10", "10", "--kernel", "x"], "--kernel"),
    (["show", "--shape", "10", "10"], "--kernel"),
    (["show", "no-such-entry"], "NAME"),
    (["show"], "NAME"),
    (["show", "nat-7x7", "--kernel", "3"], "--kernel"),
    (["analyze", "--shape", "8", "8", "--kernel", "3", "--q-tile", "0", "2"], "--q-tile"),
    (["analyze", "--shape", "16", "--kernel", "3", "--kv-tile", "4", "--block-size", "6"],
     "--block-size"),
    (["analyze", "--shape", "16", "--kernel", "3", "--block-size", "1", "2", "3"], "--block-size"),
    (["verify", "--n", "0"], "--n"),
    (["verify", "--device", "tpu"], "--device"),
    (["verify", "--max-tokens", "-5"], "--max-tokens"),
    (["frobnicate"], "COMMAND"),
])
def test_bad_arguments_are_argparse_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and flag in err and "usage:" in err


@pytest.mark.parametrize("argv", [["--help"], ["show", "--help"], ["analyze", "--help"],
                                  ["verify", "--help"]])
def test_help_has_examples(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    assert "examples:" in capsys.readouterr().out


def test_png_round_trip():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    image[3:] = image[2]  # repeated rows use the Up filter
    data = encode_png(image)
    np.testing.assert_array_equal(decode(data), image)
    np.testing.assert_array_equal(decode_png(data), image)
    with pytest.raises(ValueError, match="uint8"):
        encode_png(image.astype(np.float32))
    with pytest.raises(ValueError, match="height, width, 3"):
        encode_png(image[..., :2])


@pytest.mark.parametrize("backend, block", [("triton", None), ("flash", None), ("flash", (256, 128))])
def test_analyze_ranks_tiles_for_the_backend(capsys, backend, block):
    """`--backend` prices partial blocks with that kernel's cost and searches its block sizes:
    every suggested tile pair has one tile per block of that backend (FLASH: 128-token key
    tiles; with --block-size, those sizes), its block counts are those na_block_mask builds
    with those blocks, and the predicted speed-up is dense blocks over full + alpha * partial
    with the backend's alpha."""
    shape, kernel, stride = (96, 64), (24, 16), (8, 8)
    argv = ["analyze", "--shape", *map(str, shape), "--kernel", *map(str, kernel),
            "--stride", *map(str, stride), "--backend", backend, "--top", "4"]
    if block is not None:
        argv += ["--block-size", *map(str, block)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"cost model: {backend} backend" in text
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("suggested tiles"))
    suggestions = lines[start + 1:]
    tiles = [line.split() for line in suggestions if line.strip().startswith("--q-tile")]
    assert len(tiles) == 4
    alpha = {"triton": 1.2, "flash": 1.33}[backend]
    q_block, kv_block = block or (128, 128 if backend == "flash" else None)
    dense = (math.prod(shape) / 128) ** 2
    for words, summary in zip(tiles, [s for s in suggestions if "predicted" in s], strict=True):
        q_tile = tuple(map(int, words[1:3]))
        kv_tile = tuple(map(int, words[4:6]))
        assert math.prod(q_tile) == q_block
        if kv_block is not None:
            assert math.prod(kv_tile) == kv_block
        else:
            assert math.prod(kv_tile) in (128, 64)
        kb = math.prod(kv_tile)
        bm = flexna.na_block_mask(shape, kernel, stride, q_tile=q_tile, kv_tile=kv_tile,
                                  block_size=(q_block, kb))
        full, partial = int(bm.full_kv_num_blocks.sum()), int(bm.kv_num_blocks.sum())
        assert f"{full} full, {partial} partial" in summary
        speedup = dense / (q_block * kb / 128**2 * (full + alpha * partial))
        assert f"predicted {speedup:.2f}x over dense Flex on {backend}" in summary
