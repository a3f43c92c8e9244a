"""SAM and ASAM in the contract registry."""

from __future__ import annotations

from sharpkit.optim import ASAM, SAM

from .registry import OptimizerSpec

_BAD_RHO = [
    ({"rho": -0.1}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": float("inf")}, ValueError, "rho"),
    ({"rho": "0.05"}, TypeError, "rho"),
]

SPECS = [
    OptimizerSpec(
        name="SAM",
        factory=SAM,
        hyper={"rho": 0.05},
        neutral={"rho": 0.0},
        bad=[*_BAD_RHO, ({"rho": 0.05, "adaptive": 1}, TypeError, "adaptive")],
        two_phase=True,
    ),
    OptimizerSpec(
        name="SAM-adaptive",
        factory=SAM,
        hyper={"rho": 0.5, "adaptive": True},
        neutral={"rho": 0.0, "adaptive": True},
        bad=[({"rho": 0.5, "adaptive": True, "xi": -1.0}, ValueError, "xi")],
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
        ],
        two_phase=True,
    ),
]
