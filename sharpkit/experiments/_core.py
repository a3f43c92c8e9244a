"""The shape every experiment shares: typed seeded configs, results, verdicts, a runner.

An experiment tests one claim from the papers (see docs/theory.md) and can pass or fail.
It is an :class:`Experiment`: a config dataclass with three preset scales
(``"test"``: seconds, for the test suite; ``"small"``: under two minutes on a
2-core CPU; ``"large"``: GPU sizes), a function ``run(config) -> RunResult`` for
one seed, and a function ``decide(stats) -> Verdict`` that judges the claim from
summary statistics. The same ``decide`` judges one seed (``n = 1``) and the
aggregate over seeds (means with t-based 95% confidence intervals).

:func:`run_experiment` runs the seeds and writes every result into a folder of
its own config, ``OUT/NAME/SCALE/KEY/``, where ``KEY`` (:func:`config_key`) is a
hash of the full config (seed excluded) and the sharpkit version, with the config
stored beside as ``config.json``: a run with another config or another version
never overwrites or mixes with the files of an earlier one. It writes each seed's
result as ``seedK.json``, reuses a cached seed only when its file matches in
experiment, config, seed and version and its content digest checks out (unless
``force``), aggregates, plots, and returns an :class:`ExperimentReport`; every
file is written atomically (a temporary file in the same folder, then
``os.replace``) with ordinary permissions, so an interruption never leaves a
partial file. :func:`claims_report` writes the markdown claims report and
:func:`claims_table` its summary table.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sharpkit._progress import progress_bar
from sharpkit.io.results import ordinary_permissions, write_bytes_atomic, write_json_atomic
from sharpkit.protocol import to_jsonable

__all__ = [
    "SCALES",
    "Experiment",
    "ExperimentConfig",
    "ExperimentReport",
    "RunResult",
    "Stat",
    "Verdict",
    "check",
    "check_out_dir",
    "claims_report",
    "claims_table",
    "config_key",
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
        for f in dataclasses.fields(self):  # inf and nan are never a setting
            value = getattr(self, f.name)
            items = value if isinstance(value, tuple) else (value,)
            check(
                all(math.isfinite(v) for v in items if isinstance(v, float)),
                f"{f.name}: must be finite, got {value!r}",
            )
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
    For a quantity with known bounds (positive by definition, such as a ratio of
    norms, an eigenvalue or a time; a cosine in [-1, 1]; an accuracy in [0, 1]) the
    interval is cut to them (``truncated``): the intersection of a confidence
    interval with the set of possible values keeps its coverage, and a bound outside
    it would only say "the t-interval is too wide for this sample".
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int
    values: list[float] = field(default_factory=list)
    truncated: bool = False

    @property
    def has_ci(self) -> bool:
        return self.n >= 2 and math.isfinite(self.ci_low)

    def fmt(self, digits: int = 3) -> str:
        if self.has_ci:
            return f"{self.mean:.{digits}g} [{self.ci_low:.{digits}g}, {self.ci_high:.{digits}g}]"
        return f"{self.mean:.{digits}g}"


def summarize(
    values: Sequence[float],
    confidence: float = 0.95,
    *,
    bounds: tuple[float, float] | None = None,
) -> Stat:
    """Mean and t-interval of ``values`` (seeds are independent runs).

    Args:
        values: one number per seed.
        confidence: the interval's level.
        bounds: ``(low, high)`` the quantity cannot leave; the interval is cut to
            them (and the :class:`Stat` says so).

    Returns:
        The :class:`Stat`.

    Example:
        >>> s = summarize([0.1, 0.2, 1.5], bounds=(0.0, math.inf))
        >>> s.ci_low, s.truncated
        (0.0, True)
    """
    from scipy import stats

    x = np.asarray([float(v) for v in values], dtype=float)
    if x.size == 0:
        raise ValueError("values: nothing to summarise")
    mean = float(x.mean())
    if x.size < 2:
        return Stat(mean, math.nan, math.nan, 1, x.tolist())
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    low, high = mean - half, mean + half
    truncated = False
    if bounds is not None and (low < bounds[0] or high > bounds[1]):
        low, high, truncated = max(low, bounds[0]), min(high, bounds[1]), True
    return Stat(mean, low, high, int(x.size), x.tolist(), truncated)


@dataclass
class Verdict:
    """The judgement of a claim.

    Attributes:
        holds: True (supported), False (contradicted) or None (inconclusive:
            e.g. the confidence interval straddles the threshold).
        statement: one sentence with the numbers that decided it.
        numbers: those numbers by name.
        parts: for a claim with separate parts judged on their own, part name ->
            its verdict (True, False, None); ``holds`` then combines them (True if
            all hold, False if any fails, None otherwise) and the label lists them.
    """

    holds: bool | None
    statement: str
    numbers: dict[str, float] = field(default_factory=dict)
    parts: dict[str, bool | None] = field(default_factory=dict)

    @staticmethod
    def combine(parts: Mapping[str, bool | None]) -> bool | None:
        """True if every part holds, False if any fails, None otherwise."""
        values = list(parts.values())
        if False in values:
            return False
        return True if values and all(v is True for v in values) else None

    @property
    def label(self) -> str:
        words = {True: "supported", False: "not supported", None: "inconclusive"}
        if self.parts:
            return "; ".join(f"{k}: {words[v]}" for k, v in self.parts.items())
        return words[self.holds]


@dataclass
class RunResult:
    """One seed of one experiment: raw series, summary numbers and a verdict.

    ``digest`` is a SHA-256 of every other field (:meth:`content_digest`): a cached
    file is trusted only when it still matches it.
    """

    experiment: str
    seed: int
    config: dict[str, Any]
    series: dict[str, Any]
    summary: dict[str, float]
    verdict: Verdict
    seconds: float = 0.0
    fingerprint: str = ""
    version: str = ""
    cpu_seconds: float = 0.0
    digest: str = ""

    def content_digest(self) -> str:
        """SHA-256 (hex) of the canonical JSON of every field but ``digest``."""
        d = to_jsonable(self)
        d.pop("digest")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunResult:
        d = dict(d)
        d["verdict"] = Verdict(**d["verdict"])
        # float() parses the "nan"/"inf"/"-inf" strings that to_jsonable writes
        d["summary"] = {k: float(v) for k, v in d["summary"].items()}
        return cls(**d)


@dataclass
class ExperimentReport:
    """All seeds of one experiment, aggregated.

    ``cached_seeds`` lists the seeds reused from an earlier run's files (their
    ``seconds`` are the compute time measured then); ``key`` names the results
    folder (:func:`config_key`).
    """

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
    cpu_seconds: float = 0.0  #: CPU seconds of this process over seeds (all threads)
    cached_seeds: list[int] = field(default_factory=list)
    key: str = ""
    folder: str = ""


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
        bounds: ``{glob pattern: (low, high)}`` (``fnmatch`` on summary keys): the
            values a quantity can take by definition (e.g. ``(0, inf)`` for a ratio
            of norms, ``(-1, 1)`` for a cosine); its confidence intervals are cut to
            them. The first matching pattern wins.
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
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def bounds_of(self, key: str) -> tuple[float, float] | None:
        """The bounds of summary ``key`` (see ``bounds``), or ``None``."""
        return next((b for pat, b in self.bounds.items() if fnmatch.fnmatchcase(key, pat)), None)

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


def _summarize_all(experiment: Experiment, runs: Sequence[RunResult]) -> dict[str, Stat]:
    keys = list(runs[0].summary)
    return {
        k: summarize([r.summary[k] for r in runs], bounds=experiment.bounds_of(k)) for k in keys
    }


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
    result = RunResult(
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
    result.digest = result.content_digest()
    return result


def config_key(config: ExperimentConfig) -> str:
    """The results folder's name: 12 hex digits of a SHA-256 of the config (seed
    excluded) and the sharpkit version.

    Example:
        >>> from sharpkit.experiments import EXPERIMENTS
        >>> cfg = EXPERIMENTS["two_cycle"].config("test")
        >>> config_key(cfg) == config_key(EXPERIMENTS["two_cycle"].config("test", seed=3))
        True
    """
    return hashlib.sha256(_config_record(config).encode()).hexdigest()[:12]


def _config_record(config: ExperimentConfig) -> str:
    from sharpkit import __version__

    d = {k: v for k, v in to_jsonable(config).items() if k != "seed"}
    return json.dumps({"config": d, "version": __version__}, sort_keys=True, indent=2)


def check_out_dir(out_dir: str | Path) -> Path:
    """Refuse an output folder that is a file, lies under a file, or cannot be
    written, before any compute; nothing is created on disk.

    Raises:
        ValueError: naming ``--out`` and the reason.
    """
    out = Path(out_dir)
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "is a file" if probe == out else f"lies under a file ({probe})"
        raise ValueError(f"--out: {out} {what}, expected a folder")
    try:  # os.access says yes to root even where nothing can be created
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise ValueError(f"--out: {out} is not writable ({err.strerror or err})") from None
    return out


def _write_text(path: Path, text: str) -> Path:
    return write_bytes_atomic(Path(path), text.encode())


def _load_cached(path: Path, cfg: ExperimentConfig, experiment: Experiment) -> RunResult | None:
    """The cached result at ``path`` if it is this experiment's, for exactly this
    config, seed and sharpkit version, and its content digest checks out."""
    from sharpkit import __version__

    try:
        cached = RunResult.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if (
        cached.experiment != experiment.name
        or cached.seed != cfg.seed
        or cached.version != __version__
        or cached.config != to_jsonable(cfg)
        or cached.fingerprint != cfg.fingerprint()
        or not cached.digest
        or cached.digest != cached.content_digest()
    ):
        return None
    return cached


def _plot_atomic(experiment: Experiment, report: ExperimentReport, folder: Path) -> list[str]:
    """Draw into a temporary folder inside ``folder``, then move each file out with
    ``os.replace``: an interrupted plot leaves no partial figure."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".plot-"))
    try:
        written = experiment.plot(report, tmp) if experiment.plot is not None else []
        paths = []
        for p in written:
            final = folder / Path(p).name
            ordinary_permissions(p)
            os.replace(p, final)
            paths.append(str(final))
        return paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_experiment(
    experiment: Experiment,
    *,
    scale: str = "small",
    seeds: int | Iterable[int] | None = None,
    out_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = False,
    plot: bool = True,
    process_group: Any = None,
    **overrides: Any,
) -> ExperimentReport:
    """Run ``experiment`` over seeds, aggregate and judge.

    Args:
        experiment: the experiment.
        scale: "test", "small" or "large".
        seeds: a count (seeds ``0..n-1``) or explicit seeds; default per scale.
        out_dir: results go to ``out_dir/NAME/SCALE/KEY/`` (:func:`config_key`):
            ``config.json``, ``seedK.json``, ``summary.json`` and the figures;
            ``None`` keeps everything in memory.
        force: rerun seeds whose results already exist.
        progress: show a progress bar over seeds.
        plot: write figures (when ``out_dir`` is given and the experiment plots).
        process_group: a ``torch.distributed`` group (``torchrun``): the seeds are
            shared out, rank ``r`` of ``R`` running seeds ``r, r + R, ...`` (each seed
            is independent and writes its own file); after a barrier every rank
            reads all the seed files and judges, and rank 0 alone writes the
            summary and the figures. Needs ``out_dir`` (the files are how the seeds
            meet). The report equals one process's.
        **overrides: config fields to change from the preset (validated first).

    Returns:
        The :class:`ExperimentReport`.

    Raises:
        ValueError: a bad config, seed list or output folder, before any compute.
    """
    base = experiment.config(scale, **overrides)  # validates before any compute
    if seeds is None:
        seeds = experiment.seeds.get(scale, 1)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    check(len(seed_list) > 0, "seeds: need at least one seed")
    check(all(s >= 0 for s in seed_list), f"seeds: must be non-negative, got {seed_list}")
    check(len(set(seed_list)) == len(seed_list), f"seeds: duplicates in {seed_list}")
    key = config_key(base)
    rank, world_size = 0, 1
    if process_group is not None:
        from sharpkit.distributed import world

        rank, world_size = world(process_group)
        check(out_dir is not None, "out_dir: seeds shared over ranks meet in files; give one")
    folder = check_out_dir(out_dir) / experiment.name / scale / key if out_dir is not None else None
    if folder is not None:  # every rank: the same bytes, written atomically
        _write_text(folder / "config.json", _config_record(base) + "\n")
    mine = seed_list[rank::world_size]
    runs: list[RunResult] = []
    cached_seeds: list[int] = []
    for seed in progress_bar(mine, experiment.name, enabled=progress, unit="seed"):
        cfg = dataclasses.replace(base, seed=seed)
        path = folder / f"seed{seed}.json" if folder is not None else None
        if path is not None and path.exists() and not force:
            cached = _load_cached(path, cfg, experiment)
            if cached is not None:
                runs.append(cached)
                cached_seeds.append(seed)
                continue
        cpu0 = time.process_time()
        result = experiment.run(cfg)
        # CPU time as well as wall time: on a shared machine the wall clock also
        # counts the other processes
        result.cpu_seconds = time.process_time() - cpu0
        result.digest = result.content_digest()
        if path is not None:
            write_json_atomic(path, result)
        runs.append(result)
    if world_size > 1:  # every rank's seeds are on disk: read them all, in seed order
        import torch.distributed as dist

        assert folder is not None
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, cached_seeds, group=process_group)  # also a barrier
        cached_seeds = sorted(s for part in parts for s in part)
        runs = []
        for seed in seed_list:
            cfg = dataclasses.replace(base, seed=seed)
            loaded = _load_cached(folder / f"seed{seed}.json", cfg, experiment)
            if loaded is None:
                raise RuntimeError(f"seed {seed}: its rank wrote no valid result file")
            runs.append(loaded)
    stats = _summarize_all(experiment, runs)
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
        cpu_seconds=sum(r.cpu_seconds for r in runs),
        cached_seeds=cached_seeds,
        key=key,
        folder=str(folder) if folder is not None else "",
    )
    if folder is not None and rank == 0:
        if plot and experiment.plot is not None:
            report.figures = _plot_atomic(experiment, report, folder)
        summary = dataclasses.asdict(report)
        summary.pop("runs")
        # the file lies in the folder: the figures by name, no machine's absolute path
        summary.pop("folder")
        summary["figures"] = [Path(f).name for f in report.figures]
        write_json_atomic(folder / "summary.json", summary)
    return report


