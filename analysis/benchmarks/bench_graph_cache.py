"""Hessian-vector products over several batches: the budgeted graph cache.

``HessianOperator``'s default (``cache_graph=None``) keeps the gradient graphs of
as many batches as its memory budget holds, so a product over several batches is
one double backward per batch instead of a forward, a backward and a double
backward. Cases per model (float32, 4 batches, the last one shorter),
interleaved, ratios to one gradient over the same batches in the same round:

- ``gradient`` (baseline): ``HessianOperator.gradient`` over the 4 batches;
- ``default (budget)``: the default operator (here every graph fits);
- ``cache_graph=True`` / ``cache_graph=False``: every batch cached / none;
- ``budget: first batch only``: ``cache_budget=0`` (the first graph is always kept).

Run: ``python -m analysis.benchmarks.bench_graph_cache [--quick] [--threads N]``;
writes analysis/benchmarks/results/graph_cache.md (and .json).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from sharpkit.curvature import HessianOperator

from .harness import Case, Row, compare, machine_info, write_table

RESULTS = Path(__file__).parent / "results"


def _models(quick: bool) -> dict[str, tuple[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = 64 if quick else 128
    sizes = [n, n, n, n // 2]
    mlp = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 256), nn.Tanh(),
                        nn.Linear(256, 10))  # fmt: skip
    cnn = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, 16, 3, padding=1), nn.Tanh(),
        nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    )  # fmt: skip
    mlp_data = [(torch.randn(s, 64, generator=g), torch.randint(0, 10, (s,), generator=g))
                for s in sizes]  # fmt: skip
    cnn_data = [(torch.randn(s, 1, 16, 16, generator=g), torch.randint(0, 10, (s,), generator=g))
                for s in sizes]  # fmt: skip
    return {
        f"MLP 64-256-256-10, batches {sizes}": (mlp, mlp_data),
        f"CNN 2x conv16 16x16, batches {sizes}": (cnn, cnn_data),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "graph_cache.md"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loss = nn.CrossEntropyLoss()
    rows: list[Row] = []
    notes = []
    for name, (model, data) in _models(args.quick).items():
        ops = {
            "default (budget)": HessianOperator(model, loss, data),
            "cache_graph=True": HessianOperator(model, loss, data, cache_graph=True),
            "cache_graph=False": HessianOperator(model, loss, data, cache_graph=False),
            "budget: first batch only": HessianOperator(model, loss, data, cache_budget=0),
        }
        v = torch.randn(ops["default (budget)"].dim, generator=torch.Generator().manual_seed(2))
        for op in ops.values():
            op.matvec(v)  # builds the caches outside the timing
        cached = {k: op.cached_batches for k, op in ops.items()}
        mib = ops["default (budget)"].cache_bytes / 2**20
        notes.append(f"{name}: cached batches {cached}; the default's graphs hold {mib:.1f} MiB.")
        grad_op = ops["cache_graph=False"]
        cases = [Case("gradient", grad_op.gradient, group=name)]
        cases += [Case(k, lambda op=op, v=v: op.matvec(v), group=name) for k, op in ops.items()]
        rows += compare(cases, "gradient", rounds=5 if args.quick else 11, calls=2, warmup=1)
    notes.append(
        "Float32 on the CPU; ratios are to one gradient over the same 4 batches in the same "
        "round. The machine was shared with other jobs while this ran: absolute times are "
        "noisy, the interleaved ratios less so."
    )
    path = write_table(
        rows, args.out, title="Hessian-vector products over several batches: the graph cache",
        machine={**machine_info(), "threads": args.threads}, notes=notes,
    )  # fmt: skip
    print(path.read_text())


if __name__ == "__main__":
    main()
