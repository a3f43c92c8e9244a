"""nn loss modules whose reduction does not match what an API computes are refused.

A ``reduction='sum'`` criterion returns a scalar, so it passes every shape check of
the mean-loss APIs and would silently scale the result by the batch size (and
weight batches of different sizes wrongly); a ``'mean'`` criterion where one loss
per example is needed would fail later with a shape error. Both are refused up
front, naming the reduction.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpkit.curvature import HessianOperator
from sharpkit.optim import MSAM, DeltaSAM
from sharpkit.per_example import per_example_gradients
from sharpkit.sharpness import worst_case_sharpness
from sharpkit.testing import dense_hessian


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    return model, batch


@pytest.mark.parametrize("bad", ["sum", "none"])
def test_mean_loss_apis_refuse_other_reductions(bad: str) -> None:
    model, batch = _setup()
    loss = nn.CrossEntropyLoss(reduction=bad)
    calls = {
        "HessianOperator": lambda: HessianOperator(model, loss, batch),
        "dense_hessian": lambda: dense_hessian(model, loss, batch),
        "worst_case_sharpness": lambda: worst_case_sharpness(model, loss, batch, 0.05),
        "MSAM.step": lambda: MSAM(
            model.parameters(), torch.optim.SGD, model=model, lr=0.1, micro_batches=2
        ).step(loss_fn=loss, batch=batch),
    }
    before = [p.detach().clone() for p in model.parameters()]
    for name, call in calls.items():
        with pytest.raises(ValueError, match=rf"reduction='{bad}'.*needs reduction='mean'"):
            call()
            pytest.fail(f"{name} accepted reduction={bad!r}")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before)), "weights moved"


@pytest.mark.parametrize("bad", ["sum", "mean"])
def test_per_example_apis_refuse_other_reductions(bad: str) -> None:
    model, batch = _setup()
    loss = nn.CrossEntropyLoss(reduction=bad)
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    for call in (
        lambda: opt.step(loss_fn=loss, batch=batch),
        lambda: per_example_gradients(model, loss, batch),
    ):
        with pytest.raises(ValueError, match=rf"reduction='{bad}'.*needs reduction='none'"):
            call()


def test_matching_reductions_and_plain_callables_pass() -> None:
    model, batch = _setup()
    HessianOperator(model, nn.CrossEntropyLoss(), batch)
    HessianOperator(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), batch)
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1)
    assert opt.step(loss_fn=nn.CrossEntropyLoss(reduction="none"), batch=batch).shape == ()
    assert opt.last_losses.shape == (8,)