def ci_header(stats: Iterable[Stat]) -> str:
    """The column header of a table of :class:`Stat`: it names the interval only
    when there is one."""
    st = list(stats)
    if st and all(s.n < 2 for s in st):
        return "value (1 seed, no CI)"
    if any(s.truncated for s in st):
        return "mean [95% CI over seeds; * cut to the possible values]"
    return "mean [95% CI over seeds]"


def format_stat(s: Stat, digits: int = 4) -> str:
    """``s.fmt(digits)`` with a ``*`` when its interval was cut to the bounds."""
    return s.fmt(digits) + ("*" if s.truncated and s.has_ci else "")


def provenance(report: ExperimentReport) -> str:
    """One sentence on where the seeds' numbers come from (fresh or cached)."""
    if not report.cached_seeds:
        return f"All {len(report.seeds)} seeds computed in this run."
    fresh = [s for s in report.seeds if s not in report.cached_seeds]
    text = (
        f"Reused cached seeds {report.cached_seeds} (results of an earlier run with the same "
        f"config and version; their seconds are as measured then)"
    )
    return text + (f"; computed {fresh} in this run." if fresh else ".")


def claims_table(reports: Sequence[ExperimentReport], *, link: str = "") -> list[str]:
    """The summary table of the claims report (markdown lines): experiment, claim,
    verdict. ``link`` prefixes the anchors (e.g. the report's path from the README)."""
    lines = ["| experiment | claim | verdict |", "|---|---|---|"]
    for r in reports:
        lines.append(f"| [{r.title}]({link}#{r.experiment}) | {r.claim} | **{r.verdict.label}** |")
    return lines


