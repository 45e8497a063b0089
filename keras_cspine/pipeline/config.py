"""Settings of the two-stage inference (``predict --config FILE --set key=value``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass

from keras_cspine.io.rsna import VERTEBRAE

AGGREGATIONS = ("max", "noisy_or")
#: ``keras_cspine.stage1.fast_inference.ENGINES`` (not imported: this module stays light)
STAGE1_ENGINES = ("auto", "keras", "xla", "onnx", "onnx_int8", "openvino", "openvino_bf16")

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
        stage1_engine: how stage 1 runs (:mod:`keras_cspine.stage1.fast_inference`): ``auto``
            (OpenVINO in bfloat16 where the CPU computes bfloat16 natively: 2.4x Keras for
            GCViT-tiny at 224 px; plain Keras elsewhere), ``keras``, ``xla``, ``onnx``,
            ``openvino`` (all float32, within 1e-4 of Keras), ``onnx_int8`` (int8 weights) or
            ``openvino_bf16`` (reduced precision: their results are not those of the others).
        report_workers: processes drawing the reports while the next study is predicted
            (0: drawn in the predicting process, one after the other).
        gate_stride: with ``gating``, stage 2 first looks at every ``gate_stride``-th gated
            slice, then at the neighbours of every slice where it found a box, until a slice
            without one (:func:`keras_cspine.pipeline.results.refine_slices`); 1 looks at every
            gated slice.
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
    stage1_engine: str = "auto"
    report_workers: int = 1
    gate_stride: int = 2

    def __post_init__(self):
        if self.stage1_engine not in STAGE1_ENGINES:
            raise ValueError(f"stage1_engine must be one of {STAGE1_ENGINES}, got "
                             f"{self.stage1_engine!r}")  # fmt: skip
        if self.report_workers < 0:
            raise ValueError(f"report_workers must be >= 0, got {self.report_workers!r}")
        if self.gate_stride < 1:
            raise ValueError(f"gate_stride must be >= 1, got {self.gate_stride!r}")
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
                if k not in ("batch_size", "report", "key_slices", "threads", "stage1_engine",
                             "report_workers") and (k != "gate_stride" or v != 1)}  # fmt: skip
        return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]

    def prior(self) -> dict[str, float]:
        """The probabilities of a study without any box (also the fallback of a failed study)."""
        return {**dict.fromkeys(VERTEBRAE, self.vertebra_floor), "patient_overall": self.patient_floor}


#: The default settings (a frozen instance, safe as an argument default).
DEFAULT_PREDICT_CONFIG = PredictConfig()
