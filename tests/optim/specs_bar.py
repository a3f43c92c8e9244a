"""BAR (nBAR and oBAR) in the contract registry.

BAR is a one-pass optimizer, so the contract items about the perturbed pass do
not apply: ``perturbs=False`` and ``fail_call=None`` (an exception is raised in
its only loss evaluation instead). Everything else applies unchanged: mu0 = 0 equals the base
optimizer bit for bit, state_dict resume (including BAR's step counter and a
cosine schedule), LR schedulers, buffers, zero and non-finite gradients, groups,
frozen parameters and dtypes.

The model is the registry's MLP with BatchNorm whose two Linear layers are
sharpkit LoRA layers (random, non-zero B so that both factors get gradients).
The contract drives BAR by ``step(loss_fn=..., batch=...)`` and checks it equals
``step(closure)``: only then can a skipped step put the BatchNorm statistics
back (without either, the forward pass happened before ``step()`` was called,
as with any torch.optim optimizer). The closure-less entry point is tested
against the same references in test_bar.py. ``mu0 * lr >= 1`` (factors
``1 - a_t lr <= 0``) is refused also when ``lr`` or ``mu0`` is raised later.
"""

from __future__ import annotations

import torch
from torch import nn

from sharpkit.balance import LoRALinear
from sharpkit.optim import BAR

from .registry import OptimizerSpec


def lora_model(dtype: torch.dtype) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(
        LoRALinear(6, 16, rank=4, alpha=8.0, generator=g),
        nn.BatchNorm1d(16),
        nn.Tanh(),
        LoRALinear(16, 3, rank=4, alpha=8.0, generator=g),
    )
    with torch.no_grad():
        for m in (model[0], model[3]):
            m.lora_B.normal_(0.0, 0.3, generator=g)
    return model.to(dtype)


_BAD = [
    ({"variant": "xbar"}, ValueError, "variant"),
    ({"mu0": -0.1}, ValueError, "mu0"),
    ({"mu0": float("nan")}, ValueError, "mu0"),
    ({"mu0": "0.1"}, TypeError, "mu0"),
    ({"schedule": "exponential"}, ValueError, "schedule"),
    ({"schedule": "linear", "total_steps": None}, ValueError, "total_steps"),
    ({"schedule": "cosine", "total_steps": 0}, ValueError, "total_steps"),
    ({"on_missing": "ignore"}, ValueError, "on_missing"),
    ({"pairs": [1, 2]}, TypeError, "pairs"),
    ({"mu0": 10.0}, ValueError, "mu0 * lr"),
]
_LATER = [
    ("mu0", -0.1, ValueError, "mu0"),
    ("mu0", 10.0, ValueError, "mu0 * lr"),
    ("lr", 2.0, ValueError, "mu0 * lr"),
]

SPECS = [
    OptimizerSpec(
        name="BAR-nbar",
        factory=BAR,
        hyper={"variant": "nbar", "mu0": 0.5, "schedule": "cosine", "total_steps": 20},
        neutral={"variant": "nbar", "mu0": 0.0},
        bad=_BAD,
        bad_later=_LATER,
        perturbs=False,
        fail_call=None,
        make_model=lora_model,
    ),
    OptimizerSpec(
        name="BAR-obar",
        factory=BAR,
        hyper={"variant": "obar", "mu0": 0.5},
        neutral={"variant": "obar", "mu0": 0.0, "schedule": "linear", "total_steps": 10},
        bad=_BAD,
        bad_later=_LATER,
        perturbs=False,
        fail_call=None,
        make_model=lora_model,
    ),
]
