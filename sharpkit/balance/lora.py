"""A minimal LoRA layer and in-place LoRA injection (Hu et al., 2022).

LoRA writes the update of a frozen weight ``W0`` as a product of two trainable
factors, ``W = W0 + (alpha / r) B A`` with ``B`` (out x r) and ``A`` (r x in).
That makes every LoRA layer a *non-overparametrised* (NOP) scale-invariant
two-factor problem in the sense of Li, Zhang, He (NeurIPS 2024): the loss depends
on ``x = B`` and ``y = A`` only through ``x y`` (see :mod:`sharpkit.balance`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["LoRALinear", "add_lora"]


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")
    return value


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha: expected a real number, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha: must be finite, got {alpha}")
    return float(alpha)


class LoRALinear(nn.Module):
    r"""A linear layer with a frozen base weight and a trainable low-rank update.

    .. math::

        h = W_0 x + b + \frac{\alpha}{r} \, B A x,
        \qquad A \in \mathbb{R}^{r \times d_{in}},\; B \in \mathbb{R}^{d_{out} \times r}.

    ``lora_A`` is initialised like PEFT (Kaiming-uniform, ``a = sqrt(5)``) and
    ``lora_B`` with zeros, so the layer starts equal to its base. ``base`` (weight
    and bias) is frozen; only ``lora_A`` and ``lora_B`` are trainable. As a factor
    pair for balancedness and BAR, ``x = lora_B`` and ``y = lora_A`` (their
    product is the update; a NOP problem, Li, Zhang, He, NeurIPS 2024).

    Args:
        in_features: input size (ignored when ``base`` is given, but must match).
        out_features: output size (likewise).
        rank: the LoRA rank ``r`` (> 0).
        alpha: the LoRA scale numerator; the update is multiplied by ``alpha / rank``.
        bias: whether a newly built base layer has a bias.
        base: an existing ``nn.Linear`` to wrap (its parameters are frozen in place).
        generator: random generator for every initialisation done here.
        dtype: dtype of newly created parameters (default: the base's, else torch's).
        device: device of newly created parameters (default: the base's).

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> layer = LoRALinear(4, 3, rank=2, alpha=4.0, generator=g)
        >>> [n for n, p in layer.named_parameters() if p.requires_grad]
        ['lora_A', 'lora_B']
        >>> x = torch.randn(5, 4, generator=g)
        >>> torch.equal(layer(x), layer.base(x))  # lora_B starts at zero
        True

    References:
        Hu et al. LoRA: Low-Rank Adaptation of Large Language Models. ICLR 2022.
        Li, Zhang, He. Implicit Regularization of Sharpness-Aware Minimization for
        Scale-Invariant Problems. NeurIPS 2024.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int = 8,
        alpha: float = 16.0,
        *,
        bias: bool = True,
        base: nn.Linear | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        in_features = _check_positive_int("in_features", in_features)
        out_features = _check_positive_int("out_features", out_features)
        self.rank = _check_positive_int("rank", rank)
        self.alpha = _check_alpha(alpha)
        if base is None:
            base = nn.Linear(in_features, out_features, bias=bias, dtype=dtype, device=device)
            # nn.Linear's own initialisation, drawn from ``generator``
            nn.init.kaiming_uniform_(base.weight, a=math.sqrt(5), generator=generator)
            if base.bias is not None:
                bound = 1.0 / math.sqrt(in_features)
                nn.init.uniform_(base.bias, -bound, bound, generator=generator)
        else:
            if not isinstance(base, nn.Linear):
                raise TypeError(f"base: expected an nn.Linear, got {type(base).__name__}")
            if (base.in_features, base.out_features) != (in_features, out_features):
                raise ValueError(
                    f"base: has shape ({base.out_features}, {base.in_features}), expected "
                    f"({out_features}, {in_features}) from out_features/in_features"
                )
        base.requires_grad_(False)
        self.base = base
        self.in_features = in_features
        self.out_features = out_features
        factory = {
            "dtype": dtype if dtype is not None else base.weight.dtype,
            "device": device if device is not None else base.weight.device,
        }
        self.lora_A = nn.Parameter(torch.empty(self.rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, self.rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)

    @property
    def scaling(self) -> float:
        """The factor ``alpha / rank`` in front of ``B A``."""
        return self.alpha / self.rank

    def delta_weight(self) -> torch.Tensor:
        """The update ``(alpha / rank) B A`` as a dense (out x in) matrix."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return self.base(x) + self.scaling * low

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, alpha={self.alpha}"
        )


def _matches(name: str, targets: list[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(
    model: nn.Module,
    target_modules: str | Iterable[str],
    rank: int = 8,
    alpha: float = 16.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Replace matching ``nn.Linear`` submodules by :class:`LoRALinear`, in place.

    A submodule matches a target when its qualified name equals it or ends with
    ``"." + target`` (so ``"fc1"`` matches ``"block.0.fc1"``), as in PEFT's
    ``LoraConfig(target_modules=[...])``. Every parameter of the model except
    the new ``lora_A`` / ``lora_B`` factors is frozen (``requires_grad=False``).

    Args:
        model: the model to modify.
        target_modules: a module name or a list of names.
        rank: LoRA rank of every new layer.
        alpha: LoRA alpha of every new layer.
        generator: random generator for the new ``lora_A`` factors.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: a matching module is not an ``nn.Linear``.
        ValueError: no module matches ``target_modules``.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> net = add_lora(net, ["0", "2"], rank=2, generator=torch.Generator().manual_seed(0))
        >>> sorted(n for n, p in net.named_parameters() if p.requires_grad)
        ['0.lora_A', '0.lora_B', '2.lora_A', '2.lora_B']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(target_modules, str):
        targets = [target_modules]
    else:
        try:
            targets = list(target_modules)
        except TypeError as err:
            raise TypeError("target_modules: expected a name or a list of names") from err
        if not all(isinstance(t, str) for t in targets):
            raise TypeError("target_modules: every entry must be a str")
    if not targets:
        raise ValueError("target_modules: empty")
    matched = [
        (name, mod)
        for name, mod in model.named_modules()
        if name and _matches(name, targets) and not isinstance(mod, LoRALinear)
    ]
    if not matched:
        raise ValueError(f"target_modules: no submodule of the model matches {targets}")
    for name, mod in matched:
        if not isinstance(mod, nn.Linear):
            raise TypeError(
                f"target_modules: {name!r} is a {type(mod).__name__}, only nn.Linear is supported"
            )
    for p in model.parameters():
        p.requires_grad_(False)
    for name, mod in matched:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        new = LoRALinear(
            mod.in_features,
            mod.out_features,
            rank,
            alpha,
            base=mod,
            generator=generator,
        )
        setattr(parent, child, new)
    return model
