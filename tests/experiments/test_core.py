"""The experiment framework: configs, statistics, caching, reports."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
from scipy import stats

from sharpkit.experiments import EXPERIMENTS, claims_report, run_experiment, summarize
from sharpkit.experiments._core import Experiment, ExperimentConfig, Stat, Verdict, make_result


def test_summarize_matches_scipy_t_interval() -> None:
    x = [1.0, 2.0, 4.0, 7.0]
    s = summarize(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=sum(x) / 4, scale=stats.sem(x))
    assert s.mean == pytest.approx(3.5)
    assert (s.ci_low, s.ci_high) == pytest.approx((lo, hi))
    one = summarize([3.0])
    assert one.n == 1 and not one.has_ci and math.isnan(one.ci_low)
    with pytest.raises(ValueError, match="values"):
        summarize([])


@dataclasses.dataclass(frozen=True)
class CountConfig(ExperimentConfig):
    value: float = 1.0

    def validate(self) -> None:
        super().validate()
        if self.value < 0:
            raise ValueError(f"value: must be >= 0, got {self.value}")


CALLS: list[int] = []


def _run(cfg: CountConfig):
    CALLS.append(cfg.seed)
    return make_result(COUNT, cfg, {"x": [cfg.seed]}, {"v": cfg.value + cfg.seed}, 0.01)


def _decide(st: dict[str, Stat]) -> Verdict:
    return Verdict(st["v"].mean > 1.0, f"mean {st['v'].mean}", {"v": st["v"].mean})


COUNT = Experiment(
    name="count",
    title="Count",
    claim="v > 1",
    source="here",
    config_cls=CountConfig,
    scales={"test": CountConfig(), "small": CountConfig(value=2.0), "large": CountConfig()},
    seeds={"test": 3},
    run=_run,
    decide=_decide,
)


def _folder(root, **overrides):
    from sharpkit.experiments import config_key

    return root / "count" / "test" / config_key(COUNT.config("test", **overrides))


def test_rerun_skips_finished_seeds_unless_forced_or_changed(tmp_path) -> None:
    CALLS.clear()
    r1 = run_experiment(COUNT, scale="test", out_dir=tmp_path)
    assert CALLS == [0, 1, 2]
    assert r1.stats["v"].mean == pytest.approx(2.0) and r1.cached_seeds == []
    folder = _folder(tmp_path)
    assert (folder / "seed1.json").exists() and r1.folder == str(folder)
    r2 = run_experiment(COUNT, scale="test", out_dir=tmp_path)
    assert CALLS == [0, 1, 2] and r2.cached_seeds == [0, 1, 2]  # nothing rerun, and said so
    run_experiment(COUNT, scale="test", seeds=4, out_dir=tmp_path)
    assert CALLS == [0, 1, 2, 3]  # only the new seed
    run_experiment(COUNT, scale="test", seeds=2, out_dir=tmp_path, force=True)
    assert CALLS == [0, 1, 2, 3, 0, 1]
    # a corrupt result file is recomputed, not trusted
    (folder / "seed2.json").write_text("{not json")
    run_experiment(COUNT, scale="test", out_dir=tmp_path)
    assert CALLS[-1] == 2
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["verdict"]["holds"] is True and summary["key"] == folder.name
    assert "folder" not in summary and str(tmp_path) not in json.dumps(summary)


def test_another_config_never_overwrites_or_mixes(tmp_path) -> None:
    CALLS.clear()
    run_experiment(COUNT, scale="test", out_dir=tmp_path)
    first = _folder(tmp_path)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    r = run_experiment(COUNT, scale="test", seeds=1, out_dir=tmp_path, value=5.0)
    assert CALLS == [0, 1, 2, 0]  # a changed config is not mistaken for a finished run
    second = _folder(tmp_path, value=5.0)
    assert second != first and r.folder == str(second)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # untouched
    assert sorted(p.name for p in second.iterdir()) == ["config.json", "seed0.json", "summary.json"]
    stored = json.loads((second / "config.json").read_text())
    assert stored["config"]["value"] == 5.0 and "seed" not in stored["config"]
    from sharpkit import __version__

    assert stored["version"] == __version__


def test_another_version_gets_its_own_folder(tmp_path, monkeypatch) -> None:
    import sharpkit

    CALLS.clear()
    run_experiment(COUNT, scale="test", seeds=1, out_dir=tmp_path)
    monkeypatch.setattr(sharpkit, "__version__", "99.0")
    run_experiment(COUNT, scale="test", seeds=1, out_dir=tmp_path)
    assert CALLS == [0, 0]
    assert len(list((tmp_path / "count" / "test").iterdir())) == 2


@pytest.mark.parametrize("tamper", ["copied", "edited", "no_digest", "other_version"])
def test_cache_reuse_needs_config_seed_version_and_content(tmp_path, tamper) -> None:
    CALLS.clear()
    run_experiment(COUNT, scale="test", seeds=2, out_dir=tmp_path)
    folder = _folder(tmp_path)
    d = json.loads((folder / "seed0.json").read_text())
    if tamper == "copied":  # seed0's file copied over seed1's: its seed does not match
        (folder / "seed1.json").write_text(json.dumps(d))
    else:
        if tamper == "edited":
            d["summary"]["v"] = 100.0
        elif tamper == "no_digest":
            d.pop("digest")
        else:
            d["version"] = "0.0.1"
        (folder / "seed0.json").write_text(json.dumps(d))
    r = run_experiment(COUNT, scale="test", seeds=2, out_dir=tmp_path)
    assert CALLS == [0, 1, 1 if tamper == "copied" else 0]
    assert r.stats["v"].mean == pytest.approx(1.5)  # the tampered number never counts


def test_files_are_atomic_with_ordinary_permissions(tmp_path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        run_experiment(EXPERIMENTS["two_cycle"], scale="test", seeds=1, out_dir=tmp_path)
    finally:
        os.umask(umask)
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} >= {".json", ".png", ".svg"}
    for p in files:
        assert not p.name.startswith("."), p  # no temporary file left
        assert p.stat().st_mode & 0o777 == 0o644, p
    assert [p for p in tmp_path.rglob(".*")] == []


def test_interrupted_run_leaves_finished_seeds_and_no_partial_file(tmp_path) -> None:
    def interrupted(cfg):
        if cfg.seed == 1:
            raise KeyboardInterrupt
        return _run(cfg)

    exp = dataclasses.replace(COUNT, run=interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, scale="test", out_dir=tmp_path)
    folder = _folder(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "seed0.json"]


def test_bad_config_fails_before_compute() -> None:
    CALLS.clear()
    with pytest.raises(ValueError, match="value"):
        run_experiment(COUNT, scale="test", value=-1.0)
    with pytest.raises(ValueError, match="unknown config fields"):
        run_experiment(COUNT, scale="test", nope=1)
    with pytest.raises(ValueError, match="scale"):
        run_experiment(COUNT, scale="huge")
    with pytest.raises(ValueError, match="seed"):
        run_experiment(COUNT, scale="test", seeds=[-1])
    assert CALLS == []


def test_claims_report_lists_claims_numbers_and_verdicts(tmp_path) -> None:
    r = run_experiment(COUNT, scale="small", seeds=2)
    path = claims_report([r], tmp_path / "CLAIMS.md", machine="test machine")
    text = path.read_text()
    assert "v > 1" in text and "**supported**" in text and "test machine" in text
    assert "| v | 2.5 [" in text  # mean of 2 and 3 with its CI
    assert "| quantity | mean [95% CI over seeds] |" in text
    assert "All 2 seeds computed in this run." in text


def test_one_seed_table_names_no_interval_and_cached_seeds_are_named(tmp_path) -> None:
    run_experiment(COUNT, scale="small", seeds=1, out_dir=tmp_path)
    r = run_experiment(COUNT, scale="small", seeds=[0, 1], out_dir=tmp_path)
    one = run_experiment(COUNT, scale="small", seeds=1)
    text = claims_report([one, r], tmp_path / "CLAIMS.md").read_text()
    assert "| quantity | value (1 seed, no CI) |" in text
    assert "Reused cached seeds [0]" in text and "computed [1] in this run" in text


def test_bounded_quantities_get_intervals_that_respect_the_bounds() -> None:
    s = summarize([1e-8, 2e-8, 3e-6], bounds=(0.0, math.inf))
    assert s.ci_low == 0.0 and s.truncated and s.ci_high > 3e-6 / 3
    t = summarize([1e-8, 2e-8, 3e-6])  # a difference may be negative: no truncation
    assert t.ci_low < 0 and not t.truncated
    c = summarize([0.99, 1.0, 0.8], bounds=(-1.0, 1.0))
    assert c.ci_high == 1.0 and c.truncated and c.ci_low < 0.8
    exp = dataclasses.replace(COUNT, bounds={"v*": (0.0, math.inf)})
    assert exp.bounds_of("v") == (0.0, math.inf) and COUNT.bounds_of("v") is None


def test_readme_table_is_emitted_from_the_report(tmp_path) -> None:
    from analysis.experiments import table_from_report

    r = run_experiment(COUNT, scale="small", seeds=2)
    report = claims_report([r], tmp_path / "CLAIMS-small.md", machine="test machine")
    table = table_from_report(report, "figures/experiments/CLAIMS-small.md").splitlines()
    assert table[0] == (
        "Measured on: test machine. Details: "
        "[CLAIMS-small.md](figures/experiments/CLAIMS-small.md)."
    )
    assert table[2:4] == ["| experiment | claim | verdict |", "|---|---|---|"]
    assert (
        table[4] == "| [Count](figures/experiments/CLAIMS-small.md#count) | v > 1 | **supported** |"
    )
    assert len(table) == 5
