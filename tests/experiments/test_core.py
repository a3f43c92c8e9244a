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


def test_rerun_skips_finished_seeds_unless_forced_or_changed(tmp_path) -> None:
    CALLS.clear()
    r1 = run_experiment(COUNT, scale="test", out_dir=tmp_path)
    assert CALLS == [0, 1, 2]
    assert r1.stats["v"].mean == pytest.approx(2.0)
    assert (tmp_path / "count" / "test" / "seed1.json").exists()
    run_experiment(COUNT, scale="test", out_dir=tmp_path)
    assert CALLS == [0, 1, 2]  # nothing rerun
    run_experiment(COUNT, scale="test", seeds=4, out_dir=tmp_path)
    assert CALLS == [0, 1, 2, 3]  # only the new seed
    run_experiment(COUNT, scale="test", seeds=2, out_dir=tmp_path, force=True)
    assert CALLS == [0, 1, 2, 3, 0, 1]
    run_experiment(COUNT, scale="test", seeds=1, out_dir=tmp_path, value=5.0)
    assert CALLS[-1] == 0  # a changed config is not mistaken for a finished run
    # a corrupt result file is recomputed, not trusted
    (tmp_path / "count" / "test" / "seed2.json").write_text("{not json")
    run_experiment(COUNT, scale="test", out_dir=tmp_path)
    assert CALLS[-1] == 2
    summary = json.loads((tmp_path / "count" / "test" / "summary.json").read_text())
    assert summary["verdict"]["holds"] is True


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


def test_every_registered_experiment_has_three_scales() -> None:
    assert EXPERIMENTS
    for name, exp in EXPERIMENTS.items():
        assert exp.name == name
        assert set(exp.scales) == {"test", "small", "large"}
        for scale in exp.scales:
            exp.config(scale).validate()
