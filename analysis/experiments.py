"""Run the claim experiments and write their results, figures and claims report.

The one script that makes the experiment figures in ``figures/experiments/``:
per experiment ``figures/experiments/NAME/SCALE/`` holds the per-seed results
(``seedK.json``), the aggregate (``summary.json``) and the figures (PNG and SVG);
``figures/experiments/CLAIMS-SCALE.md`` is the claims report (claim, source,
setting, numbers with 95% confidence intervals over seeds, verdict, figure).

Usage::

    python -m analysis.experiments                 # all, small scale (CPU)
    python -m analysis.experiments --scale large --device cuda
    python -m analysis.experiments theorem2 wen_sharpness --force

Finished seeds are skipped on a rerun (unless ``--force``); the same as
``sharpkit experiment all --out figures/experiments``, with the report named by
scale so the CPU and GPU reports sit side by side.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sharpkit._device import describe_machine, resolve_device
from sharpkit.experiments import EXPERIMENTS, SCALES, claims_report, run_experiment

FIGURES = Path(__file__).resolve().parent.parent / "figures" / "experiments"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help="experiments to run (default: all)")
    ap.add_argument("--scale", choices=[s for s in SCALES if s != "test"], default="small")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per experiment")
    ap.add_argument("--out", type=Path, default=FIGURES)
    ap.add_argument("--force", action="store_true", help="rerun finished seeds")
    args = ap.parse_args(argv)
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
        print(f"{name}: {report.verdict.label} ({report.seconds:.1f} s)", flush=True)
        reports.append(report)
    if not args.names:
        path = claims_report(
            reports, args.out / f"CLAIMS-{args.scale}.md", machine=describe_machine(device)
        )
        print(f"claims report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
