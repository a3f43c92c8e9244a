"""Safe checkpoint loading: safetensors and torch state dicts, never arbitrary pickles.

- ``.safetensors`` files are read with :mod:`safetensors` (no code execution possible).
- Anything else is read with ``torch.load(..., weights_only=True)``: a pickle that
  needs to import or call arbitrary code is refused with :class:`CheckpointError`
  *before* any of that code runs.
- A state dict is checked against the model: missing and unexpected keys, shape
  mismatches and dtype-family mismatches (a float checkpoint for an integer buffer,
  a complex tensor for a float weight...) are listed by name; non-finite weights
  are reported by name. Lists of names are capped (:data:`MAX_NAMES`).

Every failure is a :class:`CheckpointError` whose :attr:`~CheckpointError.kind` says
which of these it is:

========== ==========================================================================
kind       meaning
========== ==========================================================================
missing    no file at the path
unreadable the path exists but cannot be read (a directory, no permission, I/O error)
corrupt    not a valid safetensors/torch file (random bytes, truncated, damaged, or
           tensors torch cannot use here: meta, sparse, quantized, unknown storage)
unsafe     a well-formed pickle that would import or call code ``weights_only`` forbids
mismatched a valid state dict that does not fit the model (keys, shapes, dtype families)
nonfinite  weights holding NaN or infinity (refused unless ``allow_nonfinite``)
========== ==========================================================================

A checkpoint may be a bare state dict or a dict holding one under ``"state_dict"``,
``"model_state_dict"`` or ``"model"`` (the common training-loop layouts). Tied
weights (a model whose state dict holds one tensor under two names, as GPT-2's
``wte`` and ``lm_head``) save, and load from files that hold only one of the names.
"""

from __future__ import annotations

import builtins
import importlib.util
import os
import pickle
import re
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sharpkit.io.results import ordinary_permissions, writable_file

__all__ = [
    "KINDS",
    "MAX_NAMES",
    "CheckpointError",
    "check_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "load_state_into",
    "nonfinite_entries",
    "save_model",
    "save_state_dict",
    "state_problems",
]

