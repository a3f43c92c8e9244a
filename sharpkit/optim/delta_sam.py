"""delta-SAM: SAM with dynamic reweighting (Zhou, Liu, Zhang, Chen, 2022).

What is the paper's and what is sharpkit's:

- **The paper's** (Zhou et al., Findings of EMNLP 2022): approximate the
  per-instance adversarial perturbation, which costs one backward pass per
  example, by ONE reweighted batch perturbation,
  ``g_lam = sum_i lam_i g_i``, ``e = rho g_lam / ||g_lam||``,
  ``G = grad L_B(w + e)``; instances that the shared perturbation leaves
  unguarded get larger weights; guardedness is estimated cheaply with a few
  extra forward passes under random Gaussian perturbations.
- **sharpkit's reconstruction** (the paper's exact weighting formula is not
  available to this project): the weighting is a replaceable function of
  per-example statistics (:class:`ExampleStats`), and the default
  (:class:`UnguardednessSoftmax`) is built from the first-order picture
  ``u_i = 1 - (g_i . e_SAM) / (rho ||g_i||) = 1 - cos(g_i, g)``,
  ``lam = softmax(u / tau)``; ``tau -> inf`` recovers SAM. The statistics come
  exactly (per-example gradients, ``torch.func``) or from random forward probes.
  The default ``tau`` and mode come from sharpkit's own measurement of
  ``cos(G - g, G_PI - g)`` (see :class:`DeltaSAM`).

The module also provides the exact per-instance target :func:`per_instance_target`
and :func:`perturbation_cosine`, to measure how well a perturbation
approximates it on small models.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value, vmap
from torch.optim import Optimizer

from .._batch import as_batch_loss, batch_size
from .._rng import RandomState
from ._base import BatchDrivenSAM, check_nonneg_float, global_norm
from .msam import (
    FunctionalView,
    NotVectorisable,
    VectorisationFallbackWarning,
    _batch_leaves,
    _train_mode_batchnorm,
)

__all__ = [
    "DeltaSAM",
    "ExampleStats",
    "InverseNormWeights",
    "UnguardednessSoftmax",
    "UniformWeights",
    "Weighting",
    "per_example_gradients",
    "per_instance_target",
    "perturbation_cosine",
    "perturbed_gradient",
]

_MODES = ("exact", "probe", "forward-only")


# ----------------------------------------------------------------------------
# Per-example statistics and weightings
# ----------------------------------------------------------------------------


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
    """

    losses: torch.Tensor
    sq_norms: torch.Tensor
    alignment: torch.Tensor
    mode: str
    probes: int = 0

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
    badly (measured: see :class:`DeltaSAM`).

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


def _alignment(dots: torch.Tensor, sq_norms: torch.Tensor, batch_sq: torch.Tensor) -> torch.Tensor:
    """``dots / (||g_i|| ||g||)`` clamped to [-1, 1], with the conventions of
    :class:`ExampleStats` where a norm is zero (exact zero tests, no epsilon)."""
    den = sq_norms.clamp_min(0).sqrt() * batch_sq.clamp_min(0).sqrt()
    safe = torch.where(den > 0, den, torch.ones_like(den))
    cos = torch.where(den > 0, dots / safe, torch.zeros_like(dots))
    cos = torch.where(sq_norms > 0, cos, torch.ones_like(cos))
    return cos.clamp(-1.0, 1.0)


def _normalised_weights(weighting: Weighting, stats: ExampleStats, n: int) -> torch.Tensor:
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
    return lam / total


# ----------------------------------------------------------------------------
# Functional helpers: per-example gradients, perturbed evaluations
# ----------------------------------------------------------------------------


def _check_per_example(losses: Any, n: int, where: str) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn: must return a tensor, got {type(losses).__name__} ({where})")
    if losses.shape != (n,):
        raise ValueError(
            f"loss_fn: must return one loss per example (reduction='none'), i.e. shape "
            f"({n},) for this batch of {n}; got shape {tuple(losses.shape)} ({where})"
        )
    return losses


def _examples_coupled(model: nn.Module) -> bool:
    """Whether examples of a batch interact in the forward pass (BatchNorm in training)."""
    return _train_mode_batchnorm(model) is not None


