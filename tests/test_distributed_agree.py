"""Ranks that disagree fail together (issue 13, item 4): gloo, 2 processes, bounded by timeouts.

Each kind of mismatch (kernel on the shard axis, causal, dilation, dtype, kernel on a non-shard
axis, an invalid argument on one rank with ``shard_sizes=None``) must raise a ``ValueError`` on
every rank before any halo moves (the same message on every rank for a mismatch), and the group
must still work afterwards: a correct call then equals single-process attention.
"""

from __future__ import annotations

import datetime
import json
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flexna
from flexna.distributed import shard, sharded_neighborhood_attention

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),
]

WORLD = 2
SHAPE = (12, 6)  # sharded along axis 0: 6 rows per rank
DEADLINE_S = 150  # the whole spawn; the process group's own timeout is shorter

# kind -> (this rank's keyword arguments, rank 1's dtype ("nan": one NaN in its query), what the
# message must name on every rank)
KINDS: dict[str, tuple] = {
    "kernel_shard_axis": (lambda r: dict(kernel_size=(3 if r == 0 else 5, 3)), None, "kernel_size"),
    "causal": (lambda r: dict(kernel_size=3, is_causal=(r == 1, False)), None, "is_causal"),
    "dilation": (lambda r: dict(kernel_size=3, dilation=(1 + r, 1)), None, "dilation"),
    "dtype": (lambda r: dict(kernel_size=3), "float16", "dtype"),
    "kernel_other_axis": (lambda r: dict(kernel_size=(3, 3 if r == 0 else 5)), None, "kernel_size"),
    "invalid_one_rank_gathering": (lambda r: dict(kernel_size=(3, 99 if r == 1 else 3), shard_sizes=None),
                                   None, "kernel_size"),
    "non_finite_one_rank": (lambda r: dict(kernel_size=3, check_finite=True), "nan", "non-finite"),
}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    report: dict = {}
    g = torch.Generator().manual_seed(0)
    full = torch.randn(1, *SHAPE, 2, 8, generator=g)
    mine = shard(full, rank, WORLD).contiguous()
    try:
        for kind, (kwargs, dtype, _) in KINDS.items():
            x = mine.to(getattr(torch, dtype)) if dtype and dtype != "nan" and rank == 1 else mine
            q = x.clone() if dtype == "nan" and rank == 1 else x
            if q is not x:
                q[0, 0, 0, 0, 0] = float("nan")
            kw = {"shard_sizes": (6, 6), **kwargs(rank)}
            start = time.monotonic()
            try:
                sharded_neighborhood_attention(q, x, x, **kw)
                report[kind] = {"error": None}
            except Exception as exc:
                report[kind] = {"error": type(exc).__name__, "message": str(exc)}
            report[kind]["seconds"] = time.monotonic() - start
        out = sharded_neighborhood_attention(mine, mine, mine, 3, shard_sizes=(6, 6))
        want = shard(flexna.neighborhood_attention(full, full, full, 3), rank, WORLD)
        report["after"] = float((out - want).abs().max())
    except Exception:
        report["crash"] = traceback.format_exc()
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Spawn the ranks once; every rank's report (a wedged rank is killed at the deadline)."""
    tmp = tmp_path_factory.mktemp("agree")
    ctx = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + DEADLINE_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"ranks still running after {DEADLINE_S} s: a mismatch left a rank waiting")
    out = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, rep in enumerate(out):
        assert "crash" not in rep, f"rank {r}: {rep['crash']}"
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_rank_raises(reports: list[dict], kind: str) -> None:
    field = KINDS[kind][2]
    got = [rep[kind] for rep in reports]
    for r, g in enumerate(got):
        assert g["error"] == "ValueError", f"rank {r}: {g}"
        assert field in g["message"], f"rank {r}: {g['message']}"
        assert g["seconds"] < 30, f"rank {r} waited {g['seconds']:.0f} s"
    if kind == "invalid_one_rank_gathering":
        assert got[1]["message"].startswith("kernel_size[axis 1] = 99 is out of range")
        assert "rank 1 rejected its arguments" in got[0]["message"]
    elif kind == "non_finite_one_rank":
        assert got[1]["message"].startswith("query holds 1 non-finite value(s) (NaN or inf), the first at "
                                            "index [0, 0, 0, 0, 0]")
        assert "rank 1 rejected its arguments" in got[0]["message"]
    else:
        assert got[0]["message"] == got[1]["message"]
        assert "differs across ranks" in got[0]["message"]


def test_group_still_works_after_mismatches(reports: list[dict]) -> None:
    for rep in reports:
        assert rep["after"] < 1e-5


def test_fingerprint_names_values() -> None:
    """Without processes: two ranks' fingerprints decode to a message with both values."""
    from flexna.distributed import _agree, _check_local, _encode

    x = torch.randn(1, 6, 6, 2, 8)
    rows = []
    for kernel in ((3, 3), (3, 5)):
        _, fields = _check_local(x, x, x, kernel, 1, 1, False, None, 0, False)
        rows.append(_encode(None, (x, x, x), {**fields, "tiles": ("'auto'",), "shard_sizes": (6, 6)}))
    message = r"kernel_size differs across ranks: \(3, 5\) on rank 1, \(3, 3\) on rank 0"
    with pytest.raises(ValueError, match=message):
        _agree(torch.tensor(rows), 0, None)
    assert _agree(torch.tensor([rows[0], rows[0]]), 0, None) == (6, 6)