def claims_report(
    reports: Sequence[ExperimentReport],
    path: str | Path,
    *,
    machine: str = "",
    relative_to: str | Path | None = None,
) -> Path:
    """Write the markdown claims report: claim, source, setting, numbers, verdict, figure.

    Written atomically. Every experiment's section says which seeds were reused
    from cache, and its table header names the interval only where there is one.
    """
    path = Path(path)
    base = Path(relative_to) if relative_to is not None else path.parent
    lines = ["# Claims report", ""]
    if machine:
        lines += [f"Measured on: {machine}.", ""]
    lines += claims_table(reports)
    lines += [
        "",
        "Intervals are t-based 95% confidence intervals over seeds. Where a t-interval "
        "leaves the values a quantity can take (below 0 for a positive quantity, outside "
        "[-1, 1] for a cosine) it is cut to them (marked *): intersecting a confidence "
        "interval with the possible values keeps its coverage.",
    ]
    for r in reports:
        lines += [
            "",
            f'<a id="{r.experiment}"></a>',
            f"## {r.title}",
            "",
            f"- **Claim.** {r.claim}",
            f"- **Source.** {r.source}",
            f"- **Setting.** {r.setting} Scale `{r.scale}`, seeds {r.seeds}, device {r.device}, "
            f"{r.seconds:.1f} s wall clock, {r.cpu_seconds:.1f} s CPU. {provenance(r)}",
            f"- **Verdict: {r.verdict.label}.** {r.verdict.statement}",
            "",
            f"| quantity | {ci_header(r.stats.values())} |",
            "|---|---|",
        ]
        for k, s in r.stats.items():
            lines.append(f"| {k} | {format_stat(s)} |")
        for fig in r.figures:
            if fig.endswith(".png"):
                rel = (
                    Path(fig).resolve().relative_to(base.resolve())
                    if _within(fig, base)
                    else Path(fig)
                )
                lines += ["", f"![{r.title}]({rel.as_posix()})"]
    return _write_text(path, "\n".join(lines) + "\n")


def _within(p: str | Path, base: Path) -> bool:
    try:
        Path(p).resolve().relative_to(base.resolve())
        return True
    except ValueError:
        return False
