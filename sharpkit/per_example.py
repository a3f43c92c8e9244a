r"""Per-example analysis: per-example gradients, the per-instance SAM target, cosines.

Measurements used to study SAM-type perturbations on small models (and by
:class:`~sharpkit.optim.DeltaSAM` for its statistics):

- :func:`per_example_gradients`: ``l_i(w)`` and ``g_i = grad l_i(w)`` for every
  example (``torch.func.vmap`` over single examples, or the rows of the Jacobian
  of the loss vector when BatchNorm couples the examples);
- :func:`per_instance_target`: :math:`G_{PI} = \frac1n \sum_i \nabla l_i(w + \rho g_i/\|g_i\|)`,
  the update of per-instance adversarial training (Zhou et al., 2022);
- :func:`perturbed_gradient`: :math:`\nabla L_B(w + \rho d/\|d\|)` for a direction ``d``;
- :func:`perturbation_cosine`: :math:`\cos(G - g, G_{PI} - g)`, how well a
  perturbed gradient reproduces the part of :math:`G_{PI}` the perturbation changes;
- :func:`per_example_losses_at`: per-example losses at several parameter sets in
  one batched forward, without touching the module.

All evaluate the model functionally (``torch.func.functional_call``): the
module's weights are never moved and its buffers are restored or copied.
``loss_fn(model, batch)`` returns one loss per example (``reduction='none'``;
an ``nn`` loss module built that way means ``(inputs, targets)`` batches).
Means over the examples are the loss's own: weighted by
:func:`sharpkit._batch.example_weights` (``w_i``, the target tokens of a
sequence for ``sharpkit.hf.HFLoss``, so that the batch loss is the token mean),
equal weights ``1/n`` otherwise.

References:
    Zhou, Liu, Zhang, Chen. Sharpness-Aware Minimization with Dynamic
    Reweighting. Findings of EMNLP 2022. arXiv:2112.08772.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad_and_value

from ._batch import as_batch_loss, batch_size, example_weights, weighted_mean
from ._functional import FunctionalView, batch_leaves, train_mode_batchnorm, vmap_over_model
from ._rng import RandomState

__all__ = [
    "examples_coupled",
    "per_example_gradients",
    "per_example_losses_at",
    "per_instance_target",
    "perturbation_cosine",
    "perturbed_gradient",
]


def _global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of the concatenation of ``tensors`` (per-tensor norms, then their norm)."""
    norms = torch._foreach_norm(list(tensors))
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0]) for n in norms]))


def _check_nonneg(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be finite and >= 0, got {value}")
    return value


def _chosen(model: nn.Module, params: Sequence[torch.Tensor] | None) -> list[torch.Tensor]:
    return (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )


def _check_per_example(losses: Any, n: int, where: str) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"loss_fn: must return a tensor, got {type(losses).__name__} ({where})")
    if losses.shape != (n,):
        raise ValueError(
            f"loss_fn: must return one loss per example (reduction='none'), i.e. shape "
            f"({n},) for this batch of {n}; got shape {tuple(losses.shape)} ({where})"
        )
    return losses


def examples_coupled(model: nn.Module) -> bool:
    """Whether examples of a batch interact in the forward pass (BatchNorm in training).

    Example:
        >>> examples_coupled(nn.BatchNorm1d(3)), examples_coupled(nn.BatchNorm1d(3).eval())
        (True, False)
    """
    return train_mode_batchnorm(model) is not None


