"""Statistics computed locally from a model, once, and cached on disk (Q-Filters' directions, and later others).

`store` keys artifacts by the model's fingerprint (`kvsqueeze.fingerprint`), the settings and the kvsqueeze version;
`collect` runs a model over kvsqueeze's generic text and gathers per-layer tensors from its attention modules.
"""

from kvsqueeze.calibration.collect import AttentionCall, calibration_ids, collect_attention, ids_digest
from kvsqueeze.calibration.store import (
    CalibrationFileError,
    artifact_path,
    calibrated,
    calibration_dir,
    forget,
    load_artifact,
    read_artifact,
    read_info,
    remembered,
)
from kvsqueeze.fingerprint import model_fingerprint

__all__ = [
    "AttentionCall",
    "CalibrationFileError",
    "artifact_path",
    "calibrated",
    "calibration_dir",
    "calibration_ids",
    "collect_attention",
    "forget",
    "ids_digest",
    "load_artifact",
    "model_fingerprint",
    "read_artifact",
    "read_info",
    "remembered",
]
