"""BAR step time against its base optimizer (Li, Zhang, He, NeurIPS 2024).

The paper's headline is that BAR costs about what plain LoRA costs (1.03-1.05x)
while SAM costs 2x or more. Cases per LoRA model (analysis/benchmarks/models.py),
all with AdamW (lr 1e-3) as the base optimizer:

- ``base AdamW``: zero_grad, forward/backward, ``step()`` (the baseline);
- ``BAR nbar, step(closure)`` and ``BAR nbar, backward+step()``: the two ways to
  drive BAR (mu0 = 0.1);
- ``BAR obar, step(closure)``;
- ``SAM (rho 0.05)``: sharpkit's SAM on the same model, for scale.

Target: BAR <= 1.05x the base step. A second table times ``optimizer.step()``
alone (gradients computed once, outside the timing), which isolates BAR's own
work (one fused norm pass, one host sync, one fused scaling pass); it is not the
target, since a training step always includes the forward/backward pass.

Run: ``python -m analysis.benchmarks.bench_bar [--quick] [--device cuda] [--threads N]``;
writes analysis/benchmarks/results/bar.md (and .json).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from sharpkit._device import resolve_device
from sharpkit.optim import BAR, SAM

from .harness import Case, Row, compare, machine_info, write_table
from .models import lora_mlp, lora_transformer_block, mlp_batch, sequence_batch

RESULTS = Path(__file__).parent / "results"
LR = 1e-3


def _models(large: bool) -> dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]]:
    if large:  # the GPU size
        return {
            "LoRA MLP 4096-4096-4096-10 r8, batch 512": (
                lambda: lora_mlp(in_features=4096, hidden=4096),
                lambda: mlp_batch(512, in_features=4096),
            ),
            "LoRA transformer block d1024 h16, seq 256, batch 32": (
                lambda: lora_transformer_block(dim=1024, heads=16),
                lambda: sequence_batch(32, seq_len=256, dim=1024),
            ),
        }
    return {
        "LoRA MLP 784-512-512-10 r8, batch 128": (lora_mlp, lambda: mlp_batch(128)),
        # the same model at a larger batch: how much of the ratio is a fixed per-step cost
        "LoRA MLP 784-512-512-10 r8, batch 512": (lora_mlp, lambda: mlp_batch(512)),
        "LoRA transformer block d256 h4, seq 64, batch 32": (
            lora_transformer_block,
            lambda: sequence_batch(32),
        ),
    }


def _trainable(m: nn.Module) -> list[torch.Tensor]:
    return [p for p in m.parameters() if p.requires_grad]


def step_cases(group: str, factory, make_batch, device) -> list[Case]:
    x, y = (t.to(device) for t in make_batch())
    cases = []

    def loss_of(m: nn.Module) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss

        return closure

    m = factory().to(device)
    base = torch.optim.AdamW(_trainable(m), lr=LR)
    c = loss_of(m)

    def base_step(opt=base, c=c):
        opt.zero_grad()
        c()
        opt.step()

    cases.append(Case("base AdamW", base_step, group=group))

    for label, variant in (
        ("BAR nbar, step(closure)", "nbar"),
        ("BAR obar, step(closure)", "obar"),
    ):
        m = factory().to(device)
        opt = BAR(_trainable(m), torch.optim.AdamW, variant=variant, mu0=0.1, model=m, lr=LR)
        c = loss_of(m)
        cases.append(Case(label, lambda opt=opt, c=c: opt.step(c), group=group))

    m = factory().to(device)
    opt = BAR(_trainable(m), torch.optim.AdamW, mu0=0.1, model=m, lr=LR)
    c = loss_of(m)

    def bar_plain(opt=opt, c=c):
        opt.zero_grad()
        c()
        opt.step()

    cases.append(Case("BAR nbar, backward+step()", bar_plain, group=group))

    m = factory().to(device)
    sam = SAM(_trainable(m), torch.optim.AdamW, rho=0.05, model=m, lr=LR)
    c = loss_of(m)
    cases.append(Case("SAM (rho 0.05)", lambda o=sam, c=c: o.step(c), group=group))
    return cases


def update_only_cases(group: str, factory, make_batch, device) -> list[Case]:
    x, y = (t.to(device) for t in make_batch())
    cases = []
    for label in ("AdamW.step()", "BAR(AdamW).step()"):
        m = factory().to(device)
        nn.functional.cross_entropy(m(x), y).backward()
        if label.startswith("BAR"):
            opt = BAR(_trainable(m), torch.optim.AdamW, mu0=0.1, model=m, lr=LR)
        else:
            opt = torch.optim.AdamW(_trainable(m), lr=LR)
        cases.append(Case(label, opt.step, group=group + " (update only)"))
    return cases


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="the larger (GPU) sizes")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    args = ap.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    large = args.large or device.type == "cuda"
    out = args.out or RESULTS / ("bar.md" if device.type == "cpu" else f"bar_{device.type}.md")
    rounds, calls = (3, 2) if args.quick else (21, 5)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows: list[Row] = []
    for name, (factory, make_batch) in _models(large).items():
        cases = step_cases(name, factory, make_batch, device)
        rows += compare(cases, "base AdamW", rounds=rounds, calls=calls, device=device)
    timed_models = set()  # the update does not depend on the batch: once per model
    for name, (factory, make_batch) in _models(large).items():
        if factory in timed_models:
            continue
        timed_models.add(factory)
        cases = update_only_cases(name, factory, make_batch, device)
        rows += compare(cases, "AdamW.step()", rounds=rounds, calls=calls * 4, device=device)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    write_table(
        rows,
        out,
        title=f"BAR step time ({device.type.upper()})",
        machine=machine_info(),
        notes=[
            "Target: BAR <= 1.05x the base step (forward/backward + update). "
            "'(update only)' rows time optimizer.step() alone on fixed gradients "
            "(BAR's own work; not the target).",
            "Li, Zhang, He (NeurIPS 2024) report 1.03-1.05x for BAR and 3.3-4.4x for SAM on OPT-1.3B.",
            f"1-min load average before/after the run: {load_before:.1f} / {load_after:.1f} "
            f"(other processes share this {os.cpu_count()}-core machine; ratios are interleaved "
            "in the same rounds, absolute times are not comparable across runs).",
        ],
    )
    print(out.read_text())


if __name__ == "__main__":
    main()
