"""The shape every experiment shares: typed seeded configs, results, verdicts, a runner.

An experiment tests one claim from the papers (PAPERS.md) and can pass or fail.
It is an :class:`Experiment`: a config dataclass with three preset scales
(``"test"``: seconds, for the test suite; ``"small"``: under two minutes on a
2-core CPU; ``"large"``: GPU sizes), a function ``run(config) -> RunResult`` for
one seed, and a function ``decide(stats) -> Verdict`` that judges the claim from
summary statistics. The same ``decide`` judges one seed (``n = 1``) and the
aggregate over seeds (means with t-based 95% confidence intervals).

:func:`run_experiment` runs the seeds, writes each seed's result atomically as
JSON, skips seeds whose result already exists with the same config (unless
``force``), aggregates, plots, and returns an :class:`ExperimentReport`;
:func:`claims_report` writes the markdown claims report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharpkit.io.results import read_json, to_jsonable, write_json_atomic

__all__ = [
    "SCALES",
    "Experiment",
    "ExperimentConfig",
    "ExperimentReport",
    "RunResult",
    "Stat",
    "Verdict",
    "check",
    "claims_report",
    "run_experiment",
    "summarize",
]

SCALES = ("test", "small", "large")


def check(condition: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition``: config validation before compute."""
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ExperimentConfig:
    """Base of every experiment config: a seed and a device. Subclasses add fields
    and extend :meth:`validate`, which must reject bad values before any compute."""

    seed: int = 0
    device: str = "cpu"

    def validate(self) -> None:
        check(
            isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed >= 0,
            f"seed: expected a non-negative integer, got {self.seed!r}",
        )
        check(
            isinstance(self.device, str) and self.device.split(":")[0] in ("cpu", "cuda"),
            f"device: expected 'cpu' or 'cuda[:N]', got {self.device!r}",
        )

    def fingerprint(self) -> str:
        """A hash of every field except the seed (to recognise finished runs)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "seed"}
        blob = json.dumps(to_jsonable(d), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Stat:
    """A summary number over seeds: mean and a t-based 95% confidence interval.

    With one seed the interval is ``(nan, nan)``: a single run has no error bar.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    values: list[float] = field(default_factory=list)

    @property
    def has_ci(self) -> bool:
        return self.n >= 2 and math.isfinite(self.ci_low)

    def fmt(self, digits: int = 3) -> str:
        if self.has_ci:
            return f"{self.mean:.{digits}g} [{self.ci_low:.{digits}g}, {self.ci_high:.{digits}g}]"
        return f"{self.mean:.{digits}g}"


def summarize(values: Sequence[float], confidence: float = 0.95) -> Stat:
    """Mean and t-interval of ``values`` (seeds are independent runs)."""
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        raise ValueError("values: nothing to summarise")
    mean = float(x.mean())
    if x.size < 2:
        return Stat(mean, math.nan, math.nan, 1, x.tolist())
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Stat(mean, mean - half, mean + half, int(x.size), x.tolist())


@dataclass
class Verdict:
    """The judgement of a claim.

    Attributes:
        holds: True (supported), False (contradicted) or None (inconclusive:
            e.g. the confidence interval straddles the threshold).
        statement: one sentence with the numbers that decided it.
        numbers: those numbers by name.
    """

    holds: bool | None
    statement: str
    numbers: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return {True: "supported", False: "not supported", None: "inconclusive"}[self.holds]


@dataclass
class RunResult:
    """One seed of one experiment: raw series, summary numbers and a verdict."""

    experiment: str
    seed: int
    config: dict[str, Any]
    series: dict[str, Any]
    summary: dict[str, float]
    verdict: Verdict
    seconds: float = 0.0
    fingerprint: str = ""
    version: str = ""

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        d = dict(d)
        d["verdict"] = Verdict(**d["verdict"])
        # float() parses the "nan"/"inf"/"-inf" strings that to_jsonable writes
        d["summary"] = {k: float(v) for k, v in d["summary"].items()}
        return cls(**d)


@dataclass
class ExperimentReport:
    """All seeds of one experiment, aggregated."""

    experiment: str
    title: str
    claim: str
    source: str
    setting: str
    scale: str
    seeds: list[int]
    stats: dict[str, Stat]
    verdict: Verdict
    runs: list[RunResult]
    figures: list[str] = field(default_factory=list)
    device: str = "cpu"
    seconds: float = 0.0  #: compute seconds summed over seeds (as first measured)


