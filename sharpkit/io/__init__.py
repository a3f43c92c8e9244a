"""Result files and safe checkpoint loading."""

from .checkpoint import (
    KINDS,
    MAX_NAMES,
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_state_dict,
    nonfinite_entries,
    save_model,
    save_state_dict,
)
from .results import read_json, write_json_atomic

__all__ = [
    "KINDS",
    "MAX_NAMES",
    "CheckpointError",
    "check_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "nonfinite_entries",
    "read_json",
    "save_model",
    "save_state_dict",
    "write_json_atomic",
]
