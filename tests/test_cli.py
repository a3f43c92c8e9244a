"""The sharpkit command: --version, info, experiment."""

from __future__ import annotations

import pytest

from sharpkit import __version__
from sharpkit.cli import main


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert __version__ in capsys.readouterr().out


def test_info(capsys) -> None:
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "device" in out


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "usage" in capsys.readouterr().out


def test_experiment_list_and_run(tmp_path, capsys) -> None:
    assert main(["experiment", "list"]) == 0
    assert "two_cycle" in capsys.readouterr().out
    rc = main(
        [
            "experiment",
            "two_cycle",
            "--scale",
            "test",
            "--seeds",
            "1",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    assert rc == 0
    # one folder per configuration: NAME/SCALE/KEY/ with the config beside the seeds
    (run_dir,) = (tmp_path / "two_cycle" / "test").iterdir()
    assert (run_dir / "seed0.json").exists() and (run_dir / "config.json").exists()
    assert "verdict: supported" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["experiment", "nope"], "unknown experiment"),
        (["experiment", "two_cycle", "--set", "eta_lambdas=3"], "eta_lambdas"),
        (["experiment", "two_cycle", "--set", "bogus=1"], "unknown field"),
        (["experiment", "two_cycle", "--set", "steps"], "FIELD=VALUE"),
        (["experiment", "two_cycle", "--seeds", "0"], "--seeds"),
        (["experiment", "two_cycle", "--device", "cuda:7"], "device"),
    ],
)
def test_experiment_bad_input_exits_2_with_one_line(argv, message, capsys) -> None:
    try:
        import torch

        if "cuda:7" in argv and torch.cuda.device_count() > 7:
            pytest.skip("machine has cuda:7")
    except ImportError:
        pass
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
