"""Context-parallel NA (flexna.distributed) vs single-process flexna and the float64 reference.

Each world size is spawned once (gloo on CPU, world sizes 2 and 3); the workers loop over
many configurations (1-D/2-D/3-D, causal, stride, dilation, uneven and thin shards, shard
axis other than 0, overlap on/off, GQA, tiled local order, the shape-gathering path) and
report every mismatch. Outputs and q/k/v gradients must equal those of
``flexna.neighborhood_attention`` on the gathered tensors (itself verified against the
float64 reference elsewhere); one case is also checked against ``reference_attention``
directly. The halo plans are checked against the brute-force mask without processes.
The NCCL test needs 2 CUDA devices.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import re
import traceback
import warnings
from dataclasses import asdict, dataclass, field

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

import flexna
from flexna.analysis import choose_tiles
from flexna.distributed import halo_plan, shard, sharded_neighborhood_attention, split_sizes
from flexna.functional import EagerFallbackWarning
from flexna.pattern import NAPattern
from flexna.reference import reference_attention, reference_mask

# torch's inductor uses torch.jit.script_method internally while compiling (torch's own warning)
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@dataclass(frozen=True)
class Case:
    shape: tuple
    kernel: tuple
    stride: tuple | int = 1
    dilation: tuple | int = 1
    causal: tuple | bool = False
    axis: int = 0
    sizes: tuple | None = None  # None: split_sizes
    gather: bool = False  # pass shard_sizes=None (the all-gather path)
    overlap: bool = False
    heads: int = 2
    kv_heads: int = 2
    dim: int = 8
    tiles: object = "auto"  # the local token order ("auto", None, a tile or a (q, kv) pair)
    grad: bool = True  # False: forward only (compiled Flex on CPU)
    dtype: str = "float32"
    float64_reference: bool = False
    expect: dict = field(default_factory=dict)  # plan facts to assert, e.g. {"max_peers": 2}


CASES_2 = [
    Case((37,), (7,), tiles=None),
    Case((37,), (7,), causal=True, overlap=True),
    Case((40,), (5,), stride=2, dilation=3, sizes=(25, 15), overlap=True, expect={"split": True}),
    Case((40,), (5,), stride=2, dilation=3, causal=True, sizes=(9, 31)),
    Case((20,), (13,), sizes=(3, 17), overlap=True),  # rank 0 thinner than the halo
    Case((12,), (12,)),  # full attention: each rank needs everything
    Case((24, 10), (5, 3), dilation=(2, 1), overlap=True, expect={"split": True}),
    Case((12, 10), (5, 3), dilation=(2, 1), overlap=False, float64_reference=True),
    Case((9, 16), (3, 7), stride=(1, 3), causal=(False, True), axis=1, sizes=(10, 6), overlap=True),
    Case((9, 16), (3, 7), stride=(1, 3), causal=(False, True), axis=-1, sizes=(5, 11)),
    Case((6, 8, 10), (3, 3, 5), stride=(2, 1, 2), dilation=(1, 2, 1), causal=(True, False, False),
         overlap=True),
    Case((5, 6, 12), (3, 3, 5), dilation=(1, 1, 2), axis=2, sizes=(7, 5), overlap=True),
    Case((7, 6, 5), (3, 5, 3), stride=(3, 1, 1), causal=(False, True, False), axis=1, gather=True),
    Case((16, 12), (5, 5), heads=4, kv_heads=2, overlap=True),  # GQA
    Case((32, 24), (5, 7), stride=(2, 1), tiles=((8, 16), (4, 32)), overlap=True),  # tiled, padded
    Case((8, 16, 16), (3, 5, 5), axis=1, sizes=(7, 9), overlap=True, expect={"auto_tiles": True}),
    Case((24,), (4,), stride=4, sizes=(12, 12), expect={"max_peers": 0}),  # blocks align: no halo
    Case((36,), (9,), dilation=2, gather=True, grad=False),  # compiled Flex forward
    Case((16, 6, 8), (3, 3, 3), overlap=True, grad=False),  # compiled, border boxes 1 row thick
]

CASES_3 = [
    Case((30,), (15,), sizes=(3, 3, 24), overlap=True, expect={"max_peers": 2}),  # thin: 2 peers
    Case((30,), (15,), causal=True, sizes=(3, 3, 24), expect={"max_peers": 2}),
    Case((24,), (4,), stride=4, sizes=(7, 9, 8)),
    Case((7, 9), (5, 3), dilation=(1, 3), sizes=(2, 2, 3), overlap=True),
    Case((6, 40), (3, 9), stride=(1, 4), dilation=(1, 2), axis=1, sizes=(18, 9, 13), overlap=True),
    Case((9, 6, 6), (3, 3, 3), stride=(3, 1, 2), dilation=(2, 1, 1), causal=(True, False, True),
         overlap=True),
    Case((9, 6, 6), (3, 3, 3), stride=(3, 1, 2), dilation=(2, 1, 1), causal=(True, False, True),
         overlap=False, gather=True),
    Case((5, 8, 7), (3, 5, 3), dilation=(1, 1, 2), axis=2, sizes=(1, 5, 1), heads=3, kv_heads=1,
         overlap=True),
]


def _global_qkv(case: Case, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, *case.shape, case.heads, case.dim, generator=g)
    k = torch.randn(2, *case.shape, case.kv_heads, case.dim, generator=g)
    v = torch.randn(2, *case.shape, case.kv_heads, case.dim + 2, generator=g)
    dout = torch.randn(2, *case.shape, case.heads, case.dim + 2, generator=g)
    return tuple(t.to(device, getattr(torch, case.dtype)) for t in (q, k, v, dout))


def _run_case(case: Case, rank: int, world: int, seed: int, device: str = "cpu",
              tol: float = 2e-5) -> list[str]:
    """Sharded vs single-process on this rank's rows; returns failure descriptions."""
    axis = case.axis % len(case.shape)
    length = case.shape[axis]
    sizes = case.sizes or split_sizes(length, world)
    pattern = NAPattern.create(case.shape, case.kernel, case.stride, case.dilation, case.causal)
    plans = [halo_plan(pattern, axis, sizes, r) for r in range(world)]
    failures = []
    peers = [len(p.recv) for p in plans]
    if "max_peers" in case.expect and max(peers) != case.expect["max_peers"]:
        failures.append(f"peers per rank {peers}, expected a maximum of {case.expect['max_peers']}")
    if case.expect.get("split") and not any(p.interior[0] < p.interior[1] and p.interior != p.own
                                            for p in plans):  # overlap splits some rank's queries
        failures.append(f"expected a rank with interior and border queries, plans {plans}")
    if case.expect.get("auto_tiles") and choose_tiles(pattern) is None:
        failures.append("expected tiles='auto' to pick tiles")
    q, k, v, dout = _global_qkv(case, seed, device)
    args = (case.kernel, case.stride, case.dilation, case.causal)
    gq, gk, gv = (t.clone().requires_grad_(case.grad) for t in (q, k, v))
    want = flexna.neighborhood_attention(gq, gk, gv, *args)
    if case.grad:
        want.backward(dout)

    def local(t: torch.Tensor) -> torch.Tensor:
        return shard(t, rank, world, axis, sizes).contiguous()

    lq, lk, lv = (local(t).requires_grad_(case.grad) for t in (q, k, v))
    out = sharded_neighborhood_attention(
        lq, lk, lv, *args, axis=case.axis, shard_sizes=None if case.gather else sizes,
        overlap=case.overlap, tiles=case.tiles)
    if case.grad:
        out.backward(local(dout))
    checks = [("out", out, local(want))]
    if case.grad:
        checks += [(f"d{n}", t.grad, local(g.grad)) for n, t, g in zip("qkv", (lq, lk, lv), (gq, gk, gv),
                                                                         strict=True)]
    for name, got, ref in checks:
        if got is None or got.shape != ref.shape:
            failures.append(f"{name}: shape {None if got is None else tuple(got.shape)} != {tuple(ref.shape)}")
        elif not torch.allclose(got, ref, atol=tol if got.dtype == torch.float32 else 1e-2,
                                rtol=tol if got.dtype == torch.float32 else 1e-2):
            failures.append(f"{name}: max abs diff {(got - ref).abs().max().item():.3g}")
    if case.float64_reference:
        n = pattern.num_tokens
        mask = reference_mask(*(pattern.shape, pattern.kernel_size, pattern.stride, pattern.dilation,
                                pattern.is_causal))
        bhnd = [t.reshape(2, n, t.shape[-2], t.shape[-1]).transpose(1, 2) for t in (q, k, v)]
        ref64, _ = reference_attention(*bhnd, mask)
        ref64 = ref64.transpose(1, 2).reshape(*q.shape[:-1], v.shape[-1])
        got64 = out.detach().cpu().double()
        want64 = shard(ref64, rank, world, axis, sizes)
        if not torch.allclose(got64, want64, atol=max(tol, 1e-5), rtol=max(tol, 1e-5)):
            failures.append("out vs float64 reference_attention: max abs diff "
                            f"{(got64 - want64).abs().max().item():.3g}")
    return failures


