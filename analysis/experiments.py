"""Run the claim experiments and write their results, figures and claims report.

The one script that makes the experiment figures in ``figures/experiments/``:
per experiment ``figures/experiments/NAME/SCALE/KEY/`` holds the config
(``config.json``; ``KEY`` hashes it with the sharpkit version), the per-seed
results (``seedK.json``), the aggregate (``summary.json``) and the figures (PNG
and SVG). ``figures/experiments/CLAIMS-SCALE.md`` is the claims report (claim,
source, setting, numbers with 95% confidence intervals over seeds, the decision
rule and the verdict, figure), and ``figures/experiments/CLAIMS-table.md`` its
summary table with links into the report, for the README to include as it is.

Usage::

    python -m analysis.experiments                 # all, small scale (CPU)
    python -m analysis.experiments --scale large --device cuda
    python -m analysis.experiments theorem2 wen_sharpness --force
    python -m analysis.experiments --table-only    # CLAIMS-table.md from CLAIMS-small.md
                                                   # (and into README.md between its markers)

Finished seeds of the same config and version are reused on a rerun (unless
``--force``; the report says which); the same as ``sharpkit experiment all --out
figures/experiments``, with the report named by scale so the CPU and GPU reports
sit side by side.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sharpkit._device import describe_machine, resolve_device
from sharpkit.experiments import EXPERIMENTS, SCALES, claims_report, run_experiment
from sharpkit.experiments._core import _write_text

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "figures" / "experiments"


def table_from_report(report_path: Path, link: str) -> str:
    """The summary table at the top of a claims report, with its anchors prefixed by
    ``link`` (the report's path as seen from where the table is included)."""
    lines = report_path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| experiment |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    machine = next((line for line in lines[:start] if line.startswith("Measured on:")), "")
    table = [re.sub(r"\]\(#", f"]({link}#", line) for line in lines[start:end]]
    head = [f"{machine} Details: [{report_path.name}]({link}).", ""] if machine else []
    return "\n".join(head + table) + "\n"


def write_table(report_path: Path, out: Path) -> Path:
    try:
        link = report_path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        link = report_path.name
    return _write_text(out / "CLAIMS-table.md", table_from_report(report_path, link))


README = ROOT / "README.md"
_MARKERS = ("<!-- claims-table:start -->", "<!-- claims-table:end -->")


def update_readme(table: str, readme: Path = README) -> bool:
    """Put ``table`` between the README's claims-table markers; ``False`` if it has none."""
    text = readme.read_text()
    start, end = _MARKERS
    if start not in text or end not in text:
        return False
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    _write_text(readme, f"{head}{start}\n{table}{end}{tail}")
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="experiments to run (default: all)")
    ap.add_argument("--scale", choices=[s for s in SCALES if s != "test"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per experiment")
    ap.add_argument("--out", type=Path, default=FIGURES)
    ap.add_argument("--force", action="store_true", help="rerun finished seeds")
    ap.add_argument(
        "--table-only",
        action="store_true",
        help="only rewrite CLAIMS-table.md from the existing CLAIMS-SCALE.md (no compute)",
    )
    args = ap.parse_args(argv)
    report_path = args.out / f"CLAIMS-{args.scale}.md"
    if args.table_only:
        if not report_path.is_file():
            ap.error(f"no claims report at {report_path}")
        table = write_table(report_path, args.out)
        print(f"claims table: {table}")
        if args.out == FIGURES and args.scale == "small" and update_readme(table.read_text()):
            print(f"claims table pasted into {README}")
        return 0
    unknown = [n for n in args.names if n not in EXPERIMENTS]
    if unknown:
        ap.error(f"unknown experiment(s) {unknown}; known: {', '.join(EXPERIMENTS)}")
    device = resolve_device(args.device)
    names = args.names or list(EXPERIMENTS)
    reports = []
    for name in names:
        report = run_experiment(
            EXPERIMENTS[name],
            scale=args.scale,
            seeds=args.seeds,
            out_dir=args.out,
            force=args.force,
            progress=True,
            device=str(device),
        )
        cached = f", cached seeds {report.cached_seeds}" if report.cached_seeds else ""
        print(
            f"{name}: {report.verdict.label} ({report.seconds:.1f} s wall, "
            f"{report.cpu_seconds:.1f} s CPU{cached})",
            flush=True,
        )
        reports.append(report)
    if not args.names:
        claims_report(reports, report_path, machine=describe_machine(device))
        print(f"claims report: {report_path}")
        table = write_table(report_path, args.out)
        print(f"claims table: {table}")
        if args.out == FIGURES and args.scale == "small" and update_readme(table.read_text()):
            print(f"claims table pasted into {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
