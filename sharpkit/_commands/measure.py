"""``sharpkit measure``: the sharpness profile of a trained checkpoint.

Usage::

    sharpkit measure --demo [--out DIR]                # trains a small MLP on digits
    sharpkit measure CHECKPOINT --model SPEC --data SPEC [--loss cross_entropy|mse|SPEC]
                     [--accuracy SPEC] [--metrics NAME,NAME|all] [--set METRIC.KEY=VALUE ...]
                     [--device cpu|cuda] [--dtype float32|float64] [--batch-size N]
                     [--max-batches N] [--seed N] [--threads N] [--out DIR] [--overwrite]
                     [--no-landscape] [--no-progress]
    sharpkit measure CKPT_1 CKPT_2 ... --model SPEC --data SPEC    # series over training
    sharpkit measure MODEL_DIR --data SPEC             # a save_pretrained directory
    sharpkit measure ADAPTER_DIR [--base MODEL_DIR] --data SPEC    # a PEFT adapter on its base

``SPEC`` is ``module:callable`` or ``path/to/file.py:callable`` (the current folder
is on the import path, as with ``python -m``). The model and data callables are
called without arguments. The model callable returns an ``nn.Module``; the data
callable returns a DataLoader (or any iterable of batches, read up to
``--max-batches``), a torch Dataset, or an ``(inputs, targets)`` pair of tensors.
``--loss`` and ``--accuracy`` take either the function itself,
``loss_fn(model, batch)`` / ``accuracy_fn(model, batch)``, or a zero-argument
factory returning one (an nn loss class such as ``torch.nn:CrossEntropyLoss`` is one). Built-in data: ``digits`` (the training
split of scikit-learn's bundled digits, the demo's data) and ``digits-test``.
Checkpoints are ``.safetensors`` or torch state dicts (loaded with
``weights_only=True``; pickles that need code are refused).

A CHECKPOINT may instead be a Hugging Face ``save_pretrained`` directory
(``config.json`` and ``model.safetensors``), taken without ``--model``: the model
is built from its configuration (the transformers class its ``architectures``
names, offline) and its weights read with safetensors only (a
``pytorch_model.bin`` is refused, never unpickled). Or a PEFT adapter directory
(``adapter_config.json`` and ``adapter_model.safetensors``) on top of its base: the
``--base`` directory, else the configuration's ``base_model_name_or_path`` when
it is a local directory (a hub name is refused: nothing is downloaded); the
metrics are then taken over the adapter's parameters, the base held fixed. For
such directories ``--loss`` defaults to ``hf`` with the task of the model class
(causal LM, token or sequence classification) and ``--accuracy`` to the matching
arg-max accuracy; everything else defaults to ``cross_entropy``. See
:mod:`sharpkit.io.pretrained`.

Output in ``--out`` (default ``sharpkit-out/measure``): the table on stdout,
``report.json`` and figures ``esd.png``, ``landscape_1d.png``,
``landscape_2d.png`` (and ``trajectory_pca.png`` for the demo); in series mode
``series.json``, ``series.csv`` and ``series.png``. A series reads each
checkpoint's step from the end of its file name (``ckpt_100``, ``step-100``,
``epoch3``; not ``gpt2_lora``); without a step in every name, the order given.

Every file is written to a staging folder and moved into ``--out`` when the whole
measurement is done; an interrupted or failed run leaves nothing behind. The
report records its configuration (inputs, metrics, options, seed, dtype, version)
and a key of it; a folder that holds a result of another configuration is refused
(pick another ``--out``, or ``--overwrite``).

The demo runs with one CPU thread (``--threads`` changes it): its 2410-parameter
model gains nothing from intra-op threads, and on a busy machine the threads'
synchronisation made it up to ten times slower.

Under ``torchrun --nproc-per-node N -m sharpkit measure ...`` (any launcher that
sets ``WORLD_SIZE`` > 1, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
every rank initialises the process group (gloo on the CPU; NCCL with ``--device
cuda``, each rank on its ``LOCAL_RANK`` device), takes a contiguous share of the
batches and measures with ``process_group`` (see
:func:`sharpkit.sharpness.measure_sharpness`): the report is that of one process,
with the world size recorded. Rank 0 alone prints, draws the figures (over all
the data) and writes ``--out``; the other ranks write nothing. A rank that fails
exits, and the others fail at their next collective instead of waiting (at most
``--dist-timeout`` seconds).

Exit codes: 0 measured; 1 the measurement failed (a metric that failed is recorded
in the report, the others are kept); 2 bad input (a one-line reason on stderr,
before any compute): unknown metric or option, an option out of range, a metric
that cannot run with the loss or data, unloadable spec, missing, unreadable,
corrupt or unsafe checkpoint, key/shape/dtype mismatch, non-finite weights, an
``--out`` that is a file, unwritable or holds another configuration's result;
130 interrupted (Ctrl-C: one line, no partial files).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BadInput", "load_spec", "register", "run"]


class BadInput(ValueError):
    """Input that ``sharpkit measure`` refuses (exit code 2)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from sharpkit.sharpness import DEFAULT_METRICS
    from sharpkit.sharpness._registry import describe_metrics

    p = subparsers.add_parser(
        "measure",
        help="measure the sharpness of a trained checkpoint (try --demo)",
        description="Sharpness metrics, curvature and loss landscapes of a checkpoint.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit codes: 0 measured; 1 the measurement failed (failed metrics are recorded, "
        "the others kept); 2 bad input (a one-line reason on stderr, before any compute); "
        "130 interrupted (nothing written).\n\n"
        f"metrics (default: {','.join(DEFAULT_METRICS)}) and their options "
        "(--set METRIC.KEY=VALUE, shown with defaults):\n" + describe_metrics(),
    )
    p.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="one or more checkpoint files (with --model), save_pretrained directories or "
        "PEFT adapter directories (without --model)",
    )
    p.add_argument("--demo", action="store_true", help="train and measure the built-in demo")
    p.add_argument("--model", help="module:callable or file.py:callable returning the nn.Module")
    p.add_argument(
        "--base",
        help="the base model's save_pretrained directory of a PEFT adapter directory "
        "(default: the adapter's base_model_name_or_path, when a local directory)",
    )
    p.add_argument("--data", help="'digits', 'digits-test', or module:callable / file.py:callable")
    p.add_argument(
        "--loss",
        default=None,
        help="cross_entropy (the default for checkpoint files), mse, hf (the default for "
        "save_pretrained and adapter directories: the loss a Hugging Face model computes "
        "from dict batches with labels; accuracy then defaults to its arg-max accuracy), "
        "or a spec of loss_fn(model, batch) or of a zero-argument factory returning a "
        "loss (e.g. torch.nn:CrossEntropyLoss)",
    )
    p.add_argument(
        "--accuracy",
        default=None,
        help="spec of accuracy_fn(model, batch) -> scalar (or a zero-argument factory of one) "
        "for the base accuracy and pac_bayes; default: arg-max accuracy on (inputs, targets)",
    )
    p.add_argument(
        "--metrics",
        default="default",
        help="comma list of metric names (see below), 'default' or 'all'",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METRIC.KEY=VALUE",
        help="override a metric option, e.g. worst_case.rho=0.1 (repeatable; checked "
        "against the options below before any compute)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64"),
        help="compute dtype of the model copy the metrics run on (default float32)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="examples per batch when --data gives tensors or a Dataset (default 256)",
    )
    p.add_argument(
        "--max-batches",
        type=int,
        default=1000,
        help="read at most this many batches from --data (default 1000; a longer or "
        "endless iterable is cut there, with a note)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of every stochastic metric (default 0)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default: the cores the 1-minute load average leaves "
        "idle, at least 1 and at most torch's choice, since threads that wait on a core "
        "held by another process stall every parallel region; 1 for --demo, whose tiny "
        "model only loses to thread synchronisation)",
    )
    p.add_argument(
        "--hvp",
        default="auto",
        choices=("auto", "rev-rev", "fwd-rev", "linearize"),
        help="Hessian-vector products: auto (cached double backward), or linearize (a "
        "torch.func trace per batch: faster products on CNNs and transformers, more "
        "memory; not with --loss mse, which crashes torch 2.13's tracer)",
    )
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        help="under torchrun: seconds a rank waits in a collective for the others before "
        "it fails (default 600)",
    )
    p.add_argument("--out", type=Path, default=Path("sharpkit-out/measure"), help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a result of another configuration in --out (refused otherwise)",
    )
    p.add_argument("--no-landscape", action="store_true", help="skip the landscape figures")
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (they are off anyway when stderr is not a terminal)",
    )
    p.set_defaults(func=run)


