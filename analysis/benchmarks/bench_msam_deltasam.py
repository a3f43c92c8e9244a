"""mSAM and delta-SAM: step time against SAM, and delta-SAM's approximation quality.

Two parts, one results file (analysis/benchmarks/results/msam_deltasam.md and .json):

1. **Step time** (interleaved with SAM in the same run, see harness.py) on the
   benchmark models of analysis/benchmarks/models.py (an MLP and a transformer
   block, both with LoRA adapters; only the adapters train):
   SAM (baseline); mSAM with m = 4, 8 on the vectorised and the sequential
   path; delta-SAM in ``forward-only`` mode (K = 1, 2, 4 probes), ``probe``
   mode (K = 4) and ``exact`` mode; and three reference rows that bound what
   the methods can reach (:func:`floor_cases`: SAM plus one forward, and two
   forward/backward passes run plainly and under ``vmap``).
   Targets: vectorised mSAM <= 1.15x SAM, delta-SAM with probes <= 1.3x SAM.
2. **Approximation quality** of delta-SAM's perturbation: the mean of
   ``cos(G - g, G_PI - g)`` (``G`` the method's perturbed gradient, ``G_PI`` the
   exact per-instance target, ``g`` the clean gradient) for SAM, the default
   weighting at several temperatures with exact statistics, inverse-norm
   weights, and the probe modes, on a 20-32-3 tanh MLP (float64, n = 64,
   rho = 0.05) at initialisation and after 300 full-batch gradient steps, at
   label noise 0 / 20 / 50 %, 3 seeds x 6 batches each. Data: three Gaussian
   clusters in 20 dimensions (centres N(0, 0.3^2 I), unit noise), 512 examples.

Run: ``python -m analysis.benchmarks.bench_msam_deltasam [--quick] [--device cuda]
[--large]``; on CUDA the larger sizes are timed and the table goes to
``results/msam_deltasam_cuda.md`` (the quality part is the same small float64
study on the CPU).

``--hf`` times instead Hugging Face models built from configs at their default
attention (tiny RoBERTa sequence classifier and GPT-2 LM, every parameter
trains, right-padded batches with attention masks, ``sharpkit.hf`` losses):
SAM, mSAM m = 4 on the vectorised and the sequential path, delta-SAM exact and
probe (K = 4); table in ``results/msam_deltasam_hf.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpkit._device import resolve_device
from sharpkit.optim import MSAM, SAM, DeltaSAM, InverseNormWeights, UniformWeights
from sharpkit.per_example import (
    per_example_gradients,
    per_instance_target,
    perturbation_cosine,
)

from .harness import Case, compare, machine_info, write_table

RESULTS = Path(__file__).parent / "results"

# ----------------------------------------------------------------------------
# Part 2: approximation quality (runs first in main(); needs no benchmark model)
# ----------------------------------------------------------------------------

D_IN, HIDDEN, CLASSES = 20, 32, 3
N_TRAIN, N_BATCH, RHO = 512, 64, 0.05
NOISES = (0.0, 0.2, 0.5)
STATES = {"init": 0, "trained": 300}


def cluster_data(seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Three Gaussian clusters; a fraction ``noise`` of labels redrawn uniformly."""
    g = torch.Generator().manual_seed(seed)
    centres = 0.3 * torch.randn(CLASSES, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N_TRAIN,), generator=g)
    x = centres[y] + torch.randn(N_TRAIN, D_IN, generator=g, dtype=torch.float64)
    flip = torch.rand(N_TRAIN, generator=g) < noise
    y = torch.where(flip, torch.randint(0, CLASSES, (N_TRAIN,), generator=g), y)
    return x, y


def small_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)).double()


