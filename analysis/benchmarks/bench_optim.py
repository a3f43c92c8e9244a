"""Optimizer step time: sharpkit SAM/ASAM against the base optimizer and a peer SAM.

One training step of each optimizer on the same model and batch, interleaved
in the same process (see harness.py). Cases per model:

- ``base``: SGD with momentum, one forward/backward + step (the baseline);
- ``peer SAM``: pytorch_optimizer's SAM, the most complete PyTorch SAM package,
  driven as its documentation says (closure at w by the user, then
  ``step(closure)``);
- ``sharpkit SAM`` and ``sharpkit ASAM``: ``step(closure)``.

Two forward/backward passes and one update are SAM's floor, so its ratio to
the base step is bounded below by about 2x the forward/backward share.

Run: ``python -m analysis.benchmarks.bench_optim [--quick]``; writes
analysis/benchmarks/results/optim.md (and .json).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sharpkit.optim import ASAM, SAM

from .harness import Case, compare, machine_info, write_table

RESULTS = Path(__file__).parent / "results"


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 10),
    )  # fmt: skip


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[int], torch.Tensor], int]] = {
    "MLP 784-512-512-10, batch 128": (mlp, lambda n: torch.randn(n, 784), 128),
    "CNN 2 conv + BN, 32x32x3, batch 64": (small_cnn, lambda n: torch.randn(n, 3, 32, 32), 64),
}


def _closure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def cases_for(name: str, peer: bool = True) -> list[Case]:
    factory, make_x, n = MODELS[name]
    torch.manual_seed(0)
    x, y = make_x(n), torch.randint(0, 10, (n,))
    kw = {"lr": 0.01, "momentum": 0.9}
    cases = []

    m = factory()
    base = torch.optim.SGD(m.parameters(), **kw)

    c_base = _closure(m, x, y)

    def base_step(opt=base, c=c_base):
        opt.zero_grad()
        c()
        opt.step()

    cases.append(Case("base SGD-momentum", base_step, group=name))

    if peer:
        from pytorch_optimizer import SAM as PeerSAM

        m = factory()
        popt = PeerSAM(m.parameters(), torch.optim.SGD, rho=0.05, **kw)

        c_peer = _closure(m, x, y)

        def peer_step(opt=popt, c=c_peer):
            opt.zero_grad()
            c()
            opt.step(c)

        cases.append(Case("peer SAM (pytorch_optimizer)", peer_step, group=name))

    for label, cls, extra in (
        ("sharpkit SAM", SAM, {"rho": 0.05}),
        ("sharpkit ASAM", ASAM, {"rho": 0.5}),
    ):
        m = factory()
        opt = cls(m.parameters(), torch.optim.SGD, model=m, **extra, **kw)
        c_sam = _closure(m, x, y)
        cases.append(Case(label, lambda opt=opt, c=c_sam: opt.step(c), group=name))
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "optim.md")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rounds, calls = (3, 2) if args.quick else (21, 5)
    rows = []
    for name in MODELS:
        cases = cases_for(name)
        # ratio to the base step ...
        rows += compare(cases, "base SGD-momentum", rounds=rounds, calls=calls)
        # ... and sharpkit SAM's ratio to the peer, from the same interleaved samples
        peer_rows = compare(
            [c for c in cases if c.name in ("peer SAM (pytorch_optimizer)", "sharpkit SAM", "sharpkit ASAM")],
            "peer SAM (pytorch_optimizer)", rounds=rounds, calls=calls,
        )  # fmt: skip
        for r in peer_rows:
            if r.name != r.baseline:
                r.name = f"{r.name} vs peer"
                rows.append(r)
    write_table(
        rows,
        args.out,
        title="SAM step time (CPU)",
        machine=machine_info(),
        notes=[
            "Targets: sharpkit SAM <= 1.02x the peer SAM, < 2x the base step; ASAM within 5% of SAM.",
            "Rows '... vs peer' are a separate interleaved run whose baseline is the peer SAM step.",
        ],
    )
    print(args.out.read_text())


if __name__ == "__main__":
    main()
