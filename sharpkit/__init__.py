"""sharpkit: Sharpness-Aware Minimization, measured.

Sub-packages (imported on first use, so ``import sharpkit`` stays cheap):

- :mod:`sharpkit.optim`: SAM, ASAM and the SAM family as ``torch.optim`` optimizers.
- :mod:`sharpkit.curvature`: Hessian-vector-product operators and spectral estimators.
- :mod:`sharpkit.sharpness`: worst-case, average-case and PAC-Bayes flatness metrics.
- :mod:`sharpkit.landscape`: loss surfaces and checkpoint interpolation.
- :mod:`sharpkit.balance`: two-factor (LoRA) pairs, balancedness and trackers.
- :mod:`sharpkit.experiments`: the papers' claims as seeded, typed experiments.
- :mod:`sharpkit.testing`: dense float64 references for tests and teaching.

Example:
    >>> import sharpkit
    >>> sharpkit.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBPACKAGES = (
    "optim",
    "curvature",
    "sharpness",
    "landscape",
    "balance",
    "experiments",
    "plotting",
    "io",
    "testing",
    "data",
)

__all__ = ["__version__", *_SUBPACKAGES]


def __getattr__(name: str) -> Any:
    if name in _SUBPACKAGES:
        return importlib.import_module(f"sharpkit.{name}")
    raise AttributeError(f"module 'sharpkit' has no attribute {name!r}")
