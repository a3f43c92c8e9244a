"""The catalogue of bad input: every class sharpkit refuses, with the exact behaviour.

Each case asserts the exit code (2: bad input, a one-line reason on stderr, before any
compute; 1: the measurement failed; 130: interrupted), the words of the reason, and
that nothing was written or changed (files on disk, the caller's weights).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from sharpkit.cli import build_parser, main
from sharpkit.io import save_state_dict
from sharpkit.sharpness import METRICS, measure_sharpness
from sharpkit.sharpness._registry import REGISTRY, resolve_options

SPEC = (pathlib.Path(__file__).parent / "_user_spec.py").read_text()

FAST = ["--metrics", "lambda_max,average_case", "--no-progress", "--no-landscape"]


@pytest.fixture()
def spec(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "user_spec.py"
    path.write_text(SPEC)
    return path


@pytest.fixture()
def no_training(monkeypatch):
    """The demo must not train when its input is refused."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo trained before its input was checked")

    monkeypatch.setattr("sharpkit.demo.train_demo", refuse)


def _ckpt(tmp_path: pathlib.Path, name: str = "m.pt", seed: int = 0) -> str:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return str(save_state_dict(net.state_dict(), tmp_path / name))


def _refused(argv, capsys, match: str, code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err
    return err


# -- options: keys, values, metrics not requested -----------------------------------------
@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ("worst_case.rhoo=0.1", "worst_case has no option 'rhoo' (did you mean 'rho'?)"),
        ("worst_case.rho=abc", "worst_case.rho: expected a finite number in (0, inf), got 'abc'"),
        ("worst_case.rho=-1", "worst_case.rho: expected a finite number in (0, inf)"),
        ("worst_case.rho=0", "worst_case.rho"),
        ("worst_case.rho=inf", "worst_case.rho"),
        ("worst_case.rho=nan", "worst_case.rho"),
        ("worst_case.steps=2.5", "worst_case.steps: expected an integer"),
        ("worst_case.m=0", "worst_case.m"),
        ("trace.method=exact", "trace.method: expected one of 'hutch++', 'hutchinson'"),
        ("lambda_max.tol=1", "lambda_max.tol"),
        ("lambda_max.max_basis=3", "lambda_max.max_basis: expected an integer in [4, inf)"),
        ("lambda_max.basis_storage=/no/such/dir", "lambda_max.basis_storage: '/no/such/dir'"),
        ("pac_bayes.target=top5", "pac_bayes.target"),
        ("pac_bayes.max_drop=1e999", "pac_bayes.max_drop"),
        ("esd.num_points=1", "esd.num_points"),
        ("top_k.k=3", "options for 'top_k', which is not among the requested metrics"),
        ("nope.x=1", "unknown metric 'nope'"),
        ("worst_case.rho", "expected METRIC.KEY=VALUE"),
    ],
)
def test_demo_option_refused_before_training(setting, match, capsys, no_training, tmp_path):
    out = tmp_path / "o"
    _refused(["measure", "--demo", "--set", setting, "--out", str(out)], capsys, match)
    assert not out.exists()