def per_example_ce(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def quality_methods() -> dict[str, dict[str, Any]]:
    m: dict[str, dict[str, Any]] = {"SAM": {"mode": "exact", "weighting": UniformWeights()}}
    for tau in (0.3, 0.5, 1.0, 2.0):
        m[f"exact, tau={tau:g}"] = {"mode": "exact", "tau": tau}
    m["exact, inverse-norm weights"] = {"mode": "exact", "weighting": InverseNormWeights()}
    for k in (2, 4, 8):
        m[f"probe K={k}, tau=1"] = {"mode": "probe", "probes": k, "tau": 1.0}
    for k in (1, 2, 4):
        m[f"forward-only K={k}, tau=1"] = {"mode": "forward-only", "probes": k, "tau": 1.0}
    m["forward-only K=2, tau=4"] = {"mode": "forward-only", "probes": 2, "tau": 4.0}
    return m


def quality(seeds: int, batches: int) -> dict[str, dict[str, list[float]]]:
    """``{method: {"state noise": [mean cosine per seed]}}``."""
    methods = quality_methods()
    out: dict[str, dict[str, list[float]]] = {name: {} for name in methods}
    for state, steps in STATES.items():
        for noise in NOISES:
            key = f"{state} {noise:.0%}"
            for seed in range(seeds):
                x, y = cluster_data(seed, noise)
                model = small_mlp(seed)
                gd = torch.optim.SGD(model.parameters(), lr=0.2)
                for _ in range(steps):
                    gd.zero_grad()
                    per_example_ce(model, (x, y)).mean().backward()
                    gd.step()
                gen = torch.Generator().manual_seed(1000 + seed)
                per_seed: dict[str, list[float]] = {name: [] for name in methods}
                for b in range(batches):
                    idx = torch.randperm(N_TRAIN, generator=gen)[:N_BATCH]
                    batch = (x[idx], y[idx])
                    _, grads = per_example_gradients(model, per_example_ce, batch)
                    g = [t.mean(0) for t in grads]
                    g_pi = per_instance_target(model, per_example_ce, batch, RHO)
                    for name, kw in methods.items():
                        # lr = 0: the step leaves the weights alone and G in .grad
                        opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=RHO, model=model,
                                       lr=0.0, seed=100 * b + seed, **kw)  # fmt: skip
                        opt.step(loss_fn=per_example_ce, batch=batch)
                        G = [p.grad for p in model.parameters()]
                        per_seed[name].append(perturbation_cosine(G, g_pi, g))
                for name in methods:
                    out[name].setdefault(key, []).append(statistics.mean(per_seed[name]))
    return out


