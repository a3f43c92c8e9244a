"""The optimizer contract (sharpkit.testing.contract) over every sharpkit optimizer,
and proof that it catches broken optimizers."""

from __future__ import annotations

import pytest
import torch

from sharpkit.optim import SAM
from sharpkit.testing.contract import (
    ContractError,
    OptimizerSpec,
    check_optimizer,
    contract_checks,
)

from .registry import all_specs

SPECS = all_specs()
CASES = [(spec, name) for spec in SPECS for name, _ in contract_checks(spec)]


def test_registry_is_populated() -> None:
    names = {s.name for s in SPECS}
    assert {"SAM", "ASAM", "MSAM-vectorised", "DeltaSAM-exact", "BAR-nbar"} <= names


@pytest.mark.parametrize(("spec", "check"), CASES, ids=[f"{s}-{c}" for s, c in CASES])
def test_contract(spec: OptimizerSpec, check: str) -> None:
    result = dict((name, run) for name, run in contract_checks(spec))[check]()
    if result.startswith("skipped"):
        pytest.skip(result)


def test_capability_flags_decide_what_runs() -> None:
    """The flags are read: a closure-only SAM skips the loss_fn comparison, a spec
    without neutral hyperparameters skips the base-optimizer check."""
    spec = OptimizerSpec(
        name="SAM-closure-only",
        factory=SAM,
        hyper={"rho": 0.05},
        neutral=None,
        bad=[({"rho": -1.0}, ValueError, "rho")],
        batch_driven=False,
        handles_batchnorm=False,
    )
    report = check_optimizer(
        spec,
        checks=[
            "neutral_is_base",
            "closure_equals_batch",
            "buffers_from_clean_pass",
            "exception_restores",
        ],
    )
    assert report["neutral_is_base"].startswith("skipped")
    assert report["closure_equals_batch"].startswith("skipped")
    assert report["buffers_from_clean_pass"].startswith("skipped")
    assert report["exception_restores"] == "passed"
    with pytest.raises(ValueError, match="checks"):
        check_optimizer(spec, checks=["no_such_check"])
    with pytest.raises(ValueError, match="closure_driven"):
        OptimizerSpec(
            name="x", factory=SAM, hyper={}, neutral=None, closure_driven=False, batch_driven=False
        )


# -- deliberately broken optimizers are caught ----------------------------------------


class NoRestoreSAM(SAM):
    """Forgets to roll back: an exception leaves w + e (and the clean pass's buffers)."""

    def _rollback(self) -> None:
        pass


class BiasedSAM(SAM):
    """rho = 0 is not the base optimizer: the update is scaled by 1.01."""

    def _perturbed_gradient(self, oracle):  # type: ignore[no-untyped-def]
        super()._perturbed_gradient(oracle)
        with torch.no_grad():
            for g in self._all_grads():
                g.mul_(1.01)


class ForgetfulSAM(SAM):
    """Loses the base optimizer's state (momentum) in its state dict."""

    def state_dict(self):  # type: ignore[no-untyped-def]
        sd = super().state_dict()
        return {**sd, "state": {}}


def _spec(factory: type[SAM]) -> OptimizerSpec:
    return OptimizerSpec(
        name=factory.__name__,
        factory=factory,
        hyper={"rho": 0.05},
        neutral={"rho": 0.0},
        bad=[({"rho": -1.0}, ValueError, "rho")],
    )


@pytest.mark.parametrize(
    ("factory", "check", "reason"),
    [
        (NoRestoreSAM, "exception_restores", "after an exception"),
        (BiasedSAM, "neutral_is_base", "base optimizer"),
        (ForgetfulSAM, "state_dict_resume", "resumed run"),
    ],
    ids=["no-restore", "rho0-not-base", "loses-state"],
)
def test_broken_optimizers_are_caught(factory: type[SAM], check: str, reason: str) -> None:
    with pytest.raises(ContractError, match=reason) as info:
        check_optimizer(_spec(factory))
    assert f"{check}:" in str(info.value)
    # ... and the same check passes for the real SAM
    assert check_optimizer(_spec(SAM), checks=[check])[check] == "passed"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_runs_on_cuda(spec: OptimizerSpec) -> None:
    dev = torch.device("cuda")
    model = spec.make_model(torch.float32).to(dev)
    batch = tuple(t.to(dev) for t in spec.make_batch(torch.float32))
    cpu_model = spec.make_model(torch.float32)
    opt = spec.build(model.parameters(), torch.optim.SGD, model, lr=0.1)
    cpu_opt = spec.build(cpu_model.parameters(), torch.optim.SGD, cpu_model, lr=0.1)
    for _ in range(3):
        spec.step(opt, model, spec.loss, batch)
        spec.step(cpu_opt, cpu_model, spec.loss, spec.make_batch(torch.float32))
    for a, b in zip(model.parameters(), cpu_model.parameters()):
        assert torch.allclose(a.cpu(), b, atol=1e-4)
