r"""Experiment 11: sharpness of OP minimisers is balancedness (Li, Zhang, He, NeurIPS 2024).

**Claim.** At a minimiser of a scale-invariant OP problem :math:`f(x^\top y)`
(``f'(x^T y) = 0``), the Hessian is :math:`f''\,v v^\top` with :math:`v = (y, x)`, so

.. math::

    \lambda_{\max} = f''(x^\top y)\,(\|x\|^2 + \|y\|^2),

and since :math:`(\|x\|^2 + \|y\|^2)^2 = 4B^2 + 4\|x\|^2\|y\|^2 \ge 4B^2 + 4(x^\top y)^2`,
:math:`\lambda_{\max} \ge 2 f''\sqrt{B^2 + (x^\top y)^2}`: among minimisers (fixed
:math:`x^\top y = c`) the flattest is balanced (:math:`B = 0`, :math:`x = y`),
where :math:`\lambda_{\max} = 2 f'' c`. Minimising sharpness there is the same as
reaching :math:`B = 0`.

**Measured** with sharpkit's curvature engine: :math:`\lambda_{\max}` of the
Hessian of :math:`(x, y) \mapsto f(x^\top y)` by Lanczos
(:func:`~sharpkit.curvature.eigenvalues` on a
:class:`~sharpkit.curvature.HessianOperator`, float64), against the formula, at
``minimisers`` random minimisers per seed (``x`` Gaussian of a log-uniform scale
in ``scales``, ``y`` Gaussian with its component along ``x`` set so that
:math:`x^\top y = c`; :math:`|B|` spans two orders of magnitude) plus the balanced
one, for two losses: ``square`` :math:`f(s) = (s - c)^2` (:math:`f'' = 2`, the
paper's OP toy without noise) and ``logcosh`` :math:`f(s) = \log\cosh(s - c)`
(:math:`f''(c) = 1`). Numbers: ``max_rel_error_<f>`` (largest
:math:`|\lambda_{\max} - \text{formula}|/\text{formula}`), ``min_bound_gap_<f>``
(smallest :math:`(\lambda_{\max} - 2f''\sqrt{B^2+c^2})/\lambda_{\max}` over the
random minimisers: must be :math:`\ge 0`), ``balanced_rel_gap_<f>``
(:math:`(\lambda_{\max} - 2f''c)/(2f''c)` at the balanced minimiser: 0), and, as
a control that the check can fail, ``offmin_rel_error_<f>``: the same formula at
points moved off the minimiser set (:math:`x^\top y = c + \delta`,
:math:`f' \ne 0`), where it does not hold.

**Verdict**, fixed before the run: supported when, for both losses, the mean
over seeds of ``max_rel_error`` is below ``REL_TOL`` (1e-6, Lanczos' tolerance),
``min_bound_gap`` is above ``-REL_TOL`` and ``balanced_rel_gap`` below
``REL_TOL`` in absolute value, and the control ``offmin_rel_error`` exceeds
``CONTROL_MIN`` (1e-2: the identity is specific to minimisers); not supported
otherwise.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from sharpkit.curvature import HessianOperator, eigenvalues

from ._core import Experiment, ExperimentConfig, RunResult, Stat, Verdict, check, make_result

__all__ = ["EXPERIMENT", "LOSSES", "OPSharpnessConfig", "op_lambda_max", "run"]

#: relative tolerance of the identity (the Lanczos residual tolerance)
REL_TOL = 1e-6
#: the off-minimiser control must miss the formula by at least this much
CONTROL_MIN = 1e-2
#: f and f''(c) of each loss
LOSSES = ("square", "logcosh")
_CURVATURE = {"square": 2.0, "logcosh": 1.0}


def _f(kind: str, r: torch.Tensor) -> torch.Tensor:
    return r**2 if kind == "square" else torch.log(torch.cosh(r))


class _Pair(nn.Module):
    """The OP model: parameters ``x`` and ``y``, output ``x^T y``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.x = nn.Parameter(x.clone())
        self.y = nn.Parameter(y.clone())

    def forward(self) -> torch.Tensor:
        return (self.x * self.y).sum()