def test_option_given_twice_refused(capsys, no_training, tmp_path) -> None:
    argv = ["measure", "--demo", "--out", str(tmp_path / "o")]
    _refused([*argv, "--set", "worst_case.rho=0.1", "--set", "worst_case.rho=0.2"], capsys, "twice")


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"worst_case": {"rhoo": 0.1}}, "has no option 'rhoo'"),
        ({"worst_case": {"rho": "abc"}}, "got 'abc'"),
        ({"worst_case": {"rho": "0.1"}}, "got '0.1'"),  # the API takes numbers, not text
        ({"worst_case": {"rho": -0.1}}, "worst_case.rho"),
        ({"worst_case": {"rho": math.inf}}, "worst_case.rho"),
        ({"worst_case": {"rho": math.nan}}, "worst_case.rho"),
        ({"worst_case": {"steps": True}}, "worst_case.steps"),
        ({"worst_case": {"steps": 0}}, "worst_case.steps"),
        ({"average_case": {"noise": "laplace"}}, "average_case.noise"),
        ({"lambda_max": {"tol": 0.0}}, "lambda_max.tol"),
        ({"pac_bayes": {"samples": 4}}, "not among the requested metrics"),
        ({"bogus": {}}, "unknown metric 'bogus'"),
        ({"worst_case": 0.1}, "expected a dict of options"),
        ([("worst_case", {})], "expected a dict"),
    ],
)
def test_api_options_refused_before_compute(options, match) -> None:
    net = nn.Linear(4, 3)
    before = [p.detach().clone() for p in net.parameters()]
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="options: .*" if match.startswith("worst") else None) as e:
        measure_sharpness(net, nn.CrossEntropyLoss(), data, ["worst_case", "average_case",
                          "lambda_max"], options=options)  # fmt: skip
    assert match in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metrics": "lambda_max"}, "metrics: expected a sequence of metric names"),
        ({"metrics": ["lambda_max", "lambda_max"]}, "each metric once"),
        ({"metrics": []}, "choose at least one"),
        ({"metrics": ["lambda"]}, "metrics: unknown"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"progress": "yes"}, "progress"),
        ({"accuracy_fn": 3}, "accuracy_fn"),
        ({"hvp": "fast"}, "hvp"),
        ({"mode": "test"}, "mode"),
    ],
)
def test_api_arguments_refused(kwargs, match) -> None:
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    kwargs = {"metrics": ["lambda_max"], **kwargs}
    with pytest.raises(ValueError, match=match):
        measure_sharpness(nn.Linear(4, 3), nn.CrossEntropyLoss(), data, **kwargs)


def test_every_option_has_a_type_range_and_help() -> None:
    assert list(REGISTRY) == list(METRICS)
    for spec in REGISTRY.values():
        defaults = resolve_options([spec.name], None)[spec.name]
        for key, opt in spec.options.items():
            assert opt.help, f"{spec.name}.{key}"
            # the default itself passes the check
            assert opt.check(key, defaults[key]) == defaults[key] or defaults[key] is None


