"""``sharpkit measure``: the sharpness profile of a trained checkpoint.

Usage::

    sharpkit measure --demo [--out DIR]                # trains a small MLP on digits
    sharpkit measure CHECKPOINT --model SPEC --data SPEC [--loss cross_entropy|mse|SPEC]
                     [--metrics NAME,NAME|all] [--set METRIC.KEY=VALUE ...]
                     [--device cpu|cuda] [--dtype float32|float64] [--batch-size N]
                     [--seed N] [--threads N] [--out DIR] [--no-landscape] [--no-progress]
    sharpkit measure CKPT_1 CKPT_2 ... --model SPEC --data SPEC    # series over training

``SPEC`` is ``module:callable`` or ``path/to/file.py:callable``; the callable is
called without arguments. The model callable returns an ``nn.Module``; the data
callable returns a DataLoader (or any iterable of batches), a torch Dataset, or an
``(inputs, targets)`` pair of tensors. Built-in data: ``digits`` (the training
split of scikit-learn's bundled digits, the demo's data) and ``digits-test``.
Checkpoints are ``.safetensors`` or torch state dicts (loaded with
``weights_only=True``; pickles that need code are refused).

Output in ``--out`` (default ``sharpkit-out/measure``): the table on stdout,
``report.json`` and figures ``esd.png``, ``landscape_1d.png``,
``landscape_2d.png`` (and ``trajectory_pca.png`` for the demo); in series mode
``series.json``, ``series.csv`` and ``series.png``.

The demo runs with one CPU thread (``--threads`` changes it): its 2410-parameter
model gains nothing from intra-op threads, and on a busy machine the threads'
synchronisation made it up to ten times slower.

Exit codes: 0 measured; 1 the measurement failed; 2 bad input (a one-line reason
on stderr, before any compute): unknown metric, unloadable spec, missing or unsafe
checkpoint, key/shape mismatch, non-finite weights.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["BadInput", "load_spec", "register", "run"]


class BadInput(ValueError):
    """Input that ``sharpkit measure`` refuses (exit code 2)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "measure",
        help="measure the sharpness of a trained checkpoint (try --demo)",
        description="Sharpness metrics, curvature and loss landscapes of a checkpoint.",
        epilog="exit codes: 0 measured; 1 the measurement failed; 2 bad input (a one-line "
        "reason on stderr, before any compute). Metric names: sharpkit.sharpness.METRICS.",
    )
    p.add_argument("checkpoints", nargs="*", metavar="CHECKPOINT", help="one or more checkpoints")
    p.add_argument("--demo", action="store_true", help="train and measure the built-in demo")
    p.add_argument("--model", help="module:callable or file.py:callable returning the nn.Module")
    p.add_argument("--data", help="'digits', 'digits-test', or module:callable / file.py:callable")
    p.add_argument(
        "--loss", default="cross_entropy", help="cross_entropy (default), mse, or a spec"
    )
    p.add_argument("--metrics", default="default", help="comma list, 'default' or 'all'")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METRIC.KEY=VALUE",
        help="override a metric option, e.g. worst_case.rho=0.1 (repeatable)",
    )
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--batch-size", type=int, default=256, help="batch size for tensors/datasets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU intra-op threads (default: the cores the 1-minute load average leaves "
        "idle, at least 1 and at most torch's choice; 1 for --demo, whose tiny model only "
        "loses to thread synchronisation; on a busy 2-core machine 2 threads made 100 "
        "products on the demo model 23-33x slower than 1 thread, and on a 0.35M CNN 9-10x)",
    )
    p.add_argument(
        "--hvp",
        default="auto",
        choices=("auto", "rev-rev", "fwd-rev", "linearize"),
        help="Hessian-vector products: auto (cached double backward), or linearize (a "
        "torch.func trace per batch: faster products on CNNs and transformers, more "
        "memory; not with --loss mse, which crashes torch 2.13's tracer)",
    )
    p.add_argument("--out", type=Path, default=Path("sharpkit-out/measure"), help="output folder")
    p.add_argument("--no-landscape", action="store_true", help="skip the landscape figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
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


def _load_data(spec: str, batch_size: int) -> Any:
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
        raise BadInput(f"--data: calling {spec!r} failed: {err}") from None
    if (
        isinstance(obj, (tuple, list))
        and len(obj) == 2
        and all(isinstance(t, torch.Tensor) for t in obj)
    ):
        x, y = obj
        return [
            (x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)
        ]
    if isinstance(obj, torch.utils.data.Dataset) and not isinstance(
        obj, torch.utils.data.IterableDataset
    ):
        return torch.utils.data.DataLoader(obj, batch_size=batch_size, shuffle=False)
    if hasattr(obj, "__iter__"):
        return obj
    raise BadInput(
        f"--data: {spec!r} returned {type(obj).__name__}; expected a DataLoader, an iterable of "
        "batches, a Dataset or an (inputs, targets) pair"
    )


def _load_loss(spec: str) -> Any:
    from torch import nn

    if spec == "cross_entropy":
        return nn.CrossEntropyLoss()
    if spec == "mse":
        return nn.MSELoss()
    try:
        loss = load_spec(spec, "loss")()
    except BadInput:
        raise
    except Exception as err:
        raise BadInput(f"--loss: calling {spec!r} failed: {err}") from None
    from sharpkit._batch import as_batch_loss

    try:
        as_batch_loss(loss, reduction="mean")
    except (TypeError, ValueError) as err:
        raise BadInput(f"--loss: {spec!r} returned an unusable loss: {err}") from None
    return loss


def _check_hvp(hvp: str, loss: Any) -> None:
    from sharpkit.curvature.hessian import linearize_blocker

    if hvp == "linearize" and (why := linearize_blocker(loss)) is not None:
        raise BadInput(f"--hvp linearize: {why}")


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


def _parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    from sharpkit.sharpness import METRICS

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        m = re.fullmatch(r"([a-z_]+)\.([a-z_]+)=(.+)", item.strip())
        if not m:
            raise BadInput(f"--set: expected METRIC.KEY=VALUE, got {item!r}")
        metric, key, raw = m.groups()
        if metric not in METRICS:
            raise BadInput(f"--set: unknown metric {metric!r}")
        value: Any = raw
        for conv in (int, float):
            try:
                value = conv(raw)
                break
            except ValueError:
                continue
        out.setdefault(metric, {})[key] = value
    return out


def _make_model(spec: str) -> Any:
    from torch import nn

    try:
        model = load_spec(spec, "model")()
    except BadInput:
        raise
    except Exception as err:
        raise BadInput(f"--model: calling {spec!r} failed: {err}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"--model: {spec!r} returned {type(model).__name__}, not an nn.Module")
    return model


def _load_into(model_spec: str, path: str) -> Any:
    from sharpkit.io import CheckpointError, load_checkpoint

    model = _make_model(model_spec)
    try:
        return load_checkpoint(model, path)
    except CheckpointError as err:
        raise BadInput(str(err)) from None


def _step_of(path: str, index: int) -> int:
    nums = re.findall(r"\d+", Path(path).stem)
    return int(nums[-1]) if nums else index


# -- figures -----------------------------------------------------------------------------
def _figures(
    report: Any, model: Any, loss: Any, data: Any, out: Path, args: Any, trajectory: Any
) -> list[str]:
    import torch

    from sharpkit.landscape import (
        filter_normalized_direction,
        loss_surface_1d,
        loss_surface_2d,
        pca_directions,
    )
    from sharpkit.plotting._save import save_figure
    from sharpkit.plotting.landscape import plot_surface_1d, plot_surface_2d

    files: list[str] = []
    progress = not args.no_progress
    if "esd" in report.metrics:
        import matplotlib.pyplot as plt

        d = report.metrics["esd"].details
        fig, ax = plt.subplots(figsize=(5, 3.5))
        density = torch.tensor(d["density"])
        ax.semilogy(d["grid"], density.clamp_min(1e-12))
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_ylabel("density (SLQ)")
        ax.set_title("Hessian spectral density")
        files += [str(p) for p in save_figure(fig, out, "esd", formats=("png",))]
    if args.no_landscape:
        return files
    kw = dict(device=args.device_obj, dtype=args.dtype_obj, progress=progress)
    d1 = filter_normalized_direction(model, seed=args.seed)
    d2 = filter_normalized_direction(model, seed=args.seed + 1)
    s1 = loss_surface_1d(model, loss, data, d1, steps=41, **kw)
    ax = plot_surface_1d(s1)
    ax.set_title("1-D loss (filter-normalised direction)")
    files += [str(p) for p in save_figure(ax.figure, out, "landscape_1d", formats=("png",))]
    s2 = loss_surface_2d(model, loss, data, [d1, d2], steps=21, **kw)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    plot_surface_2d(s2, axes[0], filled=False, levels=15)
    plot_surface_2d(s2, axes[1], filled=True)
    fig.suptitle("2-D loss (filter-normalised directions)")
    fig.tight_layout()
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
def _validate(args: Any) -> tuple[Any, Any, list[Any], Any]:
    """Everything that can be refused, before compute: returns (loss, data, models, traj)."""
    import torch

    from sharpkit._device import resolve_device

    try:
        args.device_obj = resolve_device(args.device)
    except ValueError as err:
        raise BadInput(f"--device: {err}") from None
    args.dtype_obj = torch.float64 if args.dtype == "float64" else torch.float32
    if args.threads is not None and args.threads < 1:
        raise BadInput(f"--threads: expected a positive integer, got {args.threads}")
    if args.batch_size < 1:
        raise BadInput(f"--batch-size: expected a positive integer, got {args.batch_size}")
    args.metric_names = _parse_metrics(args.metrics)
    args.options = _parse_overrides(args.overrides)
    if args.demo:
        if args.checkpoints or args.model or args.data:
            raise BadInput("--demo: takes no CHECKPOINT, --model or --data")
        if args.loss != "cross_entropy":
            raise BadInput("--demo: measures its classifier with cross_entropy; takes no --loss")
        return None, None, [], None
    if not args.checkpoints:
        raise BadInput("give a CHECKPOINT (with --model and --data), or --demo")
    if not args.model:
        raise BadInput("--model: required with a CHECKPOINT (module:callable or file.py:callable)")
    if not args.data:
        raise BadInput("--data: required with a CHECKPOINT ('digits' or a spec)")
    loss = _load_loss(args.loss)
    _check_hvp(args.hvp, loss)
    data = _load_data(args.data, args.batch_size)
    models = [_load_into(args.model, c) for c in args.checkpoints]
    return loss, data, models, None


def _print(report: Any, title: str) -> None:
    from rich.console import Console

    Console(width=120).print(report.table(title=title))


def run(args: argparse.Namespace) -> int:
    try:
        loss, data, models, _ = _validate(args)
    except BadInput as err:
        print(f"sharpkit measure: error: {err}", file=sys.stderr)
        return 2
    out: Path = args.out
    progress = not args.no_progress
    import os

    import torch

    threads_before = torch.get_num_threads()
    threads = args.threads
    if threads is None and args.demo:
        threads = 1  # a 2410-parameter model only loses to thread synchronisation
    elif threads is None:
        # Intra-op threads that wait on a core held by another process stall every
        # parallel region: take only the cores the 1-minute load average leaves idle.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        cores = cores or os.cpu_count() or 1
        idle = int(cores - os.getloadavg()[0] + 0.5) if hasattr(os, "getloadavg") else cores
        threads = max(1, min(threads_before, idle))
    torch.set_num_threads(threads)
    try:
        return _measure(args, loss, data, models, out, progress)
    finally:
        torch.set_num_threads(threads_before)


def _measure(args: Any, loss: Any, data: Any, models: list[Any], out: Path, progress: bool) -> int:
    from sharpkit.io import save_state_dict, write_json_atomic
    from sharpkit.sharpness import measure_sharpness

    t_start = time.perf_counter()
    try:
        trajectory = None
        if args.demo:
            from torch import nn

            from sharpkit.demo import train_demo

            run_ = train_demo(seed=args.seed)
            model, loss = run_.model, nn.CrossEntropyLoss()
            x, y = run_.train
            data = [
                (x[i : i + args.batch_size], y[i : i + args.batch_size])
                for i in range(0, len(y), args.batch_size)
            ]
            models = [model]
            trajectory = run_.trajectory
            ckpt = save_state_dict(model.state_dict(), out / "demo_model.safetensors")
            print(
                f"demo: trained a 64-32-10 MLP on digits ({len(y)} training examples), "
                f"test accuracy {run_.test_accuracy:.3f}; saved {ckpt}"
            )
            args.checkpoints = [str(ckpt)]
        reports = []
        for i, model in enumerate(models):
            rep = measure_sharpness(
                model, loss, data, args.metric_names, options=args.options, seed=args.seed,
                device=args.device_obj, dtype=args.dtype_obj, hvp=args.hvp, progress=progress,
            )  # fmt: skip
            reports.append(rep)
            if len(models) > 1:
                print(f"[{i + 1}/{len(models)}] {args.checkpoints[i]}: loss {rep.base['loss']:.4g}")
        if len(models) == 1:
            rep = reports[0]
            _print(rep, f"sharpness of {args.checkpoints[0]}")
            figures = _figures(rep, models[0], loss, data, out, args, trajectory)
            doc = rep.to_dict() | {"checkpoint": args.checkpoints[0], "figures": figures}
            write_json_atomic(out / "report.json", doc)
        else:
            _series(reports, args, out)
    except Exception as err:
        print(f"sharpkit measure: measurement failed: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} in {time.perf_counter() - t_start:.1f} s")
    return 0


def _series(reports: list[Any], args: Any, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from sharpkit.io import write_json_atomic
    from sharpkit.plotting._save import save_figure
    from sharpkit.plotting.sharpness import plot_sharpness_series

    steps = [_step_of(c, i) for i, c in enumerate(args.checkpoints)]
    names = list(reports[0].metrics)
    table = Table(title="sharpness over training")
    table.add_column("checkpoint")
    table.add_column("step", justify="right")
    table.add_column("loss", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    rows = []
    for c, s, r in zip(args.checkpoints, steps, reports):
        vals = [r.metrics[n].value for n in names]
        table.add_row(Path(c).name, str(s), f"{r.base['loss']:.4g}", *(f"{v:.4g}" for v in vals))
        rows.append({"checkpoint": c, "step": s, "loss": r.base["loss"], **dict(zip(names, vals))})
    Console(width=160).print(table)
    write_json_atomic(
        out / "series.json",
        {
            "checkpoints": args.checkpoints,
            "steps": steps,
            "reports": [r.to_dict() for r in reports],
        },
    )
    header = ["checkpoint", "step", "loss", *names]
    lines = [",".join(header)] + [",".join(str(row[h]) for h in header) for row in rows]
    (out / "series.csv").write_text("\n".join(lines) + "\n")
    fig = plot_sharpness_series(
        steps,
        {n: [r.metrics[n].value for r in reports] for n in names},
        {n: [r.metrics[n].stderr for r in reports] for n in names},
        xlabel="step",
    )
    save_figure(fig, out, "series", formats=("png",))
