"""Results carry their protocol and serialise to JSON.

Every measurement in sharpkit (curvature estimates, sharpness metrics,
experiments) records *how* it was measured in a :class:`MeasurementProtocol`
and converts to plain JSON with :func:`to_jsonable`. Files are written
atomically (:func:`write_json_atomic`): a crash mid-write never leaves a
half-written result that a rerun would trust.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["MeasurementProtocol", "read_json", "to_jsonable", "write_json_atomic"]


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


def ordinary_permissions(path: str | Path) -> None:
    """Give a file made by :func:`tempfile.mkstemp` (mode 0600) the mode a plain
    ``open(path, "w")`` would have given it (0666 less the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def writable_file(path: Any) -> Path:
    """``path`` as a :class:`Path` whose folder exists, or a ``ValueError`` naming why not
    (a directory at the path, a file where a folder must be)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: {str(path)!r} is a directory")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"path: cannot write {str(path)!r}: {str(parent)!r} is a file")
            break
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json_atomic(path: str | Path, obj: Any, *, indent: int = 2) -> Path:
    """Write ``to_jsonable(obj)`` to ``path`` atomically (temp file + rename)."""
    path = writable_file(path)
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_json(path: str | Path) -> Any:
    """Read a JSON file written by :func:`write_json_atomic`."""
    return json.loads(Path(path).read_text())