@dataclass(frozen=True)
class Experiment:
    """One claim, testable at three scales.

    Attributes:
        name: short identifier (the CLI name).
        title: human title.
        claim: the claim, in one or two sentences.
        source: where the claim comes from (paper, theorem, section).
        config_cls: the config dataclass.
        scales: preset configs (without the seed) for "test", "small", "large".
        seeds: default number of seeds per scale.
        run: ``run(config) -> RunResult`` for one seed.
        decide: ``decide(stats) -> Verdict`` from summary statistics.
        plot: ``plot(report, out_dir) -> list of written paths`` (PNG and SVG).
        setting: ``setting(config) -> str`` describing the setup for the report.
    """

    name: str
    title: str
    claim: str
    source: str
    config_cls: type[ExperimentConfig]
    scales: Mapping[str, ExperimentConfig]
    seeds: Mapping[str, int]
    run: Callable[[Any], RunResult]
    decide: Callable[[dict[str, Stat]], Verdict]
    plot: Callable[[ExperimentReport, Path], list[Path]] | None = None
    setting: Callable[[Any], str] = lambda cfg: ""

    def config(self, scale: str = "small", **overrides: Any) -> ExperimentConfig:
        """The preset config for ``scale`` with ``overrides`` applied and validated."""
        if scale not in self.scales:
            raise ValueError(f"scale: expected one of {sorted(self.scales)}, got {scale!r}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(self.config_cls)}
        if unknown:
            raise ValueError(f"{self.name}: unknown config fields {sorted(unknown)}")
        cfg = dataclasses.replace(self.scales[scale], **overrides)
        cfg.validate()
        return cfg


def make_result(
    experiment: Experiment,
    config: ExperimentConfig,
    series: dict[str, Any],
    summary: dict[str, float],
    seconds: float,
) -> RunResult:
    """Build a :class:`RunResult`, judging the single seed with ``experiment.decide``."""
    from sharpkit import __version__

    stats = {k: summarize([v]) for k, v in summary.items()}
    return RunResult(
        experiment=experiment.name,
        seed=config.seed,
        config=to_jsonable(config),
        series=to_jsonable(series),
        summary={k: float(v) for k, v in summary.items()},
        verdict=experiment.decide(stats),
        seconds=seconds,
        fingerprint=config.fingerprint(),
        version=__version__,
    )


def _seed_path(out_dir: Path, name: str, scale: str, seed: int) -> Path:
    return out_dir / name / scale / f"seed{seed}.json"


def run_experiment(
    experiment: Experiment,
    *,
    scale: str = "small",
    seeds: int | Iterable[int] | None = None,
    out_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
    plot: bool = True,
    **overrides: Any,
) -> ExperimentReport:
    """Run ``experiment`` over seeds, aggregate and judge.

    Args:
        experiment: the experiment.
        scale: "test", "small" or "large".
        seeds: a count (seeds ``0..n-1``) or explicit seeds; default per scale.
        out_dir: where per-seed JSON results, the summary and figures go; ``None``
            keeps everything in memory.
        force: rerun seeds whose results already exist.
        progress: show a progress bar over seeds.
        plot: write figures (when ``out_dir`` is given and the experiment plots).
        **overrides: config fields to change from the preset (validated first).

    Returns:
        The :class:`ExperimentReport`.
    """
    base = experiment.config(scale, **overrides)  # validates before any compute
    if seeds is None:
        seeds = experiment.seeds.get(scale, 1)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    check(len(seed_list) > 0, "seeds: need at least one seed")
    check(all(s >= 0 for s in seed_list), f"seeds: must be non-negative, got {seed_list}")
    out = Path(out_dir) if out_dir is not None else None
    runs: list[RunResult] = []
    it: Iterable[int] = seed_list
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(seed_list, desc=experiment.name, unit="seed")
    for seed in it:
        cfg = dataclasses.replace(base, seed=seed)
        path = _seed_path(out, experiment.name, scale, seed) if out is not None else None
        if path is not None and path.exists() and not force:
            try:
                cached = RunResult.from_dict(read_json(path))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                cached = None
            if cached is not None and cached.fingerprint == cfg.fingerprint():
                runs.append(cached)
                continue
        result = experiment.run(cfg)
        if path is not None:
            write_json_atomic(path, result)
        runs.append(result)
    keys = list(runs[0].summary)
    stats = {k: summarize([r.summary[k] for r in runs]) for k in keys}
    report = ExperimentReport(
        experiment=experiment.name,
        title=experiment.title,
        claim=experiment.claim,
        source=experiment.source,
        setting=experiment.setting(base),
        scale=scale,
        seeds=seed_list,
        stats=stats,
        verdict=experiment.decide(stats),
        runs=runs,
        device=base.device,
        seconds=sum(r.seconds for r in runs),  # compute time, cached seeds included
    )
    if out is not None:
        if plot and experiment.plot is not None:
            fig_dir = out / experiment.name / scale
            report.figures = [str(p) for p in experiment.plot(report, fig_dir)]
        summary = dataclasses.asdict(report)
        summary.pop("runs")
        write_json_atomic(out / experiment.name / scale / "summary.json", summary)
    return report


def claims_report(
    reports: Sequence[ExperimentReport],
    path: str | Path,
    *,
    machine: str = "",
    relative_to: str | Path | None = None,
) -> Path:
    """Write the markdown claims report: claim, source, setting, numbers, verdict, figure."""
    path = Path(path)
    base = Path(relative_to) if relative_to is not None else path.parent
    lines = ["# Claims report", ""]
    if machine:
        lines += [f"Measured on: {machine}.", ""]
    lines += ["| experiment | claim | verdict |", "|---|---|---|"]
    for r in reports:
        lines.append(f"| [{r.title}](#{r.experiment}) | {r.claim} | **{r.verdict.label}** |")
    for r in reports:
        lines += [
            "",
            f'<a id="{r.experiment}"></a>',
            f"## {r.title}",
            "",
            f"- **Claim.** {r.claim}",
            f"- **Source.** {r.source}",
            f"- **Setting.** {r.setting} Scale `{r.scale}`, seeds {r.seeds}, device {r.device}, "
            f"{r.seconds:.1f} s.",
            f"- **Verdict: {r.verdict.label}.** {r.verdict.statement}",
            "",
            "| quantity | mean [95% CI over seeds] |",
            "|---|---|",
        ]
        for k, s in r.stats.items():
            lines.append(f"| {k} | {s.fmt(4)} |")
        for fig in r.figures:
            if fig.endswith(".png"):
                rel = (
                    Path(fig).resolve().relative_to(base.resolve())
                    if _within(fig, base)
                    else Path(fig)
                )
                lines += ["", f"![{r.title}]({rel.as_posix()})"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def _within(p: str | Path, base: Path) -> bool:
    try:
        Path(p).resolve().relative_to(base.resolve())
        return True
    except ValueError:
        return False
