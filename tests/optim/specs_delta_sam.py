"""delta-SAM in the contract registry.

delta-SAM's loss returns one loss per example (``reduction='none'``,
``per_example_loss=True``: the contract's reference side differentiates their
mean) and it is driven by ``step(loss_fn=..., batch=...)`` only. Its step returns
the mean loss at ``w``; the per-example losses are ``last_losses``.

``fail_call = 2``: the first ``loss_fn`` call is the clean pass at ``w``; the
second is at perturbed weights (the probe forwards in the probe modes, the
forward at ``w + e`` in exact mode). Probe forwards run functionally on
perturbed copies of the parameters, so the module itself is only ever evaluated
at ``w`` and at ``w + e`` (the zero-gradient check observes the module).
"""

from __future__ import annotations

from sharpkit.optim import DeltaSAM

from .registry import OptimizerSpec

_BAD = [
    ({"rho": -0.1}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": "0.05"}, TypeError, "rho"),
    ({"mode": "cheap"}, ValueError, "mode"),
    ({"tau": 0.0}, ValueError, "tau"),
    ({"tau": -1.0}, ValueError, "tau"),
    ({"probes": 0}, ValueError, "probes"),
    ({"probes": 2.0}, TypeError, "probes"),
    ({"probe_radius": 0.0}, ValueError, "probe_radius"),
    ({"weighting": "softmax"}, TypeError, "weighting"),
    ({"weighting": lambda s: s.losses, "tau": 1.0}, ValueError, "tau"),
]


def _spec(name: str, mode: str) -> OptimizerSpec:
    return OptimizerSpec(
        name=name,
        factory=DeltaSAM,
        hyper={"rho": 0.05, "mode": mode, "probes": 3},
        neutral={"rho": 0.0, "mode": mode},
        bad=_BAD,
        bad_later=[("rho", -0.1, ValueError, "rho")],
        closure_driven=False,
        per_example_loss=True,
        fail_call=2,
    )


SPECS = [
    _spec("DeltaSAM-exact", "exact"),
    _spec("DeltaSAM-probe", "probe"),
    _spec("DeltaSAM-forward-only", "forward-only"),
]