def quality_table(res: dict[str, dict[str, list[float]]], seeds: int, batches: int) -> str:
    keys = [f"{s} {nz:.0%}" for s in STATES for nz in NOISES]
    lines = [
        "### delta-SAM approximation quality: mean cos(G - g, G_PI - g)",
        "",
        f"20-32-3 tanh MLP, float64, n = {N_BATCH}, rho = {RHO}; Gaussian clusters; "
        f"'init' = at initialisation, 'trained' = after {STATES['trained']} full-batch "
        f"GD steps (lr 0.2); label noise 0/20/50 %; mean over {seeds} seeds x {batches} "
        "batches (± standard deviation of the per-seed means). Higher is better; SAM is "
        "the reference.",
        "",
        "| method | " + " | ".join(keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for name, per_key in res.items():
        cells = []
        for k in keys:
            v = per_key[k]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            cells.append(f"{statistics.mean(v):.3f} ± {sd:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Part 1: step time
# ----------------------------------------------------------------------------


def flat_ce(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    """Per-example cross-entropy of an ``(inputs, targets)`` batch."""
    return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def timing_cases(
    name: str,
    factory: Callable[[], nn.Module],
    batch: Any,
    per_example: Callable[..., Any],
    device: torch.device | None = None,
) -> list[Case]:
    kw = {"lr": 0.01, "momentum": 0.9}
    device = device or torch.device("cpu")
    batch = tuple(t.to(device) for t in batch)
    base_factory = factory

    def factory() -> nn.Module:  # every optimizer gets its own copy, on the device
        return base_factory().to(device)

    def trainable(m: nn.Module) -> list[torch.Tensor]:
        return [p for p in m.parameters() if p.requires_grad]

    cases = [Case("SAM", sam_step(factory(), batch, per_example, kw), group=name)]

    def mean_loss(model: Any, b: Any) -> torch.Tensor:
        return per_example(model, b).mean()

    for mb in (4, 8):
        for path in ("vectorised", "sequential"):
            m = factory()
            opt = MSAM(trainable(m), torch.optim.SGD, rho=0.05, micro_batches=mb, model=m,
                       path=path, **kw)  # fmt: skip
            cases.append(
                Case(
                    f"mSAM m={mb} {path}",
                    lambda o=opt: o.step(loss_fn=mean_loss, batch=batch),
                    group=name,
                )
            )
    for mode, probes in (("forward-only", 1), ("forward-only", 2), ("forward-only", 4),
                         ("probe", 4), ("exact", 1)):  # fmt: skip
        m = factory()
        opt = DeltaSAM(trainable(m), torch.optim.SGD, rho=0.05, model=m, mode=mode,
                       probes=probes, **kw)  # fmt: skip
        label = f"delta-SAM {mode}" + ("" if mode == "exact" else f" K={probes}")
        cases.append(
            Case(label, lambda o=opt: o.step(loss_fn=per_example, batch=batch), group=name)
        )
    cases += floor_cases(name, factory(), batch, per_example, kw)
    return cases


def sam_step(
    m: nn.Module, batch: Any, per_example: Callable[..., Any], kw: dict[str, Any]
) -> Callable[[], Any]:
    """One SAM step (the baseline) on ``m``'s trainable parameters, as a callable."""
    sam = SAM([p for p in m.parameters() if p.requires_grad], torch.optim.SGD, rho=0.05,
              model=m, **kw)  # fmt: skip

    def closure() -> torch.Tensor:
        loss = per_example(m, batch).mean()
        loss.backward()
        return loss

    return lambda: sam.step(closure)


def floor_cases(
    name: str, m: nn.Module, batch: Any, per_example: Callable[..., Any], kw: dict[str, Any]
) -> list[Case]:
    """Reference rows (no method of their own) that bound what the methods can reach.

    - ``floor: SAM + 1 forward``: a SAM step plus one no-grad forward, the work
      forward-only delta-SAM with K = 1 cannot avoid (its statistics are O(n));
    - ``passes: 2 plain``: two forward/backward passes of the mean loss (SAM's
      passes without its update, restore and checks);
    - ``passes: 2 vmapped, m=4``: the same two passes as vectorised mSAM runs
      them, ``vmap`` over 4 micro-batches with 4 stacked copies of the trainable
      parameters. The gap between the two ``passes`` rows is what ``vmap``
      itself costs, and vectorised mSAM cannot be cheaper than SAM plus that gap.
    """
    params = [p for p in m.parameters() if p.requires_grad]
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    step = sam_step(m, batch, per_example, kw)

    def sam_plus_forward() -> None:
        step()
        with torch.no_grad():
            per_example(m, batch)

    def plain_passes() -> None:
        for _ in range(2):
            torch.autograd.grad(per_example(m, batch).mean(), params)

    mb = 4
    n = batch[0].shape[0]
    pieces = tuple(t[: n - n % mb].reshape(mb, n // mb, *t.shape[1:]) for t in batch)

    def one(tp: dict[str, torch.Tensor], piece: tuple[torch.Tensor, ...]) -> torch.Tensor:
        def call(*args: Any) -> Any:
            return torch.func.functional_call(m, tp, args, tie_weights=False)

        return per_example(call, piece).mean()

    batched = torch.func.vmap(one)

    def vmapped_passes() -> None:
        for _ in range(2):
            stacked = [
                p.detach().unsqueeze(0).expand(mb, *p.shape).requires_grad_() for p in params
            ]
            losses = batched(dict(zip(names, stacked)), pieces)
            torch.autograd.grad(losses.sum(), stacked)

    return [
        Case("floor: SAM + 1 forward", sam_plus_forward, group=name),
        Case("passes: 2 plain", plain_passes, group=name),
        Case(f"passes: 2 vmapped, m={mb}", vmapped_passes, group=name),
    ]


def benchmark_models(
    large: bool = False,
) -> list[tuple[str, Callable[[], nn.Module], Any, Callable[..., Any]]]:
    """(label, model factory, batch, per-example loss) for the LoRA benchmark models;
    ``large``: the GPU sizes (those of bench_bar's ``--large``)."""
    from . import models

    if large:
        return [
            (
                "LoRA MLP 4096-4096-4096-10, batch 512",
                lambda: models.lora_mlp(in_features=4096, hidden=4096),
                models.mlp_batch(512, in_features=4096),
                flat_ce,
            ),
            (
                "LoRA transformer block d=1024 h16, seq 256, batch 32",
                lambda: models.lora_transformer_block(dim=1024, heads=16),
                models.sequence_batch(32, seq_len=256, dim=1024),
                flat_ce,
            ),
        ]
    return [
        ("LoRA MLP 784-512-512-10, batch 128", models.lora_mlp, models.mlp_batch(128), flat_ce),
        # the same model at a larger batch: how much of the ratio is a fixed per-step cost
        ("LoRA MLP 784-512-512-10, batch 512", models.lora_mlp, models.mlp_batch(512), flat_ce),
        (
            "LoRA transformer block d=256, seq 64, batch 32",
            models.lora_transformer_block,
            models.sequence_batch(32),
            flat_ce,
        ),
    ]


def hf_timing_cases(device: torch.device) -> list[list[Case]]:
    """SAM, mSAM and delta-SAM on tiny Hugging Face models at their default attention
    (one list of cases per model)."""
    import transformers

    from sharpkit.hf import hf_loss, hf_per_example_loss

    vocab, n, t = 512, 32, 32
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    lengths = torch.randint(t // 4, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    small = {"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 256,
             "num_hidden_layers": 2, "vocab_size": vocab}  # fmt: skip

    def roberta() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.RobertaConfig(max_position_embeddings=t + 2, num_labels=3, **small)
        return transformers.RobertaForSequenceClassification(cfg)

    def gpt2() -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=vocab,
                                      n_positions=t, bos_token_id=0, eos_token_id=0)  # fmt: skip
        return transformers.GPT2LMHeadModel(cfg)

    models = [
        (f"HF RoBERTa-tiny d=64 L=2, seq {t} padded, batch {n}", roberta,
         torch.randint(0, 3, (n,), generator=g)),
        (f"HF GPT-2-tiny d=64 L=2, seq {t} padded, batch {n}", gpt2,
         ids.masked_fill(mask == 0, -100)),
    ]  # fmt: skip
    kw = {"lr": 0.01, "momentum": 0.9}
    groups = []
    for name, build, labels in models:
        cases: list[Case] = []
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        batch = {k: v.to(device) for k, v in batch.items()}

        def fresh(build: Callable[[], nn.Module] = build) -> nn.Module:
            return build().to(device).train()

        cases.append(Case("SAM", sam_step(fresh(), batch, hf_loss, kw), group=name))
        for path in ("vectorised", "sequential"):
            m = fresh()
            opt = MSAM(m.parameters(), torch.optim.SGD, rho=0.05, micro_batches=4, model=m,
                       path=path, **kw)  # fmt: skip
            cases.append(Case(f"mSAM m=4 {path}",
                              lambda o=opt, b=batch: o.step(loss_fn=hf_loss, batch=b),
                              group=name))  # fmt: skip
        for mode in ("exact", "probe"):
            m = fresh()
            opt = DeltaSAM(m.parameters(), torch.optim.SGD, rho=0.05, model=m, mode=mode,
                           probes=4, **kw)  # fmt: skip
            label = "delta-SAM exact" if mode == "exact" else "delta-SAM probe K=4"
            cases.append(Case(label,
                              lambda o=opt, b=batch: o.step(loss_fn=hf_per_example_loss, batch=b),
                              group=name))  # fmt: skip
        groups.append(cases)
    return groups


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few rounds and seeds (a smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS / "msam_deltasam.md")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--large", action="store_true", help="the larger (GPU) sizes")
    ap.add_argument("--hf", action="store_true", help="time tiny Hugging Face models only")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    if args.hf:
        if args.out == RESULTS / "msam_deltasam.md":
            args.out = (
                RESULTS / f"msam_deltasam_hf{'' if device.type == 'cpu' else '_' + device.type}.md"
            )
        rounds, calls = (3, 2) if args.quick else (15, 4)
        rows = []
        for cases in hf_timing_cases(device):
            rows += compare(cases, "SAM", rounds=rounds, calls=calls, device=device)
        write_table(
            rows,
            args.out,
            title=f"mSAM and delta-SAM on Hugging Face models ({device.type.upper()}), ratio to SAM",
            machine=machine_info(device),
            notes=[
                "Models built from configs at their default attention (SDPA), training mode "
                "(dropout 0.1), every parameter trains; right-padded batches with attention "
                "masks; SGD with momentum as base, rho = 0.05. mSAM's vectorised path and "
                "delta-SAM exact run under torch.func.vmap (sharpkit._functional."
                "vmap_over_model); the sequential rows are the loop they replace.",
            ],
        )
        print(args.out.read_text())
        return
    large = args.large or device.type == "cuda"
    if args.out == RESULTS / "msam_deltasam.md" and device.type != "cpu":
        args.out = RESULTS / f"msam_deltasam_{device.type}.md"
    seeds, batches = (1, 2) if args.quick else (3, 6)
    qual = quality(seeds, batches)
    qtable = quality_table(qual, seeds, batches)
    print(qtable)
    if args.skip_timing:
        return
    rounds, calls = (3, 2) if args.quick else (15, 4)
    rows = []
    for name, factory, batch, per_example in benchmark_models(large):
        cases = timing_cases(name, factory, batch, per_example, device)
        rows += compare(cases, "SAM", rounds=rounds, calls=calls, device=device)
    write_table(
        rows,
        args.out,
        title=f"mSAM and delta-SAM step time ({device.type.upper()}), ratio to SAM",
        machine=machine_info(device),
        notes=[
            "Targets: vectorised mSAM (m = 4, 8) <= 1.15x SAM; delta-SAM with probes "
            "<= 1.3x SAM. All optimizers: SGD with momentum as base, rho = 0.05, only "
            "the LoRA adapters train.",
            "Reference rows (no method): 'floor: SAM + 1 forward' is a SAM step plus one "
            "no-grad forward, the least forward-only delta-SAM with K = 1 can cost; "
            "'passes: 2 plain' and 'passes: 2 vmapped, m=4' are SAM's two forward/backward "
            "passes run plainly and as vectorised mSAM runs them (vmap over 4 micro-batches "
            "and 4 stacked adapter copies); their difference is vmap's own cost, which "
            "vectorised mSAM adds to SAM's step.",
        ],
    )
    with args.out.open("a") as fh:
        fh.write("\n" + qtable)
    blob = json.loads(args.out.with_suffix(".json").read_text())
    blob["quality"] = {"seeds": seeds, "batches": batches, "cosines": qual}
    args.out.with_suffix(".json").write_text(json.dumps(blob, indent=2) + "\n")
    print(args.out.read_text())


if __name__ == "__main__":
    main()
