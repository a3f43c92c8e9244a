"""The registry every sharpkit optimizer joins to be held to the shared contract.

Each ``tests/optim/specs_*.py`` module defines ``SPECS: list[OptimizerSpec]``;
``test_contract.py`` runs every contract test over all of them. A spec says how
to build the optimizer, which hyperparameters make it the base optimizer (so
that it must reproduce the base bit for bit), which hyperparameters are invalid,
and how to drive one training step.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from sharpkit._batch import BatchLoss

StepFn = Callable[[Optimizer, nn.Module, BatchLoss, Any], Any]


def closure_step(opt: Optimizer, model: nn.Module, loss_fn: BatchLoss, batch: Any) -> Any:
    """Drive ``opt`` with the torch.optim closure contract."""

    def closure() -> torch.Tensor:
        loss = loss_fn(model, batch)
        loss.backward()
        return loss

    return opt.step(closure)


def default_model(dtype: torch.dtype) -> nn.Module:
    """A small MLP with BatchNorm (so buffer handling is exercised)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)).to(
        dtype
    )


def default_batch(dtype: torch.dtype, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def default_loss(model: Callable[..., Any], batch: Any) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def full_batch_clean_pass(model: nn.Module, loss_fn: BatchLoss, batch: Any) -> None:
    """The forward passes whose BatchNorm statistics a step must keep (one full batch)."""
    with torch.no_grad():
        loss_fn(model, batch)


@dataclass(frozen=True)
class OptimizerSpec:
    """How the contract suite builds and drives one optimizer.

    Attributes:
        name: test id.
        factory: ``factory(params, base_optimizer, *, model, **kwargs)``; ``kwargs``
            holds the method's hyperparameters and the base optimizer's.
        hyper: typical method hyperparameters.
        neutral: hyperparameters with which the method must equal its base optimizer.
        bad: ``(overrides, exception type, substring of the message)`` triples.
        step: performs one training step and returns the loss at ``w``.
        two_phase: supports ``first_step()`` / ``second_step()``.
        perturbs: evaluates the loss at perturbed weights (SAM family).
        fail_call: 1-based index of the first ``loss_fn`` call made at perturbed
            weights (raising there tests exception safety); ``None`` if none.
        make_model: builds the test model in a dtype.
        make_batch: builds the test batch in a dtype.
        loss_fn: the batch loss the step uses.
        clean_pass: reproduces the forward passes whose buffers the step must keep.
        requires_model: the optimizer needs ``model=`` (functional evaluation).
    """

    name: str
    factory: Callable[..., Optimizer]
    hyper: dict[str, Any]
    neutral: dict[str, Any]
    bad: Sequence[tuple[dict[str, Any], type[Exception], str]]
    step: StepFn = closure_step
    two_phase: bool = False
    perturbs: bool = True
    fail_call: int | None = 2
    make_model: Callable[[torch.dtype], nn.Module] = default_model
    make_batch: Callable[[torch.dtype], Any] = default_batch
    loss_fn: BatchLoss = default_loss
    clean_pass: Callable[[nn.Module, BatchLoss, Any], None] = full_batch_clean_pass
    extra: dict[str, Any] = field(default_factory=dict)

    def build(
        self,
        params: Any,
        base: type[Optimizer],
        model: nn.Module,
        hyper: dict[str, Any] | None = None,
        **base_kwargs: Any,
    ) -> Optimizer:
        kw = dict(self.hyper if hyper is None else hyper)
        kw.update(base_kwargs)
        return self.factory(params, base, model=model, **kw)

    def __str__(self) -> str:  # pytest ids
        return self.name


def all_specs() -> list[OptimizerSpec]:
    """Collect ``SPECS`` from every ``specs_*.py`` module beside this file."""
    here = Path(__file__).parent
    specs: list[OptimizerSpec] = []
    for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda i: i.name):
        if info.name.startswith("specs_"):
            mod = importlib.import_module(
                f"{__package__}.{info.name}" if __package__ else info.name
            )
            specs.extend(mod.SPECS)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise RuntimeError(f"duplicate optimizer spec names: {names}")
    return specs
