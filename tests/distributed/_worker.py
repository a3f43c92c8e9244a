"""One rank of a distributed test case: ``python -m tests.distributed._worker CASE OUT``."""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tests.distributed import _cases


def curvature(rank: int, world_size: int) -> dict:
    from sharpkit.curvature import HessianOperator
    from sharpkit.distributed import ShardedOperator

    x, y = _cases.data()
    xs, ys = _cases.shard(x, rank, world_size), _cases.shard(y, rank, world_size)
    local = HessianOperator(_cases.mlp(), nn.CrossEntropyLoss(), _cases.batches(xs, ys))
    return _cases.curvature_estimates(ShardedOperator(local))


def curvature_weighted(rank: int, world_size: int) -> dict:
    from sharpkit.curvature import HessianOperator
    from sharpkit.distributed import ShardedOperator

    x, y, m = (_cases.shard(t, rank, world_size) for t in _cases.masked_data())
    local = HessianOperator(_cases.mlp(), _cases.MaskedMSE(), _cases.masked_batches(x, y, m))
    op = ShardedOperator(local)
    v = torch.linspace(-1.0, 1.0, op.dim, dtype=torch.float64)
    return {"hv": op.matvec(v), "custom": torch.tensor(op.protocol().weighting == "custom")}


def curvature_noseed(rank: int, world_size: int) -> dict:
    from sharpkit.curvature import HessianOperator, eigenvalues
    from sharpkit.distributed import ShardedOperator

    x, y = _cases.data()
    xs, ys = _cases.shard(x, rank, world_size), _cases.shard(y, rank, world_size)
    op = ShardedOperator(HessianOperator(_cases.mlp(), nn.CrossEntropyLoss(), (xs, ys)))
    torch.manual_seed(rank)  # every rank would draw its own random start vector
    try:
        eigenvalues(op, k=1)
    except ValueError as err:
        return {"raised": torch.tensor(True), "message": str(err)}
    return {"raised": torch.tensor(False), "message": ""}


def shared_seed(rank: int, world_size: int) -> dict:
    from sharpkit.distributed import shared_seed

    torch.manual_seed(100 + rank)
    drawn = shared_seed()
    try:
        shared_seed(rank)  # different seeds on different ranks
        refused = False
    except ValueError:
        refused = True
    return {"seed": torch.tensor(drawn), "refused": torch.tensor(refused)}


def train(rank: int, world_size: int) -> dict:
    return {kind: _cases.train(kind, rank, world_size, ddp=True) for kind in _cases.KINDS}


def train_batch_driven(rank: int, world_size: int) -> dict:
    return {
        kind: _cases.train_batch_driven(kind, rank, world_size, ddp=True)
        for kind in _cases.BATCH_DRIVEN
    }


def sharpness(rank: int, world_size: int) -> dict:
    return _cases.sharpness(_cases.shard_batches(rank, world_size), dist.group.WORLD)


def robustness(rank: int, world_size: int) -> dict:
    out: dict = {
        "bn": _cases.train_bn(rank, world_size, ddp=True),
        "bn_no_model": _cases.train_bn(rank, world_size, ddp=True, model_arg=False),
        "bn_msam": _cases.train_bn_msam(rank, world_size, ddp=True),
    }
    for kind in ("sam", "msam-vectorised"):
        out["nonfinite_" + kind] = _cases.nonfinite(kind, rank, world_size, ddp=True)
    for kind in _cases.RESUME_KINDS:
        out["resume_" + kind] = _cases.resume(kind, rank, world_size)
    return out


def exception_sam(rank: int, world_size: int) -> dict:
    return _cases.exception_mid_step("sam", rank, world_size)


def exception_msam(rank: int, world_size: int) -> dict:
    return _cases.exception_mid_step("msam-vectorised", rank, world_size)


def seeds(rank: int, world_size: int) -> dict:
    return {**curvature_noseed(rank, world_size), **shared_seed(rank, world_size)}


CASES = {
    f.__name__: f
    for f in (
        curvature,
        curvature_weighted,
        exception_sam,
        exception_msam,
        robustness,
        seeds,
        sharpness,
        train,
        train_batch_driven,
    )
}


def main() -> None:
    case, out = sys.argv[1], Path(sys.argv[2])
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    try:
        result = CASES[case](rank, world_size)
        if result.pop("_leave", False):  # the group is broken: no collective, no teardown
            torch.save(result, out / f"rank{rank}.pt")
            sys.stdout.flush()
            os._exit(0)
        torch.save(result, out / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
