"""Two-factor pairs, balancedness and the gradient-norm gap.

Li, Zhang, He (NeurIPS 2024) study scale-invariant two-factor problems, where the
loss depends on two factors only through their product: NOP ``f(x y^T)`` (LoRA:
``W0 + B A``) and OP ``f(x^T y)``. Rescaling ``x -> c x``, ``y -> y / c`` leaves
the loss unchanged, and the quantity that tells the rescalings apart is the
**balancedness**

.. math::

    B = \\tfrac12 \\big(\\|x\\|_F^2 - \\|y\\|_F^2\\big).

Gradient flow conserves it (``dB/dt = <x, g_x> - <y, g_y> = 0``); SAM changes it
at the rate ``rho (||g_x||^2 - ||g_y||^2) / sqrt(||g_x||^2 + ||g_y||^2)`` on NOP
problems (Theorem 2), so the **gradient gap** ``||g_x||^2 - ||g_y||^2`` is the
signal that drives balancing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .lora import LoRALinear

__all__ = ["FactorPair", "balancedness", "find_pairs", "gradient_gap"]


@dataclass(frozen=True, eq=False)
class FactorPair:
    """Two factors whose product is what the loss sees.

    For LoRA, ``x = lora_B`` and ``y = lora_A`` (the update is ``x y``); that
    is a NOP problem. For OP problems ``f(x^T y)``, ``x`` and ``y`` have the
    same shape.

    Attributes:
        name: a label (the module path for discovered pairs).
        x: the first factor.
        y: the second factor.

    Example:
        >>> pair = FactorPair("toy", nn.Parameter(torch.ones(3)), nn.Parameter(torch.zeros(3)))
        >>> balancedness(pair)
        1.5
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise TypeError(f"name: expected a str, got {type(self.name).__name__}")
        for arg in ("x", "y"):
            if not isinstance(getattr(self, arg), torch.Tensor):
                raise TypeError(
                    f"{arg}: expected a tensor (nn.Parameter), got "
                    f"{type(getattr(self, arg)).__name__}"
                )
        if self.x is self.y:
            raise ValueError("x, y: the two factors must be different tensors")

    def __iter__(self):  # allows ``x, y = pair``
        return iter((self.x, self.y))


def _peft_pairs(name: str, module: nn.Module) -> list[FactorPair]:
    """PEFT's LoRA layers: ``lora_A``/``lora_B`` ModuleDicts keyed by adapter name
    (Linear and Conv layers) and ``lora_embedding_A``/``_B`` ParameterDicts."""
    out: list[FactorPair] = []
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if isinstance(a, nn.ModuleDict) and isinstance(b, nn.ModuleDict):
        for key in a.keys():
            if key in b and hasattr(a[key], "weight") and hasattr(b[key], "weight"):
                out.append(FactorPair(f"{name}.{key}", b[key].weight, a[key].weight))
    ea, eb = getattr(module, "lora_embedding_A", None), getattr(module, "lora_embedding_B", None)
    if isinstance(ea, nn.ParameterDict) and isinstance(eb, nn.ParameterDict):
        for key in ea.keys():
            if key in eb:
                out.append(FactorPair(f"{name}.{key}", eb[key], ea[key]))
    return out


def find_pairs(model: nn.Module, *, trainable_only: bool = True) -> list[FactorPair]:
    """Find every LoRA factor pair in ``model``.

    Recognises sharpkit's :class:`~sharpkit.balance.LoRALinear` (pair named by
    the module path) and PEFT's LoRA layers (``lora_A``/``lora_B`` per adapter,
    named ``"<module path>.<adapter>"``; PEFT itself is not imported). In every
    pair ``x`` is the B factor and ``y`` the A factor.

    Args:
        model: the model to search.
        trainable_only: keep only pairs whose two factors both require grad.

    Returns:
        The pairs, in module order (possibly empty).

    Example:
        >>> from sharpkit.balance import add_lora
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> [p.name for p in find_pairs(add_lora(net, ["0", "2"], rank=2))]
        ['0', '2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    pairs: list[FactorPair] = []
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            pairs.append(FactorPair(name, module.lora_B, module.lora_A))
        else:
            pairs.extend(_peft_pairs(name, module))
    if trainable_only:
        pairs = [p for p in pairs if p.x.requires_grad and p.y.requires_grad]
    return pairs


def _as_pair(pair: FactorPair | tuple[torch.Tensor, torch.Tensor]) -> FactorPair:
    if isinstance(pair, FactorPair):
        return pair
    if isinstance(pair, tuple) and len(pair) == 2:
        return FactorPair("pair", pair[0], pair[1])
    raise TypeError(f"pair: expected a FactorPair or an (x, y) tuple, got {type(pair).__name__}")


def _sq(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float64)) ** 2


def balancedness(pair: FactorPair | tuple[torch.Tensor, torch.Tensor]) -> float:
    """``B = (||x||_F^2 - ||y||_F^2) / 2``, computed in float64.

    Li, Zhang, He (NeurIPS 2024), Section 3: conserved by gradient flow on
    scale-invariant two-factor problems, driven towards 0 by SAM.

    Example:
        >>> balancedness((torch.tensor([3.0, 4.0]), torch.tensor([1.0, 0.0])))
        12.0
    """
    pair = _as_pair(pair)
    return float((_sq(pair.x) - _sq(pair.y)) / 2)


def gradient_gap(pair: FactorPair | tuple[torch.Tensor, torch.Tensor]) -> float:
    """``||g_x||^2 - ||g_y||^2`` from the gradients now in ``x.grad`` and ``y.grad``.

    SAM's balancing force on a NOP pair is
    ``rho * gap / sqrt(||g_x||^2 + ||g_y||^2)`` (Li, Zhang, He, NeurIPS 2024,
    Theorem 2). Computed in float64.

    Raises:
        ValueError: a factor has no gradient (call ``backward()`` first).

    Example:
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> y = torch.tensor([3.0, 1.0], requires_grad=True)
        >>> (x @ y).backward()  # g_x = y, g_y = x
        >>> gradient_gap((x, y))
        5.0
    """
    pair = _as_pair(pair)
    if pair.x.grad is None or pair.y.grad is None:
        raise ValueError(f"pair: {pair.name!r} has no gradient; call backward() first")
    return float(_sq(pair.x.grad) - _sq(pair.y.grad))


def pairs_from(
    source: nn.Module | Iterable[FactorPair | tuple[torch.Tensor, torch.Tensor]],
    argname: str = "pairs",
) -> list[FactorPair]:
    """Normalise a model (searched with :func:`find_pairs`) or a list of pairs."""
    if isinstance(source, nn.Module):
        return find_pairs(source)
    if isinstance(source, (str, bytes, torch.Tensor)):
        raise TypeError(f"{argname}: expected a model or a list of (x, y) pairs")
    try:
        items = list(source)
    except TypeError as err:
        raise TypeError(f"{argname}: expected a model or a list of (x, y) pairs") from err
    out = []
    for i, item in enumerate(items):
        if isinstance(item, FactorPair):
            out.append(item)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            out.append(FactorPair(f"pair{i}", item[0], item[1]))
        else:
            raise TypeError(
                f"{argname}: entry {i} is a {type(item).__name__}, expected a FactorPair "
                "or an (x, y) tuple"
            )
    return out
