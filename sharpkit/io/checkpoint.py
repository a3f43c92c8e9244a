"""Safe checkpoint loading: safetensors and torch state dicts, never arbitrary pickles.

- ``.safetensors`` files are read with :mod:`safetensors` (no code execution possible).
- Anything else is read with ``torch.load(..., weights_only=True)``: a pickle that
  needs to import or call arbitrary code is refused with :class:`CheckpointError`
  *before* any of that code runs.
- A state dict is checked against the model: missing and unexpected keys and shape
  mismatches are listed by name; non-finite weights are reported by name.

A checkpoint may be a bare state dict or a dict holding one under ``"state_dict"``,
``"model_state_dict"`` or ``"model"`` (the common training-loop layouts).
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointError",
    "check_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "nonfinite_entries",
    "save_state_dict",
]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model."""


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if (
                isinstance(inner, Mapping)
                and inner
                and all(isinstance(v, torch.Tensor) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path}: expected a state dict (name -> tensor), got {type(obj).__name__}"
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(bad[:10])}")
    return {str(k): v for k, v in obj.items()}


def load_state_dict(
    path: str | Path, *, map_location: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file or a torch file, safely.

    Args:
        path: the checkpoint file.
        map_location: where tensors are loaded (default CPU).

    Returns:
        ``{name: tensor}``.

    Raises:
        CheckpointError: missing file, unreadable file, a pickle that would run
            arbitrary code (refused, nothing executed), or not a state dict.

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> p = save_state_dict(nn.Linear(2, 1).state_dict(), os.path.join(d, "m.safetensors"))
        >>> sorted(load_state_dict(p))
        ['bias', 'weight']
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.suffix == _SAFETENSORS_SUFFIX:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return _unwrap(state, path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path}: refused: the file needs arbitrary code to load (torch.load with "
            f"weights_only=True rejected it: {first}). Only load files you trust; convert "
            "them to a plain state dict or safetensors first."
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({err})") from None
    return _unwrap(obj, path)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as safetensors (``.safetensors``) or with ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == _SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(path))
    else:
        torch.save({k: v.detach().cpu() for k, v in state.items()}, path)
    return path


def nonfinite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating entries that hold a NaN or an infinity.

    Example:
        >>> nonfinite_entries({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
        ['b']
    """
    return [
        k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Problems fitting ``state`` into ``model``: one line per kind, naming the keys.

    Returns an empty list when the keys and shapes match exactly.

    Example:
        >>> check_state_dict(nn.Linear(2, 1), {"weight": torch.zeros(1, 3)})
        ['missing keys: bias', 'shape mismatches: weight (checkpoint (1, 3), model (1, 2))']
    """
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    if shapes:
        problems.append("shape mismatches: " + ", ".join(shapes))
    return problems


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    allow_nonfinite: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strictly), safely.

    Args:
        model: the module to fill (modified in place and returned).
        path: a ``.safetensors`` or torch state-dict file.
        allow_nonfinite: load weights with NaN/inf instead of refusing.
        map_location: where tensors are read.

    Raises:
        CheckpointError: unsafe or unreadable file, key or shape mismatches (every
            offending key listed), or non-finite weights (listed) unless allowed.

    Example:
        >>> import tempfile, os
        >>> p = save_state_dict(nn.Linear(2, 1).state_dict(), os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> isinstance(load_checkpoint(nn.Linear(2, 1), p), nn.Linear)
        True
    """
    state = load_state_dict(path, map_location=map_location)
    problems = check_state_dict(model, state)
    if problems:
        raise CheckpointError(f"{path}: does not fit the model: " + "; ".join(problems))
    bad = nonfinite_entries(state)
    if bad and not allow_nonfinite:
        raise CheckpointError(f"{path}: non-finite weights (NaN or inf) in: {', '.join(bad)}")
    model.load_state_dict(state, strict=True)
    return model
