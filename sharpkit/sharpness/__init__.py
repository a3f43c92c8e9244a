"""Flatness and sharpness metrics of a trained model.

- :func:`worst_case_sharpness`: ``E_B max_{||d/c||_p <= rho} L_B(w+d) - L_B(w)``
  (m-sharpness; plain or adaptive, p = 2 or inf; auto-PGD).
- :func:`average_case_sharpness`: ``E_d L(w+d) - L(w)`` under Gaussian/uniform noise.
- :func:`pac_bayes_flatness`: Jiang et al.'s ``1/sigma^2`` (plain or magnitude-aware).
- :func:`fisher_rao_norm`: Liang et al.'s ``sqrt(E <w, grad l>^2)``.
- :func:`epsilon_sharpness`: Keskar et al.'s box-constrained sharpness.
- :func:`measure_sharpness` and :class:`SharpnessReport`: any set of the above plus
  curvature (lambda_max, top-k, lambda_min, trace, ESD), with protocol and JSON.

:data:`REGISTRY` holds every metric's options (type, default, range, help) and needs;
:func:`resolve_options` checks options against it (the API and the CLI both do,
before any compute).

Each metric returns a :class:`MetricResult` (value, stderr, details, cost in
forward/gradient/HVP/JVP batch evaluations, protocol). The caller's model is never
modified: metrics run on a private copy. Every evaluation of a metric replays the
random-number state the metric started in, so with dropout in ``mode="train"`` the
losses compared (``L(w + d)`` against ``L(w)``) are those of one fixed draw of the
masks, not mask noise.
"""

from sharpkit.sharpness._objective import Cost, MetricResult
from sharpkit.sharpness._registry import REGISTRY, MetricSpec, Option, resolve_options
from sharpkit.sharpness.average_case import average_case_sharpness
from sharpkit.sharpness.fisher_rao import fisher_rao_norm
from sharpkit.sharpness.pac_bayes import pac_bayes_flatness
from sharpkit.sharpness.report import (
    DEFAULT_METRICS,
    METRICS,
    SCHEMA_VERSION,
    SharpnessReport,
    measure_sharpness,
)
from sharpkit.sharpness.worst_case import epsilon_sharpness, project, worst_case_sharpness

__all__ = [
    "DEFAULT_METRICS",
    "METRICS",
    "REGISTRY",
    "SCHEMA_VERSION",
    "Cost",
    "MetricResult",
    "MetricSpec",
    "Option",
    "SharpnessReport",
    "average_case_sharpness",
    "epsilon_sharpness",
    "fisher_rao_norm",
    "measure_sharpness",
    "pac_bayes_flatness",
    "project",
    "resolve_options",
    "worst_case_sharpness",
]
