"""Result files and safe checkpoint loading."""

from .checkpoint import (
    CheckpointError,
    check_state_dict,
    load_checkpoint,
    load_state_dict,
    nonfinite_entries,
    save_state_dict,
)
from .results import MeasurementProtocol, read_json, to_jsonable, write_json_atomic

__all__ = [
    "CheckpointError",
    "MeasurementProtocol",
    "check_state_dict",
    "load_checkpoint",
    "load_state_dict",
    "nonfinite_entries",
    "read_json",
    "save_state_dict",
    "to_jsonable",
    "write_json_atomic",
]