# -- specs ----------------------------------------------------------------------------
def load_spec(spec: str, what: str) -> Callable[..., Any]:
    """Resolve ``module:callable`` or ``path.py:callable`` to the callable."""
    if ":" not in spec:
        raise BadInput(f"--{what}: expected 'module:callable' or 'file.py:callable', got {spec!r}")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target)
        if not path.is_file():
            raise BadInput(f"--{what}: no such file {target!r}")
        name = f"_sharpkit_spec_{abs(hash(str(path.resolve())))}"
        mod_spec = importlib.util.spec_from_file_location(name, path)
        if mod_spec is None or mod_spec.loader is None:
            raise BadInput(f"--{what}: cannot import {target!r}")
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:
            raise BadInput(f"--{what}: importing {target!r} failed: {err}") from None
    else:
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:  # as `python -m` would have it
            sys.path.insert(0, cwd)
        try:
            module = importlib.import_module(target)
        except Exception as err:
            raise BadInput(f"--{what}: cannot import module {target!r}: {err}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise BadInput(f"--{what}: {target!r} has no callable {attr!r}")
    return fn


def _builtin_digits(split: str, batch_size: int) -> list[Any]:
    from sharpkit.demo import demo_data

    d = demo_data(0)
    x, y = (d.x_train, d.y_train) if split == "train" else (d.x_test, d.y_test)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def _load_data(spec: str, batch_size: int, max_batches: int) -> list[Any]:
    """The batches of ``--data``, materialised (an iterable is read once, bounded)."""
    import torch

    if spec == "digits":
        return _builtin_digits("train", batch_size)
    if spec == "digits-test":
        return _builtin_digits("test", batch_size)
    try:
        obj = load_spec(spec, "data")()
    except BadInput:
        raise
    except Exception as err:
        raise BadInput(f"--data: calling {spec!r} failed: {_line(err)}") from None
    if (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
    ):
        x, y = obj
        if len(x) != len(y):
            raise BadInput(f"--data: {spec!r} gave {len(x)} inputs but {len(y)} targets")
        obj = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    elif isinstance(obj, torch.utils.data.Dataset) and not isinstance(
        obj, torch.utils.data.IterableDataset
    ):
        obj = torch.utils.data.DataLoader(obj, batch_size=batch_size, shuffle=False)
    elif isinstance(obj, (torch.Tensor, str, bytes, dict)) or not hasattr(obj, "__iter__"):
        raise BadInput(
            f"--data: {spec!r} returned {type(obj).__name__}; expected a DataLoader, an iterable "
            "of batches, a Dataset or an (inputs, targets) pair"
        )
    try:
        batches = list(itertools.islice(iter(obj), max_batches + 1))
    except Exception as err:
        raise BadInput(f"--data: iterating {spec!r} failed: {_line(err)}") from None
    if not batches:
        raise BadInput(f"--data: {spec!r} gave no batches")
    if len(batches) > max_batches:
        batches = batches[:max_batches]
        print(
            f"note: --data {spec!r} gives more than {max_batches} batches; measuring the first "
            f"{max_batches} (--max-batches)",
            file=sys.stderr,
        )
    return batches


def _line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _required_positional(fn: Any) -> int | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty)