_NESTED_KEYS = ("state_dict", "model_state_dict", "model")
_SAFETENSORS_SUFFIX = ".safetensors"
#: the kinds of :class:`CheckpointError`
KINDS = ("missing", "unreadable", "corrupt", "unsafe", "mismatched", "nonfinite")
#: at most this many names are listed in one message (then "... and N more")
MAX_NAMES = 8
_MAX_REASON = 200
# torch's weights_only unpickler names the global it refused; a well-formed dotted
# name is a pickle that asks for code, anything else is damage
_NAME = r"(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*"
_UNSAFE = re.compile(
    rf"Unsupported global: GLOBAL ({_NAME}) was not an allowed global"
    rf"|Trying to load unsupported GLOBAL ({_NAME}) whose module"
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit the model.

    Attributes:
        kind: one of :data:`KINDS`.
    """

    def __init__(self, kind: str, message: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
        super().__init__(message)
        self.kind = kind


def _names(names: Iterable[str], cap: int = MAX_NAMES) -> str:
    names = list(names)
    shown = [n if len(n) <= 80 else n[:77] + "..." for n in names[:cap]]
    more = f" ... and {len(names) - cap} more" if len(names) > cap else ""
    return ", ".join(shown) + more


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())  # one line
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _check_file(path: Path) -> None:
    try:
        exists = path.exists()
    except OSError as err:
        raise CheckpointError("unreadable", f"{path}: cannot stat ({_reason(err)})") from None
    if not exists:
        raise CheckpointError("missing", f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError("unreadable", f"{path}: not a regular file (a directory?)")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise CheckpointError("unreadable", f"{path}: cannot read ({_reason(err)})") from None


def _check_location(map_location: Any) -> None:
    try:
        dev = torch.device(map_location)
    except (RuntimeError, TypeError):
        raise ValueError(f"map_location: not a device: {map_location!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"map_location: {map_location!r}, but CUDA is not available")


def _tensor_problem(t: torch.Tensor) -> str | None:
    if t.is_meta:
        return "a meta tensor (no data)"
    if t.layout != torch.strided:
        return f"a {t.layout} tensor (only dense tensors load)"
    if t.is_quantized:
        return "a quantized tensor"
    return None


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
            "corrupt",
            f"{path}: corrupt: expected a state dict (name -> tensor), got {type(obj).__name__}",
        )
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            "corrupt", f"{path}: corrupt: entries that are not tensors: {_names(bad)}"
        )
    odd = [(str(k), why) for k, v in obj.items() if (why := _tensor_problem(v)) is not None]
    if odd:
        listed = _names(f"{k} ({why})" for k, why in odd)
        raise CheckpointError("corrupt", f"{path}: corrupt: unsupported tensors: {listed}")
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
        CheckpointError: ``kind`` ``"missing"``, ``"unreadable"``, ``"corrupt"`` or
            ``"unsafe"`` (a pickle that would run code: refused, nothing executed).

    Example:
        >>> import tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> p = save_state_dict(nn.Linear(2, 1).state_dict(), os.path.join(d, "m.safetensors"))
        >>> sorted(load_state_dict(p))
        ['bias', 'weight']
        >>> _ = open(os.path.join(d, "text.pt"), "w").write("hello")
        >>> load_state_dict(os.path.join(d, "text.pt"))
        Traceback (most recent call last):
        ...
        sharpkit.io.checkpoint.CheckpointError: ...text.pt: corrupt: not a readable torch checkpoint (KeyError: 101)
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    _check_location(map_location)
    _check_file(path)
    if path.suffix == _SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(map_location))
        except Exception as err:  # any failure of the parser is a damaged file
            raise CheckpointError(
                "corrupt", f"{path}: corrupt: not a readable safetensors file ({_reason(err)})"
            ) from None
        return _unwrap(state, path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        m = _UNSAFE.search(str(err))
        if m is None or not _exists(m.group(1) or m.group(2)):
            raise CheckpointError(
                "corrupt", f"{path}: corrupt: not a readable torch checkpoint ({_reason(err)})"
            ) from None
        raise CheckpointError(
            "unsafe",
            f"{path}: unsafe: refused: the file needs arbitrary code to load (it asks for "
            f"{m.group(1) or m.group(2)}, which torch.load(weights_only=True) does not "
            "allow; nothing was run). Only load files you trust; convert them to a plain "
            "state dict or safetensors first.",
        ) from None
    except MemoryError:
        raise CheckpointError(
            "corrupt", f"{path}: corrupt: declares more data than fits in memory"
        ) from None
    except Exception as err:  # damaged files raise anything from KeyError to struct.error
        raise CheckpointError(
            "corrupt", f"{path}: corrupt: not a readable torch checkpoint ({_reason(err)})"
        ) from None
    return _unwrap(obj, path)


def _exists(full: str) -> bool:
    """Whether the global a refused pickle names exists (a damaged name is corruption).

    Nothing new is imported: names are looked up in modules already loaded; a module
    not loaded yet is looked for by its top-level package only (no code runs).
    """
    parts = full.split(".")
    if len(parts) == 1:
        return hasattr(builtins, full)
    for i in range(len(parts) - 1, 0, -1):
        mod = sys.modules.get(".".join(parts[:i]))
        if mod is None:
            continue
        obj: Any = mod
        for j, attr in enumerate(parts[i:], start=i):
            nxt = getattr(obj, attr, None)
            if nxt is None:
                # perhaps a submodule not imported yet: its file must exist
                spec = getattr(obj, "__spec__", None)
                locs = getattr(spec, "submodule_search_locations", None) or []
                return j == len(parts) - 2 and any(
                    (Path(loc) / f"{attr}.py").is_file() or (Path(loc) / attr).is_dir()
                    for loc in locs
                )
            obj = nxt
        return True
    return importlib.util.find_spec(parts[0]) is not None


def _atomic_target(path: Any) -> tuple[Path, Path]:
    path = writable_file(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    return path, Path(tmp)


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | Path) -> Path:
    """Write a state dict as safetensors (``.safetensors``) or with ``torch.save``, atomically.

    Tensors that share memory (tied weights) are written once per name: safetensors
    stores a copy for each alias (it cannot store shared memory), ``torch.save``
    keeps the sharing. The file appears complete or not at all.

    Example:
        >>> import tempfile, os
        >>> lin = nn.Linear(2, 2)
        >>> tied = {"a": lin.weight, "b": lin.weight}
        >>> p = save_state_dict(tied, os.path.join(tempfile.mkdtemp(), "t.safetensors"))
        >>> sorted(load_state_dict(p))
        ['a', 'b']
    """
    if not isinstance(state, Mapping):
        raise TypeError(f"state: expected a mapping name -> tensor, got {type(state).__name__}")
    odd = []
    for k, v in state.items():
        why = _tensor_problem(v) if isinstance(v, torch.Tensor) else "not a tensor"
        if why is not None:
            odd.append(f"{k} ({why})")
    if odd:
        raise ValueError(f"state: cannot save {_names(odd)}")
    path, tmp = _atomic_target(path)
    try:
        if path.suffix == _SAFETENSORS_SUFFIX:
            from safetensors.torch import save_file

            seen: set[int] = set()
            out = {}
            for k, v in state.items():
                t = v.detach().cpu()
                ptr = t.untyped_storage().data_ptr() if t.numel() else None
                # safetensors refuses shared or overlapping memory: copy each alias
                t = t.clone() if ptr in seen else t.contiguous()
                if ptr is not None:
                    seen.add(ptr)
                out[k] = t
            save_file(out, str(tmp))
        else:
            torch.save({k: v.detach().cpu() for k, v in state.items()}, tmp)
        ordinary_permissions(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_model(model: nn.Module, path: str | Path) -> Path:
    """Write ``model.state_dict()`` (every name, tied weights included) to ``path``.

    The file loads strictly into the same architecture with :func:`load_checkpoint`.

    Example:
        >>> import tempfile, os
        >>> p = save_model(nn.Linear(2, 1), os.path.join(tempfile.mkdtemp(), "m.safetensors"))
        >>> isinstance(load_checkpoint(nn.Linear(2, 1), p), nn.Linear)
        True
    """
    return save_state_dict(model.state_dict(), path)


def nonfinite_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating entries that hold a NaN or an infinity.

    Example:
        >>> nonfinite_entries({"a": torch.ones(2), "b": torch.tensor([1.0, float("nan")])})
        ['b']
    """
    out = []
    for k, v in state.items():
        if v.is_floating_point() or v.is_complex():
            x = v.float() if v.dtype.itemsize == 1 else v  # float8 has no isfinite kernel
            if not bool(torch.isfinite(x).all()):
                out.append(k)
    return out


def _family(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "float8" if dtype.itemsize == 1 else "float"
    return "integer"


def _ties(model: nn.Module) -> dict[str, list[str]]:
    """name -> the other names of the model's state dict that hold the same tensor."""
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if v.numel():
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape))
            groups.setdefault(key, []).append(k)
    return {k: [o for o in g if o != k] for g in groups.values() if len(g) > 1 for k in g}


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Problems fitting ``state`` into ``model``: one line per kind, naming the keys.

    Returns an empty list when the keys, shapes and dtype families match. A key that
    the model ties to another (one tensor, two names) may be absent when the other
    is present. Each list of names is capped at :data:`MAX_NAMES`.

    Example:
        >>> check_state_dict(nn.Linear(2, 1), {"weight": torch.zeros(1, 3)})
        ['missing keys: bias', 'shape mismatches: weight (checkpoint (1, 3), model (1, 2))']
        >>> check_state_dict(nn.Linear(2, 1), {"weight": torch.zeros(1, 2, dtype=torch.long),
        ...                                    "bias": torch.zeros(1)})
        ['dtype mismatches: weight (checkpoint torch.int64, model torch.float32)']
    """
    return state_problems(model.state_dict(), state, _ties(model))


def state_problems(
    expected: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    ties: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """Problems fitting ``state`` where ``expected`` (name -> tensor) is wanted.

    What :func:`check_state_dict` checks, for any expected state (for example a
    PEFT model's adapter state): missing and unexpected keys, shapes and dtype
    families. ``ties`` maps a name to the other names holding the same tensor (a
    tied name may be absent when another is present).

    Example:
        >>> state_problems({"a": torch.zeros(2)}, {"a": torch.zeros(3), "b": torch.zeros(1)})
        ['unexpected keys: b', 'shape mismatches: a (checkpoint (3,), model (2,))']
    """
    ties = ties or {}
    problems = []
    missing = [
        k for k in expected if k not in state and not any(t in state for t in ties.get(k, []))
    ]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    dtypes = [
        f"{k} (checkpoint {state[k].dtype}, model {v.dtype})"
        for k, v in expected.items()
        if k in state and _family(state[k].dtype) != _family(v.dtype)
    ]
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_names(shapes)}")
    if dtypes:
        problems.append(f"dtype mismatches: {_names(dtypes)}")
    return problems


def load_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    allow_nonfinite: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (strictly), safely.

    Every check (file, keys, shapes, dtype families, finiteness) runs before anything
    is copied into ``model``.

    Args:
        model: the module to fill (modified in place and returned).
        path: a ``.safetensors`` or torch state-dict file.
        allow_nonfinite: load weights with NaN/inf instead of refusing.
        map_location: where tensors are read.

    Raises:
        CheckpointError: with :attr:`~CheckpointError.kind` one of :data:`KINDS`.

    Example:
        >>> import tempfile, os
        >>> p = save_state_dict(nn.Linear(2, 1).state_dict(), os.path.join(tempfile.mkdtemp(), "m.pt"))
        >>> isinstance(load_checkpoint(nn.Linear(2, 1), p), nn.Linear)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    state = load_state_dict(path, map_location=map_location)
    return load_state_into(model, state, path, allow_nonfinite=allow_nonfinite)


def load_state_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str | Path,
    *,
    allow_nonfinite: bool = False,
) -> nn.Module:
    """Load a state dict read from ``where`` into ``model``, strictly, after every check.

    The checks and the loading of :func:`load_checkpoint`, for a state already read
    (from several files, say); ``where`` names it in the messages.

    Raises:
        CheckpointError: ``kind`` ``"mismatched"`` or ``"nonfinite"``.

    Example:
        >>> load_state_into(nn.Linear(2, 1), {"weight": torch.zeros(1, 2)}, "w.safetensors")
        Traceback (most recent call last):
        ...
        sharpkit.io.checkpoint.CheckpointError: w.safetensors: mismatched: does not fit the model: missing keys: bias
    """
    problems = check_state_dict(model, state)
    if problems:
        raise CheckpointError(
            "mismatched", f"{where}: mismatched: does not fit the model: " + "; ".join(problems)
        )
    bad = nonfinite_entries(state)
    if bad and not allow_nonfinite:
        raise CheckpointError(
            "nonfinite", f"{where}: nonfinite: non-finite weights (NaN or inf) in: {_names(bad)}"
        )
    for k, others in _ties(model).items():  # a tied name the file left out
        if k not in state:
            state = {**state, k: state[next(o for o in others if o in state)]}
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. a copy torch cannot do
        raise CheckpointError(
            "mismatched", f"{where}: mismatched: torch could not load it ({_reason(err)})"
        ) from None
    return model
