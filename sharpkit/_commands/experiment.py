"""``sharpkit experiment``: run the claim experiments.

Usage::

    sharpkit experiment list
    sharpkit experiment NAME [--scale test|small|large] [--device cpu|cuda] [--seeds N]
                             [--out DIR] [--force] [--set FIELD=VALUE ...]
    sharpkit experiment all  [--scale ...] [--out DIR] ...    # every experiment + CLAIMS.md

Results go to ``DIR/NAME/SCALE/KEY/``, one folder per config: ``KEY`` hashes the
full config (seed excluded) and the sharpkit version, and ``config.json`` beside
the results records both, so a run with another ``--set`` never overwrites or
mixes with an earlier one. The folder holds ``seedK.json`` (a rerun reuses a
seed only when its file matches config, seed and version and its content digest
checks out, unless ``--force``; the table then says which seeds were reused),
``summary.json`` and the figures (PNG, SVG). ``all`` also writes the claims
report ``DIR/CLAIMS-SCALE-KEY.md`` (``KEY`` of the set of configs). Every file is
written atomically.

Under ``torchrun --nproc-per-node R -m sharpkit experiment ...`` the seeds are shared
out over the ranks (gloo on CPU, NCCL with ``--device cuda``, each rank on its
``LOCAL_RANK`` device): each seed runs once, on one rank, and rank 0 prints, writes
the summary and figures and the claims report, equal to one process's.

Exit codes: 0 the experiments ran (whatever their verdicts); 2 bad usage, a bad
config or an ``--out`` that is a file or not writable (one line on stderr, before
any compute); 130 interrupted (Ctrl-C: one line; finished seeds are kept, no
partial file is left).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import sys
import typing
from pathlib import Path
from typing import Any

__all__ = ["parse_overrides", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run the experiments that test the papers' claims",
        description="Run one experiment, 'all' of them (with a claims report), or 'list' them.",
    )
    p.add_argument("name", help="experiment name, 'all', or 'list'")
    p.add_argument("--scale", default="small", choices=("test", "small", "large"))
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default: per scale)")
    p.add_argument(
        "--out", type=Path, default=Path("sharpkit-out/experiments"), help="output folder"
    )
    p.add_argument("--force", action="store_true", help="rerun seeds that already have results")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field (repeatable); tuples as comma lists",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--dist-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="under torchrun: seconds a rank waits for the others before failing",
    )
    p.set_defaults(func=run)


def _convert(value: str, hint: Any, default: Any) -> Any:
    origin = typing.get_origin(hint)
    if origin is tuple or isinstance(default, tuple):
        args = typing.get_args(hint)
        elem = args[0] if args else (type(default[0]) if default else float)
        return tuple(_convert(v.strip(), elem, None) for v in value.split(",") if v.strip())
    kind = hint if isinstance(hint, type) else type(default)
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {value!r}")
    if kind in (int, float, str):
        return kind(value)
    return value


def parse_overrides(config_cls: type, items: list[str]) -> dict[str, Any]:
    """Parse ``FIELD=VALUE`` strings into typed config overrides."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set: expected FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if key not in fields:
            raise ValueError(f"--set: unknown field {key!r}; fields: {sorted(fields)}")
        if key in ("seed", "device"):
            raise ValueError(f"--set: use --seeds/--device for {key!r}")
        f = fields[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        try:
            out[key] = _convert(value, hints.get(key), default)
        except ValueError as err:
            raise ValueError(f"--set {key}: {err}") from None
    return out


def _print_report(report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from sharpkit.experiments._core import ci_header, format_stat, provenance

    table = Table(title=f"{report.title} ({report.scale}, seeds {report.seeds})")
    table.add_column("quantity")
    table.add_column(ci_header(report.stats.values()))
    for k, s in report.stats.items():
        table.add_row(k, format_stat(s))
    console = Console()
    console.print(table)
    console.print(
        f"[bold]verdict: {report.verdict.label}[/bold]. {escape(report.verdict.statement)}"
    )
    console.print(escape(provenance(report)))
    console.print(f"results: {report.folder}")
    for f in report.figures:
        console.print(f"figure: {f}")


def run(args: argparse.Namespace) -> int:
    """Run the command; Ctrl-C ends it with one line and exit code 130."""
    try:
        return _run(args)
    except KeyboardInterrupt:
        print(
            f"sharpkit experiment: interrupted; finished seeds are kept under {args.out}",
            file=sys.stderr,
        )
        return 130


def _run(args: argparse.Namespace) -> int:
    from sharpkit._device import resolve_device
    from sharpkit.distributed import init_from_environment
    from sharpkit.experiments import EXPERIMENTS
    from sharpkit.experiments._core import check_out_dir

    if args.name == "list":
        for name, exp in EXPERIMENTS.items():
            print(f"{name:<18} {exp.title}")
        return 0
    names = list(EXPERIMENTS) if args.name == "all" else [args.name]
    try:
        for name in names:
            if name not in EXPERIMENTS:
                raise ValueError(
                    f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}, all, list"
                )
        device = str(resolve_device(args.device))
        if args.seeds is not None and args.seeds < 1:
            raise ValueError(f"--seeds: need at least 1, got {args.seeds}")
        plans = []
        for name in names:  # validate every config before any compute
            exp = EXPERIMENTS[name]
            overrides = parse_overrides(exp.config_cls, args.overrides) if args.overrides else {}
            exp.config(args.scale, device=device, **overrides)
            plans.append((exp, overrides))
        check_out_dir(args.out)
        # under torchrun: the seeds are shared out over the ranks; rank 0 reports
        group, _ = init_from_environment(resolve_device(args.device), args.dist_timeout)
    except ValueError as err:
        print(f"sharpkit experiment: {err}", file=sys.stderr)
        return 2
    try:
        return _run_plans(args, plans, device, group)
    finally:
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run_plans(args: argparse.Namespace, plans: list[Any], device: str, group: Any) -> int:
    from sharpkit.distributed import is_main_process
    from sharpkit.experiments import claims_report, run_experiment

    main = group is None or is_main_process(group)
    reports = []
    for exp, overrides in plans:
        report = run_experiment(
            exp,
            scale=args.scale,
            seeds=args.seeds,
            out_dir=args.out,
            force=args.force,
            progress=main and not args.no_progress,
            device=device,
            process_group=group,
            **overrides,
        )
        if main:
            _print_report(report)
        reports.append(report)
    if args.name == "all" and main:
        from sharpkit._device import describe_machine

        # named by the set of configs, so a run of other configs never overwrites it
        key = hashlib.sha256(" ".join(r.key for r in reports).encode()).hexdigest()[:12]
        path = claims_report(
            reports, args.out / f"CLAIMS-{args.scale}-{key}.md", machine=describe_machine(device)
        )
        print(f"claims report: {path}")
    return 0
