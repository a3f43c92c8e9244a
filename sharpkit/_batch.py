"""How sharpkit takes a model, a loss and data: one convention for the whole library.

- A **batch loss** is a function ``loss_fn(model, batch) -> Tensor``. ``model`` is
  anything callable like the module (sharpkit may pass a ``torch.func``
  functional wrapper of it, so use it only by calling it); ``batch`` is whatever
  the data yields. It returns the *mean* loss over the batch (a scalar), or,
  where sharpkit asks for per-example losses (delta-SAM, Fisher-Rao), a vector
  with one loss per example (``reduction='none'``).
- A plain criterion (an ``nn.Module`` loss such as ``nn.CrossEntropyLoss()``) is
  accepted wherever a batch loss is, and means the supervised convention: the
  batch is ``(inputs, targets)`` and the loss is ``criterion(model(inputs), targets)``
  (see :func:`supervised`).
- **Data** is either one batch (a tensor, or a tuple/list/dict of tensors) or an
  iterable of batches (a ``DataLoader``, a list of tuples). The number of examples
  in a batch is the leading dimension of its first tensor (:func:`batch_size`).
- **Weights.** A mean over batches (or micro-batches, or ranks) of batch losses
  weighs each batch by what its loss averages over (:func:`batch_weight`): its
  number of examples, or its number of target tokens for a loss that says it is
  a token mean (a ``batch_weight(batch)`` method, as ``sharpkit.hf.HFLoss``
  has). With those weights the mean over batches is the loss of all the data as
  one batch. :func:`example_weights` gives the same per example (for means of
  per-example losses) and :func:`weighting` names the normalisation
  (``"examples"`` or ``"tokens"``) for the measurement protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from sharpkit._functional import tree_flatten

__all__ = [
    "BatchLoss",
    "as_batch_loss",
    "batch_size",
    "batch_weight",
    "example_weights",
    "iter_batches",
    "move_batch",
    "split_batch",
    "supervised",
    "weighted_mean",
    "weighting",
]

BatchLoss = Callable[[Callable[..., Any], Any], torch.Tensor]


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def supervised(criterion: Callable[[Any, Any], torch.Tensor]) -> BatchLoss:
    """Turn ``criterion(outputs, targets)`` into a batch loss over ``(inputs, targets)``.

    Dict inputs are passed as keyword arguments (``model(**inputs)``).

    Example:
        >>> loss_fn = supervised(nn.MSELoss())
        >>> model = nn.Linear(2, 1)
        >>> loss_fn(model, (torch.zeros(4, 2), model.bias.detach().expand(4, 1))).item() == 0.0
        True
    """

    def loss_fn(model: Callable[..., Any], batch: Any) -> torch.Tensor:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                "batch: a criterion expects batches of (inputs, targets); got "
                f"{type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
                + ". Pass a loss_fn(model, batch) for other batch layouts."
            )
        inputs, targets = batch
        return criterion(_call(model, inputs), targets)

    loss_fn.criterion = criterion  # type: ignore[attr-defined]
    return loss_fn


def as_batch_loss(loss: Any, reduction: str | None = None) -> BatchLoss:
    """Normalise a loss argument to the batch-loss convention.

    An ``nn.Module`` loss (subclass of ``torch.nn.modules.loss._Loss``) is wrapped
    with :func:`supervised`; any other callable is taken to be ``loss_fn(model, batch)``.

    Args:
        loss: the loss argument.
        reduction: the reduction the caller's mathematics assumes (``"mean"`` for a
            batch mean, whose batches are then weighted by :func:`batch_weight`). An nn loss
            module with another reduction is refused: a ``"sum"`` loss would pass
            every shape check and silently scale and misweight the result.

    Example:
        >>> as_batch_loss(nn.MSELoss(reduction="sum"), reduction="mean")
        Traceback (most recent call last):
        ...
        ValueError: loss_fn: MSELoss(reduction='sum') returns a sum; this needs reduction='mean' (the mean loss of a batch)
    """
    if isinstance(loss, nn.modules.loss._Loss):
        have = getattr(loss, "reduction", None)
        if reduction is not None and have is not None and have != reduction:
            what = {"mean": "the mean loss of a batch", "none": "one loss per example"}
            raise ValueError(
                f"loss_fn: {type(loss).__name__}(reduction={have!r}) returns "
                f"{'a sum' if have == 'sum' else what.get(have, repr(have))}; this needs "
                f"reduction={reduction!r} ({what.get(reduction, reduction)})"
            )
        return supervised(loss)
    if not callable(loss):
        raise TypeError(
            f"loss_fn: expected a callable loss_fn(model, batch) or an nn loss module, "
            f"got {type(loss).__name__}"
        )
    return loss


def _first_tensor(batch: Any) -> torch.Tensor | None:
    leaves, _ = tree_flatten(batch)
    return next((t for t in leaves if isinstance(t, torch.Tensor)), None)


def batch_size(batch: Any) -> int:
    """Number of examples in ``batch``: the leading dimension of its first tensor.

    Example:
        >>> batch_size((torch.zeros(5, 3), torch.zeros(5)))
        5
    """
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(
            f"batch: cannot find a tensor with a leading example dimension in {type(batch).__name__}"
        )
    return int(t.shape[0])


def batch_weight(loss_fn: Any, batch: Any) -> float:
    """The weight of ``batch`` in a mean over batches of ``loss_fn``'s batch means.

    A loss that knows its normalisation (a ``batch_weight(batch)`` method, like
    ``sharpkit.hf.HFLoss``) gives it (the number of target tokens for a token
    mean); any other loss weighs a batch by its number of examples
    (:func:`batch_size`, an integer). With these weights ``w_b``,
    ``sum_b w_b L_b / sum_b w_b`` is the loss of all the data as one batch.

    Example:
        >>> batch = (torch.zeros(3, 2), torch.zeros(3))
        >>> batch_weight(lambda m, b: 0.0, batch)
        3
    """
    own = getattr(loss_fn, "batch_weight", None)
    if callable(own):
        return float(own(batch))
    return batch_size(batch)


def example_weights(loss_fn: Any, batch: Any) -> torch.Tensor | None:
    """Each example's weight in ``loss_fn``'s batch mean, or ``None`` for equal weights.

    A loss with an ``example_weights(batch)`` method (``sharpkit.hf.HFLoss``:
    the number of target tokens of each sequence) gives ``w`` of shape ``(n,)``
    and its mean loss is ``sum_i w_i l_i / sum_i w_i`` with ``l_i`` its
    per-example losses; any other loss weighs examples equally (``None``, so that
    callers keep a plain ``mean()``).

    Example:
        >>> example_weights(lambda m, b: 0.0, torch.zeros(4, 2)) is None
        True
    """
    own = getattr(loss_fn, "example_weights", None)
    if not callable(own):
        return None
    w = own(batch)
    if not isinstance(w, torch.Tensor) or w.shape != (batch_size(batch),):
        raise ValueError(
            f"loss_fn: example_weights(batch) must return one weight per example, shape "
            f"({batch_size(batch)},); got {getattr(w, 'shape', type(w).__name__)}"
        )
    return w


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """``values.mean()`` (``weights=None``) or ``sum_i w_i v_i / sum_i w_i`` (differentiable).

    Example:
        >>> weighted_mean(torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0]))
        tensor(1.5000)
    """
    if weights is None:
        return values.mean()
    w = weights.to(device=values.device, dtype=values.dtype)
    return (values * w).sum() / w.sum()


def weighting(loss_fn: Any, batches: Iterable[Any]) -> str:
    """What ``loss_fn`` averages over in ``batches``: ``"tokens"`` or ``"examples"``.

    Read from a ``normalisation_of(batch)`` method (``sharpkit.hf.HFLoss``);
    ``"custom"`` for a loss with its own ``batch_weight`` but no such method;
    ``"examples"`` for any other loss (batches of several kinds give both names,
    comma-separated). Measurements record it in their protocol.

    Example:
        >>> weighting(lambda m, b: 0.0, [torch.zeros(2)])
        'examples'
    """
    own = getattr(loss_fn, "normalisation_of", None)
    if not callable(own):
        return "custom" if callable(getattr(loss_fn, "batch_weight", None)) else "examples"
    return ", ".join(sorted({str(own(b)) for b in batches}))


def _is_single_batch(data: Any) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, Mapping):
        return any(isinstance(v, torch.Tensor) for v in data.values())
    if isinstance(data, (tuple, list)):
        return len(data) > 0 and all(isinstance(v, torch.Tensor) for v in data)
    return False


def iter_batches(data: Any) -> Iterator[Any]:
    """Iterate over ``data``: one batch, or an iterable of batches.

    A tensor, or a tuple/list/dict of tensors, is one batch; anything else
    iterable (a ``DataLoader``, a list of ``(x, y)`` tuples) yields batches.
    """
    if _is_single_batch(data):
        yield data
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data: expected a batch or an iterable of batches, got {type(data).__name__}"
        )
    yield from data


def move_batch(
    batch: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Any:
    """Move every tensor of ``batch`` to ``device``; cast floating tensors to ``dtype``.

    Example:
        >>> move_batch({"x": torch.zeros(2), "y": torch.zeros(2, dtype=torch.long)}, dtype=torch.float64)
        {'x': tensor([0., 0.], dtype=torch.float64), 'y': tensor([0, 0])}
    """

    def move(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device) if device is not None else t

    leaves, rebuild = tree_flatten(batch)
    return rebuild([move(t) for t in leaves])


def split_batch(batch: Any, parts: int) -> list[Any]:
    """Split ``batch`` along the example dimension into ``parts`` disjoint pieces.

    Sizes follow :func:`torch.tensor_split`: they differ by at most one, the first
    ``n % parts`` pieces taking one extra example. Non-tensor leaves are shared.

    Example:
        >>> [batch_size(b) for b in split_batch((torch.zeros(10, 2), torch.zeros(10)), 4)]
        [3, 3, 2, 2]
    """
    n = batch_size(batch)
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts: expected a positive integer, got {parts!r}")
    if parts > n:
        raise ValueError(
            f"parts: cannot split a batch of {n} examples into {parts} non-empty pieces"
        )

    leaves, rebuild = tree_flatten(batch)
    pieces = [
        torch.tensor_split(x, parts)
        if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == n
        else [x] * parts
        for x in leaves
    ]
    return [rebuild([p[i] for p in pieces]) for i in range(parts)]