def _per_example_vmap(
    view: FunctionalView, loss_fn: Callable[..., Any], batch: Any, n: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-example losses and gradients with ``vmap(grad)`` over single-example batches."""
    leaves, rebuild = _batch_leaves(batch, n)
    params = {name: p.detach() for name, p in zip(view.names, view.params)}

    def one(tp: dict[str, torch.Tensor], example: list[torch.Tensor]) -> torch.Tensor:
        out = loss_fn(view.caller(tp), rebuild([t.unsqueeze(0) for t in example]))
        return _check_per_example(out, 1, "one example")[0]

    with torch.enable_grad():
        grads, losses = vmap(grad_and_value(one), in_dims=(None, 0), randomness="different")(
            params, leaves
        )
    return losses.detach(), [grads[name].detach() for name in view.names]


def _per_example_jacobian(view: FunctionalView, losses: torch.Tensor) -> list[torch.Tensor | None]:
    """Rows of the Jacobian of the per-example loss vector (a batched backward).

    Correct when examples interact (BatchNorm in training), at the price of ``n``
    backward passes (vectorised)."""
    n = losses.shape[0]
    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
    return list(
        torch.autograd.grad(
            losses, view.params, grad_outputs=eye, is_grads_batched=True, allow_unused=True
        )
    )


def per_example_gradients(
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    *,
    params: Sequence[torch.Tensor] | None = None,
    coupled: bool | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-example losses ``l_i(w)`` and gradients ``g_i = grad l_i(w)``.

    Args:
        model: the module ``loss_fn`` calls.
        loss_fn: ``loss_fn(model, batch)`` returning one loss per example.
        batch: the batch.
        params: the parameters to differentiate (default: all of ``model``'s that
            require a gradient).
        coupled: whether examples interact in the forward pass. ``False``:
            ``vmap`` over single-example batches (fast). ``True``: rows of the
            Jacobian of the loss vector of the whole batch (``n`` vectorised
            backward passes; right for BatchNorm in training mode, whose running
            statistics this forward then updates). ``None``: ``True`` exactly
            when the model has a BatchNorm in training mode.

    Returns:
        ``(losses, grads)``: ``losses`` of shape ``(n,)`` and, per parameter, a
        tensor of shape ``(n, *p.shape)``.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
        >>> def per_ex(m, b):
        ...     return 0.5 * m(b).squeeze(1) ** 2
        >>> losses, (gw,) = per_example_gradients(lin, per_ex, x)
        >>> gw.shape                                   # (n, *weight.shape)
        torch.Size([2, 1, 2])
        >>> torch.allclose(gw[:, 0], lin(x).detach() * x)  # d/dw 0.5 (w.x)^2 = (w.x) x
        True
    """
    loss_fn = as_batch_loss(loss_fn, reduction="none")
    n = batch_size(batch)
    chosen = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    view = FunctionalView(model, [{"params": chosen}])
    if coupled is None:
        coupled = _examples_coupled(model)
    if not coupled:
        return _per_example_vmap(view, loss_fn, batch, n)
    with torch.enable_grad():
        losses = _check_per_example(loss_fn(model, batch), n, "at w")
        rows = _per_example_jacobian(view, losses)
    grads = [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) if r is None else r
             for p, r in zip(view.params, rows)]  # fmt: skip
    return losses.detach(), grads


def _buffer_copies(view: FunctionalView, count: int | None) -> dict[str, torch.Tensor]:
    """Copies of the buffers that a training-mode forward updates in place (BatchNorm
    running statistics), by name, to evaluate perturbed weights without touching
    the module's own; ``count`` copies stacked along a new first axis for ``vmap``."""
    out: dict[str, torch.Tensor] = {}
    for name, mod in view.model.named_modules():
        if not (
            isinstance(mod, nn.modules.batchnorm._BatchNorm)
            and mod.training
            and mod.track_running_stats
        ):
            continue
        for b in ("running_mean", "running_var", "num_batches_tracked"):
            v = getattr(mod, b, None)
            if v is None:
                continue
            key = f"{name}.{b}" if name else b
            v = v.detach()
            out[key] = (
                v.clone() if count is None else v.unsqueeze(0).repeat(count, *([1] * v.dim()))
            )
    return out


