r"""Factor pairs with an exactly zero factor, and the warning for the metrics they break.

A fresh LoRA adapter starts with ``lora_B = 0`` (Hu et al., 2022; PEFT's
default), so the update ``B A`` is zero and the loss near it is degenerate for
every scale-relative perturbation:

- a **filter-normalised direction** (Li et al., 2018) scales each filter of the
  direction to the norm of the matching filter of ``w``: its ``B`` part is zero,
  and moving ``A`` alone does not change ``B A = 0``, so the landscape over the
  adapter is exactly flat;
- an **adaptive metric** perturbs ``w`` by ``c * u`` with ``c = |w|`` (ASAM-style
  adaptive sharpness, Kwon et al., 2021; Andriushchenko et al., 2023): ``B`` is
  not moved and the loss does not change, so the sharpness is zero (exactly,
  without an offset in ``c``).

Neither number says anything about the model; :func:`warn_zero_factors` says so.
What to do: measure after some training (``B != 0``), use the non-adaptive
metrics and random (not filter-normalised) directions, or measure in the space
of the merged weights ``W0 + B A`` (e.g. PEFT's ``merge_and_unload()``).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .pairs import FactorPair, find_pairs, pairs_from

__all__ = ["ZeroFactorWarning", "warn_zero_factors", "zero_factors"]


class ZeroFactorWarning(UserWarning):
    """A scale-relative measurement is degenerate because a LoRA factor is exactly zero."""


def _names(source: object) -> dict[int, str]:
    if isinstance(source, nn.Module):
        return {id(p): n for n, p in source.named_parameters(remove_duplicate=False)}
    return {}


def zero_factors(
    model_or_pairs: nn.Module | Iterable[FactorPair | tuple[torch.Tensor, torch.Tensor]],
) -> list[str]:
    """The factors that are exactly zero, by parameter name.

    Every factor pair of the model (:func:`~sharpkit.balance.find_pairs`,
    trainable pairs only) or of the given list is checked; a factor counts when
    all its entries are 0 (one fused pass, one host synchronisation). Names are
    the model's parameter names (for a list of pairs, ``"<pair>.x"`` /
    ``"<pair>.y"``).

    Args:
        model_or_pairs: a model, or a list of :class:`~sharpkit.balance.FactorPair`
            / ``(x, y)`` tuples.

    Returns:
        The names, in pair order (empty when no factor is zero or there is no pair).

    Example:
        >>> from sharpkit.balance import add_lora
        >>> net = add_lora(nn.Sequential(nn.Linear(3, 4)), ["0"], rank=2)
        >>> zero_factors(net)  # lora_B starts at zero
        ['0.lora_B']
        >>> _ = nn.init.ones_(net[0].lora_B)
        >>> zero_factors(net)
        []
    """
    if isinstance(model_or_pairs, nn.Module):
        pairs = find_pairs(model_or_pairs)
    else:
        pairs = pairs_from(model_or_pairs, "model_or_pairs")
    if not pairs:
        return []
    names = _names(model_or_pairs)
    tensors = [t for p in pairs for t in (p.x, p.y)]
    with torch.no_grad():
        norms = torch._foreach_norm([t.detach() for t in tensors], float("inf"))
        first = norms[0].device
        zero = torch.stack([(n == 0).to(first) for n in norms]).tolist()
    out = []
    for i, t in enumerate(tensors):
        if zero[i]:
            pair = pairs[i // 2]
            out.append(names.get(id(t), f"{pair.name}.{'xy'[i % 2]}"))
    return out


def warn_zero_factors(
    model_or_pairs: nn.Module | Iterable[FactorPair | tuple[torch.Tensor, torch.Tensor]],
    what: str,
    *,
    stacklevel: int = 2,
) -> list[str]:
    """Warn (:class:`ZeroFactorWarning`) when ``what`` is degenerate by a zero factor.

    Call it where a filter-normalised direction or an adaptive (``c = |w|``)
    perturbation is built, with the measured model (or its pairs).

    Args:
        model_or_pairs: as for :func:`zero_factors`.
        what: the measurement, for the message (e.g. ``"worst_case_adaptive"``).
        stacklevel: passed to :func:`warnings.warn`.

    Returns:
        :func:`zero_factors` of ``model_or_pairs``.

    Example:
        >>> import warnings
        >>> from sharpkit.balance import add_lora
        >>> net = add_lora(nn.Sequential(nn.Linear(3, 4)), ["0"], rank=2)
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     _ = warn_zero_factors(net, "filter-normalised direction")
        >>> print(str(caught[0].message).split(":")[0])
        filter-normalised direction is degenerate
    """
    if not isinstance(what, str) or not what:
        raise ValueError(f"what: expected a non-empty str, got {what!r}")
    zero = zero_factors(model_or_pairs)
    if zero:
        shown = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
        warnings.warn(
            f"{what} is degenerate: {len(zero)} LoRA factor(s) are exactly zero ({shown}), "
            "as in a fresh adapter (lora_B = 0). A scale-relative perturbation does not move "
            "a zero factor, and moving the other one leaves B A = 0, so the result is exactly "
            "flat (zero sharpness). Measure after training, use non-adaptive metrics and "
            "random directions, or measure the merged weights (PEFT merge_and_unload()).",
            ZeroFactorWarning,
            stacklevel=stacklevel,
        )
    return zero
