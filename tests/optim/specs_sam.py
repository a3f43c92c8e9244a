"""SAM and ASAM in the contract registry (driven by closures and by loss_fn/batch)."""

from __future__ import annotations

from sharpkit.optim import ASAM, SAM

from .registry import OptimizerSpec

_BAD_RHO = [
    ({"rho": -0.1}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": float("inf")}, ValueError, "rho"),
    ({"rho": "0.05"}, TypeError, "rho"),
]
_LATER = [("rho", -0.1, ValueError, "rho"), ("rho", float("inf"), ValueError, "rho")]
_LATER_XI = [*_LATER, ("xi", -1.0, ValueError, "xi"), ("adaptive_bias", 1, TypeError, "adaptive")]

SPECS = [
    OptimizerSpec(
        name="SAM",
        factory=SAM,
        hyper={"rho": 0.05},
        neutral={"rho": 0.0},
        bad=[*_BAD_RHO, ({"rho": 0.05, "adaptive": 1}, TypeError, "adaptive")],
        bad_later=_LATER,
        two_phase=True,
    ),
    OptimizerSpec(
        name="SAM-adaptive",
        factory=SAM,
        hyper={"rho": 0.5, "adaptive": True},
        neutral={"rho": 0.0, "adaptive": True},
        bad=[({"rho": 0.5, "adaptive": True, "xi": -1.0}, ValueError, "xi")],
        bad_later=_LATER_XI,
        two_phase=True,
    ),
    OptimizerSpec(
        name="ASAM",
        factory=ASAM,
        hyper={"rho": 0.5, "xi": 0.01},
        neutral={"rho": 0.0},
        bad=[
            *_BAD_RHO,
            ({"xi": -0.01}, ValueError, "xi"),
            ({"xi": float("nan")}, ValueError, "xi"),
            ({"adaptive_bias": "yes"}, TypeError, "adaptive_bias"),
        ],
        bad_later=_LATER_XI,
        two_phase=True,
    ),
    OptimizerSpec(
        name="ASAM-all-parameters",
        factory=ASAM,
        hyper={"rho": 0.5, "adaptive_bias": True},
        neutral={"rho": 0.0, "adaptive_bias": True},
        bad=_BAD_RHO,
        bad_later=_LATER_XI,
        two_phase=True,
    ),
]
