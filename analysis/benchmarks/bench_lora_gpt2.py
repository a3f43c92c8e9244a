"""Step time of LoRA-SAM, LoRA-oBAR and LoRA-nBAR against plain LoRA on a tiny GPT-2.

The setting of notebooks/06_lora_gpt2.py (Li, Zhang, He, NeurIPS 2024,
arXiv:2410.14802, report BAR at 1.03-1.05x plain LoRA's runtime): a GPT-2 built
from a config (nothing downloaded) with PEFT LoRA adapters (rank 8, alpha 16, on
``c_attn``, ``c_proj`` and ``c_fc``), the causal LM loss :data:`sharpkit.hf.hf_loss`
on a padded batch, AdamW (lr 1e-3) as the base optimizer. Cases, each on its own
copy of the same model, timed interleaved round by round:

- ``LoRA (AdamW)``: zero_grad, forward/backward, ``step()`` (the baseline);
- ``LoRA-nBAR`` / ``LoRA-oBAR``: ``BAR.step(closure)`` (mu0 = 1, one pass);
- ``LoRA-SAM``: ``SAM.step(closure)`` (rho = 0.05, two passes).

Besides the wall-clock ratios of the harness, every call's process CPU time is
recorded and paired by round the same way (columns ``cpu ms`` and ``cpu ratio``):
on a machine shared with other jobs, CPU time is what a step costs, wall time
includes waiting for a core.

Run: ``python -m analysis.benchmarks.bench_lora_gpt2 [--quick] [--threads N]``;
writes analysis/benchmarks/results/lora_gpt2.md (and .json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sharpkit.hf import hf_loss
from sharpkit.optim import BAR, SAM

from .harness import Case, Row, compare, machine_info, write_table

RESULTS = Path(__file__).parent / "results"
LR = 1e-3

#: name -> (GPT2Config keyword arguments, batch size, sequence length)
MODELS: dict[str, tuple[dict[str, int], int, int]] = {
    "GPT-2 2L d32 h2 (notebook 06), batch 32x16": (
        {"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64},
        32,
        16,
    ),
    "GPT-2 4L d128 h4, batch 16x64": (
        {"n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 256},
        16,
        64,
    ),
}


def build(config: dict[str, int], seq_len: int) -> torch.nn.Module:
    """A GPT-2 from ``config`` with fresh PEFT LoRA adapters (seeded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_positions=seq_len, bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, **config,
    )  # fmt: skip
    lora = LoraConfig(
        r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], lora_dropout=0.0,
        fan_in_fan_out=True,
    )  # fmt: skip
    model = get_peft_model(GPT2LMHeadModel(cfg), lora)
    model.train()
    return model


def batch(config: dict[str, int], n: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Right-padded random token sequences of uneven lengths (labels -100 on padding)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, config["vocab_size"], (n, seq_len), generator=g)
    lengths = torch.randint(seq_len // 2, seq_len + 1, (n,), generator=g)
    mask = (torch.arange(seq_len) < lengths[:, None]).long()
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def _case(kind: str, model: torch.nn.Module, data: dict[str, torch.Tensor]) -> Callable[[], Any]:
    params = [p for p in model.parameters() if p.requires_grad]

    def closure() -> torch.Tensor:
        loss = hf_loss(model, data)
        loss.backward()
        return loss

    if kind == "LoRA (AdamW)":
        opt = torch.optim.AdamW(params, lr=LR)

        def step() -> None:
            opt.zero_grad()
            closure()
            opt.step()

        return step
    if kind == "LoRA-SAM":
        sam = SAM(params, torch.optim.AdamW, rho=0.05, lr=LR)
        return lambda: sam.step(closure)
    variant = {"LoRA-nBAR": "nbar", "LoRA-oBAR": "obar"}[kind]
    bar = BAR(params, torch.optim.AdamW, variant=variant, mu0=1.0, model=model, lr=LR)
    return lambda: bar.step(closure)


KINDS = ("LoRA (AdamW)", "LoRA-nBAR", "LoRA-oBAR", "LoRA-SAM")


def _cpu_timed(fn: Callable[[], Any], log: list[float]) -> Callable[[], None]:
    def timed() -> None:
        t0 = time.process_time()
        fn()
        log.append(time.process_time() - t0)

    return timed


def _add_cpu(rows: list[Row], logs: dict[str, list[float]], warmup: int, calls: int) -> None:
    """Per-round CPU-time means and their ratios to the baseline, into ``row.extra``."""

    def per_round(log: list[float]) -> list[float]:
        log = log[warmup * calls :]
        return [sum(log[i : i + calls]) / calls for i in range(0, len(log), calls)]

    base = per_round(logs[rows[0].baseline])
    for row in rows:
        mine = per_round(logs[row.name])
        row.extra["cpu ms"] = f"{1e3 * statistics.median(mine):.2f}"
        row.extra["cpu ratio"] = f"{statistics.median(a / b for a, b in zip(mine, base)):.3f}"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS / "lora_gpt2.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rounds, calls, warmup = (3, 2, 1) if args.quick else (12, 3, 2)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for name, (config, n, seq_len) in MODELS.items():
        data = batch(config, n, seq_len)
        logs: dict[str, list[float]] = {kind: [] for kind in KINDS}
        cases = [
            Case(kind, _cpu_timed(_case(kind, build(config, seq_len), data), logs[kind]), name)
            for kind in KINDS
        ]
        got = compare(cases, "LoRA (AdamW)", rounds=rounds, calls=calls, warmup=warmup)
        _add_cpu(got, logs, warmup, calls)
        rows += got
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    notes = [
        f"torch threads {args.threads}; default (SDPA) attention; float32; "
        f"{'quick run; ' if args.quick else ''}"
        f"1-minute load average {load:.1f} before and {load_after:.1f} after the run.",
        "The machine was shared with other jobs while this ran (see the load average): wall "
        "times include waiting for a core and are noisy; the CPU-time columns (process time, "
        "paired by round like the wall-clock ratios) are the better measure of a step's cost.",
        "Paper (Li, Zhang, He, NeurIPS 2024): BAR 1.03-1.05x plain LoRA; SAM 3.3-4.4x on "
        "OPT-1.3B, where SAM ran in FP32 and LoRA/BAR in FP16 (here all run in float32, so "
        "SAM's expected ratio is about 2x: two forward/backward passes).",
    ]
    path = write_table(
        rows,
        args.out,
        title="LoRA-SAM / LoRA-BAR step time against plain LoRA, tiny GPT-2 + PEFT",
        machine=machine_info(),
        notes=notes,
        extra_columns=("cpu ms", "cpu ratio"),
    )
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