def op_lambda_max(kind: str, x: torch.Tensor, y: torch.Tensor, c: float) -> float:
    r"""``lambda_max`` of the Hessian of :math:`(x, y) \mapsto f(x^\top y - c)` (Lanczos).

    Args:
        kind: ``"square"`` (:math:`f(r) = r^2`) or ``"logcosh"``.
        x, y: the point (float64 vectors of the same size).
        c: the target.

    Example:
        >>> x = y = torch.full((3,), 0.5 ** 0.5 / 3 ** 0.5, dtype=torch.float64)  # x^T y = 0.5
        >>> round(op_lambda_max("square", x, y, 0.5), 6)   # f'' (|x|^2 + |y|^2) = 2 * 1
        2.0
    """
    check(kind in LOSSES, f"kind: expected one of {LOSSES}, got {kind!r}")
    model = _Pair(x, y)

    def loss(m: nn.Module, target: torch.Tensor) -> torch.Tensor:
        return _f(kind, m() - target).mean()

    op = HessianOperator(model, loss, torch.tensor([c], dtype=torch.float64), dtype=torch.float64)
    return float(eigenvalues(op, k=1, tol=1e-10, seed=0).eigenvalues[0])


@dataclass(frozen=True)
class OPSharpnessConfig(ExperimentConfig):
    """Config of the OP sharpness identity experiment.

    Attributes:
        dim: size of x and y (>= 2).
        target: the value ``c`` of ``x^T y`` at the minimisers (> 0).
        minimisers: random minimisers per seed and loss.
        scales: the range ``(lo, hi)`` of the log-uniform scale of ``x``.
        offset: ``delta`` of the off-minimiser control (``x^T y = c + delta``).
    """

    dim: int = 3
    target: float = 0.5
    minimisers: int = 16
    scales: tuple[float, float] = (0.1, 3.0)
    offset: float = 0.5

    def validate(self) -> None:
        super().validate()
        check(self.dim >= 2, f"dim: must be >= 2, got {self.dim}")
        check(self.target > 0, f"target: must be positive, got {self.target}")
        check(self.minimisers >= 1, f"minimisers: must be >= 1, got {self.minimisers}")
        check(
            len(self.scales) == 2 and 0 < self.scales[0] < self.scales[1],
            f"scales: need (lo, hi) with 0 < lo < hi, got {self.scales}",
        )
        check(self.offset != 0, f"offset: must be non-zero, got {self.offset}")


def _minimiser(cfg: OPSharpnessConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = math.log(cfg.scales[0]), math.log(cfg.scales[1])
    scale = math.exp(lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64)))
    x = scale * torch.randn(cfg.dim, generator=gen, dtype=torch.float64) / math.sqrt(cfg.dim)
    y = torch.randn(cfg.dim, generator=gen, dtype=torch.float64) / math.sqrt(cfg.dim)
    y = y - (x @ y) / (x @ x) * x + cfg.target / (x @ x) * x  # x^T y = c exactly
    return x, y