def _validation_errors(rank: int, world: int) -> list[str]:
    """Bad inputs raise ValueError naming the argument (consistently on every rank)."""
    failures = []
    x = torch.randn(1, 6, 5, 2, 4)
    cases = [
        (dict(axis=2), "axis = 2 is out of range"),
        (dict(axis=-3), "axis = -3 is out of range"),
        (dict(shard_sizes=(6,) * (world + 1)), "one int per rank"),
        (dict(shard_sizes=(5,) * world), "does not match"),
        (dict(shard_sizes=(0, *(6,) * (world - 1))), "out of range: every rank needs a shard"),
        (dict(kernel_size=(6 * world + 1, 3), shard_sizes=(6,) * world), "kernel_size\\[axis 0\\]"),
        (dict(overlap="yes"), "overlap must be a bool"),
    ]
    for kwargs, pattern in cases:
        kwargs = {"kernel_size": 3, **kwargs}
        try:
            sharded_neighborhood_attention(x, x, x, **kwargs)
        except ValueError as exc:
            if not re.search(pattern, str(exc)):
                failures.append(f"{kwargs}: message {exc} does not match {pattern!r}")
        else:
            failures.append(f"{kwargs}: no ValueError")
    # mismatched q/k/v on this rank (local check)
    try:
        sharded_neighborhood_attention(x, x[:, :5], x, 3, shard_sizes=(6,) * world)
    except ValueError as exc:
        if "key shape" not in str(exc):
            failures.append(f"q/k mismatch: {exc}")
    else:
        failures.append("q/k mismatch: no ValueError")
    # slabs that do not fit together across ranks: every rank raises (gathering path)
    y = torch.randn(1, 6, 5 + (rank == world - 1), 2, 4)
    try:
        sharded_neighborhood_attention(y, y, y, 3)
    except ValueError as exc:
        if "differ across ranks" not in str(exc):
            failures.append(f"cross-rank mismatch: {exc}")
    else:
        failures.append("cross-rank mismatch: no ValueError")
    return failures


