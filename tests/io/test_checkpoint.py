"""Safe checkpoint loading: formats, refusal of code-running pickles, mismatches, NaNs."""

from __future__ import annotations

import pathlib

import pytest
import torch
from torch import nn

from sharpkit.io import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_state_dict,
    nonfinite_entries,
    save_state_dict,
)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path, suffix) -> None:
    net = _net()
    path = save_state_dict(net.state_dict(), tmp_path / f"m{suffix}")
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    load_checkpoint(other, path)
    for (k, a), b in zip(net.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


def test_nested_training_checkpoint(tmp_path) -> None:
    net = _net()
    torch.save({"model_state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert set(load_state_dict(tmp_path / "ckpt.pt")) == set(net.state_dict())


class _Evil:
    """Unpickling this creates a file: the attack a weights-only load must block."""

    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def test_malicious_pickle_refused_and_never_executed(tmp_path) -> None:
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "payload": _Evil(target)}, path)
    assert not target.exists()
    with pytest.raises(CheckpointError, match="refused: the file needs arbitrary code"):
        load_state_dict(path)
    assert not target.exists()
    # sanity of the test itself: an unsafe load would have created the file
    torch.load(path, weights_only=False)
    assert target.exists()


def test_key_and_shape_mismatches_named(tmp_path) -> None:
    state = dict(_net().state_dict())
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(5, 4)
    path = save_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(_net(), path)
    msg = str(info.value)
    assert "missing keys: 0.bias" in msg
    assert "unexpected keys: extra.weight" in msg
    assert "2.weight (checkpoint (5, 4), model (2, 4))" in msg
    assert check_state_dict(_net(), _net().state_dict()) == []


def test_nonfinite_reported(tmp_path) -> None:
    state = dict(_net().state_dict())
    state["0.weight"] = state["0.weight"].clone()
    state["0.weight"][0, 0] = float("inf")
    state["2.bias"] = torch.full((2,), float("nan"))
    path = save_state_dict(state, tmp_path / "nan.pt")
    assert nonfinite_entries(state) == ["0.weight", "2.bias"]
    with pytest.raises(CheckpointError, match=r"non-finite weights .* 0.weight, 2.bias"):
        load_checkpoint(_net(), path)
    load_checkpoint(_net(), path, allow_nonfinite=True)


def test_unreadable_files(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_state_dict(tmp_path / "missing.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "junk.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pt")