def run(cfg: OPSharpnessConfig) -> RunResult:
    """One seed: the identity at random and balanced minimisers and off the minimiser set."""
    cfg.validate()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    c = cfg.target
    points = [_minimiser(cfg, gen) for _ in range(cfg.minimisers)]
    summary: dict[str, float] = {}
    series: dict[str, object] = {}
    for kind in LOSSES:
        k = _CURVATURE[kind]
        errors, gaps, bal, lam = [], [], [], []
        for x, y in points:
            measured = op_lambda_max(kind, x, y, c)
            formula = k * float(x @ x + y @ y)
            b = 0.5 * float(x @ x - y @ y)
            errors.append(abs(measured - formula) / formula)
            gaps.append((measured - 2 * k * math.sqrt(b * b + c * c)) / measured)
            bal.append(abs(b))
            lam.append(measured)
        xb = torch.full((cfg.dim,), math.sqrt(c / cfg.dim), dtype=torch.float64)
        balanced = op_lambda_max(kind, xb, xb, c)
        off = []
        for x, y in points:
            moved = y + cfg.offset / float(x @ x) * x  # x^T y = c + offset: f' != 0
            formula = k * float(x @ x + moved @ moved)
            off.append(abs(op_lambda_max(kind, x, moved, c) - formula) / formula)
        summary[f"max_rel_error_{kind}"] = max(errors)
        summary[f"min_bound_gap_{kind}"] = min(gaps)
        summary[f"balanced_rel_gap_{kind}"] = (balanced - 2 * k * c) / (2 * k * c)
        summary[f"offmin_rel_error_{kind}"] = sum(off) / len(off)
        series[f"abs_B_{kind}"] = bal
        series[f"lambda_max_{kind}"] = lam
        series[f"balanced_lambda_max_{kind}"] = balanced
    series["target"] = c
    return make_result(EXPERIMENT, cfg, series, summary, time.perf_counter() - t0)


def decide(stats: dict[str, Stat]) -> Verdict:
    ok, parts = True, []
    for kind in LOSSES:
        err = stats[f"max_rel_error_{kind}"].mean
        gap = stats[f"min_bound_gap_{kind}"].mean
        bal = stats[f"balanced_rel_gap_{kind}"].mean
        off = stats[f"offmin_rel_error_{kind}"].mean
        ok = ok and err < REL_TOL and gap > -REL_TOL and abs(bal) < REL_TOL and off > CONTROL_MIN
        parts.append(
            f"{kind}: largest relative error of lambda_max = f''(|x|^2+|y|^2) at minimisers "
            f"{err:.1e} (threshold {REL_TOL:g}), smallest margin over the bound "
            f"2 f'' sqrt(B^2 + c^2) {gap:.2e}, balanced minimiser vs 2 f'' c {bal:.1e}; "
            f"off the minimisers (f' != 0) the formula misses by {off:.3f} (control, must "
            f"exceed {CONTROL_MIN:g})"
        )
    return Verdict(
        holds=bool(ok),
        statement="; ".join(parts) + ".",
        numbers={k: s.mean for k, s in stats.items()},
    )


def _setting(cfg: OPSharpnessConfig) -> str:
    return (
        f"f(x^T y) with x, y in R^{cfg.dim}, f = (s - c)^2 and log cosh(s - c), c = {cfg.target:g}; "
        f"{cfg.minimisers} random minimisers per seed (|x| log-uniform in {list(cfg.scales)}) and "
        f"the balanced one; lambda_max by Lanczos on sharpkit's HessianOperator (float64); "
        f"control: x^T y = c + {cfg.offset:g}."
    )


def _plot(report, out_dir):
    from sharpkit.plotting.experiments.op_sharpness import plot

    return plot(report, out_dir)


EXPERIMENT = Experiment(
    name="op_sharpness",
    title="Sharpness of OP minimisers: lambda_max = f''(x^T y)(|x|^2 + |y|^2)",
    claim=(
        "At minimisers of scale-invariant OP problems lambda_max = f''(x^T y)(|x|^2 + |y|^2), "
        "so the flattest minimiser is the balanced one (B = 0)."
    ),
    source="Li, Zhang, He (NeurIPS 2024, arXiv:2410.14802), Section 4 (OP); docs/theory.md.",
    config_cls=OPSharpnessConfig,
    scales={
        "test": OPSharpnessConfig(minimisers=3),
        "small": OPSharpnessConfig(),
        "large": OPSharpnessConfig(dim=64, minimisers=64),
    },
    seeds={"test": 1, "small": 5, "large": 10},
    run=run,
    decide=decide,
    plot=_plot,
    setting=_setting,
)
