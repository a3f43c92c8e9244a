"""The papers' claims as seeded, typed experiments that can pass or fail.

Each experiment module defines a config dataclass, ``run(config)`` for one seed
and an :class:`~sharpkit.experiments.Experiment` named ``EXPERIMENT``;
:func:`run_experiment` runs seeds, aggregates with confidence intervals and
judges the claim. The registry :data:`EXPERIMENTS` maps CLI names to them.

Example:
    >>> from sharpkit.experiments import EXPERIMENTS, run_experiment
    >>> report = run_experiment(EXPERIMENTS["two_cycle"], scale="test", seeds=1)
    >>> report.verdict.holds
    True
"""

from __future__ import annotations

from ._core import (
    SCALES,
    Experiment,
    ExperimentConfig,
    ExperimentReport,
    RunResult,
    Stat,
    Verdict,
    claims_report,
    claims_table,
    config_key,
    run_experiment,
    summarize,
)
from .balance_toys import EXPERIMENT as BALANCE_TOYS
from .delta_sam_approx import EXPERIMENT as DELTA_SAM_APPROX
from .lora_digits import EXPERIMENT as LORA_DIGITS
from .many_layers import EXPERIMENT as MANY_LAYERS
from .msam_flatness import EXPERIMENT as MSAM_FLATNESS
from .noise_balancing import EXPERIMENT as NOISE_BALANCING
from .op_sharpness import EXPERIMENT as OP_SHARPNESS
from .outlier_injection import EXPERIMENT as OUTLIER_INJECTION
from .theorem2 import EXPERIMENT as THEOREM2
from .theorem3 import EXPERIMENT as THEOREM3
from .two_cycle import EXPERIMENT as TWO_CYCLE
from .wen_sharpness import EXPERIMENT as WEN_SHARPNESS

# Each experiment module adds one line here (keep them one per line).
_ALL: tuple[Experiment, ...] = (
    OUTLIER_INJECTION,
    DELTA_SAM_APPROX,
    MSAM_FLATNESS,
    BALANCE_TOYS,
    WEN_SHARPNESS,
    THEOREM2,
    TWO_CYCLE,
    MANY_LAYERS,
    LORA_DIGITS,
    THEOREM3,
    OP_SHARPNESS,
    NOISE_BALANCING,
)

#: The claims report lists experiments in the issue's numbering (1..9).
_ORDER = (
    "balance_toys",
    "outlier_injection",
    "theorem2",
    "many_layers",
    "lora_digits",
    "msam_flatness",
    "delta_sam_approx",
    "two_cycle",
    "wen_sharpness",
    "theorem3",
    "op_sharpness",
    "noise_balancing",
)

#: name -> experiment, in the order of the claims report
EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in sorted(_ALL, key=lambda e: _ORDER.index(e.name) if e.name in _ORDER else len(_ORDER))
}

__all__ = [
    "EXPERIMENTS",
    "SCALES",
    "Experiment",
    "ExperimentConfig",
    "ExperimentReport",
    "RunResult",
    "Stat",
    "Verdict",
    "claims_report",
    "claims_table",
    "config_key",
    "run_experiment",
    "summarize",
]