def _per_example_vmap(
    view: FunctionalView, loss_fn: Callable[..., Any], batch: Any, n: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-example losses and gradients with ``vmap(grad)`` over single-example batches."""
    leaves, rebuild = batch_leaves(batch, n)
    params = {name: p.detach() for name, p in zip(view.names, view.params)}

    def one(tp: dict[str, torch.Tensor], example: list[torch.Tensor]) -> torch.Tensor:
        out = loss_fn(view.caller(tp), rebuild([t.unsqueeze(0) for t in example]))
        return _check_per_example(out, 1, "one example")[0]

    with torch.enable_grad():
        grads, losses = vmap_over_model(
            grad_and_value(one), in_dims=(None, 0), randomness="different"
        )(params, leaves)
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
    chosen = _chosen(model, params)
    view = FunctionalView(model, [{"params": chosen}])
    if coupled is None:
        coupled = examples_coupled(model)
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
                return vmap_over_model(at, in_dims=(0, 0), randomness="same")(params, consts)
        rows = []
        consts = _buffer_copies(view, None)
        for s in range(count):
            with rng.replayed():
                rows.append(at({name: t[s] for name, t in zip(view.names, stacked)}, consts))
        return torch.stack(rows)


def per_example_losses_at(
    model: nn.Module,
    loss_fn: Any,
    batch: Any,
    stacked: Sequence[torch.Tensor],
    *,
    params: Sequence[torch.Tensor] | None = None,
    random_state: RandomState | None = None,
    vectorise: bool = True,
) -> torch.Tensor:
    """Per-example losses at ``S`` parameter sets, without gradients and without
    touching the module.

    ``stacked[k]`` holds ``S`` values of the ``k``-th parameter of ``params``
    (shape ``(S, *p.shape)``); the result ``L[s, i] = l_i(w_s)`` has shape
    ``(S, n)``. One ``vmap``-ed forward over the sets (``vectorise=True``, more
    than one set) or a loop. Every set draws its random numbers (dropout masks)
    from ``random_state``, replayed, so all see the masks one plain call would
    draw; BatchNorm running statistics are copied, never updated.

    Args:
        model, loss_fn, batch: as in :func:`per_example_gradients`.
        stacked: one ``(S, *p.shape)`` tensor per parameter.
        params: the parameters that ``stacked`` replaces (default: all that
            require a gradient).
        random_state: the random state to replay (default: the current one of
            the parameters' device).
        vectorise: use ``vmap`` over the sets.

    Returns:
        ``(S, n)`` losses.

    Example:
        >>> lin = nn.Linear(1, 1, bias=False)
        >>> per_ex = lambda m, b: m(b).squeeze(1)
        >>> w = torch.tensor([[[1.0]], [[2.0]]])       # two values of the weight
        >>> per_example_losses_at(lin, per_ex, torch.tensor([[1.0], [3.0]]), [w])
        tensor([[1., 3.],
                [2., 6.]])
    """
    loss_fn = as_batch_loss(loss_fn, reduction="none")
    chosen = _chosen(model, params)
    view = FunctionalView(model, [{"params": chosen}])
    if len(stacked) != len(view.params):
        raise ValueError(
            f"stacked: expected {len(view.params)} tensors (one per parameter), got {len(stacked)}"
        )
    rng = random_state if random_state is not None else RandomState(view.params)
    return _evaluate_sets(
        view, loss_fn, batch, batch_size(batch), list(stacked), rng, vectorise=vectorise
    )


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
    are. ``loss_fn`` returns per-example losses; ``L_B`` is their mean (weighted
    by the loss's ``example_weights``, as in the module docstring).

    Args:
        model, loss_fn, batch: as in :func:`per_example_gradients`.
        direction: one tensor per parameter of ``params``.
        rho: the perturbation radius.
        params: the parameters (default: all that require a gradient).

    Returns:
        The gradient as one tensor per parameter.

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
    chosen = _chosen(model, params)
    view = FunctionalView(model, [{"params": chosen}])
    if len(direction) != len(view.params):
        raise ValueError(
            f"direction: expected {len(view.params)} tensors (one per parameter), got {len(direction)}"
        )
    norm = float(_global_norm([d.detach() for d in direction]))
    scale = rho / norm if math.isfinite(norm) and norm > 0 else 0.0
    moved = [
        (p.detach() + scale * d.detach()).requires_grad_() for p, d in zip(view.params, direction)
    ]
    consts = _buffer_copies(view, None)
    with torch.enable_grad():
        losses = _check_per_example(
            loss_fn(view.caller(dict(zip(view.names, moved)), consts), batch), n, "at w + e"
        )
        grads = torch.autograd.grad(
            weighted_mean(losses, example_weights(loss_fn, batch)), moved, allow_unused=True
        )
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

        G_{PI} = \frac1n \sum_i \nabla l_i\big(w + \rho\, g_i / \|g_i\|\big)

    (with example weights ``w_i``, :math:`\sum_i w_i \nabla l_i(\cdot) / \sum_i w_i`).

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
    rho = _check_nonneg("rho", rho)
    n = batch_size(batch)
    chosen = _chosen(model, params)
    if coupled is None:
        coupled = examples_coupled(model)
    snapshot = [b.detach().clone() for b in model.buffers()]
    try:
        _, grads = per_example_gradients(model, loss_fn, batch, params=chosen, coupled=coupled)
    finally:
        with torch.no_grad():
            for b, s in zip(model.buffers(), snapshot):
                b.copy_(s)
    view = FunctionalView(model, [{"params": chosen}])
    ew = example_weights(loss_fn, batch)
    if ew is not None:
        ew = ew / ew.sum()
    norms = torch.stack([g.reshape(n, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
    inv = torch.where(norms > 0, norms.reciprocal(), torch.zeros_like(norms))
    moved = [
        p.detach().unsqueeze(0) + (rho * inv).view(n, *([1] * p.dim())).to(g.dtype) * g
        for p, g in zip(view.params, grads)
    ]
    if not coupled:
        leaves, rebuild = batch_leaves(batch, n)

        def one(tp: dict[str, torch.Tensor], example: list[torch.Tensor]) -> torch.Tensor:
            out = loss_fn(view.caller(tp), rebuild([t.unsqueeze(0) for t in example]))
            return _check_per_example(out, 1, "one example")[0]

        with torch.enable_grad():
            g_pi, _ = vmap_over_model(grad_and_value(one), in_dims=(0, 0), randomness="different")(
                dict(zip(view.names, moved)), leaves
            )
        return [
            g_pi[name].mean(0) if ew is None else torch.tensordot(ew.to(g_pi[name]), g_pi[name], 1)
            for name in view.names
        ]
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
                t.add_(g, alpha=1.0 / n if ew is None else float(ew[i]))
    return total


def perturbation_cosine(
    G: Sequence[torch.Tensor], G_pi: Sequence[torch.Tensor], g: Sequence[torch.Tensor]
) -> float:
    """``cos(G - g, G_PI - g)``: how well a perturbed gradient ``G`` reproduces the
    part of the per-instance target that the perturbation changes.

    Args:
        G: the perturbed gradient of a method, one tensor per parameter.
        G_pi: the per-instance target (:func:`per_instance_target`).
        g: the gradient at ``w``.

    Returns:
        The cosine, a float in ``[-1, 1]``; ``ValueError`` if it is undefined.

    Full-gradient cosines ``cos(G, G_PI)`` are dominated by ``g`` (close to 1
    for every method on a small model) and say little; this one does not.

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
