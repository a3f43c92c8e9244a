"""delta-SAM's weightings: per-example statistics in, weights on the simplex out.

A weighting is any callable ``ExampleStats -> (n,)`` non-negative tensor;
:class:`~sharpkit.optim.DeltaSAM` multiplies it by the loss's example weights
(``ExampleStats.weights``: the target tokens of each sequence for a token-mean
loss, so that uniform weights give the batch gradient of the token mean, i.e.
SAM) and normalises the result to sum to one. The
paper (Zhou et al., 2022) up-weights the instances that the shared perturbation
leaves unguarded but its exact formula is not available to sharpkit; the
default :class:`UnguardednessSoftmax` is sharpkit's reconstruction from the
first-order picture, and the others are reference points.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "ExampleStats",
    "InverseNormWeights",
    "UnguardednessSoftmax",
    "UniformWeights",
    "Weighting",
    "normalised_weights",
]


@dataclass(frozen=True)
class ExampleStats:
    """What a weighting may use, one entry per example of the batch.

    Attributes:
        losses: ``l_i(w)``, shape ``(n,)``.
        sq_norms: ``||g_i||^2`` (exact, or the probe estimate ``mean_k (g_i . z_k)^2``).
        alignment: ``cos(g_i, g)`` with ``g`` the batch gradient, i.e.
            ``(g_i . e_SAM) / (rho ||g_i||)``: the share of example ``i``'s own
            first-order worst-case loss rise ``rho ||g_i||`` that SAM's shared
            perturbation delivers; in ``[-1, 1]``. An example with ``g_i = 0`` has
            alignment 1 (its worst case, no rise, is reached); with ``g = 0`` all
            have alignment 0.
        mode: ``'exact'``, ``'probe'`` or ``'forward-only'`` (how they were obtained).
        probes: number of random probes (0 in exact mode).
        weights: the example weights of the loss's batch mean ``w_i``
            (:func:`sharpkit._batch.example_weights`), or ``None`` (equal). The
            final weights are ``lam_i ∝ w_i * weighting(stats)_i``.
    """

    losses: torch.Tensor
    sq_norms: torch.Tensor
    alignment: torch.Tensor
    mode: str
    probes: int = 0
    weights: torch.Tensor | None = None

    @property
    def unguardedness(self) -> torch.Tensor:
        """``u_i = 1 - alignment_i``: 0 = fully served by SAM's perturbation, 2 = pushed
        the wrong way."""
        return 1.0 - self.alignment


#: A weighting maps the statistics to non-negative weights of shape ``(n,)``;
#: DeltaSAM normalises them to sum to one.
Weighting = Callable[[ExampleStats], torch.Tensor]


class UnguardednessSoftmax:
    r"""sharpkit's default delta-SAM weighting (a reconstruction, not the paper's formula).

    .. math::

        u_i = 1 - \frac{g_i \cdot e_{SAM}}{\rho \|g_i\|} = 1 - \cos(g_i, g), \qquad
        \lambda = \mathrm{softmax}(u / \tau).

    ``tau = inf`` gives uniform weights (SAM). Small ``tau`` concentrates the
    perturbation on a few examples, which approximates the per-instance target
    badly.

    Args:
        tau: temperature (> 0; ``math.inf`` allowed).

    Example:
        >>> s = ExampleStats(torch.zeros(3), torch.ones(3), torch.tensor([1.0, 0.0, -1.0]), "exact")
        >>> UnguardednessSoftmax(tau=1.0)(s)
        tensor([0.0900, 0.2447, 0.6652])
    """

    def __init__(self, tau: float = 1.0) -> None:
        if isinstance(tau, bool) or not isinstance(tau, (int, float)):
            raise TypeError(f"tau: expected a positive real number, got {type(tau).__name__}")
        if not tau > 0:  # also rejects NaN
            raise ValueError(f"tau: must be > 0 (math.inf for SAM), got {tau}")
        self.tau = float(tau)

    def __call__(self, stats: ExampleStats) -> torch.Tensor:
        if math.isinf(self.tau):
            return torch.ones_like(stats.alignment)
        return torch.softmax(stats.unguardedness / self.tau, dim=0)

    def __repr__(self) -> str:
        return f"UnguardednessSoftmax(tau={self.tau})"


class UniformWeights:
    """``lam_i = 1/n``: plain SAM (a reference point for comparisons).

    Example:
        >>> UniformWeights()(ExampleStats(torch.zeros(4), torch.ones(4), torch.zeros(4), "exact"))
        tensor([1., 1., 1., 1.])
    """

    def __call__(self, stats: ExampleStats) -> torch.Tensor:
        return torch.ones_like(stats.losses)

    def __repr__(self) -> str:
        return "UniformWeights()"


class InverseNormWeights:
    """``lam_i ∝ 1 / ||g_i||``, i.e. ``e ∝ sum_i g_i / ||g_i||``: every example's
    gradient direction counts equally. Examples with ``g_i = 0`` get weight 0.

    Example:
        >>> InverseNormWeights()(ExampleStats(torch.zeros(2), torch.tensor([1.0, 4.0]),
        ...                                   torch.zeros(2), "exact"))
        tensor([1.0000, 0.5000])
    """

    def __call__(self, stats: ExampleStats) -> torch.Tensor:
        norms = stats.sq_norms.clamp_min(0).sqrt()
        return torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))

    def __repr__(self) -> str:
        return "InverseNormWeights()"


def normalised_weights(weighting: Weighting, stats: ExampleStats, n: int) -> torch.Tensor:
    """``weighting(stats)`` checked (shape ``(n,)``, finite, non-negative, not all zero),
    times the example weights ``stats.weights`` (if any), normalised to sum to one.
    A non-finite loss gives uniform weights (the step is skipped anyway)."""
    if not bool(torch.isfinite(stats.losses).all()):
        # a non-finite loss makes the step skip anyway; keep the NaN, do not blame the weighting
        return torch.full_like(stats.losses, 1.0 / n)
    lam = weighting(stats)
    if not isinstance(lam, torch.Tensor) or lam.shape != (n,):
        shape = tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__
        raise ValueError(f"weighting: must return a tensor of shape ({n},), got {shape}")
    lam = lam.detach().to(stats.losses.dtype)
    total = lam.sum()
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()) or not bool(total > 0):
        raise ValueError(
            "weighting: weights must be finite, non-negative and not all zero; got "
            f"{lam.tolist() if n <= 8 else lam}"
        )
    if stats.weights is not None:
        lam = lam * stats.weights.to(lam)
        total = lam.sum()
        if not bool(total > 0):
            raise ValueError(
                "weighting: puts all its weight on examples that have none in the loss's "
                "mean (no target tokens)"
            )
    return lam / total
