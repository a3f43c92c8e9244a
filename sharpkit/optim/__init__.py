"""The SAM family as ``torch.optim`` optimizers, with one step contract.

Every optimizer here is stepped the same way,
``opt.step(closure)`` (where a closure can drive it) or
``opt.step(loss_fn=..., batch=...)`` (always, given ``model=``), and returns the
mean loss at ``w``. All share one base (:class:`~sharpkit.optim.SAMBase` for the
two-pass methods, :class:`~sharpkit.optim.WrappedOptimizer` underneath it) whose
step runs inside one transaction: weights, buffers and optimizer state are
restored if anything raises, and a non-finite value skips the whole step.
:func:`sharpkit.testing.check_optimizer` checks that contract on any optimizer.
"""

from ._base import BufferSnapshot, Oracle, SAMBase, WrappedOptimizer, frozen_buffers
from .asam import ASAM
from .bar import BAR
from .delta_sam import (
    DeltaSAM,
    ExampleStats,
    InverseNormWeights,
    UnguardednessSoftmax,
    UniformWeights,
    Weighting,
)
from .msam import MSAM, VectorisationFallbackWarning
from .sam import SAM

__all__ = [
    "ASAM",
    "BAR",
    "MSAM",
    "SAM",
    "BufferSnapshot",
    "DeltaSAM",
    "ExampleStats",
    "InverseNormWeights",
    "Oracle",
    "SAMBase",
    "UnguardednessSoftmax",
    "UniformWeights",
    "VectorisationFallbackWarning",
    "Weighting",
    "WrappedOptimizer",
    "frozen_buffers",
]
