"""Hugging Face ``save_pretrained`` directories and PEFT adapter directories, offline.

Two layouts are read, and nothing is ever downloaded or unpickled:

- a **model directory** (``model.save_pretrained(DIR)``): ``config.json`` and
  ``model.safetensors`` (or a sharded ``model.safetensors.index.json`` with its
  shards). The model is built from the configuration
  (``transformers.AutoConfig.from_pretrained(DIR, local_files_only=True)``; the
  class named in ``architectures``, which must be one of transformers' own: a
  configuration that needs the repository's code (``auto_map``) is refused) and
  its weights are read with safetensors only, then loaded strictly
  (:func:`~sharpkit.io.checkpoint.load_state_into`: every key, shape and dtype
  family checked first; tied weights such as GPT-2's ``wte`` / ``lm_head``,
  which ``save_pretrained`` writes once, are restored from the one name). A
  pickle checkpoint (``pytorch_model.bin``, ``*.pt``, ...) is refused without
  being opened.
- a **PEFT adapter directory** (``peft_model.save_pretrained(DIR)``):
  ``adapter_config.json`` and ``adapter_model.safetensors``, on top of a base
  model directory: ``base`` when given, else the configuration's
  ``base_model_name_or_path`` when that is a local directory (a hub name is
  refused: sharpkit never downloads). The base is loaded as above, the adapters
  are injected with PEFT (``get_peft_model``) and trainable (the parameters that
  fine-tuning trains, and that a measurement differentiates; the base stays
  frozen), and the file's tensors are checked against the adapter state PEFT
  would save for that model (keys without the adapter name, shapes, dtype
  families) before they are loaded with ``set_peft_model_state_dict``.

:func:`read_pretrained` checks everything that can be checked from the files
alone (layout, JSON, the architecture, the base) without building anything;
:func:`load_pretrained` builds and loads. Every failure is a
:class:`~sharpkit.io.checkpoint.CheckpointError` with a one-line message.

Example:
    >>> import tempfile
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> d = tempfile.mkdtemp()
    >>> cfg = GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8,
    ...                  bos_token_id=0, eos_token_id=0)
    >>> GPT2LMHeadModel(cfg).save_pretrained(d)
    >>> read_pretrained(d).architecture
    'GPT2LMHeadModel'
    >>> model = load_pretrained(d)
    >>> model.lm_head.weight is model.transformer.wte.weight  # tied, as built
    True

References:
    Wolf et al. Transformers: State-of-the-Art Natural Language Processing.
    EMNLP 2020 (system demonstrations). arXiv:1910.03771. Hu et al. LoRA:
    Low-Rank Adaptation of Large Language Models. ICLR 2022. arXiv:2106.09685.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import (
    CheckpointError,
    _names,
    _reason,
    load_state_dict,
    load_state_into,
    nonfinite_entries,
    state_problems,
)

__all__ = [
    "Pretrained",
    "is_adapter_state",
    "is_pretrained_dir",
    "load_adapter_state",
    "load_pretrained",
    "read_pretrained",
]

MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
_WEIGHTS = "model.safetensors"
_INDEX = "model.safetensors.index.json"
_ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: file endings of pickle checkpoints (refused without being opened)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class Pretrained:
    """What :func:`read_pretrained` found in a directory.

    Attributes:
        path: the directory.
        kind: ``"model"`` (a ``save_pretrained`` model) or ``"adapter"`` (PEFT).
        architecture: the transformers class that is built (the base's, for an
            adapter).
        weights: the safetensors files to read.
        base: for an adapter, the base model directory (a ``"model"``).
    """

    path: Path
    kind: str
    architecture: str
    weights: tuple[Path, ...]
    base: Pretrained | None = None

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file the loaded model depends on (configurations and weights, the
        base's included)."""
        config = self.path / (ADAPTER_CONFIG if self.kind == "adapter" else MODEL_CONFIG)
        own = (config, *self.weights)
        return own + (self.base.files if self.base is not None else ())


