"""Distributed costs on this machine (gloo): Hessian products over a data set, and
data-parallel mSAM's step against data-parallel SAM's.

Two ranks are started once (``MASTER_ADDR=127.0.0.1``, one torch thread each) and
time, interleaved round by round in the same processes:

- ``1 process, 1 thread``: rank 0 alone multiplies with the Hessian over the whole
  data set (rank 1 waits at a barrier). The baseline.
- ``1 process, 2 threads``: the same with two torch threads (the whole machine for
  one process, the fair comparison on a 2-core machine).
- ``2 processes (ShardedOperator)``: each rank multiplies with the Hessian of its
  half of the data, and the example-weighted products are all-reduced.

Each group is run with the per-batch gradient graphs cached (``cache_graph=True``)
and recomputed per product (``cache_graph=False``). A sample is one product,
between two barriers, timed on rank 0.

Second table (``distributed_optim.md``): one training step on two ranks, each with
a local batch of 256: SAM on a ``DistributedDataParallel`` model (two gradient
all-reduces per step, one per pass; the baseline) against data-parallel mSAM with
one and four micro-batches per rank (one all-reduce per step: the first pass is
local). With one micro-batch per rank the local computation is SAM's, so the
difference is the communication saved.

Run: ``python -m analysis.benchmarks.bench_distributed [--quick]``; writes
analysis/benchmarks/results/distributed.md and distributed_optim.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from analysis.benchmarks.harness import Row, machine_info, rows_from_samples, write_table

RESULTS = Path(__file__).parent / "results" / "distributed.md"
EXAMPLES, BATCH = 4096, 512


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 10)
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(EXAMPLES, 64, generator=g), torch.randint(0, 10, (EXAMPLES,), generator=g)


def _batches(x: torch.Tensor, y: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(torch.split(x, BATCH), torch.split(y, BATCH)))


def _worker(rounds: int) -> None:
    from sharpkit.curvature import HessianOperator
    from sharpkit.distributed import ShardedOperator

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    out = Path(os.environ["SHARPKIT_BENCH_OUT"])
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    x, y = _data()
    loss = nn.CrossEntropyLoss()
    cases = []
    for cache in (True, False):
        group = f"cache_graph={cache}"
        full = (
            HessianOperator(_model(), loss, _batches(x, y), cache_graph=cache)
            if rank == 0
            else None
        )
        xs, ys = torch.tensor_split(x, size)[rank], torch.tensor_split(y, size)[rank]
        sharded = ShardedOperator(
            HessianOperator(_model(), loss, _batches(xs, ys), cache_graph=cache)
        )
        v = torch.randn(sharded.dim, generator=torch.Generator().manual_seed(2))

        def single(threads: int, full=full, v=v) -> None:
            if rank == 0:
                torch.set_num_threads(threads)
                full.matvec(v)
                torch.set_num_threads(1)

        cases += [
            (group, "1 process, 1 thread", lambda single=single: single(1)),
            (group, "1 process, 2 threads", lambda single=single: single(2)),
            (group, f"{size} processes (ShardedOperator)", lambda s=sharded, v=v: s.matvec(v)),
        ]
    rows = _timed(cases, "1 process, 1 thread", rounds)
    dim = sum(p.numel() for p in _model().parameters())
    if rank == 0:
        write_table(
            rows,
            out,
            title="Hessian-vector products over a data set: 1 process vs 2 (gloo, localhost)",
            machine=machine_info(),
            notes=[
                f"MLP 64-256-256-10 ({dim} parameters), cross-entropy, {EXAMPLES} synthetic "
                f"examples in batches of {BATCH}, float32. One sample = one product over the "
                "whole data set, between two barriers (rank 0's clock); ratio to one process "
                "with one thread in the same round. The sharded operator adds one all-reduce "
                f"of {dim} floats and a two-number input check per product."
            ],
        )
    rows = _timed(_optimizer_cases(rank, size), "SAM on a DDP model", rounds)
    if rank == 0:
        write_table(
            rows,
            out.with_name(out.stem + "_optim.md"),
            title="Data-parallel mSAM against SAM under DDP: one step on 2 ranks (gloo)",
            machine=machine_info(),
            notes=[
                f"The same MLP ({dim} parameters), a local batch of {LOCAL_BATCH} per rank, "
                "SGD base. SAM under DDP all-reduces both passes' gradients (2 x "
                f"{dim} floats per step); data-parallel mSAM all-reduces once ({dim} floats "
                "and a few numbers), its first pass is local. One sample = one step between "
                "two barriers (rank 0's clock)."
            ],
        )
    dist.barrier()
    dist.destroy_process_group()


LOCAL_BATCH = 256


def _optimizer_cases(rank: int, size: int) -> list:
    from sharpkit.optim import MSAM, SAM

    g = torch.Generator().manual_seed(3 + rank)
    x, y = (
        torch.randn(LOCAL_BATCH, 64, generator=g),
        torch.randint(0, 10, (LOCAL_BATCH,), generator=g),
    )
    loss = nn.CrossEntropyLoss()
    net_sam = _model()
    ddp = nn.parallel.DistributedDataParallel(net_sam)
    sam = SAM(net_sam.parameters(), torch.optim.SGD, rho=0.05, lr=0.01)

    def closure() -> torch.Tensor:
        out = loss(ddp(x), y)
        out.backward()
        return out

    cases = [("step", "SAM on a DDP model", lambda: sam.step(closure))]
    for m in (1, 4):
        net = _model()
        opt = MSAM(
            net.parameters(),
            torch.optim.SGD,
            rho=0.05,
            micro_batches=m,
            model=nn.parallel.DistributedDataParallel(net),
            lr=0.01,
        )
        cases.append(
            (
                "step",
                f"data-parallel mSAM, {m} micro-batch{'es' if m > 1 else ''} per rank",
                lambda opt=opt: opt.step(loss_fn=loss, batch=(x, y)),
            )
        )
    return cases


def _timed(cases: list, baseline: str, rounds: int) -> list[Row]:
    """Warm up, then interleaved rounds (order reversed every other round); each sample
    is one call between two barriers, timed on this rank."""
    for _, _, fn in cases:
        dist.barrier()
        fn()
    samples: dict[tuple[str, str], list[float]] = {(g, n): [] for g, n, _ in cases}
    for r in range(rounds):
        for g, n, fn in cases if r % 2 == 0 else cases[::-1]:
            dist.barrier()
            t0 = time.perf_counter()
            fn()
            dist.barrier()
            samples[(g, n)].append(time.perf_counter() - t0)
    rows: list[Row] = []
    for group in dict.fromkeys(g for g, _, _ in cases):  # groups in order, each its baseline
        names = [n for g, n, _ in cases if g == group]
        rows += rows_from_samples(
            [(group, n, "") for n in names], {n: samples[(group, n)] for n in names}, baseline,
            rounds, 1,
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke test)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args()
    rounds = args.rounds or (4 if args.quick else 20)
    if args.worker:
        _worker(rounds)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "SHARPKIT_BENCH_OUT": args.out,
        }
        cmd = [sys.executable, "-m", "analysis.benchmarks.bench_distributed", "--worker"]
        procs.append(subprocess.Popen([*cmd, "--rounds", str(rounds)], env=env))
    codes = [p.wait(timeout=1800) for p in procs]
    if any(codes):
        raise SystemExit(f"bench_distributed: a rank failed (exit codes {codes})")
    out = Path(args.out)
    print(out.read_text())
    print(out.with_name(out.stem + "_optim.md").read_text())


if __name__ == "__main__":
    main()
