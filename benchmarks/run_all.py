"""Run the whole attention benchmark (all workloads, fp16 + bf16, forward and forward+backward).

    python benchmarks/run_all.py [--out benchmarks/results] [--gpus 0 1 2 3] [--jobs fp16:fwd ...]

Each job is one ``bench_attention.py`` invocation: one dtype x direction x workload group
(``GROUPS``), each under 10 minutes on an H100/H200. Jobs run in parallel, one per visible
GPU (each GPU runs one job at a time, so kernel timings are not shared; the CPU-bound
sub-millisecond rows do share the host's CPUs with other jobs' compiles), then
``summarize.py`` writes ``<gpu>-<date>.md``. With one GPU the jobs run one after another.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ALL_JOBS = ["fp16:fwd", "fp16:fwdbwd", "bf16:fwd", "bf16:fwdbwd"]
# one bench_attention.py invocation per (job, group): each stays well under 10 minutes on an
# H200 (a 3-D fwd+bwd row alone takes ~5 min, most of it compiling and autotuning NATTEN)
GROUPS = {"1d": ["long-1d", "long-1d-s256", "long-1d-blocked"], "2d": ["flux-na", "flux-gna"],
          "3d-na": ["hunyuan-na"], "3d-gna": ["hunyuan-gna"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--gpus", nargs="*", type=int, default=None)
    ap.add_argument("--jobs", nargs="*", default=ALL_JOBS, help="dtype:fwd|fwdbwd")
    ap.add_argument("--workloads", nargs="*", default=None)
    ap.add_argument("--groups", nargs="*", default=list(GROUPS), help=f"workload groups, of {list(GROUPS)}")
    ap.add_argument("--timeout", type=float, default=None,
                    help="stop a job after this many seconds (its JSON keeps what it measured)")
    ap.add_argument("--validate", type=int, default=0, help="passed to the fp16 forward job")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("run_all.py needs CUDA")
    gpus = a.gpus if a.gpus is not None else list(range(torch.cuda.device_count()))
    groups = {"custom": a.workloads} if a.workloads else {g: GROUPS[g] for g in a.groups}
    pending = [(job, group) for job in a.jobs for group in groups]
    running: list[tuple[subprocess.Popen, int, str, float]] = []
    free = list(gpus)
    logs = Path(a.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    while pending or running:
        while pending and free:
            (job, group), gpu = pending.pop(0), free.pop(0)
            dtype, direction = job.split(":")
            cmd = [sys.executable, str(HERE / "bench_attention.py"), "--dtype", dtype, "--out", a.out,
                   "--workloads", *groups[group], f"--tag=-{group}"]
            if direction == "fwdbwd":
                cmd.append("--backward")
            if a.validate and job == "fp16:fwd":
                cmd += ["--validate", str(a.validate)]
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(gpu)}
            log = open(logs / f"{job.replace(':', '-')}-{group}.log", "w")  # noqa: SIM115 - closed with the process
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), gpu,
                            f"{job} {group}", time.time()))
            print(f"started {job} {group} on GPU {gpu}", flush=True)
        while not any(p.poll() is not None for p, *_ in running):
            for p, _, job, t0 in running:
                if a.timeout and time.time() - t0 > a.timeout:
                    print(f"stopping {job} after {a.timeout:.0f} s", flush=True)
                    p.kill()
            time.sleep(2)
        entry = next(r for r in running if r[0].poll() is not None)
        running.remove(entry)
        proc, gpu, job, _ = entry
        free.append(gpu)
        print(f"finished {job} on GPU {gpu}: exit {proc.returncode}", flush=True)
    name = torch.cuda.get_device_name(gpus[0] if gpus else 0).replace(" ", "-")
    date = datetime.date.today()
    files = sorted(str(p) for p in Path(a.out).glob(f"{name}-{date}-*.json"))
    subprocess.run([sys.executable, str(HERE / "summarize.py"), *files, "--out",
                    str(Path(a.out) / f"{name}-{date}.md")], check=True)


if __name__ == "__main__":
    main()
