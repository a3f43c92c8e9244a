"""Hessian-vector products over a data set: one process against two (gloo, this machine).

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

Run: ``python -m analysis.benchmarks.bench_distributed [--quick]``; writes
analysis/benchmarks/results/distributed.md (and .json).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from analysis.benchmarks.harness import Row, machine_info, write_table

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
    # warm-up (caches, allocator) then interleaved rounds, order reversed every other round
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
    if rank == 0:
        rows = []
        for g, n, _ in cases:
            base = samples[(g, "1 process, 1 thread")]
            s = samples[(g, n)]
            ratios = [a / b for a, b in zip(s, base)]
            q, qr = statistics.quantiles(s, n=4), statistics.quantiles(ratios, n=4)
            rows.append(
                Row(
                    group=g,
                    name=n,
                    baseline="1 process, 1 thread",
                    median_ms=1e3 * statistics.median(s),
                    q1_ms=1e3 * q[0],
                    q3_ms=1e3 * q[2],
                    ratio=statistics.median(ratios),
                    ratio_q1=qr[0],
                    ratio_q3=qr[2],
                    rounds=rounds,
                    calls=1,
                )
            )
        dim = sum(p.numel() for p in _model().parameters())
        write_table(
            rows,
            os.environ["SHARPKIT_BENCH_OUT"],
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
    dist.barrier()
    dist.destroy_process_group()


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
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
