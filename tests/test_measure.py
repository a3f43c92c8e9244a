"""``sharpkit measure`` end to end: the demo, a user-style spec module, series mode, and
the refusals (exit code 2 with a one-line reason, before any compute)."""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from sharpkit.cli import main
from sharpkit.io import save_state_dict

SPEC = (pathlib.Path(__file__).parent / "_user_spec.py").read_text()


FAST = ["--metrics", "lambda_max,worst_case_adaptive,average_case", "--no-progress"]


@pytest.fixture()
def spec(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "user_spec.py"
    path.write_text(SPEC)
    return path


def _checkpoint(tmp_path: pathlib.Path, name: str, seed: int) -> pathlib.Path:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return save_state_dict(net.state_dict(), tmp_path / name)


def test_demo_end_to_end(tmp_path, capsys) -> None:
    out = tmp_path / "demo"
    code = main(["measure", "--demo", "--out", str(out), *FAST])
    assert code == 0
    text = capsys.readouterr().out
    assert "lambda_max" in text and "worst_case_adaptive" in text
    doc = json.loads((out / "report.json").read_text())
    assert doc["schema_version"] == 1
    assert list(doc["metrics"]) == ["lambda_max", "worst_case_adaptive", "average_case"]
    assert doc["base"]["accuracy"] > 0.9  # the demo model is trained
    for fig in ("landscape_1d.png", "landscape_2d.png", "trajectory_pca.png"):
        assert (out / fig).stat().st_size > 0
    # the saved demo checkpoint measures again through the spec route, to the same number
    code = main(
        ["measure", str(out / "demo_model.safetensors"), "--model", "sharpkit.demo:demo_model",
         "--data", "digits", "--out", str(tmp_path / "again"), "--no-landscape", *FAST]
    )  # fmt: skip
    assert code == 0
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    # same weights and data; float32 sums whose order depends on the thread count can
    # change where Lanczos stops, and it stops at a residual of tol = 1e-4 * ||H||
    assert again["metrics"]["lambda_max"]["value"] == pytest.approx(
        doc["metrics"]["lambda_max"]["value"], rel=3e-4
    )


def test_user_spec_module_and_esd(tmp_path, spec) -> None:
    ckpt = _checkpoint(tmp_path, "model.pt", 0)
    out = tmp_path / "out"
    code = main(
        ["measure", str(ckpt), "--model", f"{spec}:model", "--data", f"{spec}:data",
         "--metrics", "esd,trace,fisher_rao", "--set", "esd.runs=2", "--batch-size", "32",
         "--out", str(out), "--no-landscape", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / "report.json").read_text())
    assert doc["metrics"]["esd"]["protocol"]["extra"]["runs"] == 2
    assert doc["metrics"]["trace"]["protocol"]["batches"] == 3
    assert doc["metrics"]["trace"]["protocol"]["extra"]["hvp"] == "rev-rev"
    assert (out / "esd.png").exists() and not (out / "landscape_1d.png").exists()


def test_series_mode(tmp_path, spec) -> None:
    ckpts = [_checkpoint(tmp_path, f"ckpt_{s}.safetensors", s) for s in (10, 20, 30)]
    out = tmp_path / "series"
    code = main(
        ["measure", *map(str, ckpts), "--model", f"{spec}:model", "--data", f"{spec}:data",
         "--out", str(out), *FAST]
    )  # fmt: skip
    assert code == 0
    doc = json.loads((out / "series.json").read_text())
    assert doc["steps"] == [10, 20, 30] and len(doc["reports"]) == 3
    assert (out / "series.png").exists()
    assert (out / "series.csv").read_text().splitlines()[0].startswith("checkpoint,step,loss,")


class _Evil:
    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def _refused(argv, capsys, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert match in err, err


def test_refusals(tmp_path, spec, capsys) -> None:
    good = str(_checkpoint(tmp_path, "good.pt", 0))
    base = ["--model", f"{spec}:model", "--data", f"{spec}:data", "--out", str(tmp_path / "o")]
    _refused(["measure", "--no-progress"], capsys, "--demo")
    _refused(["measure", good, *base, "--metrics", "nope"], capsys, "--metrics: unknown")
    _refused(["measure", str(tmp_path / "missing.pt"), *base], capsys, "no such checkpoint")
    _refused(["measure", good, "--data", "digits"], capsys, "--model: required")
    _refused(["measure", good, *base[:2], "--data", "nomodule_xyz:data"], capsys, "--data")
    _refused(
        ["measure", good, "--model", f"{spec}:not_a_model", *base[2:]], capsys, "not an nn.Module"
    )
    _refused(["measure", good, *base, "--set", "worst_case.rho"], capsys, "--set")
    # a summed loss would scale every metric by the batch size: refused, naming it
    _refused(["measure", good, *base, "--loss", f"{spec}:summed"], capsys, "reduction='sum'")
    _refused(["measure", "--demo", "--loss", "mse"], capsys, "takes no --loss")
    # a known crash of torch's tracer is refused, not run
    _refused(
        ["measure", good, *base, "--loss", "mse", "--hvp", "linearize"], capsys, "--hvp linearize"
    )
    # a pickle whose loading would create a file: refused, and the file never appears
    target = tmp_path / "pwned"
    torch.save({"0.weight": torch.zeros(8, 6), "x": _Evil(target)}, tmp_path / "evil.pt")
    _refused(["measure", str(tmp_path / "evil.pt"), *base], capsys, "refused")
    assert not target.exists()
    # key/shape mismatch names the keys
    bad = torch.load(good, weights_only=True)
    bad["2.weight"] = torch.zeros(4, 8)
    bad.pop("0.bias")
    save_state_dict(bad, tmp_path / "bad.pt")
    _refused(["measure", str(tmp_path / "bad.pt"), *base], capsys, "missing keys: 0.bias")
    # non-finite weights are reported, not measured
    nan = torch.load(good, weights_only=True)
    nan["0.weight"][0, 0] = float("nan")
    save_state_dict(nan, tmp_path / "nan.pt")
    _refused(
        ["measure", str(tmp_path / "nan.pt"), *base],
        capsys,
        "non-finite weights (NaN or inf) in: 0.weight",
    )
    assert not (tmp_path / "o").exists()  # nothing computed, nothing written