# -- metrics that cannot run with this loss or data: refused up front --------------------
def test_metric_needs_checked_before_compute(tmp_path, spec, capsys) -> None:
    good = _ckpt(tmp_path)
    base = ["--model", f"{spec}:model", "--data", f"{spec}:data", "--out", str(tmp_path / "o")]
    _refused(
        ["measure", good, *base, "--metrics", "fisher_rao", "--loss", f"{spec}:loss_fn"],
        capsys,
        "--loss: fisher_rao needs per-example losses",
    )
    _refused(
        ["measure", good, *base, "--metrics", "fisher_rao", "--loss", "mse",
         "--set", "fisher_rao.fisher=model"],
        capsys, "needs nn.CrossEntropyLoss",
    )  # fmt: skip
    dict_base = [*base[:2], "--data", f"{spec}:dict_data", *base[4:]]
    _refused(
        ["measure", good, *dict_base, "--metrics", "pac_bayes", "--loss", f"{spec}:loss_fn"],
        capsys,
        "--accuracy: pac_bayes needs an accuracy",
    )
    assert not (tmp_path / "o").exists()
    # the same in the API, before any compute
    with pytest.raises(ValueError, match="fisher_rao needs per-example losses"):
        measure_sharpness(nn.Linear(6, 3), lambda m, b: m(b[0]).mean(), (torch.randn(4, 6),
                          torch.zeros(4)), ["lambda_max", "fisher_rao"])  # fmt: skip


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--max-batches", "0"], "--max-batches"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seed", "-1"], "--seed"),
        (["--threads", "0"], "--threads"),
        (["--loss", "SPEC:three"], "takes 3 arguments"),
        (["--loss", "SPEC:nothing"], "has no callable 'nothing'"),
        (["--accuracy", "SPEC:nothing"], "--accuracy"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_cli_arguments_refused(extra, match, tmp_path, spec, capsys) -> None:
    extra = [e.replace("SPEC", str(spec)) for e in extra]
    argv = ["measure", _ckpt(tmp_path), "--model", f"{spec}:model", "--data", f"{spec}:data",
            "--out", str(tmp_path / "o"), *FAST, *extra]  # fmt: skip
    _refused(argv, capsys, match)
    assert not (tmp_path / "o").exists()


def test_demo_refuses_inputs_it_does_not_take(capsys, no_training, tmp_path) -> None:
    _refused(["measure", "--demo", "--accuracy", "x:y"], capsys, "--demo: takes no")


# -- --out ----------------------------------------------------------------------------------
def test_out_that_is_a_file_or_under_a_file_refused(tmp_path, capsys, no_training) -> None:
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    _refused(["measure", "--demo", "--out", str(f)], capsys, "is a file, not a folder")
    _refused(["measure", "--demo", "--out", str(f / "sub")], capsys, "is a file")
    assert f.read_text() == "keep me"


def test_result_of_another_configuration_never_overwritten(tmp_path, spec, capsys) -> None:
    out = tmp_path / "o"
    argv = ["measure", _ckpt(tmp_path), "--model", f"{spec}:model", "--data", f"{spec}:data",
            "--out", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    first = (out / "report.json").read_bytes()
    key = json.loads(first)["config_key"]
    capsys.readouterr()
    _refused([*argv, "--set", "average_case.rho=0.02"], capsys, f"holds report.json of "
             f"configuration {key}")  # fmt: skip
    assert (out / "report.json").read_bytes() == first
    assert main(argv) == 0  # the same configuration may run again
    assert json.loads((out / "report.json").read_text())["config_key"] == key
    assert main([*argv, "--set", "average_case.rho=0.02", "--overwrite"]) == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["config_key"] != key and doc["config"]["options"] == {"average_case": {"rho": 0.02}}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging left


# -- data that never ends -----------------------------------------------------------------
def test_endless_data_is_bounded_and_says_so(tmp_path, spec, capsys) -> None:
    out = tmp_path / "o"
    argv = ["measure", _ckpt(tmp_path), "--model", f"{spec}:model", "--data", f"{spec}:endless",
            "--max-batches", "3", "--out", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    assert "measuring the first 3 (--max-batches)" in capsys.readouterr().err
    doc = json.loads((out / "report.json").read_text())
    assert doc["protocol"]["batches"] == 3 and doc["protocol"]["examples"] == 48


# -- loss and accuracy specs, import path -------------------------------------------------
@pytest.mark.parametrize("loss", ["SPEC:loss_fn", "SPEC:loss_factory", "torch.nn:CrossEntropyLoss"])
def test_loss_spec_forms(loss, tmp_path, spec) -> None:
    ckpt = _ckpt(tmp_path)
    common = ["--model", f"{spec}:model", "--data", f"{spec}:data", *FAST]
    assert main(["measure", ckpt, *common, "--out", str(tmp_path / "ref")]) == 0
    argv = ["measure", ckpt, *common, "--loss", loss.replace("SPEC", str(spec)),
            "--accuracy", f"{spec}:accuracy", "--out", str(tmp_path / "o")]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((tmp_path / "o" / "report.json").read_text())
    ref = json.loads((tmp_path / "ref" / "report.json").read_text())
    # the same cross-entropy in every form, the same accuracy: the same numbers
    assert doc["base"] == pytest.approx(ref["base"])
    assert doc["metrics"]["lambda_max"]["value"] == pytest.approx(
        ref["metrics"]["lambda_max"]["value"], rel=1e-5
    )


def test_current_folder_is_on_the_import_path(tmp_path, monkeypatch) -> None:
    pkg = tmp_path / "sk_user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    ckpt = _ckpt(tmp_path)
    argv = ["measure", ckpt, "--model", "sk_user_pkg.models:model",
            "--data", "sk_user_pkg.models:data", "--out", str(tmp_path / "o"), *FAST]  # fmt: skip
    assert main(argv) == 0


# -- series mode --------------------------------------------------------------------------
def test_series_steps_from_a_clear_pattern_and_csv_with_commas(tmp_path, spec, capsys) -> None:
    from sharpkit._commands.measure import _step_of

    assert _step_of("gpt2_lora.pt") is None and _step_of("lora_v2.pt") is None
    assert _step_of("ckpt_100.pt") == 100 and _step_of("run2-step300.safetensors") == 300
    assert _step_of("epoch3.pt") == 3 and _step_of("checkpoint-500.pt") == 500
    ckpts = [_ckpt(tmp_path, "gpt2_lora.pt", 0), _ckpt(tmp_path, "a,b full.pt", 1)]
    out = tmp_path / "s"
    argv = ["measure", *ckpts, "--model", f"{spec}:model", "--data", f"{spec}:data",
            "--out", str(out), *FAST]  # fmt: skip
    assert main(argv) == 0
    assert "steps are the order given" in capsys.readouterr().err
    doc = json.loads((out / "series.json").read_text())
    assert doc["steps"] == [0, 1] and doc["step_source"] == "order given"
    rows = list(csv.reader((out / "series.csv").open()))
    assert rows[0] == ["checkpoint", "step", "loss", "lambda_max", "average_case"]
    assert [r[0] for r in rows[1:]] == ckpts and all(len(r) == 5 for r in rows)


# -- checkpoints through the CLI: each kind exits 2 with one line ------------------------
class _Evil:
    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_checkpoint_kinds_exit_2(tmp_path, spec, capsys) -> None:
    base = ["--model", f"{spec}:model", "--data", f"{spec}:data", "--out", str(tmp_path / "o")]
    good = torch.load(_ckpt(tmp_path), weights_only=True)
    (tmp_path / "text.pt").write_text("hello\n")
    _refused(["measure", str(tmp_path / "text.pt"), *base], capsys, "corrupt")
    (tmp_path / "dir.pt").mkdir()
    _refused(["measure", str(tmp_path / "dir.pt"), *base], capsys, "not a regular file")
    blob = pathlib.Path(_ckpt(tmp_path, "legacy.pt")).read_bytes()
    (tmp_path / "trunc.pt").write_bytes(blob[: len(blob) // 3])
    _refused(["measure", str(tmp_path / "trunc.pt"), *base], capsys, "corrupt")
    marker = tmp_path / "pwned"
    torch.save({**good, "x": _Evil(marker)}, tmp_path / "evil.pt")
    _refused(["measure", str(tmp_path / "evil.pt"), *base], capsys, "unsafe: refused")
    save_state_dict({**good, "0.weight": good["0.weight"].to(torch.float8_e4m3fn)},
                    tmp_path / "fp8.safetensors")  # fmt: skip
    _refused(["measure", str(tmp_path / "fp8.safetensors"), *base], capsys, "dtype mismatches")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_fuzzed_checkpoints_through_the_cli(tmp_path, spec, capsys) -> None:
    import random

    from tests.io.test_checkpoint_fuzz import mutate

    rng = random.Random(1)
    data = pathlib.Path(_ckpt(tmp_path, "z.pt")).read_bytes()
    base = ["--model", f"{spec}:model", "--data", f"{spec}:data", "--out", str(tmp_path / "o")]
    codes = set()
    for i in range(25):
        path = tmp_path / f"f{i}.pt"
        path.write_bytes(mutate(data, rng))
        code = main(["measure", str(path), *base, *FAST, "--overwrite"])
        err = capsys.readouterr().err.strip()
        assert code in (0, 2), err
        if code == 2:
            assert len(err.splitlines()) == 1 and str(path) in err
        codes.add(code)
    assert 2 in codes


# -- failures at run time, non-convergence ------------------------------------------------
def test_a_failing_metric_keeps_the_others() -> None:
    calls = {"n": 0}

    def flaky_accuracy(model, batch):
        calls["n"] += 1
        if calls["n"] > 1:  # the base accuracy works, pac_bayes' calls fail
            raise RuntimeError("accuracy backend went away")
        x, y = batch
        return (model(x).argmax(-1) == y).float().mean()

    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    with pytest.warns(UserWarning, match="pac_bayes failed"):
        rep = measure_sharpness(nn.Linear(4, 3), nn.CrossEntropyLoss(), data,
                                ["lambda_max", "pac_bayes", "average_case"],
                                accuracy_fn=flaky_accuracy)  # fmt: skip
    assert list(rep.metrics) == ["lambda_max", "average_case"]
    assert rep.failures == {"pac_bayes": "RuntimeError: accuracy backend went away"}
    assert rep.to_dict()["failures"] == rep.failures and "FAILED" in str(rep)


def test_failing_metric_through_the_cli_exit_1_report_kept(tmp_path, spec, capsys) -> None:
    (tmp_path / "acc.py").write_text(
        "calls = [0]\n"
        "def acc(model, batch):\n"
        "    calls[0] += 1\n"
        "    if calls[0] > 1:\n"
        "        raise RuntimeError('boom')\n"
        "    return (model(batch[0]).argmax(-1) == batch[1]).float().mean()\n"
    )
    out = tmp_path / "o"
    argv = ["measure", _ckpt(tmp_path), "--model", f"{spec}:model", "--data", f"{spec}:data",
            "--accuracy", f"{tmp_path / 'acc.py'}:acc", "--out", str(out), "--no-progress",
            "--no-landscape", "--metrics", "lambda_max,pac_bayes"]  # fmt: skip
    assert main(argv) == 1
    assert "1 metric(s) failed (pac_bayes)" in capsys.readouterr().err
    doc = json.loads((out / "report.json").read_text())
    assert list(doc["metrics"]) == ["lambda_max"] and "boom" in doc["failures"]["pac_bayes"]


def test_non_converged_pac_bayes_is_labelled_everywhere() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))  # untrained
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(48, 6, generator=g), torch.randint(0, 3, (48,), generator=g))
    with pytest.warns(UserWarning, match="pac_bayes did not converge"):
        rep = measure_sharpness(net, nn.CrossEntropyLoss(), data, ["pac_bayes"],
                                options={"pac_bayes": {"max_iter": 5}})  # fmt: skip
    assert rep.not_converged == ["pac_bayes"]
    assert rep.to_dict()["not_converged"] == ["pac_bayes"]
    assert rep.to_dict()["metrics"]["pac_bayes"]["details"]["converged"] is False
    assert "NOT converged" in str(rep) and "(!)" in str(rep)


# -- interruptions ------------------------------------------------------------------------
def test_interrupt_in_process_exit_130_nothing_written(tmp_path, spec, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("sharpkit.sharpness.measure_sharpness", interrupted)
    out = tmp_path / "o"
    argv = ["measure", _ckpt(tmp_path), "--model", f"{spec}:model", "--data", f"{spec}:data",
            "--out", str(out), *FAST]  # fmt: skip
    _refused(argv, capsys, "interrupted; nothing written", code=130)
    assert not out.exists()


@pytest.mark.slow
def test_sigint_during_the_demo(tmp_path) -> None:
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).parents[1]), "MPLBACKEND": "Agg"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharpkit.cli", "measure", "--demo", "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # a suite started in the background ignores SIGINT, and so would the child
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    line = proc.stdout.readline()  # printed once the demo trained, while measuring
    assert line.startswith("demo: trained"), line
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.strip() == "sharpkit measure: interrupted; nothing written"
    assert not out.exists()


# -- help and info ------------------------------------------------------------------------
def test_help_lists_metrics_defaults_and_every_option_has_help(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["measure", "--help"])
    text = capsys.readouterr().out
    for name in METRICS:
        assert f"  {name}: " in text
    assert "worst_case.rho=0.05" in text and "pac_bayes.max_iter=40" in text
    measure = build_parser()._subparsers._group_actions[0].choices["measure"]
    for action in measure._actions:
        assert action.help, action.dest


def test_info_shows_pyhessian_version(capsys) -> None:
    pytest.importorskip("pyhessian")
    from importlib.metadata import version

    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("pyhessian"))
    assert line.split()[1] == version("pyhessian")


