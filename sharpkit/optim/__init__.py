"""The SAM family as ``torch.optim`` optimizers.

All share one base (:class:`~sharpkit.optim.SAMBase` for the two-pass methods,
:class:`~sharpkit.optim.WrappedOptimizer` underneath it) and one contract,
tested for every optimizer in ``tests/optim/test_contract.py``.
"""

from ._base import BufferSnapshot, SAMBase, WrappedOptimizer, frozen_buffers
from .asam import ASAM
from .bar import BAR
from .delta_sam import DeltaSAM
from .msam import MSAM, VectorisationFallbackWarning
from .sam import SAM

__all__ = [
    "ASAM",
    "BAR",
    "MSAM",
    "SAM",
    "BufferSnapshot",
    "DeltaSAM",
    "SAMBase",
    "VectorisationFallbackWarning",
    "WrappedOptimizer",
    "frozen_buffers",
]