def _worker(rank: int, world: int, init_file: str, out_dir: str, cases: list[dict], backend: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", EagerFallbackWarning)  # CPU gradients run dense Flex
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
    device, tol, init = "cpu", 2e-5, {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device, tol = f"cuda:{rank}", 1e-4  # compiled kernels: different summation orders
        init["device_id"] = torch.device(device)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120), **init)
    report: dict = {"failures": [], "cases": len(cases)}
    try:
        for i, c in enumerate(cases):
            case = Case(**{key: tuple(v) if isinstance(v, list) else v for key, v in c.items()})
            try:
                failures = _run_case(case, rank, world, i, device, tol)
                report["failures"] += [f"case {i} {case}: {f}" for f in failures]
            except Exception:
                report["failures"].append(f"case {i} {case}: {traceback.format_exc()}")
        if backend == "gloo":
            report["failures"] += [f"validation: {f}" for f in _validation_errors(rank, world)]
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(report, f)
        dist.destroy_process_group()


def _spawn(world: int, cases: list[Case], tmp_path, backend: str = "gloo") -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    payload = [asdict(c) for c in cases]
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(out_dir), payload, backend),
             nprocs=world, join=True)
    failures = []
    for r in range(world):
        report = json.loads((out_dir / f"rank{r}.json").read_text())
        failures += [f"rank {r}: {f}" for f in report["failures"]]
    assert not failures, "\n".join(failures)


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")


