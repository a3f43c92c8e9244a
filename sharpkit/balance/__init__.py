"""Two-factor pairs, balancedness and its tracking (Li, Zhang, He, NeurIPS 2024).

- :class:`LoRALinear`, :func:`add_lora`: a minimal LoRA layer and injection.
- :class:`FactorPair`, :func:`find_pairs`: the factor pairs of a model
  (sharpkit's LoRA layers and PEFT's), shared with :class:`sharpkit.optim.BAR`.
- :func:`balancedness` ``B = (||x||^2 - ||y||^2) / 2`` and :func:`gradient_gap`
  ``||g_x||^2 - ||g_y||^2``.
- :class:`BalanceTracker`: records both per pair and step for any optimizer
  (tidy DataFrame, CSV, JSON).
- :func:`zero_factors`, :func:`warn_zero_factors`: factors that are exactly zero
  (fresh LoRA, ``lora_B = 0``), which make filter-normalised directions and
  adaptive metrics degenerate.
- :mod:`sharpkit.balance.toys`: the paper's NOP/OP toy problems.
- :mod:`sharpkit.balance.rules`: the BAR scaling rule and ``a_t`` schedules.
"""

from . import rules, toys
from .degenerate import ZeroFactorWarning, warn_zero_factors, zero_factors
from .lora import LoRALinear, add_lora
from .pairs import FactorPair, balancedness, find_pairs, gradient_gap
from .tracker import BalanceTracker

__all__ = [
    "BalanceTracker",
    "FactorPair",
    "LoRALinear",
    "ZeroFactorWarning",
    "add_lora",
    "balancedness",
    "find_pairs",
    "gradient_gap",
    "rules",
    "toys",
    "warn_zero_factors",
    "zero_factors",
]
