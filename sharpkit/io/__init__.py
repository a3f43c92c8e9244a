"""Result files and safe checkpoint loading."""

from .results import MeasurementProtocol, read_json, to_jsonable, write_json_atomic

__all__ = ["MeasurementProtocol", "read_json", "to_jsonable", "write_json_atomic"]