@needs_gloo
@pytest.mark.parametrize("world,cases", [(2, CASES_2), (3, CASES_3)], ids=["world2", "world3"])
def test_sharded_equals_single_process_gloo(world, cases, tmp_path):
    _spawn(world, cases, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA devices")
def test_sharded_equals_single_gpu_nccl(tmp_path):
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    # a subset (each case compiles Flex forward and backward a few times), plus a larger fp16 video
    cases = [dataclasses.replace(CASES_2[i], dim=16) for i in (1, 4, 6, 8, 10, 13, 14, 15, 18)]
    cases.append(Case((24, 16, 32), (9, 7, 7), overlap=True, heads=4, dim=64, dtype="float16"))
    _spawn(2, cases, tmp_path, backend="nccl")


def test_requires_initialised_process_group():
    assert not dist.is_initialized()
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"group: the default torch\.distributed process group is not init"):
        sharded_neighborhood_attention(x, x, x, 3, shard_sizes=(8,))


def test_validation_before_group_check():
    x = torch.randn(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"axis = 1 is out of range: need an int with -1 <= axis < 1"):
        sharded_neighborhood_attention(x, x, x, 3, axis=1)
    with pytest.raises(ValueError, match="shard of size 0"):
        sharded_neighborhood_attention(x[:, :0], x[:, :0], x[:, :0], 3)


def test_split_sizes():
    assert split_sizes(10, 3) == (4, 3, 3)
    assert split_sizes(9, 3) == (3, 3, 3)
    assert [len(t) for t in torch.arange(10).tensor_split(3)] == list(split_sizes(10, 3))
    with pytest.raises(ValueError, match="cannot split length 2 over 3 ranks"):
        split_sizes(2, 3)


# ---------------------------------------------------------------------------- halo plans


@st.composite
def sharded_patterns(draw):
    ndim = draw(st.integers(1, 2))
    shape, kernel, stride, dil, causal = [], [], [], [], []
    for _ in range(ndim):
        length = draw(st.integers(2, 24))
        d = draw(st.integers(1, 3 if length >= 6 else 1))
        k = draw(st.integers(1, length // d))
        shape.append(length)
        kernel.append(k)
        stride.append(draw(st.integers(1, k)))
        dil.append(d)
        causal.append(draw(st.booleans()))
    pattern = NAPattern.create(tuple(shape), tuple(kernel), tuple(stride), tuple(dil), tuple(causal))
    axis = draw(st.integers(0, ndim - 1))
    world = draw(st.integers(1, min(4, shape[axis])))
    cuts = sorted(draw(st.sets(st.integers(1, shape[axis] - 1), min_size=world - 1, max_size=world - 1)))
    bounds = [0, *cuts, shape[axis]]
    sizes = tuple(b - a for a, b in itertools.pairwise(bounds))
    return pattern, axis, sizes


@settings(max_examples=150, deadline=None)
@given(sharded_patterns())
def test_halo_plan_is_exact(case):
    """Every key a rank's queries attend is in its assembled rows; the received rows are
    exactly the needed rows outside its slab; sends mirror receives; interior queries attend
    only own rows; borders' key rows hold all their keys."""
    pattern, axis, sizes = case
    p = pattern
    mask = reference_mask(p.shape, p.kernel_size, p.stride, p.dilation, p.is_causal)
    coords = torch.stack(torch.unravel_index(torch.arange(p.num_tokens), p.shape), dim=1)[:, axis]
    plans = [halo_plan(p, axis, sizes, r) for r in range(len(sizes))]
    for r, plan in enumerate(plans):
        a, b = plan.own
        mine = (coords >= a) & (coords < b)
        needed = coords[mask[mine].any(dim=0)]
        lo = min(int(needed.min()), a)
        hi = max(int(needed.max()) + 1, b)
        assert plan.keys == (lo, hi), (r, plan)
        got = sorted(row for _, s, e in plan.recv for row in range(s, e))
        assert got == [row for row in range(lo, hi) if not a <= row < b]
        for peer, s, e in plan.recv:
            assert plans[peer].own[0] <= s < e <= plans[peer].own[1]
            assert (r, s, e) in plans[peer].send
        ia, ib = plan.interior
        assert a <= ia <= ib <= b
        for rows, keys in ((plan.interior, plan.own), (plan.left_border, plan.left_border_keys),
                           (plan.right_border, plan.right_border_keys)):
            q_sel = (coords >= rows[0]) & (coords < rows[1])
            attended = coords[mask[q_sel].any(dim=0)]
            if attended.numel():
                assert keys[0] <= int(attended.min()) and int(attended.max()) < keys[1], (r, rows, keys)
        assert plan.left_border == (a, ia) and plan.right_border == (ib, b)