def is_pretrained_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding ``config.json`` or ``adapter_config.json``.

    Example:
        >>> import tempfile
        >>> is_pretrained_dir(tempfile.mkdtemp())
        False
    """
    p = Path(path)
    return p.is_dir() and ((p / MODEL_CONFIG).is_file() or (p / ADAPTER_CONFIG).is_file())


def _json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except OSError as err:
        raise CheckpointError("unreadable", f"{path}: cannot read ({_reason(err)})") from None
    except ValueError as err:
        raise CheckpointError(
            "corrupt", f"{path}: corrupt: not valid JSON ({_reason(err)})"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError("corrupt", f"{path}: corrupt: expected a JSON object")
    return obj


def _pickles(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())


def _no_weights(path: Path, what: str, expected: str) -> CheckpointError:
    """The error for a directory without safetensors weights: a pickle there is unsafe."""
    found = _pickles(path)
    if found:
        return CheckpointError(
            "unsafe",
            f"{path}: unsafe: refused: the {what} are a pickle ({_names(found)}), which "
            "sharpkit never unpickles; re-save with save_pretrained(DIR) (safetensors, the "
            "default)",
        )
    return CheckpointError("missing", f"{path}: no {what} ({expected})")


def _transformers_class(name: Any, where: Path) -> type:
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "unreadable",
            f"{where}: a Hugging Face directory needs transformers (pip install 'sharpkit[hf]')",
        ) from None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(
            "unreadable",
            f"{where}: architectures names {name!r}, which is not a transformers model class; "
            "build the model with --model SPEC (a module:callable) and load model.safetensors",
        )
    return cls


def _model_weights(path: Path) -> tuple[Path, ...]:
    if (path / _WEIGHTS).is_file():
        return (path / _WEIGHTS,)
    if (path / _INDEX).is_file():
        shards = _json(path / _INDEX).get("weight_map")
        if not isinstance(shards, dict) or not shards:
            raise CheckpointError("corrupt", f"{path / _INDEX}: corrupt: no weight_map")
        files = tuple(path / f for f in sorted(set(map(str, shards.values()))))
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError("missing", f"{path}: missing weight shards: {_names(absent)}")
        return files
    raise _no_weights(path, "model weights", _WEIGHTS)


def _local_base(adapter: Path, named: Any) -> Path:
    if named is None or named == "":
        raise CheckpointError(
            "missing",
            f"{adapter / ADAPTER_CONFIG}: names no base model (base_model_name_or_path is "
            "empty); give the base's save_pretrained directory (--base DIR)",
        )
    if not isinstance(named, str):
        raise CheckpointError("corrupt", f"{adapter}: corrupt: base_model_name_or_path {named!r}")
    for candidate in (Path(named), adapter / named):
        if candidate.is_dir():
            return candidate
    raise CheckpointError(
        "missing",
        f"{adapter}: base model {named!r} is not a local directory (a Hugging Face hub "
        "name?); sharpkit never downloads: save the base with save_pretrained and give "
        "that directory (--base DIR)",
    )


def read_pretrained(
    path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None
) -> Pretrained:
    """Check a model or adapter directory from its files alone, building nothing.

    Args:
        path: a ``save_pretrained`` model directory or a PEFT adapter directory.
        base: for an adapter, the base model directory (default: the adapter
            configuration's ``base_model_name_or_path``, when a local directory).

    Returns:
        A :class:`Pretrained`.

    Raises:
        CheckpointError: ``"missing"`` (no such directory, no configuration, no
            weights, a base that is not a local directory), ``"unsafe"`` (the
            weights are a pickle), ``"corrupt"`` (bad JSON), ``"unreadable"``
            (no transformers / peft, an architecture that is not transformers'
            own, a configuration that needs the repository's code).

    Example:
        >>> import tempfile
        >>> read_pretrained(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        sharpkit.io.checkpoint.CheckpointError: ...: neither config.json nor adapter_config.json: not a save_pretrained directory
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError("missing", f"{path}: no such directory")
    if (path / ADAPTER_CONFIG).is_file():
        cfg = _json(path / ADAPTER_CONFIG)
        if not isinstance(cfg.get("peft_type"), str):
            raise CheckpointError("corrupt", f"{path / ADAPTER_CONFIG}: corrupt: no peft_type")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise CheckpointError(
                "unreadable", f"{path}: a PEFT adapter needs peft (pip install 'sharpkit[hf]')"
            ) from None
        if not (path / _ADAPTER_WEIGHTS).is_file():
            raise _no_weights(path, "adapter weights", _ADAPTER_WEIGHTS)
        base_dir = Path(base) if base is not None else None
        if base_dir is not None and not base_dir.is_dir():
            raise CheckpointError("missing", f"{base_dir}: base: no such directory")
        base_dir = base_dir or _local_base(path, cfg.get("base_model_name_or_path"))
        if (base_dir / ADAPTER_CONFIG).is_file():
            raise CheckpointError(
                "unreadable", f"{base_dir}: the base of an adapter must be a model directory"
            )
        parent = read_pretrained(base_dir)
        return Pretrained(path, "adapter", parent.architecture, (path / _ADAPTER_WEIGHTS,), parent)
    if not (path / MODEL_CONFIG).is_file():
        raise CheckpointError(
            "missing",
            f"{path}: neither {MODEL_CONFIG} nor {ADAPTER_CONFIG}: not a save_pretrained directory",
        )
    if base is not None:
        raise CheckpointError("unreadable", f"{path}: base: only an adapter directory has a base")
    cfg = _json(path / MODEL_CONFIG)
    if cfg.get("auto_map"):
        raise CheckpointError(
            "unreadable",
            f"{path / MODEL_CONFIG}: needs the repository's own code (auto_map), which sharpkit "
            "never runs; build the model with --model SPEC",
        )
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and archs):
        raise CheckpointError(
            "unreadable",
            f"{path / MODEL_CONFIG}: names no architectures; build the model with --model SPEC",
        )
    _transformers_class(archs[0], path)
    return Pretrained(path, "model", archs[0], _model_weights(path))


def _build(info: Pretrained) -> nn.Module:
    import transformers

    cls = _transformers_class(info.architecture, info.path)
    try:
        config = transformers.AutoConfig.from_pretrained(str(info.path), local_files_only=True)
        model = cls(config)
    except Exception as err:
        raise CheckpointError(
            "unreadable", f"{info.path}: cannot build {info.architecture} ({_reason(err)})"
        ) from None
    state: dict[str, torch.Tensor] = {}
    for f in info.weights:
        state.update(load_state_dict(f))
    where = info.weights[0] if len(info.weights) == 1 else info.path
    return load_state_into(model, state, where).eval()


def _attach_adapter(info: Pretrained, base: nn.Module) -> nn.Module:
    import peft

    try:
        config = peft.PeftConfig.from_pretrained(str(info.path))
    except Exception as err:
        raise CheckpointError(
            "corrupt", f"{info.path / ADAPTER_CONFIG}: corrupt: {_reason(err)}"
        ) from None
    config.inference_mode = False  # the adapters are the measured (trainable) parameters
    try:
        model = peft.get_peft_model(base, config)
    except Exception as err:
        raise CheckpointError(
            "mismatched",
            f"{info.path}: mismatched: the adapter does not fit the base {info.architecture} "
            f"({_reason(err)})",
        ) from None
    (weights,) = info.weights
    return load_adapter_state(model, load_state_dict(weights), weights, base=info.base.path)


def is_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is a PEFT adapter file's state for the PEFT model ``model``:
    ``model`` has adapters and no key of ``state`` is one of ``model``'s own (an
    adapter file's keys carry no adapter name; a full state dict's do).

    Example:
        >>> is_adapter_state(nn.Linear(2, 2), {"weight": torch.zeros(2, 2)})
        False
    """
    return hasattr(model, "peft_config") and not set(state) & set(model.state_dict())


def load_adapter_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    where: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
) -> nn.Module:
    """Load a PEFT adapter file's tensors into the PEFT model ``model``, checked first.

    ``state`` has PEFT's saved layout (``adapter_model.safetensors``: keys without
    the adapter name). It is compared with the state PEFT would save for ``model``
    (its active adapter): missing and unexpected keys, shapes and dtype families
    are refused before anything is copied; then ``set_peft_model_state_dict``
    places it.

    Args:
        model: a PEFT model (``PeftModel``) with the adapter's configuration.
        state: the file's tensors (:func:`~sharpkit.io.load_state_dict`).
        where: the file, for messages.
        base: the base model's directory, for messages.

    Returns:
        ``model``, in eval mode.

    Raises:
        CheckpointError: ``"mismatched"`` or ``"nonfinite"``.
    """
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    adapter = getattr(model, "active_adapter", "default")
    expected = get_peft_model_state_dict(model, adapter_name=adapter)

    def short(d: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:  # readable names
        return {k.removeprefix("base_model.model."): v for k, v in d.items()}

    problems = state_problems(short(expected), short(state))
    if problems:
        on = f" {base}" if base is not None else ""
        raise CheckpointError(
            "mismatched",
            f"{where}: mismatched: the adapter does not fit the base{on}: " + "; ".join(problems),
        )
    bad = nonfinite_entries(state)
    if bad:
        raise CheckpointError(
            "nonfinite", f"{where}: nonfinite: non-finite weights (NaN or inf) in: {_names(bad)}"
        )
    result = set_peft_model_state_dict(model, dict(state), adapter_name=adapter)
    if result.unexpected_keys:
        raise CheckpointError(
            "mismatched",
            f"{where}: mismatched: PEFT did not place {_names(result.unexpected_keys)}",
        )
    return model.eval()


def load_pretrained(
    path: str | os.PathLike[str] | Pretrained, *, base: str | os.PathLike[str] | None = None
) -> nn.Module:
    """Build and load a ``save_pretrained`` model or a PEFT adapter on its base, offline.

    The global random state is left as it was (building a model draws its
    initial weights, which the checkpoint then replaces).

    Args:
        path: the directory, or what :func:`read_pretrained` returned for it.
        base: for an adapter, the base model directory (see :func:`read_pretrained`).

    Returns:
        The model in eval mode: the transformers model, or for an adapter the
        ``PeftModel`` whose adapter parameters are the trainable ones.

    Raises:
        CheckpointError: as :func:`read_pretrained`, and ``"mismatched"`` (keys,
            shapes or dtype families that do not fit), ``"nonfinite"``,
            ``"corrupt"`` (an unreadable safetensors file).

    Example:
        >>> import tempfile
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> d = tempfile.mkdtemp()
        >>> cfg = BertConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
        ...                  intermediate_size=16, vocab_size=16, max_position_embeddings=8)
        >>> BertForSequenceClassification(cfg).save_pretrained(d)
        >>> type(load_pretrained(d)).__name__
        'BertForSequenceClassification'
    """
    info = path if isinstance(path, Pretrained) else read_pretrained(path, base=base)
    with torch.random.fork_rng(devices=[]):
        if info.kind == "model":
            return _build(info)
        assert info.base is not None
        return _attach_adapter(info, _build(info.base))