def _evaluate_sets(
    view: FunctionalView,
    loss_fn: Callable[..., Any],
    batch: Any,
    n: int,
    stacked: list[torch.Tensor],
    rng: RandomState,
    *,
    vectorise: bool = True,
) -> torch.Tensor:
    """Per-example losses at ``S`` parameter sets (``stacked[k]`` has shape
    ``(S, *p.shape)``), without gradients and without touching the module: one
    vmapped forward (or a loop when ``vectorise`` is False; a single set needs no
    ``vmap``, whose batching overhead made forward-only K = 1 7% slower on the
    benchmark LoRA MLP). Every set draws its random numbers (dropout masks) from
    ``rng``, replayed; the global state is left as it was. Returns ``(S, n)``."""
    count = stacked[0].shape[0]
    vectorise = vectorise and count > 1

    def at(tp: dict[str, torch.Tensor], consts: dict[str, torch.Tensor]) -> torch.Tensor:
        return _check_per_example(loss_fn(view.caller(tp, consts), batch), n, "probe")

    with torch.no_grad():
        if vectorise:
            consts = _buffer_copies(view, count)
            params = dict(zip(view.names, stacked))
            with rng.replayed():  # 'same': every set sees the masks a plain call would draw
                return vmap(at, in_dims=(0, 0), randomness="same")(params, consts)
        rows = []
        consts = _buffer_copies(view, None)
        for s in range(count):
            with rng.replayed():
                rows.append(at({name: t[s] for name, t in zip(view.names, stacked)}, consts))
        return torch.stack(rows)


