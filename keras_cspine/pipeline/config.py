"""Settings of the two-stage inference (``predict --config FILE --set key=value``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from keras_cspine.io.rsna import VERTEBRAE

AGGREGATIONS = ("max", "noisy_or")

@dataclass(frozen=True)
class PredictConfig:
    """Settings of the two-stage inference (``--config FILE``, ``--set key=value``).

    Args:
        gating: run stage 2 only on slices where stage 1 sees a cervical vertebra.
        sequence_model: read stage 1 along the study with the run's sequence model
            (:mod:`keras_cspine.stage1.sequence_model`) when it has one; it takes precedence over
            ``level_decoding``.
        level_decoding: decode stage 1's per-slice probabilities study by study
            (:mod:`keras_cspine.stage1.level_decoding`) when the stage 1 run has a decoder (and no
            sequence model is used).
        presence_threshold: a vertebra is present on a slice when its probability reaches this;
            used by the gate and by the assignment of boxes.
        box_conf: minimum confidence of a stage 2 box (Ultralytics' predict default 0.25).
        box_iou: NMS IoU threshold of stage 2.
        aggregation: ``"max"`` or ``"noisy_or"`` over a vertebra's boxes (see the module).
        vertebra_floor, patient_floor: probability of a vertebra / the patient without any box.
        ceiling: the highest probability written.
        batch_size: stage 1 slices per forward pass.
        decoder: DICOM decoder (``keras_cspine.io.dicom.read_slice``).
        report: ``"html"``, ``"markdown"`` or ``"none"``.
        key_slices: slices with the strongest boxes drawn in a report.
        threads: onnxruntime intra-op threads (None: its default).
    """

    gating: bool = True
    sequence_model: bool = True
    level_decoding: bool = True
    presence_threshold: float = 0.5
    box_conf: float = 0.25
    box_iou: float = 0.7
    aggregation: str = "max"
    vertebra_floor: float = 0.05
    patient_floor: float = 0.15
    ceiling: float = 0.95
    batch_size: int = 32
    decoder: str = "auto"
    report: str = "html"
    key_slices: int = 4
    threads: int | None = None

    def __post_init__(self):
        for name in ("presence_threshold", "box_conf", "box_iou"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")
        if not 0.0 <= self.vertebra_floor <= self.ceiling <= 1.0 or not (
            0.0 <= self.patient_floor <= self.ceiling
        ):
            raise ValueError(
                f"need 0 <= vertebra_floor, patient_floor <= ceiling <= 1, got "
                f"{self.vertebra_floor!r}, {self.patient_floor!r}, {self.ceiling!r}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if self.report not in ("html", "markdown", "none"):
            raise ValueError(f"report must be 'html', 'markdown' or 'none', got {self.report!r}")
        if self.key_slices < 0:
            raise ValueError(f"key_slices must be >= 0, got {self.key_slices!r}")

    def digest(self) -> str:
        """What a study's result depends on (the report settings excluded)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("batch_size", "report", "key_slices", "threads")}  # fmt: skip
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]

    def prior(self) -> dict[str, float]:
        """The probabilities of a study without any box (also the fallback of a failed study)."""
        return {**dict.fromkeys(VERTEBRAE, self.vertebra_floor), "patient_overall": self.patient_floor}


#: The default settings (a frozen instance, safe as an argument default).
DEFAULT_PREDICT_CONFIG = PredictConfig()