def _function_or_factory(spec: str, what: str) -> Any:
    """A ``fn(model, batch)`` spec itself, or what its zero-argument factory returns."""
    fn = load_spec(spec, what)
    if isinstance(fn, type) or _required_positional(fn) == 0:
        try:
            return fn()
        except Exception as err:
            raise BadInput(f"--{what}: calling {spec!r} failed: {_line(err)}") from None
    if _required_positional(fn) not in (None, 2):
        raise BadInput(
            f"--{what}: {spec!r} takes {_required_positional(fn)} arguments; expected "
            f"{what}_fn(model, batch) or a zero-argument factory returning one"
        )
    return fn


def _load_loss(spec: str, task: str = "auto") -> Any:
    from torch import nn

    if spec == "cross_entropy":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    if spec == "hf":  # models that compute their loss from dict batches with labels
        from sharpkit.hf import HFLoss

        return HFLoss(task)
    loss = _function_or_factory(spec, "loss")
    from sharpkit._batch import as_batch_loss

    try:
        as_batch_loss(loss, reduction="mean")
    except (TypeError, ValueError) as err:
        raise BadInput(f"--loss: {spec!r} returned an unusable loss: {err}") from None
    return loss


def _load_accuracy(spec: str | None) -> Any:
    if spec is None:
        return None
    fn = _function_or_factory(spec, "accuracy")
    if not callable(fn):
        raise BadInput(f"--accuracy: {spec!r} gave {type(fn).__name__}, not a function")
    return fn


def _parse_metrics(text: str) -> list[str]:
    from sharpkit.sharpness import DEFAULT_METRICS, METRICS

    if text == "default":
        return list(DEFAULT_METRICS)
    if text == "all":
        return list(METRICS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in METRICS]
    if unknown or not names:
        raise BadInput(f"--metrics: unknown {unknown or text!r}; known: {', '.join(METRICS)}")
    return names


def _parse_overrides(items: list[str], metrics: list[str]) -> dict[str, dict[str, Any]]:
    """``--set METRIC.KEY=VALUE`` items, checked against the metric registry."""
    from sharpkit.sharpness._registry import resolve_options

    given: dict[str, dict[str, Any]] = {}
    for item in items:
        m = re.fullmatch(r"([A-Za-z_]\w*)\.([A-Za-z_]\w*)=(.+)", item.strip())
        if not m:
            raise BadInput(f"--set: expected METRIC.KEY=VALUE, got {item!r}")
        metric, key, raw = m.groups()
        if key in given.get(metric, {}):
            raise BadInput(f"--set: {metric}.{key} given twice")
        given.setdefault(metric, {})[key] = raw.strip()
    try:
        resolved = resolve_options(metrics, given, from_text=True, where="--set")
    except ValueError as err:
        raise BadInput(str(err)) from None
    return {m: {k: resolved[m][k] for k in keys} for m, keys in given.items()}