def perturbed_gradient(
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    direction: Sequence[torch.Tensor],
    rho: float,
    *,
    params: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``grad L_B(w + rho d / ||d||)`` for a direction ``d`` (``d = 0``: at ``w``).

    Evaluated functionally: the module's weights and buffers are left as they
    are. ``loss_fn`` returns per-example losses; ``L_B`` is their mean.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> x = torch.eye(2)
        >>> per_ex = lambda m, b: 0.5 * m(b).squeeze(1) ** 2
        >>> w = lin.weight.detach().clone()
        >>> (G,) = perturbed_gradient(lin, per_ex, x, [torch.tensor([[1.0, 0.0]])], 0.1)
        >>> torch.allclose(G, (w + torch.tensor([[0.1, 0.0]])) / 2)
        True
    """
    loss_fn = as_batch_loss(loss_fn, reduction="none")
    n = batch_size(batch)
    chosen = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    view = FunctionalView(model, [{"params": chosen}])
    if len(direction) != len(view.params):
        raise ValueError(
            f"direction: expected {len(view.params)} tensors (one per parameter), got {len(direction)}"
        )
    norm = float(global_norm([d.detach() for d in direction]))
    scale = rho / norm if math.isfinite(norm) and norm > 0 else 0.0
    moved = [
        (p.detach() + scale * d.detach()).requires_grad_() for p, d in zip(view.params, direction)
    ]
    consts = _buffer_copies(view, None)
    with torch.enable_grad():
        losses = _check_per_example(
            loss_fn(view.caller(dict(zip(view.names, moved)), consts), batch), n, "at w + e"
        )
        grads = torch.autograd.grad(losses.mean(), moved, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(view.params, grads)]


def per_instance_target(
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    rho: float,
    *,
    params: Sequence[torch.Tensor] | None = None,
    coupled: bool | None = None,
) -> list[torch.Tensor]:
    r"""The per-instance SAM target that delta-SAM approximates (exact, for small models):

    .. math::

        G_{PI} = \frac1n \sum_i \nabla l_i\big(w + \rho\, g_i / \|g_i\|\big).

    Each example is evaluated at its own perturbation (an example with
    ``g_i = 0`` at ``w``). With independent examples (``coupled=False``) each
    ``l_i`` is a single-example loss and the ``n`` evaluations run as one
    ``vmap``; with coupled examples (BatchNorm in training) ``l_i`` is the
    ``i``-th loss of the whole batch evaluated at ``w + e_i`` (a loop of ``n``
    full-batch passes). The module is not modified.

    Args:
        model, loss_fn, batch: as in :func:`per_example_gradients`.
        rho: perturbation radius.
        params: the parameters (default: all that require a gradient).
        coupled: see :func:`per_example_gradients`.

    Returns:
        ``G_PI`` as one tensor per parameter.

    Example:
        >>> lin = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = lin.weight.copy_(torch.tensor([[1.0, 2.0]]))
        >>> x = torch.eye(2)          # l_i = 0.5 w_i^2: g_i = w_i e_i, H_i = e_i e_i^T
        >>> per_ex = lambda m, b: 0.5 * m(b).squeeze(1) ** 2
        >>> per_instance_target(lin, per_ex, x, rho=0.5)[0]   # (1/2)(w_i + 0.5) e_i
        tensor([[0.7500, 1.2500]])
    """
    loss_fn = as_batch_loss(loss_fn, reduction="none")
    rho = check_nonneg_float("rho", rho)
    n = batch_size(batch)
    chosen = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    if coupled is None:
        coupled = _examples_coupled(model)
    snapshot = [b.detach().clone() for b in model.buffers()]
    try:
        _, grads = per_example_gradients(model, loss_fn, batch, params=chosen, coupled=coupled)
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), snapshot):
                b.copy_(s)
    view = FunctionalView(model, [{"params": chosen}])
    norms = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    inv = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    moved = [
        p.detach().unsqueeze(0) + (rho * inv).view(n, *([1] * p.dim())).to(g.dtype) * g
        for p, g in zip(view.params, grads)
    ]
    if not coupled:
        leaves, rebuild = _batch_leaves(batch, n)

        def one(tp: dict[str, torch.Tensor], example: list[torch.Tensor]) -> torch.Tensor:
            out = loss_fn(view.caller(tp), rebuild([t.unsqueeze(0) for t in example]))
            return _check_per_example(out, 1, "one example")[0]

        with torch.enable_grad():
            g_pi, _ = vmap(grad_and_value(one), in_dims=(0, 0), randomness="different")(
                dict(zip(view.names, moved)), leaves
            )
        return [g_pi[name].mean(0) for name in view.names]
    total = [torch.zeros_like(p) for p in view.params]
    for i in range(n):
        at = [m[i].clone().requires_grad_() for m in moved]
        consts = _buffer_copies(view, None)
        with torch.enable_grad():
            losses = _check_per_example(
                loss_fn(view.caller(dict(zip(view.names, at)), consts), batch), n, "at w + e_i"
            )
            gi = torch.autograd.grad(losses[i], at, allow_unused=True)
        for t, g in zip(total, gi):
            if g is not None:
                t.add_(g, alpha=1.0 / n)
    return total


def perturbation_cosine(
    G: Sequence[torch.Tensor], G_pi: Sequence[torch.Tensor], g: Sequence[torch.Tensor]
) -> float:
    """``cos(G - g, G_PI - g)``: how well a perturbed gradient ``G`` reproduces the
    part of the per-instance target that the perturbation changes.

    Full-gradient cosines ``cos(G, G_PI)`` are dominated by ``g`` (about 0.998 for
    every method in PAPERS.md's pre-check) and say nothing; this one does.

    Example:
        >>> g = [torch.tensor([1.0, 0.0])]
        >>> perturbation_cosine([torch.tensor([1.0, 1.0])], [torch.tensor([1.0, 2.0])], g)
        1.0
    """
    a = torch.cat([(x - y).reshape(-1) for x, y in zip(G, g)])
    b = torch.cat([(x - y).reshape(-1) for x, y in zip(G_pi, g)])
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    if den == 0.0:
        raise ValueError("G, G_pi: G - g or G_PI - g is zero; the cosine is undefined")
    return float(a @ b) / den


# ----------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------


class DeltaSAM(BatchDrivenSAM):
    r"""delta-SAM: SAM with one dynamically reweighted batch perturbation.

    .. math::

        g_\lambda = \sum_i \lambda_i g_i, \qquad
        e = \rho\, g_\lambda / \|g_\lambda\|, \qquad
        w \leftarrow \mathrm{base\_step}\big(w,\ \nabla L_B(w + e)\big),

    with :math:`\lambda` on the simplex, chosen to approximate the per-instance
    target :math:`G_{PI} = \frac1n \sum_i \nabla l_i(w + \rho g_i/\|g_i\|)`
    (:func:`per_instance_target`) with one perturbation instead of ``n``.

    **Paper versus reconstruction.** The update above, the idea of up-weighting
    the instances that the shared perturbation leaves unguarded, and estimating
    guardedness with a few extra forward passes under random Gaussian
    perturbations are Zhou et al.'s. Their weighting formula is not available to
    sharpkit; the weighting here is a replaceable callable (``weighting=``, a
    function of :class:`ExampleStats`), and the default is sharpkit's
    reconstruction :class:`UnguardednessSoftmax`:
    :math:`u_i = 1 - \cos(g_i, g)`, :math:`\lambda = \mathrm{softmax}(u/\tau)`.

    **Statistics** (``mode=``):

    - ``'exact'``: per-example gradients with ``torch.func`` (``vmap`` over
      single examples; the Jacobian of the loss vector when BatchNorm couples
      the examples), then :math:`g_\lambda = \sum_i \lambda_i g_i` directly.
      Costs a per-example backward (memory ``n x`` the trainable parameters).
    - ``'probe'`` (PAPERS.md's recipe): backward of the mean loss (graph kept)
      gives ``g``; ``K`` forward probes :math:`a_{ik} = (l_i(w + s z_k) - l_i(w))/s`,
      :math:`z_k \sim N(0, I)`, estimate :math:`\|g_i\|^2 = E[(g_i\cdot z)^2]`
      by :math:`\frac1K\sum_k a_{ik}^2`; one more forward along
      :math:`\hat g` gives :math:`g_i \cdot \hat g`; a second backward of
      :math:`\sum_i \lambda_i l_i` gives :math:`g_\lambda`. Cost: SAM + 1 backward
      + ``K + 1`` forwards.
    - ``'forward-only'``: weights *before* the only backward, from ``K`` forward
      probes alone: :math:`\|g_i\|^2 \approx \frac1K \sum_k a_{ik}^2`,
      :math:`g_i \cdot g \approx \frac1K \sum_k a_{ik} b_k` with
      :math:`b_k = \frac1n \sum_i a_{ik}`, then one backward of
      :math:`\sum_i \lambda_i l_i`. Cost: SAM + ``K`` forwards; noisier.

    Probe forwards run functionally on perturbed copies of the trainable
    parameters (one ``vmap`` over the probes, a plain call for a single one;
    the module's weights never move, its BatchNorm buffers are not updated by
    them). They replay the random-number state of the clean forward, so a model
    with dropout in training mode draws the same masks at ``w`` and at every
    probe point (common random numbers; otherwise the differences would measure
    the masks). The probe step is
    :math:`s = r/\sqrt{d}` (``d`` trainable scalars, ``r = probe_radius``, so
    :math:`\|s z\| \approx r`); forward differences, whose error is far below
    the estimator's own noise (relative standard deviation of the squared-norm
    estimate :math:`\sqrt{2/K}`).

    **Measured trade-off** (analysis/benchmarks/bench_msam_deltasam.py; a
    20-32-3 tanh MLP, ``n = 64``, ``rho = 0.05``, Gaussian-cluster data,
    3 seeds x 6 batches, float64; mean ``cos(G - g, G_PI - g)`` at label noise
    0 / 20 / 50 %, at initialisation | after 300 gradient steps)::

        SAM                          0.77 0.73 0.68 | 0.70 0.68 0.67
        exact, tau = 1 (default)     0.78 0.75 0.72 | 0.79 0.76 0.76
        exact, tau = 0.3             0.68 0.48 0.27 | 0.43 0.22 0.23   (collapses)
        probe K = 4, tau = 1         0.78 0.75 0.72 | 0.80 0.74 0.76
        forward-only K = 2, tau = 1  0.67 0.59 0.51 | 0.49 0.38 0.34   (worse than SAM)

    (The benchmark's quality table has more settings: tau = 0.5 and 2, K = 2 and 8,
    inverse-norm weights; see results/msam_deltasam.md.) The
    ``tau = 0.3`` reported in PAPERS.md's pre-check did not reproduce here:
    with small ``tau`` a handful of examples dominates ``e``. ``tau = 1`` was
    the best or near-best setting in every condition measured, hence the
    default. The forward-only mode with one probe is the cheapest (1.23x SAM's
    step on the benchmark LoRA transformer block, 1.35x on the LoRA MLP, on a
    2-core CPU; its floor is SAM plus one forward) but its
    weights are too noisy at ``K <= 4`` to approximate ``G_PI`` better than SAM;
    do not expect it to beat SAM. Default: ``mode='exact'``, best quality, and
    cheap for adapter (LoRA) training where the trainable parameters are few.

    BatchNorm running statistics come from the clean forward at ``w`` only.
    ``rho = 0`` reproduces the base optimizer bit for bit (no statistics are
    computed then). A non-finite loss or gradient at ``w`` skips the step.

    Args:
        params: parameters or parameter-group dicts (groups may set ``rho``).
        base_optimizer: optimizer class, e.g. ``torch.optim.SGD``.
        rho: perturbation radius (>= 0).
        model: the module ``loss_fn`` evaluates (required).
        mode: ``'exact'``, ``'probe'`` or ``'forward-only'``.
        tau: temperature of the default weighting (default 1.0); not with ``weighting``.
        weighting: a callable ``ExampleStats -> (n,)`` non-negative weights, in place
            of the default.
        probes: number ``K`` of random probes (probe modes).
        probe_radius: ``r``, the norm of a probe perturbation (> 0).
        seed: seed of the probes' random generator (its state is in ``state_dict``).
        **base_kwargs: passed to ``base_optimizer``.

    Example:
        >>> import torch
        >>> from sharpkit.optim.delta_sam import DeltaSAM
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.05, model=model, lr=0.1)
        >>> loss_fn = torch.nn.CrossEntropyLoss(reduction="none")   # one loss per example
        >>> first = opt.step(loss_fn, (x, y)).mean().item()
        >>> later = [opt.step(loss_fn, (x, y)).mean().item() for _ in range(20)][-1]
        >>> later < first, round(opt.last_weights.sum().item(), 6)
        (True, 1.0)

    References:
        Zhou, Liu, Zhang, Chen. Sharpness-Aware Minimization with Dynamic
        Reweighting. Findings of EMNLP 2022. arXiv:2112.08772.
    """

    _OWN_KEYS = ("rho",)
    _needs_batch = "it needs per-example losses"

    def __init__(
        self,
        params: Iterable[Any],
        base_optimizer: Callable[..., Optimizer],
        rho: float = 0.05,
        *,
        model: nn.Module,
        mode: str = "exact",
        tau: float | None = None,
        weighting: Weighting | None = None,
        probes: int = 4,
        probe_radius: float = 1e-2,
        seed: int = 0,
        **base_kwargs: Any,
    ) -> None:
        if model is None:
            raise TypeError(
                "model: DeltaSAM needs the module, as model=..., because it evaluates "
                "loss_fn(model, batch) itself"
            )
        if mode not in _MODES:
            raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
        if weighting is not None and tau is not None:
            raise ValueError("tau: applies to the default weighting; do not pass it with weighting")
        if weighting is None:
            weighting = UnguardednessSoftmax(1.0 if tau is None else tau)
        elif not callable(weighting):
            raise TypeError(f"weighting: expected a callable, got {type(weighting).__name__}")
        if isinstance(probes, bool) or not isinstance(probes, int):
            raise TypeError(f"probes: expected a positive integer, got {probes!r}")
        if probes < 1:
            raise ValueError(f"probes: must be >= 1, got {probes}")
        probe_radius = check_nonneg_float("probe_radius", probe_radius)
        if probe_radius == 0.0:
            raise ValueError("probe_radius: must be > 0")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed: expected an integer, got {seed!r}")
        defaults = {"rho": check_nonneg_float("rho", rho)}
        super().__init__(params, base_optimizer, defaults, base_kwargs, model=model)
        self.mode = mode
        self.weighting = weighting
        self.probes = probes
        self.probe_radius = probe_radius
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_generator_state: torch.Tensor | None = None
        #: the normalised weights of the last step (``None`` before, or when rho = 0)
        self.last_weights: torch.Tensor | None = None
        #: the statistics of the last step
        self.last_stats: ExampleStats | None = None

    # -- state dict: the probes' generator travels with it ---------------------------

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._generator is not None:
            sd["delta_sam_generator"] = self._generator.get_state()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        gen_state = state_dict.pop("delta_sam_generator", None)
        super().load_state_dict(state_dict)
        self._generator = None
        self._pending_generator_state = gen_state

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_generator_state is not None:
                self._generator.set_state(self._pending_generator_state)
                self._pending_generator_state = None
        return self._generator

    # -- step -----------------------------------------------------------------------------

    def step(self, loss_fn: Any = None, batch: Any = None) -> torch.Tensor:  # type: ignore[override]
        """One delta-SAM update; returns the per-example losses at ``w`` (detached).

        Args:
            loss_fn: ``loss_fn(model, batch)`` returning one loss per example
                (``reduction='none'``), shape ``(n,)``; an ``nn`` loss module built
                with ``reduction='none'`` means ``(inputs, targets)`` batches.
            batch: the mini-batch.

        Returns:
            ``l_i(w)``, shape ``(n,)`` (take ``.mean()`` for the batch loss).
        """
        if loss_fn is None or batch is None:
            raise TypeError(
                "DeltaSAM.step(loss_fn, batch): loss_fn (loss_fn(model, batch) -> one loss "
                "per example) and batch are required"
            )
        loss_fn = as_batch_loss(loss_fn, reduction="none")
        n = batch_size(batch)
        calls = {"n": 0}

        def closure() -> torch.Tensor:
            calls["n"] += 1
            if calls["n"] == 1:
                return self._clean_pass(loss_fn, batch, n)
            losses = _check_per_example(loss_fn(self.model, batch), n, "at w + e")
            losses.mean().backward()
            return losses

        return super().step(closure)

    # -- the clean pass: leave g_lam in .grad ------------------------------------------------

    def _clean_pass(self, loss_fn: Callable[..., Any], batch: Any, n: int) -> torch.Tensor:
        if all(group["rho"] == 0.0 for group in self.param_groups):
            # e = 0 whatever the weights: a plain gradient, no statistics
            losses = _check_per_example(loss_fn(self.model, batch), n, "at w")
            losses.mean().backward()
            self.last_weights, self.last_stats = None, None
            return losses.detach()
        try:
            view = FunctionalView(self.model, self.param_groups)
        except NotVectorisable as err:
            raise ValueError(
                f"model: {err}; DeltaSAM evaluates the model functionally and needs every "
                "optimized parameter to be one of model's"
            ) from err
        if not view.trainable:
            raise RuntimeError("DeltaSAM: no parameter of the optimizer requires a gradient")
        if self.mode == "exact":
            return self._exact(view, loss_fn, batch, n)
        low = sorted({str(p.dtype) for p in view.params if torch.finfo(p.dtype).bits < 32})
        if low:
            raise ValueError(
                f"mode: {self.mode!r} perturbs the weights by tiny finite-difference steps, "
                f"which vanish in {', '.join(low)}; use float32 or float64 trainable "
                "parameters, or mode='exact'"
            )
        rng = RandomState(view.params)  # what the clean forward draws its masks from
        if self.mode == "probe":
            losses = _check_per_example(loss_fn(self.model, batch), n, "at w")
            losses.mean().backward(retain_graph=True)
            grads = [p.grad for p in view.params]
            if any(g is None for g in grads):
                grads = [
                    torch.zeros_like(p) if g is None else g for p, g in zip(view.params, grads)
                ]
            L, s, t = self._probe_losses(view, loss_fn, batch, n, grads, rng)
            self.zero_grad(set_to_none=True)
        else:
            # the probes need nothing from the clean pass, so they run first, while no
            # autograd graph is held in memory (3-8% of a SAM step faster on the
            # benchmark LoRA MLP than probing after the clean forward)
            L, s, t = self._probe_losses(view, loss_fn, batch, n, None, rng)
            losses = _check_per_example(loss_fn(self.model, batch), n, "at w")
        stats = self._probe_stats(L, losses.detach(), s, t)
        lam = _normalised_weights(self.weighting, stats, n)
        self.last_weights, self.last_stats = lam, stats
        losses.backward(lam.to(losses.dtype))
        return losses.detach()

    def _exact(
        self, view: FunctionalView, loss_fn: Callable[..., Any], batch: Any, n: int
    ) -> torch.Tensor:
        if _examples_coupled(self.model):
            return self._exact_jacobian(view, loss_fn, batch, n)
        else:
            try:
                losses, grads = _per_example_vmap(view, loss_fn, batch, n)
            except (RuntimeError, NotImplementedError) as err:
                # vmap could not run the model per example: the Jacobian of the loss
                # vector gives the same gradients at n (vectorised) backward passes
                warnings.warn(
                    "DeltaSAM: torch.func.vmap could not compute per-example gradients "
                    f"({type(err).__name__}: {err}); using the Jacobian of the loss vector",
                    VectorisationFallbackWarning,
                    stacklevel=6,
                )
                return self._exact_jacobian(view, loss_fn, batch, n)
        return self._finish_exact(view, losses, grads, n)

    def _exact_jacobian(
        self, view: FunctionalView, loss_fn: Callable[..., Any], batch: Any, n: int
    ) -> torch.Tensor:
        losses = _check_per_example(loss_fn(self.model, batch), n, "at w")
        rows = _per_example_jacobian(view, losses)
        grads = [torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device) if r is None else r
                 for p, r in zip(view.params, rows)]  # fmt: skip
        return self._finish_exact(view, losses.detach(), grads, n)

    def _finish_exact(
        self, view: FunctionalView, losses: torch.Tensor, grads: list[torch.Tensor], n: int
    ) -> torch.Tensor:
        flat = [g.reshape(n, -1) for g in grads]
        g_mean = [f.mean(0) for f in flat]
        sq = torch.stack([torch.linalg.vector_norm(f, dim=1) for f in flat]).square().sum(0)
        dots = torch.stack([f @ gm for f, gm in zip(flat, g_mean)]).sum(0)
        batch_sq = global_norm(g_mean).square()
        stats = ExampleStats(losses, sq, _alignment(dots, sq, batch_sq), "exact")
        lam = _normalised_weights(self.weighting, stats, n)
        self.last_weights, self.last_stats = lam, stats
        with torch.no_grad():
            for p, g in zip(view.params, grads):
                p.grad = torch.tensordot(lam.to(g.dtype), g, dims=1)
        return losses

    def _probe_losses(
        self,
        view: FunctionalView,
        loss_fn: Callable[..., Any],
        batch: Any,
        n: int,
        grads: list[torch.Tensor] | None,
        rng: RandomState,
    ) -> tuple[torch.Tensor, float, float | None]:
        """Per-example losses at the ``K`` probe points ``w + s z_k`` and, given the
        batch gradient (probe mode), at one more point ``w + t g``.

        Returns ``(L, s, t)``: ``L`` of shape ``(K, n)`` or ``(K + 1, n)``, the
        probe step ``s``, and ``t`` (``None`` without ``grads``; 0 when ``g`` is
        zero or not finite, and the last row of ``L`` is then unusable)."""
        params = view.params
        d = sum(p.numel() for p in params)
        K = self.probes
        s = self.probe_radius / math.sqrt(d)
        gen = self._gen(params[0].device)
        t: float | None = None
        with torch.no_grad():
            stacked = []
            for p in params:
                z = torch.randn((K, *p.shape), generator=gen, device=gen.device, dtype=p.dtype)
                stacked.append(torch.add(p.detach().unsqueeze(0), z.to(p.device), alpha=s))
            if grads is not None:  # one more point along g / ||g||, at distance probe_radius
                gnorm = float(global_norm(grads))
                t = self.probe_radius / gnorm if math.isfinite(gnorm) and gnorm > 0 else 0.0
                stacked = [
                    torch.cat([st, (p.detach() + t * g).unsqueeze(0)])
                    for st, p, g in zip(stacked, params, grads)
                ]
            return self._evaluate(view, loss_fn, batch, n, stacked, rng), s, t

    @torch.no_grad()
    def _probe_stats(
        self, L: torch.Tensor, l0: torch.Tensor, s: float, t: float | None
    ) -> ExampleStats:
        """:class:`ExampleStats` from the probe losses ``L`` and the losses ``l0`` at ``w``."""
        K = self.probes
        A = (L[:K] - l0) / s  # (K, n): a_ik ~ g_i . z_k
        sq = A.pow(2).mean(0)
        if t is None:  # forward-only
            b = A.mean(1)  # b_k ~ g . z_k
            dots = (A * b[:, None]).mean(0)
            alignment = _alignment(dots, sq, b.pow(2).mean())
        elif t > 0:
            along = (L[K] - l0) / self.probe_radius  # g_i . g / ||g||
            sq_safe = torch.where(sq > 0, sq, torch.ones_like(sq))
            alignment = torch.where(sq > 0, along / sq_safe.sqrt(), torch.ones_like(sq))
            alignment = alignment.clamp(-1.0, 1.0)
        else:  # g = 0: no direction to align with
            alignment = torch.where(sq > 0, torch.zeros_like(sq), torch.ones_like(sq))
        return ExampleStats(l0, sq, alignment, self.mode, probes=K)

    def _evaluate(
        self,
        view: FunctionalView,
        loss_fn: Callable[..., Any],
        batch: Any,
        n: int,
        stacked: list[torch.Tensor],
        rng: RandomState,
    ) -> torch.Tensor:
        if getattr(self, "_probe_fallback", None) is None:
            try:
                return _evaluate_sets(view, loss_fn, batch, n, stacked, rng, vectorise=True)
            except (NotVectorisable, RuntimeError, NotImplementedError) as err:
                out = _evaluate_sets(view, loss_fn, batch, n, stacked, rng, vectorise=False)
                self._probe_fallback = f"{type(err).__name__}: {err}"
                warnings.warn(
                    "DeltaSAM: torch.func.vmap could not run the probe forwards as one batch; "
                    f"they run one by one from now on. Reason: {self._probe_fallback}",
                    VectorisationFallbackWarning,
                    stacklevel=6,
                )
                return out
        return _evaluate_sets(view, loss_fn, batch, n, stacked, rng, vectorise=False)
