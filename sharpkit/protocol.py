"""How a number was measured, and its conversion to plain JSON.

Every measurement in sharpkit (curvature estimates, sharpness metrics, landscapes,
experiments) records *how* it was measured in a :class:`MeasurementProtocol` (the
data and how it was weighted, dtype, device, seed, estimator, number of products
and library version) and converts to plain JSON with :func:`to_jsonable`. Writing the files is
:mod:`sharpkit.io`'s business; this module does no I/O, so the measuring packages
do not depend on it.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MeasurementProtocol", "to_jsonable"]


def _version() -> str:
    from sharpkit import __version__

    return __version__


@dataclasses.dataclass
class MeasurementProtocol:
    """How a number was measured.

    Attributes:
        estimator: what produced it (e.g. ``"lanczos"``, ``"hutchinson"``).
        examples: number of examples the operator or metric averaged over.
        batches: number of batches.
        weighting: how batches (and examples) were weighted in the means:
            ``"examples"`` (by their number of examples, the mean of a per-example
            loss) or ``"tokens"`` (by their number of target tokens, the mean of a
            token-mean loss such as a language model's; the total is
            ``extra["tokens"]``) or ``"custom"`` (by the loss's own
            ``batch_weight``), see :func:`sharpkit._batch.batch_weight`.
        mode: module mode during measurement (``"eval"`` or ``"train"``).
        dtype: floating dtype of the computation.
        device: device it ran on.
        seed: the seed of the random generator, if any.
        matvecs: Hessian-vector products (or other operator applications) used.
        extra: anything else that decides the number (budgets, tolerances...).
        version: the sharpkit version.

    Example:
        >>> p = MeasurementProtocol(estimator="hutchinson", examples=64, seed=0)
        >>> to_jsonable(p)["estimator"]
        'hutchinson'
    """

    estimator: str
    examples: int | None = None
    batches: int | None = None
    weighting: str | None = None
    mode: str | None = None
    dtype: str | None = None
    device: str | None = None
    seed: int | None = None
    matvecs: int | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    version: str = dataclasses.field(default_factory=_version)


def to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` to JSON-compatible Python objects.

    Handles dataclasses, mappings, sequences, tensors, NumPy arrays and scalars,
    paths, dtypes, devices and enums. Non-finite floats become the strings
    ``"nan"``, ``"inf"`` and ``"-inf"`` (JSON has no such numbers).

    Example:
        >>> to_jsonable({"a": torch.tensor([1.0, float("nan")]), "b": np.int64(3)})
        {'a': [1.0, 'nan'], 'b': 3}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        if math.isnan(x):
            return "nan"
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, enum.Enum):
        return to_jsonable(obj.value)
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    raise TypeError(f"to_jsonable: cannot convert {type(obj).__name__} to JSON")