def _make_model(spec: str) -> Any:
    from torch import nn

    try:
        model = load_spec(spec, "model")()
    except BadInput:
        raise
    except Exception as err:
        raise BadInput(f"--model: calling {spec!r} failed: {_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model: {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_into(model_spec: str, path: str) -> Any:
    """The ``--model`` module with the checkpoint file loaded (a PEFT model also takes
    its adapter file, ``adapter_model.safetensors``)."""
    from sharpkit.io import CheckpointError, load_state_dict
    from sharpkit.io.checkpoint import load_state_into

    model = _make_model(model_spec)
    try:
        state = load_state_dict(path)
        if hasattr(model, "peft_config"):
            from sharpkit.io.pretrained import is_adapter_state, load_adapter_state

            if is_adapter_state(model, state):
                return load_adapter_state(model, state, path)
        return load_state_into(model, state, path)
    except CheckpointError as err:
        raise BadInput(str(err)) from None


def _sources(args: Any) -> list[Any]:
    """Each CHECKPOINT: a file path (loaded into ``--model``) or, for a directory, the
    :class:`~sharpkit.io.pretrained.Pretrained` it holds, checked from its files alone."""
    from sharpkit.io import CheckpointError
    from sharpkit.io.pretrained import ADAPTER_CONFIG, is_pretrained_dir, read_pretrained

    out: list[Any] = []
    for c in args.checkpoints:
        path = Path(c)
        if not path.is_dir() or (args.model and not is_pretrained_dir(path)):
            out.append(c)  # a checkpoint file for --model (which refuses a directory)
            continue
        base = args.base if (path / ADAPTER_CONFIG).is_file() else None
        try:
            out.append(read_pretrained(path, base=base))
        except CheckpointError as err:
            raise BadInput(str(err)) from None
    dirs = [s for s in out if not isinstance(s, str)]
    if dirs and args.model:
        raise BadInput(
            f"--model: not used with the directory {str(dirs[0].path)!r} (its model is built "
            "from its config.json); leave --model out, or give a checkpoint file"
        )
    if len(dirs) < len(out) and not args.model:
        raise BadInput(
            "--model: required with a CHECKPOINT file (module:callable or file.py:callable); "
            "a save_pretrained or PEFT adapter directory needs none"
        )
    if args.base is not None and not any(s.kind == "adapter" for s in dirs):
        raise BadInput("--base: only used with a PEFT adapter directory (adapter_config.json)")
    return out


def _hf_task(sources: list[Any]) -> str:
    """The task of ``--loss hf``: the model class's, when every CHECKPOINT is a directory
    of one task; else ``auto`` (from the labels)."""
    from sharpkit.hf import task_of

    tasks = {task_of(s.architecture) for s in sources if not isinstance(s, str)}
    if len(tasks) == 1 and all(not isinstance(s, str) for s in sources):
        return tasks.pop()
    return "auto"


def _default_loss(sources: list[Any]) -> str:
    """``--loss`` when not given: ``hf`` for Hugging Face directories, else ``cross_entropy``."""
    if sources and all(not isinstance(s, str) for s in sources):
        return "hf"
    return "cross_entropy"


def _load_source(model_spec: str | None, source: Any) -> Any:
    """The model of one CHECKPOINT (see :func:`_sources`), loaded."""
    from sharpkit.io import CheckpointError
    from sharpkit.io.pretrained import load_pretrained

    if isinstance(source, str):
        assert model_spec is not None
        return _load_into(model_spec, source)
    try:
        return load_pretrained(source)
    except CheckpointError as err:
        raise BadInput(str(err)) from None


def _fingerprint(source: Any) -> dict[str, Any]:
    """What identifies a CHECKPOINT's contents: its file(s), paths, sizes and times."""

    def one(path: Path) -> dict[str, Any]:
        st = path.stat()
        return {"path": str(path.resolve()), "bytes": st.st_size, "mtime": st.st_mtime}

    if isinstance(source, str):
        return one(Path(source))
    return {"path": str(source.path.resolve()), "files": [one(f) for f in source.files]}


#: a step at the end of a file name: ``ckpt_100``, ``step-100``, ``epoch3``, ``100``
#: (a digit glued to a word, as in ``gpt2`` or ``lora_v2``, is not a step)
_STEP = re.compile(r"(?:^|[_\-.]|step|epoch|iter|ckpt|checkpoint)[_\-]?(\d+)$", re.IGNORECASE)


def _step_of(path: str) -> int | None:
    m = _STEP.search(Path(path).stem)
    return int(m.group(1)) if m else None


def _steps(paths: list[str]) -> tuple[list[int], str]:
    """Steps from the file names when every name has a distinct one, else the order."""
    found = [_step_of(p) for p in paths]
    if all(s is not None for s in found) and len(set(found)) == len(found):
        return [int(s) for s in found if s is not None], "file name"
    return list(range(len(paths))), "order given"


# -- several processes (torchrun) -------------------------------------------------------
def _init_distributed(args: Any) -> Any:
    """The process group ``torchrun``'s environment describes (``WORLD_SIZE`` > 1), or
    ``None`` in one process (:func:`sharpkit.distributed.init_from_environment`; a CUDA
    ``--device`` becomes this rank's ``LOCAL_RANK`` device)."""
    from sharpkit.distributed import init_from_environment

    try:
        group, args.device_obj = init_from_environment(args.device_obj, args.dist_timeout)
    except ValueError as err:
        raise BadInput(str(err)) from None
    return group


def _writes(args: Any) -> bool:
    """Whether this process prints and writes the results: rank 0, or the only one."""
    from sharpkit.distributed import is_main_process

    group = getattr(args, "process_group", None)
    return group is None or is_main_process(group)


def _distributed_record(args: Any) -> dict[str, Any]:
    """The world the report was measured in (size 1 in one process)."""
    from sharpkit.distributed import world

    group = getattr(args, "process_group", None)
    if group is None:
        return {"world_size": 1, "backend": None}
    import torch.distributed as dist

    return {"world_size": world(group)[1], "backend": dist.get_backend(group)}


def _rank_share(data: list[Any], args: Any) -> list[Any]:
    """This rank's contiguous share of the batches (all of them in one process): the
    ranks' shares are the batches of one process, so the per-batch metrics see the
    same batches."""
    from sharpkit.distributed import world

    group = getattr(args, "process_group", None)
    if group is None:
        return data
    rank, size = world(group)
    if len(data) < size:
        raise BadInput(
            f"--data: {len(data)} batch(es) cannot be shared by {size} ranks; lower "
            "--batch-size or start fewer processes"
        )
    base, extra = divmod(len(data), size)
    start = rank * base + min(rank, extra)
    return data[start : start + base + (rank < extra)]


def _same_weights_on_every_rank(models: list[Any], args: Any) -> None:
    """Rank 0's weights and buffers on every rank (each rank loaded or trained its own
    copy; a broadcast rules out a rank measuring another model)."""
    from sharpkit.distributed import broadcast_from_first

    group = getattr(args, "process_group", None)
    if group is None:
        return
    for model in models:
        broadcast_from_first([*model.parameters(), *model.buffers()], group)


def _distributed(
    args: Any, loss: Any, accuracy: Any, data: Any, models: list[Any], out: Path
) -> int:
    """One rank's run under torchrun: rank 0 as in one process (staged into ``out``);
    the others measure their share, print nothing and write nothing. The process group
    is destroyed at the end, also after a failure."""
    import contextlib
    import io

    import torch.distributed as dist

    try:
        if _writes(args):
            return _staged(args, loss, accuracy, data, models, out, False)
        with tempfile.TemporaryDirectory() as stage, contextlib.redirect_stdout(io.StringIO()):
            code, _ = _measure(args, loss, accuracy, data, models, Path(stage), out, False)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -- figures -----------------------------------------------------------------------------
def _figures(
    report: Any, model: Any, loss: Any, data: Any, out: Path, args: Any, trajectory: Any
) -> list[str]:

    from sharpkit.landscape import (
        filter_normalized_direction,
        loss_surface_1d,
        loss_surface_2d,
        pca_directions,
    )
    from sharpkit.plotting._save import save_figure
    from sharpkit.plotting.landscape import plot_landscape_2d, plot_surface_1d, plot_surface_2d

    files: list[str] = []
    progress = not args.no_progress and sys.stderr.isatty()
    if "esd" in report.metrics:
        from sharpkit.plotting.curvature import plot_spectral_density

        ax = plot_spectral_density(report.metrics["esd"].details)
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_title("Hessian spectral density (SLQ)")
        files += [str(p) for p in save_figure(ax.figure, out, "esd", formats=("png",))]
    if args.no_landscape:
        return files
    kw = dict(device=args.device_obj, dtype=args.dtype_obj, progress=progress)
    # on one line: a warning about them (a fresh adapter's zero factor) is shown once
    d1, d2 = (filter_normalized_direction(model, seed=args.seed + i) for i in range(2))
    s1 = loss_surface_1d(model, loss, data, d1, steps=41, **kw)
    ax = plot_surface_1d(s1)
    ax.set_title("1-D loss (filter-normalised direction)")
    files += [str(p) for p in save_figure(ax.figure, out, "landscape_1d", formats=("png",))]
    s2 = loss_surface_2d(model, loss, data, [d1, d2], steps=21, **kw)
    fig = plot_landscape_2d(s2, title="2-D loss along two filter-normalised directions")
    files += [str(p) for p in save_figure(fig, out, "landscape_2d", formats=("png",))]
    surfaces = {"landscape_1d": s1.to_dict(), "landscape_2d": s2.to_dict()}
    if trajectory is not None:
        dirs, coords, explained = pca_directions(trajectory)
        pad = 0.2 * float((coords.max(0).values - coords.min(0).values).max())
        span = tuple(
            (float(coords[:, i].min()) - pad, float(coords[:, i].max()) + pad) for i in range(2)
        )
        s3 = loss_surface_2d(model, loss, data, dirs, steps=21, span=span, **kw)
        ax = plot_surface_2d(s3, trajectory=coords.numpy())
        ax.set_xlabel(f"PC1 ({100 * explained[0]:.0f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * explained[1]:.0f}%)")
        ax.set_title("training trajectory on the loss surface")
        files += [str(p) for p in save_figure(ax.figure, out, "trajectory_pca", formats=("png",))]
        surfaces["trajectory_pca"] = s3.to_dict() | {"trajectory": coords, "explained": explained}
    from sharpkit.io import write_json_atomic

    write_json_atomic(out / "landscape.json", surfaces)
    files.append(str(out / "landscape.json"))
    return files


# -- the command -------------------------------------------------------------------------
#: files a measurement writes into --out (a folder holding one of them holds a result)
_RESULTS = ("report.json", "series.json")


def _check_out(out: Path) -> None:
    """Refuse an --out that is a file or cannot be created or written, before compute."""
    if out.exists() and not out.is_dir():
        raise BadInput(f"--out: {str(out)!r} is a file, not a folder")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise BadInput(f"--out: cannot create {str(out)!r}: {str(probe)!r} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"--out: {str(probe)!r} is not writable")


def _config(args: Any) -> dict[str, Any]:
    """Everything that decides the numbers of this run (and the sharpkit version)."""
    from sharpkit import __version__

    return {
        "sharpkit": __version__,
        "demo": bool(args.demo),
        "checkpoints": [_fingerprint(s) for s in getattr(args, "sources", args.checkpoints)],
        "model": args.model,
        "data": args.data,
        "loss": args.loss,
        "accuracy": args.accuracy,
        "metrics": args.metric_names,
        "options": args.options,
        "seed": args.seed,
        "dtype": args.dtype,
        "device": str(args.device_obj),
        "batch_size": args.batch_size,
        "max_batches": args.max_batches,
        "hvp": args.hvp,
        "landscape": not args.no_landscape,
    }


def _config_key(config: dict[str, Any]) -> str:
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_not_another_config(out: Path, key: str, overwrite: bool) -> None:
    for name in _RESULTS:
        path = out / name
        if not path.exists():
            continue
        try:
            other = json.loads(path.read_text()).get("config_key")
        except (OSError, ValueError, AttributeError):
            other = None
        if other != key and not overwrite:
            what = f"configuration {other}" if other else "an unknown configuration"
            raise BadInput(
                f"--out: {str(out)!r} holds {name} of {what} (this run: {key}); choose another "
                "--out or pass --overwrite"
            )


def _cli_names(message: str, args: Any) -> str:
    """A library message in the command line's words (its argument names)."""
    for lib, cli in (
        ("hvp: ", f"--hvp {args.hvp}: "),
        ("loss_fn: ", "--loss: "),
        ("options: ", "--set: "),
        ("accuracy_fn: ", "--accuracy: "),
    ):
        if message.startswith(lib):
            return cli + message[len(lib) :]
    return message


def _data_label(args: Any) -> str:
    if args.demo or args.data == "digits":
        return "digits, train split"
    if args.data == "digits-test":
        return "digits, test split"
    return str(args.data)


def _validate(args: Any) -> tuple[Any, Any, list[Any], Any]:
    """Everything that can be refused, before compute: returns (loss, data, models, accuracy)."""
    import torch

    from sharpkit._device import resolve_device
    from sharpkit.sharpness.report import check_requirements

    try:
        args.device_obj = resolve_device(args.device)
    except ValueError as err:
        raise BadInput(f"--device: {err}") from None
    args.dtype_obj = torch.float64 if args.dtype == "float64" else torch.float32
    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads: expected a positive integer, got {args.threads}")
    if args.batch_size < 1:
        raise BadInput(f"--batch-size: expected a positive integer, got {args.batch_size}")
    if args.max_batches < 1:
        raise BadInput(f"--max-batches: expected a positive integer, got {args.max_batches}")
    if args.seed < 0:
        raise BadInput(f"--seed: expected a non-negative integer, got {args.seed}")
    args.metric_names = _parse_metrics(args.metrics)
    args.options = _parse_overrides(args.overrides, args.metric_names)
    _check_out(args.out)
    if args.demo:
        if args.checkpoints or args.model or args.data or args.accuracy or args.base:
            raise BadInput("--demo: takes no CHECKPOINT, --model, --base, --data or --accuracy")
        if args.loss not in (None, "cross_entropy"):
            raise BadInput("--demo: measures its classifier with cross_entropy; takes no --loss")
        args.loss, args.sources = "cross_entropy", []
        loss, data, models, accuracy = torch.nn.CrossEntropyLoss(), None, [], None
    else:
        if not args.checkpoints:
            raise BadInput(
                "give a CHECKPOINT (a file with --model, or a save_pretrained directory) and "
                "--data, or --demo"
            )
        args.sources = _sources(args)
        if not args.data:
            raise BadInput("--data: required with a CHECKPOINT ('digits' or a spec)")
        if args.loss is None:
            args.loss = _default_loss(args.sources)
        task = _hf_task(args.sources)
        loss = _load_loss(args.loss, task)
        accuracy = _load_accuracy(args.accuracy)
        if accuracy is None and args.loss == "hf":
            from sharpkit.hf import HFAccuracy

            # arg-max of the logits (token-level for language models)
            accuracy = HFAccuracy(task)
    from sharpkit.sharpness._registry import resolve_options

    resolved = resolve_options(args.metric_names, args.options)
    try:
        check_requirements(args.metric_names, resolved, loss, hvp=args.hvp)
    except (TypeError, ValueError) as err:
        raise BadInput(_cli_names(str(err), args)) from None
    if args.demo:
        return loss, data, models, accuracy
    data = _load_data(args.data, args.batch_size, args.max_batches)
    needs_acc = [m for m in args.metric_names if resolved[m].get("target") == "accuracy"]
    first = data[0]
    if (
        needs_acc
        and accuracy is None
        and not (isinstance(first, (tuple, list)) and len(first) == 2)
    ):
        raise BadInput(
            f"--accuracy: {', '.join(needs_acc)} needs an accuracy and the default expects "
            f"(inputs, targets) batches, but --data gives {type(first).__name__}; pass "
            "--accuracy SPEC, --set pac_bayes.target=loss, or leave pac_bayes out"
        )
    models = [_load_source(args.model, s) for s in args.sources]
    return loss, data, models, accuracy


def _print(report: Any, title: str, data: str) -> None:
    from rich.console import Console

    Console(width=120).print(report.table(title=title, data=data))


def _default_threads(requested: int | None, demo: bool, torch_default: int) -> int:
    """``--threads``, or the default: 1 for the demo (a 2410-parameter model only loses
    to thread synchronisation), else the cores the 1-minute load average leaves idle
    (at least 1, at most torch's own choice): intra-op threads that wait on a core held
    by another process stall every parallel region."""
    if requested is not None:
        return requested
    if demo:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    cores = cores or os.cpu_count() or 1
    idle = int(cores - os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else cores
    return max(1, min(torch_default, idle))


def run(args: argparse.Namespace) -> int:
    try:
        try:
            loss, data, models, accuracy = _validate(args)
            args.config = _config(args)
            args.config_key = _config_key(args.config)
            _check_not_another_config(args.out, args.config_key, args.overwrite)
            args.process_group = _init_distributed(args)
        except BadInput as err:
            print(f"sharpkit measure: error: {err}", file=sys.stderr)
            return 2
        out: Path = args.out
        progress = not args.no_progress and sys.stderr.isatty()
        import torch

        threads_before = torch.get_num_threads()
        torch.set_num_threads(_default_threads(args.threads, args.demo, threads_before))
        try:
            if args.process_group is not None:
                return _distributed(args, loss, accuracy, data, models, out)
            return _staged(args, loss, accuracy, data, models, out, progress)
        finally:
            torch.set_num_threads(threads_before)
    except KeyboardInterrupt:
        print("sharpkit measure: interrupted; nothing written", file=sys.stderr)
        return 130


def _staged(
    args: Any, loss: Any, accuracy: Any, data: Any, models: list[Any], out: Path, progress: bool
) -> int:
    """Run the measurement into a staging folder; move its files into ``out`` at the end."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".staging-"))
    try:
        code, written = _measure(args, loss, accuracy, data, models, stage, out, progress)
        if written:
            results = [p for p in stage.iterdir() if p.name in _RESULTS]
            for p in [q for q in stage.iterdir() if q not in results] + results:
                os.replace(p, out / p.name)  # the result files last
            print(f"wrote {out}")
        return code
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and out.exists() and not any(out.iterdir()):
            out.rmdir()


def _measure(
    args: Any,
    loss: Any,
    accuracy: Any,
    data: Any,
    models: list[Any],
    stage: Path,
    out: Path,
    progress: bool,
) -> tuple[int, bool]:
    import warnings

    from sharpkit.io import save_state_dict
    from sharpkit.sharpness import measure_sharpness

    t_start = time.perf_counter()
    label = _data_label(args)
    try:
        trajectory = None
        if args.demo:
            from sharpkit.demo import train_demo

            run_ = train_demo(seed=args.seed)
            model = run_.model
            x, y = run_.train
            data = [
                (x[i : i + args.batch_size], y[i : i + args.batch_size])
                for i in range(0, len(y), args.batch_size)
            ]
            models = [model]
            trajectory = run_.trajectory
            save_state_dict(model.state_dict(), stage / "demo_model.safetensors")
            ckpt = out / "demo_model.safetensors"
            print(
                f"demo: trained a 64-32-10 MLP on digits ({len(y)} training examples), "
                f"test accuracy {run_.test_accuracy:.3f}; saving {ckpt}"
            )
            args.checkpoints = [str(ckpt)]
        _same_weights_on_every_rank(models, args)
        share = _rank_share(data, args)
        reports = []
        for i, model in enumerate(models):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    rep = measure_sharpness(
                        model, loss, share, args.metric_names, options=args.options,
                        accuracy_fn=accuracy, seed=args.seed, device=args.device_obj,
                        dtype=args.dtype_obj, hvp=args.hvp, progress=progress,
                        process_group=getattr(args, "process_group", None),
                    )  # fmt: skip
                except (ValueError, TypeError) as err:  # refused before any metric ran
                    raise BadInput(_cli_names(str(err), args)) from None
            for w in caught:
                if "measure_sharpness:" in str(w.message):
                    print(f"warning: {w.message}", file=sys.stderr)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            reports.append(rep)
            if len(models) > 1:
                print(f"[{i + 1}/{len(models)}] {args.checkpoints[i]}: loss {rep.base['loss']:.4g}")
        keyed = {"config": args.config, "config_key": args.config_key}
        keyed["distributed"] = _distributed_record(args)
        if not _writes(args):  # another rank's: the report is rank 0's to write
            return 0, False
        if len(models) == 1:
            rep = reports[0]
            _print(rep, f"sharpness of {args.checkpoints[0]}", label)
            figures = _figures(rep, models[0], loss, data, stage, args, trajectory)
            doc = rep.to_dict() | {
                "checkpoint": args.checkpoints[0],
                "data": label,
                "figures": [str(out / Path(f).name) for f in figures],
                **keyed,
            }
            from sharpkit.io import write_json_atomic

            write_json_atomic(stage / "report.json", doc)
        else:
            _series(reports, args, stage, keyed)
    except BadInput as err:
        print(f"sharpkit measure: error: {_line(err)}", file=sys.stderr)
        return 2, False
    except Exception as err:
        print(
            f"sharpkit measure: measurement failed: {type(err).__name__}: {_line(err)}",
            file=sys.stderr,
        )
        return 1, False
    failed = sorted({n for r in reports for n in r.failures})
    if failed:
        print(
            f"sharpkit measure: {len(failed)} metric(s) failed ({', '.join(failed)}); the "
            "report keeps the others and records why",
            file=sys.stderr,
        )
    print(f"measured in {time.perf_counter() - t_start:.1f} s")
    return (1 if failed else 0), True


def _series(reports: list[Any], args: Any, stage: Path, keyed: dict[str, Any]) -> None:
    import math

    from rich.console import Console
    from rich.table import Table

    from sharpkit.io import write_json_atomic
    from sharpkit.plotting._save import save_figure
    from sharpkit.plotting.sharpness import plot_sharpness_series

    steps, source = _steps(args.checkpoints)
    if source != "file name":
        print(
            "note: series: not every checkpoint name ends in a distinct step (ckpt_100, "
            "step-100, epoch3); steps are the order given",
            file=sys.stderr,
        )
    names = list(args.metric_names)

    def value(r: Any, n: str) -> float:
        return r.metrics[n].value if n in r.metrics else math.nan

    table = Table(title="sharpness over training")
    table.add_column("checkpoint")
    table.add_column("step", justify="right")
    table.add_column("loss", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    rows = []
    for c, s, r in zip(args.checkpoints, steps, reports):
        vals = [value(r, n) for n in names]
        table.add_row(Path(c).name, str(s), f"{r.base['loss']:.4g}", *(f"{v:.4g}" for v in vals))
        rows.append([c, s, r.base["loss"], *vals])
    Console(width=160).print(table)
    write_json_atomic(
        stage / "series.json",
        {
            "checkpoints": args.checkpoints,
            "steps": steps,
            "step_source": source,
            "reports": [r.to_dict() for r in reports],
            **keyed,
        },
    )
    with open(stage / "series.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["checkpoint", "step", "loss", *names])
        writer.writerows(rows)
    fig = plot_sharpness_series(
        steps,
        {n: [value(r, n) for r in reports] for n in names},
        {n: [r.metrics[n].stderr if n in r.metrics else None for r in reports] for n in names},
        xlabel="step" if source == "file name" else "checkpoint (order given)",
    )
    save_figure(fig, stage, "series", formats=("png",))
