"""Fuzzing the checkpoint loader: seeded mutations of valid safetensors, zip and legacy
torch files (and of code-running pickles). Every case either loads into the model or is
refused with a :class:`CheckpointError` of a known kind and a one-line reason; no raw
exception escapes, and the marker file of the code-running pickle never appears."""

from __future__ import annotations

import pathlib
import random

import pytest
import torch
from torch import nn

from sharpkit.io import KINDS, CheckpointError, load_checkpoint, save_state_dict

#: mutated files per base file and test (5 base files -> 2,500 cases)
CASES = 500


class _Evil:
    def __init__(self, target: pathlib.Path) -> None:
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _bases(tmp: pathlib.Path, marker: pathlib.Path) -> dict[str, tuple[str, bytes]]:
    state = _model().state_dict()
    out = {}
    save_state_dict(state, tmp / "b.safetensors")
    out["safetensors"] = (".safetensors", (tmp / "b.safetensors").read_bytes())
    torch.save(state, tmp / "zip.pt")
    out["zip"] = (".pt", (tmp / "zip.pt").read_bytes())
    torch.save(state, tmp / "legacy.pt", _use_new_zipfile_serialization=False)
    out["legacy"] = (".pt", (tmp / "legacy.pt").read_bytes())
    evil = {**state, "payload": _Evil(marker)}
    torch.save(evil, tmp / "evil_zip.pt")
    out["evil_zip"] = (".pt", (tmp / "evil_zip.pt").read_bytes())
    torch.save(evil, tmp / "evil_legacy.pt", _use_new_zipfile_serialization=False)
    out["evil_legacy"] = (".pt", (tmp / "evil_legacy.pt").read_bytes())
    return out


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation: flips, truncation, insertion, deletion, duplication, random."""
    b = bytearray(data)
    op = rng.randrange(7)
    if op == 0:  # flip a few bytes
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif op == 1:  # truncate
        del b[rng.randrange(len(b)) :]
    elif op == 2:  # insert random bytes
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.randbytes(rng.randint(1, 64))
    elif op == 3:  # delete a range
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 64)]
    elif op == 4:  # duplicate a chunk
        i = rng.randrange(len(b))
        b[i:i] = b[i : i + rng.randint(1, 256)]
    elif op == 5:  # overwrite a region with random bytes
        i = rng.randrange(len(b))
        n = rng.randint(1, 128)
        b[i : i + n] = rng.randbytes(min(n, len(b) - i))
    else:  # random bytes of a random length
        b = bytearray(rng.randbytes(rng.randint(0, 2 * len(b))))
    return bytes(b)


@pytest.mark.parametrize("base", ["safetensors", "zip", "legacy", "evil_zip", "evil_legacy"])
def test_mutated_checkpoints_load_or_are_refused_with_a_reason(tmp_path, base) -> None:
    marker = tmp_path / "pwned"
    suffix, data = _bases(tmp_path, marker)[base]
    rng = random.Random(f"sharpkit-fuzz-{base}")
    kinds: dict[str, int] = {}
    for i in range(CASES):
        path = tmp_path / f"case{i % 7}{suffix}"
        path.write_bytes(mutate(data, rng))
        model = _model()
        try:
            load_checkpoint(model, path)
        except CheckpointError as err:
            msg = str(err)
            assert err.kind in KINDS, msg
            assert "\n" not in msg and len(msg) < 1500, msg
            kinds[err.kind] = kinds.get(err.kind, 0) + 1
        else:
            kinds["loaded"] = kinds.get("loaded", 0) + 1
        assert not marker.exists(), f"case {i}: a pickle ran code"
    # a damaged file is corrupt, not unsafe, unless its pickle still asks for code
    if not base.startswith("evil"):
        assert kinds.get("unsafe", 0) <= CASES // 50, kinds
    assert kinds.get("corrupt", 0) > CASES // 4, kinds


def test_random_bytes_and_truncations_are_corrupt_not_unsafe(tmp_path) -> None:
    rng = random.Random(0)
    legacy = tmp_path / "l.pt"
    torch.save(_model().state_dict(), legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    for n in range(0, len(data), max(1, len(data) // 97)):
        path = tmp_path / "t.pt"
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(_model(), path)
        assert exc.value.kind == "corrupt", str(exc.value)
    for _ in range(200):
        path = tmp_path / "r.pt"
        path.write_bytes(rng.randbytes(rng.randint(0, 4096)))
        with pytest.raises(CheckpointError) as exc:
            load_checkpoint(_model(), path)
        assert exc.value.kind == "corrupt", str(exc.value)
