"""The Fisher-Rao norm (Liang, Poggio, Rakhlin, Stokes, 2019).

    ||w||_fr^2 = <w, F(w) w> = E_(x, y) [ <w, grad_w l(w; x, y)>^2 ]

with ``F`` the Fisher information: the empirical Fisher (``y`` the data labels) or
the model Fisher (``y ~ p_w(y | x)``, softmax outputs). The inner product is a
directional derivative along ``w`` itself,

    <w, grad_w l(w)> = d/dt l((1 + t) w) |_{t = 0},

computed for every example at once with one forward-mode JVP per batch
(attention on its math kernels, which have a forward derivative). For a
bias-free ReLU network with L hidden layers it equals ``(L + 1) <dl/df, f>``
(Liang et al., Lemma 2.1), and it is invariant under ReLU layer rescaling.

References:
    Liang, Poggio, Rakhlin, Stokes. Fisher-Rao metric, geometry, and complexity of
    neural networks. AISTATS 2019.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import jvp

from sharpkit._quiet import torch_internal_notices_hidden
from sharpkit.sharpness._objective import (
    MetricResult,
    Objective,
    make_generator,
)

__all__ = ["fisher_rao_norm"]

FISHERS = ("empirical", "model")


def _per_example_loss(
    loss_fn: Any, fisher: str, gens: dict[str, torch.Generator]
) -> Callable[..., Any]:
    """The per-example loss; the model Fisher samples labels from ``gens["batch"]``
    (the current batch's generator)."""
    criterion = getattr(loss_fn, "criterion", None)
    if fisher == "model":
        if not isinstance(criterion, nn.CrossEntropyLoss):
            raise ValueError(
                "fisher: 'model' needs a classification loss (nn.CrossEntropyLoss) to "
                "sample labels from the softmax; use fisher='empirical'"
            )

        def model_loss(model: Any, batch: Any) -> torch.Tensor:
            inputs, _ = batch
            logits = model(inputs)
            with torch.no_grad():
                probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
                y = torch.multinomial(probs, 1, generator=gens["batch"])
                y = y.squeeze(-1).to(logits.device)
            return nn.functional.cross_entropy(logits, y, reduction="none")

        return model_loss
    if criterion is not None:
        per = copy.copy(criterion)
        per.reduction = "none"

        def emp_loss(model: Any, batch: Any) -> torch.Tensor:
            inputs, targets = batch
            out = per(model(inputs), targets)
            return out.reshape(out.shape[0], -1).sum(dim=1)

        return emp_loss
    # a loss that knows its per-example form (sharpkit.hf.HFLoss: a token mean per sequence)
    per_example = getattr(loss_fn, "per_example", None)
    if per_example is not None and getattr(loss_fn, "reduction", None) != "none":
        return per_example
    return loss_fn


def _fisher_rao(obj: Objective, *, fisher: str, seed: int | torch.Generator | None) -> MetricResult:
    if fisher not in FISHERS:
        raise ValueError(f"fisher: expected one of {FISHERS}, got {fisher!r}")
    gen, seed_used = make_generator(obj.shared_seed(seed))
    batch_gens = obj.batch_generators(gen, seed_used)  # labels of a batch: the same on any rank
    current: dict[str, torch.Generator] = {}
    loss_fn = _per_example_loss(obj.loss_fn, fisher, current)
    obj.set_offset(None)
    primals = tuple(obj.w0)

    def losses_of(batch: Any) -> Callable[..., torch.Tensor]:
        def losses(*ws: torch.Tensor) -> torch.Tensor:
            return loss_fn(obj.frozen.caller(ws), batch)

        return losses

    values = []
    with obj.metered() as cost:
        for b, n, g in zip(obj.batches, obj.sizes, batch_gens):
            current["batch"] = g
            # forward mode: attention on kernels with a forward derivative
            with (
                torch.no_grad(),
                torch_internal_notices_hidden(),
                obj.frozen.evaluating(second_order=True),
            ):
                out, tangent = jvp(losses_of(b), primals, primals)
            if out.dim() != 1 or out.shape[0] != n:
                raise ValueError(
                    "loss_fn: the Fisher-Rao norm needs per-example losses (a vector of "
                    f"length {n}); got shape {tuple(out.shape)}. Pass an nn loss module or "
                    "a loss_fn that returns reduction='none' losses."
                )
            values.append(tangent.double() ** 2)
            obj.cost.jvp += 1
    sq = torch.cat(values)
    # mean and unbiased variance over every rank's examples, in two passes
    total, count = obj.reduce(float(sq.sum()), float(sq.numel()))
    mean_sq = total / count
    (dev,) = obj.reduce(float(((sq - mean_sq) ** 2).sum()))
    se_sq = math.sqrt(dev / (count - 1) / count) if count > 1 else None
    norm = math.sqrt(mean_sq)
    return MetricResult(
        name="fisher_rao",
        value=norm,
        stderr=(se_sq / (2 * norm)) if (se_sq is not None and norm > 0) else None,
        details={"norm_sq": mean_sq, "norm_sq_stderr": se_sq, "fisher": fisher},
        cost=cost,
        protocol=obj.protocol("jvp", seed_used if fisher == "model" else None, fisher=fisher),
    )


def fisher_rao_norm(
    model: nn.Module,
    loss_fn: Any,
    data: Any,
    *,
    fisher: str = "empirical",
    seed: int | torch.Generator | None = 0,
    params: Sequence[str] | Callable[[str], bool] | None = None,
    mode: str = "eval",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    process_group: Any = None,
) -> MetricResult:
    """Fisher-Rao norm ``sqrt(E <w, grad l>^2)`` over the examples of ``data``.

    Args:
        model: the network (never modified).
        loss_fn: an nn loss module (its ``reduction='none'`` form is used), a loss
            with a ``per_example`` form (:class:`sharpkit.hf.HFLoss`: one token-mean
            loss per sequence), or a ``loss_fn(model, batch)`` returning one loss
            per example.
        data: one batch or an iterable of batches.
        fisher: ``"empirical"`` (data labels) or ``"model"`` (labels sampled from the
            softmax; needs ``nn.CrossEntropyLoss``).
        seed: seed of the label sampling (``fisher="model"``).
        params: the parameters ``w`` of the inner product (others held fixed).
        mode, dtype, device: as in :func:`~sharpkit.sharpness.worst_case_sharpness`.
        process_group: ``data`` is this rank's shard (see
            :class:`~sharpkit.sharpness._objective.Objective`): the mean and its
            error are over all the shards' examples; a batch's sampled labels do
            not depend on the rank holding it.

    Returns:
        A :class:`MetricResult`: ``value`` the norm with a delta-method ``stderr``;
        ``details["norm_sq"]``. Cost: one JVP per batch.

    Example:
        >>> model = nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 2.0]]))
        >>> x, y = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0]])
        >>> round(fisher_rao_norm(model, nn.MSELoss(), (x, y)).value, 6)  # <w, 2 f x> = 2 f^2
        18.0
    """
    obj = Objective(
        model, loss_fn, data, params=params, mode=mode, dtype=dtype, device=device,
        process_group=process_group,
    )  # fmt: skip
    return _fisher_rao(obj, fisher=fisher, seed=seed)