def test_progress_bars_quiet_when_piped_and_without_widgets(capsys) -> None:
    import importlib.util

    from sharpkit._progress import progress_bar

    bar = progress_bar(range(3), "x", enabled=True)  # stderr is captured: not a terminal
    assert bar.disable and list(bar) == [0, 1, 2]
    if importlib.util.find_spec("ipywidgets") is None:
        assert type(bar).__module__ == "tqdm.std"


# -- the hostile pass over the other public functions this package owns ------------------
def _hostile_cases(tmp: pathlib.Path):
    from sharpkit.data import load_digits
    from sharpkit.demo import demo_model, train_demo
    from sharpkit.io import load_checkpoint, load_state_dict, write_json_atomic
    from sharpkit.sharpness import (
        average_case_sharpness,
        epsilon_sharpness,
        pac_bayes_flatness,
        worst_case_sharpness,
    )

    net, ce = nn.Linear(4, 3), nn.CrossEntropyLoss()
    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    (tmp / "file").write_text("x")
    return [
        (lambda: worst_case_sharpness(net, ce, data, math.nan), "rho"),
        (lambda: worst_case_sharpness(net, ce, data, "0.1"), "rho"),
        (lambda: worst_case_sharpness(net, ce, data, 0.1, p=3), "p: expected 2 or inf"),
        (lambda: worst_case_sharpness(net, ce, data, 0.1, m=0), "m: expected"),
        (lambda: worst_case_sharpness(net, ce, data, 0.1, restarts=0), "restarts"),
        (lambda: average_case_sharpness(net, ce, data, math.inf), "rho"),
        (lambda: average_case_sharpness(net, ce, data, 0.1, samples=1.5), "samples"),
        (lambda: average_case_sharpness(net, ce, data, 0.1, noise="laplace"), "noise"),
        (lambda: pac_bayes_flatness(net, ce, data, max_drop=2.0), "can never be exceeded"),
        (lambda: pac_bayes_flatness(net, ce, data, rtol=0), "rtol"),
        (lambda: pac_bayes_flatness(net, ce, data, target="top5"), "target"),
        (lambda: epsilon_sharpness(net, ce, data, -1), "epsilon"),
        (
            lambda: measure_sharpness(net, ce, (torch.randn(8, 5), data[1]), ["lambda_max"]),
            "the loss failed at the unperturbed weights",
        ),
        (
            lambda: measure_sharpness(
                net, ce, data, ["pac_bayes"], options={"pac_bayes": {"max_drop": 1.0}}
            ),
            "pac_bayes.max_drop",
        ),
        (lambda: load_checkpoint(None, tmp / "file"), "model: expected an nn.Module"),
        (lambda: load_state_dict(None), "path: expected a str"),
        (lambda: load_state_dict(tmp / "file", map_location="bogus"), "map_location"),
        (lambda: save_state_dict([1], tmp / "x.pt"), "state: expected a mapping"),
        (lambda: save_state_dict({"a": 1}, tmp / "x.pt"), "not a tensor"),
        (lambda: save_state_dict({"a": torch.ones(1)}, tmp), "is a directory"),
        (lambda: save_state_dict({"a": torch.ones(1)}, tmp / "file" / "x.pt"), "is a file"),
        (lambda: write_json_atomic(tmp, {}), "is a directory"),
        (lambda: load_digits(seed=-1), "seed"),
        (lambda: load_digits(dtype="float32"), "dtype"),
        (lambda: load_digits(test_fraction=math.nan), "test_fraction"),
        (lambda: train_demo(epochs=-1), "epochs"),
        (lambda: train_demo(lr=math.nan), "lr"),
        (lambda: train_demo(batch_size=0), "batch_size"),
        (lambda: demo_model(0), "hidden"),
    ]


def test_hostile_pass_every_public_argument(tmp_path) -> None:
    before = sorted(p.name for p in tmp_path.iterdir())
    for call, match in _hostile_cases(tmp_path):
        with pytest.raises((ValueError, TypeError), match=match):
            call()
    # nothing written by any refused call (the fixture file aside)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({*before, "file"})


def test_data_that_does_not_fit_the_model_exit_2(tmp_path, spec, capsys) -> None:
    (tmp_path / "wide.py").write_text(
        "import torch\ndef data():\n    return torch.randn(8, 5), torch.randint(0, 3, (8,))\n"
    )
    argv = ["measure", _ckpt(tmp_path), "--model", f"{spec}:model", "--data",
            f"{tmp_path / 'wide.py'}:data", "--out", str(tmp_path / "o"), *FAST]  # fmt: skip
    _refused(argv, capsys, "the loss failed at the unperturbed weights")
    assert not (tmp_path / "o").exists()
