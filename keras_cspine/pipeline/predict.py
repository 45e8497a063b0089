"""Two-stage inference: ``python -m keras_cspine predict INPUT --out OUT`` (the paper's two stages).

The paper's system has two models, both applied to the axial slices of a CT study:

1. **stage 1**, vertebrae classification (Section 2.5): the two-input GCViT (or a baseline) gives
   each slice the probabilities that C1..C7 are present on it;
2. **stage 2**, fracture detection (Section 2.6): a YOLO detector draws fracture boxes.

This module (not the paper) joins them into study-level findings:

- a study folder is read in series order (superior -> inferior) by :mod:`keras_cspine.io.dicom`;
- stage 1 runs on every slice (:class:`Stage1Model`, the ``.keras`` of a training run, with the
  run's preprocessing mode, image size and metadata features); beyond the paper, the study is
  then read as one sequence by the run's sequence model (:mod:`keras_cspine.stage1.sequence_model`, a
  bidirectional GRU over the slice features) or, for runs without one, its per-slice
  probabilities are decoded by the run's level decoder (:mod:`keras_cspine.stage1.level_decoding`: the
  vertebrae follow each other down the spine);
- **gating**: stage 2 (:class:`Stage2Model`, the ONNX export run by onnxruntime, so that no torch
  enters the TensorFlow process) runs only on slices where stage 1 sees a cervical vertebra
  (``max_k p_k >= presence_threshold``); ``gating=False`` runs it on every slice;
- each box is **assigned** to the vertebrae present on its slice (``p_k >= presence_threshold``)
  with the evidence ``score * p_k``; boxes on slices without any cervical vertebra are kept in the
  JSON but count for nothing;
- **aggregation**: a vertebra's evidence is the maximum of its boxes' evidence (``"max"``) or
  their noisy-OR (``"noisy_or"``); the patient's is the maximum (noisy-OR) over vertebrae. An
  evidence ``e`` becomes the probability ``floor + (ceiling - floor) * e``, so that a study
  without boxes keeps a small prior and no probability reaches 0 or 1 (the competition metric is
  a log loss).

Outputs of :func:`predict` (all written atomically; a rerun with the same settings keeps the
studies already done):

- ``submission.csv``: the RSNA format (``row_id = <UID>_C1..C7``, ``<UID>_patient_overall``,
  ``fractured``), ready for the Kaggle competition; a study that cannot be read gets its prior
  rows, so that the file stays complete;
- ``predictions.csv``: one row per study (probabilities, slice and box counts, status);
- ``studies/<UID>.json``: per-slice vertebra probabilities, the gate, every box (slice number,
  ``x, y, width, height`` in native pixels as in ``train_bounding_boxes.csv``, score, vertebrae);
- ``reports/<UID>/report.html`` (or ``.md``) with PNG figures (:mod:`keras_cspine.pipeline.report`), and
  ``index.html`` linking them;
- ``errors.csv``: the studies that could not be read, and why;
- ``summary.json``: models, settings, timings per step (read, stage 1, stage 2, report) and, with
  ``labels``, the study-level evaluation (:func:`evaluate_predictions`: the competition's
  weighted log loss, per-vertebra and patient AUC), also in ``evaluation.json`` / ``.md``.

Memory: a study is held as float32 HU while it is processed (about 1 MB per 512 x 512 slice).

Example:
    >>> summary = predict("test_images", "runs/predict",
    ...                   stage1="runs/stage1_gcvit_tiny", stage2="runs/detect/yolov8s")  # doctest: +SKIP
    >>> summary["files"]["submission"]  # doctest: +SKIP
    'runs/predict/submission.csv'
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import TARGETS, VERTEBRAE
from keras_cspine.utils import atomic_write, write_json

__all__ = [
    "AGGREGATIONS",
    "Box",
    "PredictConfig",
    "Stage1Model",
    "Stage2Model",
    "StudyResult",
    "aggregate_study",
    "assign_boxes",
    "evaluate_predictions",
    "find_latest_stage1",
    "find_latest_stage2",
    "find_studies",
    "gate_slices",
    "predict",
    "predict_study",
]

AGGREGATIONS = ("max", "noisy_or")
STEPS = ("read", "stage1", "stage2", "report")
RESULT_FORMAT = 1
_ROW_TARGET = re.compile(r"_(C[1-7]|patient_overall)$")


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------
# Finding studies and models
# --------------------------------------------------------------------------------------------
def _has_dicom(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir())


def find_studies(input_path: str | os.PathLike) -> list[Path]:
    """The study folders of ``input_path``.

    ``input_path`` is one study folder (it holds ``.dcm`` files), a folder of study folders (the
    RSNA ``test_images`` layout) or an RSNA dataset root (its ``test_images`` are used).
    Sub-folders are returned sorted by name, hidden ones left out.
    """
    root = Path(input_path)
    if not root.is_dir():
        raise CSpineDataError(root, "input folder not found")
    if _has_dicom(root):
        return [root]
    if (root / "test_images").is_dir() and not any(
        p.is_dir() and _has_dicom(p) for p in root.iterdir() if not p.name.startswith(".")
    ):
        root = root / "test_images"
    studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not studies:
        raise CSpineDataError(
            root, "no study folders: expected <UID>/<n>.dcm folders (RSNA test_images layout) or "
            "a folder of .dcm slices"
        )  # fmt: skip
    return studies


def _newest(paths: Iterable[Path]) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def find_latest_stage1(runs: str | os.PathLike = "runs") -> Path | None:
    """The newest stage 1 run directory under ``runs`` (one holding ``model.keras``), or None."""
    root = Path(runs)
    if not root.is_dir():
        return None
    found = _newest(p for p in root.rglob("model.keras") if "backup" not in p.parts)
    return found.parent if found else None


def find_latest_stage2(runs: str | os.PathLike = "runs") -> Path | None:
    """The newest stage 2 weights under ``runs``: ``weights/best.onnx`` (else ``best.pt``)."""
    root = Path(runs)
    if not root.is_dir():
        return None
    return _newest(root.rglob("weights/best.onnx")) or _newest(root.rglob("weights/best.pt"))


# --------------------------------------------------------------------------------------------
# Stage 1
# --------------------------------------------------------------------------------------------
def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CSpineDataError(path, f"cannot read: {err}") from err
    return data if isinstance(data, dict) else {}


def _stage1_settings(run_dir: Path | None) -> dict[str, Any]:
    """Preprocessing of a training run: mode and render size (prepare), metadata columns."""
    settings: dict[str, Any] = {}
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return settings
    config = _read_yaml(run_dir / "config.yaml")
    data = config.get("data") or {}
    if data.get("metadata_columns"):
        settings["metadata_columns"] = tuple(data["metadata_columns"])
    settings["mode"] = data.get("prepare_mode")  # used only when prepare.json is gone
    splits = run_dir / "splits.json"
    if splits.is_file():
        prepared = json.loads(splits.read_text(encoding="utf-8")).get("prepared")
        prepare_json = Path(prepared) / "prepare.json" if prepared else None
        if prepare_json is not None and prepare_json.is_file():
            prep = json.loads(prepare_json.read_text(encoding="utf-8")).get("settings", {})
            settings["mode"] = prep.get("mode", settings["mode"])
            settings["render_size"] = prep.get("size")
    return {k: v for k, v in settings.items() if v is not None}


class Stage1Model:
    """The stage 1 vertebrae classifier with the preprocessing it was trained with.

    Args:
        model: a loaded ``keras.Model`` (inputs ``image`` and/or ``metadata``, 7 sigmoids).
        mode: ``keras_cspine.data.preprocess`` mode of the training images.
        render_size: side at which slices were rendered (the prepare size); the model's own
            input size when None. Images are then resampled to the model's input size, exactly
            as ``CSpineSequence`` does.
        metadata_columns: features of the ``metadata`` input (``position_mm``, ``slice_ratio``
            or ``z_mm``), scaled as in ``keras_cspine.stage1.dataset.METADATA_SCALE``.
        source: where the model came from (for logs).
    """

    def __init__(self, model, mode: str = "bone", render_size: int | None = None,
                 metadata_columns: Sequence[str] = ("position_mm", "slice_ratio"),
                 source: str = "<in memory>", level_decoder=None,
                 sequence_model=None):  # fmt: skip
        from keras_cspine.data.preprocess import MODES, WINDOW_MODES

        if mode not in (*MODES, *WINDOW_MODES):
            raise ValueError(f"mode must be one of {sorted({*MODES, *WINDOW_MODES})}, got {mode!r}")
        self.model = model
        inputs = model.input if isinstance(model.input, dict) else {"image": model.input}
        self.input_names = tuple(inputs)
        unknown = set(self.input_names) - {"image", "metadata"}
        if unknown:
            raise ValueError(f"stage 1 model has unknown inputs {sorted(unknown)}")
        self.image_size = int(inputs["image"].shape[1]) if "image" in inputs else None
        self.render_size = int(render_size or self.image_size or 0) or None
        self.mode = mode
        self.metadata_columns = tuple(metadata_columns)
        if "metadata" in inputs and inputs["metadata"].shape[-1] != len(self.metadata_columns):
            raise ValueError(
                f"stage 1 model takes {inputs['metadata'].shape[-1]} metadata features, but "
                f"{len(self.metadata_columns)} columns are configured: {self.metadata_columns}"
            )
        self.source = source
        self.level_decoder = level_decoder
        self.sequence_model = sequence_model
        self._feature_model = None
        if sequence_model is not None:
            from keras_cspine.stage1.sequence_model import feature_model

            self._feature_model = feature_model(model)
            got = int(self._feature_model.outputs[0].shape[-1])
            wants = int(sequence_model.input["features"].shape[-1])
            if got != wants:
                raise ValueError(f"the sequence model reads {wants} slice features, but stage 1 "
                                 f"model {source} gives {got}")  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike, mode: str | None = None,
             render_size: int | None = None) -> Stage1Model:  # fmt: skip
        """A training run directory (``model.keras`` + ``config.yaml``) or a ``.keras`` file.

        The preprocessing comes from the run (its ``config.yaml`` and the ``prepare.json`` of
        its data); ``mode`` / ``render_size`` override it (default ``bone`` at the model size).
        The run's ``level_decoder.json`` and ``sequence_model.keras`` (written by ``train``),
        when present beside the model, are loaded as :attr:`level_decoder` and
        :attr:`sequence_model`.
        """
        import keras

        import keras_cspine.stage1.models.baselines  # noqa: F401 - registers the backbones for loading
        from keras_cspine.stage1.level_decoding import LEVEL_DECODER_FILE, LevelDecoder
        from keras_cspine.stage1.sequence_model import SEQUENCE_MODEL_FILE, load_sequence_model

        path = Path(path)
        model_path = path / "model.keras" if path.is_dir() else path
        if not model_path.is_file():
            raise CSpineDataError(model_path, "stage 1 model not found (a run directory with "
                                              "model.keras, or a .keras file)")  # fmt: skip
        settings = _stage1_settings(model_path.parent)
        try:
            model = keras.saving.load_model(model_path)
        except (ValueError, OSError, TypeError) as err:
            raise CSpineDataError(model_path, f"not a loadable Keras model: {err}") from err
        decoder_path = model_path.parent / LEVEL_DECODER_FILE
        sequence_path = model_path.parent / SEQUENCE_MODEL_FILE
        return cls(
            model, mode=mode or settings.get("mode", "bone"),
            render_size=render_size or settings.get("render_size"),
            metadata_columns=settings.get("metadata_columns", ("position_mm", "slice_ratio")),
            source=str(model_path),
            level_decoder=LevelDecoder.load(decoder_path) if decoder_path.is_file() else None,
            sequence_model=(load_sequence_model(sequence_path) if sequence_path.is_file()
                            else None),
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The settings, for logs and JSON."""
        return {
            "source": self.source, "inputs": list(self.input_names), "mode": self.mode,
            "render_size": self.render_size, "image_size": self.image_size,
            "metadata_columns": list(self.metadata_columns),
            "level_decoder": self.level_decoder is not None,
            "sequence_model": self.sequence_model is not None,
        }  # fmt: skip

    def metadata(self, positions_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
        """``(Z, F)`` metadata of a series, as ``prepare`` indexes it and ``CSpineSequence``
        scales it: ``position_mm`` below the first slice, ``slice_ratio``, ``z_mm``."""
        from keras_cspine.stage1.dataset import METADATA_SCALE

        n = len(positions_mm)
        columns = {
            "position_mm": positions_mm[0] - positions_mm,
            "slice_ratio": np.arange(n) / (n - 1) if n > 1 else np.zeros(1),
            "z_mm": np.asarray(z_mm, dtype=np.float64),
        }
        unknown = [c for c in self.metadata_columns if c not in columns]
        if unknown:
            raise ValueError(f"unsupported metadata column(s) {unknown}; known {sorted(columns)}")
        out = np.stack([columns[c] * METADATA_SCALE.get(c, 1.0) for c in self.metadata_columns],
                       axis=1) if self.metadata_columns else np.zeros((n, 0))  # fmt: skip
        return out.astype(np.float32)

    def images(self, hu: np.ndarray) -> np.ndarray:
        """``(Z, S, S, 3)`` float32 model images of a HU volume (the training preprocessing)."""
        from keras_cspine.data.preprocess import to_model_image
        from keras_cspine.stage1.dataset import resample

        out = np.empty((len(hu), self.image_size, self.image_size, 3), np.float32)
        for i, slice_hu in enumerate(hu):
            image = to_model_image(slice_hu, mode=self.mode, size=self.render_size)
            out[i] = resample(image, self.image_size)
        return out

    def predict(self, hu: np.ndarray, positions_mm: np.ndarray, z_mm: np.ndarray,
                batch_size: int = 32, return_features: bool = False):  # fmt: skip
        """``(Z, 7)`` per-slice presence probabilities of C1..C7 for a HU volume in series order;
        with ``return_features`` also the ``(Z, F)`` slice features of
        :func:`keras_cspine.stage1.sequence_model.feature_model`."""
        n = len(positions_mm)
        metadata = self.metadata(np.asarray(positions_mm, np.float64), z_mm)
        if return_features and self._feature_model is None:
            from keras_cspine.stage1.sequence_model import feature_model

            self._feature_model = feature_model(self.model)
        out = np.empty((n, len(VERTEBRAE)), np.float32)
        features = None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch: dict[str, np.ndarray] = {}
            if "image" in self.input_names:
                batch["image"] = self.images(hu[start:stop])
            if "metadata" in self.input_names:
                batch["metadata"] = metadata[start:stop]
            if stop - start < batch_size and n > batch_size:  # keep one traced batch shape
                pad = batch_size - (stop - start)
                batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)])
                         for k, v in batch.items()}  # fmt: skip
            if return_features:
                feats, scores = self._feature_model.predict_on_batch(batch)
                if features is None:
                    features = np.empty((n, feats.shape[-1]), np.float32)
                features[start:stop] = np.asarray(feats)[: stop - start]
            else:
                scores = self.model.predict_on_batch(batch)
            out[start:stop] = np.asarray(scores, dtype=np.float32)[: stop - start]
        if not np.isfinite(out).all():
            raise ValueError(f"stage 1 model {self.source} gave non-finite scores")
        return (out, features) if return_features else out

    def study_probabilities(self, hu: np.ndarray, positions_mm: np.ndarray, z_mm: np.ndarray,
                            batch_size: int = 32, sequence_model: bool = True,
                            level_decoding: bool = True) -> np.ndarray:  # fmt: skip
        """``(Z, 7)`` probabilities of C1..C7 for a study in series order, read along the study:
        by the run's sequence model when it has one (and ``sequence_model``), else by its level
        decoder (when ``level_decoding``), else the per-slice probabilities (the paper)."""
        positions_mm = np.asarray(positions_mm, np.float64)
        if sequence_model and self.sequence_model is not None:
            from keras_cspine.stage1.sequence_model import apply_sequence_model

            _, features = self.predict(hu, positions_mm, z_mm, batch_size, return_features=True)
            n = len(positions_mm)
            return apply_sequence_model(self.sequence_model, features, np.zeros(n), np.arange(n))
        probabilities = self.predict(hu, positions_mm, z_mm, batch_size)
        if level_decoding and self.level_decoder is not None:
            from keras_cspine.stage1.level_decoding import slice_spacing

            probabilities = self.level_decoder.decode(
                probabilities, slice_spacing(positions_mm)).astype(np.float32)  # fmt: skip
        return probabilities


# --------------------------------------------------------------------------------------------
# Stage 2
# --------------------------------------------------------------------------------------------
def _stage2_settings(weights: Path, metadata: Mapping[str, str]) -> dict[str, Any]:
    """Image mode, size and spine window of the YOLO export a detector was trained on: from the
    ONNX metadata (``keras_cspine export_onnx`` writes them there), else through the detection
    run's ``run.json``."""
    from keras_cspine.stage2.yolo_dataset import EXPORT_METADATA_KEY, export_image_settings

    if EXPORT_METADATA_KEY in metadata:
        return json.loads(metadata[EXPORT_METADATA_KEY])
    for run_dir in (weights.parent.parent, weights.parent):
        run_json = run_dir / "run.json"
        if run_json.is_file():
            data_yaml = json.loads(run_json.read_text(encoding="utf-8")).get("data")
            settings = export_image_settings(data_yaml)
            if settings:
                return settings
    return {}


def pt_to_onnx(weights: Path) -> Path:
    """Export a YOLO ``.pt`` to ONNX beside it, in a subprocess (torch never enters this one)."""
    target = weights.with_suffix(".onnx")
    if target.is_file() and target.stat().st_mtime >= weights.stat().st_mtime:
        return target
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, "-m", "keras_cspine", "detect", "onnx", str(weights), "--out", str(target)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if result.returncode != 0 or not target.is_file():
        raise CSpineDataError(weights, f"ONNX export failed: {result.stderr.strip()[-800:]}")
    return target


class Stage2Model:
    """The stage 2 fracture detector (ONNX, onnxruntime) with its export's image settings.

    Args:
        detector: a ``keras_cspine.stage2.onnx_predictor.OnnxDetector``.
        mode: preprocessing mode of the YOLO export images.
        size: side of the export images (the detector letterboxes them to its input size).
        roi_mm: the export's spine window (``keras_cspine.stage2.roi``); None: whole slices.
        source: where the model came from.
    """

    def __init__(self, detector, mode: str = "bone", size: int | None = None,
                 roi_mm: float | None = None, source: str = "<in memory>"):  # fmt: skip
        self.detector = detector
        self.mode = mode
        self.size = int(size or detector.imgsz[0])
        self.roi_mm = None if roi_mm is None else float(roi_mm)
        self.source = source

    @classmethod
    def load(cls, path: str | os.PathLike, conf: float = 0.25, iou: float = 0.7,
             threads: int | None = None, mode: str | None = None,
             size: int | None = None) -> Stage2Model:  # fmt: skip
        """A detection run directory, its ``.onnx`` or its ``.pt`` (exported to ONNX first)."""
        from keras_cspine.stage2.onnx_predictor import OnnxDetector

        path = Path(path)
        if path.is_dir():
            candidates = [path / "weights" / "best.onnx", path / "best.onnx",
                          path / "weights" / "best.pt", path / "best.pt"]  # fmt: skip
            found = next((p for p in candidates if p.is_file()), None)
            if found is None:
                raise CSpineDataError(path, "no weights/best.onnx or weights/best.pt in this "
                                            "detection run")  # fmt: skip
            path = found
        if not path.is_file():
            raise CSpineDataError(path, "stage 2 model not found")
        if path.suffix == ".pt":
            path = pt_to_onnx(path)
        elif path.suffix != ".onnx":
            raise CSpineDataError(path, "stage 2 model must be a .onnx or .pt file")
        detector = OnnxDetector(path, conf=conf, iou=iou, threads=threads)
        settings = _stage2_settings(path, detector.metadata)
        return cls(detector, mode=mode or settings.get("mode", "bone"),
                   size=size or settings.get("size"), roi_mm=settings.get("roi_mm"),
                   source=str(path))  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """The settings, for logs and JSON."""
        return {"source": self.source, "mode": self.mode, "size": self.size,
                "roi_mm": self.roi_mm, "input_size": list(self.detector.imgsz),
                "conf": self.detector.conf, "iou": self.detector.iou}  # fmt: skip

    def study_roi(self, hu: np.ndarray, slice_numbers: Sequence[int],
                  pixel_spacing: Sequence[float]):  # fmt: skip
        """The spine window of a study (``(Z, rows, columns)`` HU in series order, with its slice
        numbers), found from the same slices as at export; None without ``roi_mm``."""
        if self.roi_mm is None:
            return None
        from keras_cspine.stage2.roi import roi_sample, study_roi

        index = {int(n): i for i, n in enumerate(slice_numbers)}
        sample = [hu[index[n]] for n in roi_sample(slice_numbers)]
        return study_roi(sample, pixel_spacing, self.roi_mm)

    def detect(self, hu: np.ndarray, roi=None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(N, 4)`` as ``x, y, width, height`` in native slice pixels, and scores;
        ``roi``: the study's :meth:`study_roi` when the detector was trained on windows."""
        if (roi is None) != (self.roi_mm is None):
            raise ValueError(f"stage 2 model {self.source} was trained on "
                             + ("whole slices: pass no roi" if self.roi_mm is None
                                else f"{self.roi_mm:g} mm spine windows: pass its study_roi"))
        found = self.detector.predict_slice(hu, mode=self.mode, size=self.size, roi=roi)
        return found.xywh().astype(np.float64), found.scores.astype(np.float64)


# --------------------------------------------------------------------------------------------
# Gating, assignment, aggregation (pure functions of the model outputs)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Box:
    """One fracture box of stage 2, with the vertebrae it was assigned to.

    Attributes:
        series_index, slice_number: the slice (series order index, file number).
        x, y, width, height: native slice pixels, top-left corner (``train_bounding_boxes.csv``).
        score: detector confidence.
        vertebrae: vertebra -> evidence (``score * p_vertebra``) for the vertebrae present on
            the slice; empty when stage 1 sees none there.
    """

    series_index: int
    slice_number: int
    x: float
    y: float
    width: float
    height: float
    score: float
    vertebrae: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "slice_number": self.slice_number, "series_index": self.series_index,
            "x": round(self.x, 2), "y": round(self.y, 2), "width": round(self.width, 2),
            "height": round(self.height, 2), "score": round(self.score, 5),
            "vertebrae": {k: round(v, 5) for k, v in self.vertebrae.items()},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Box:
        return cls(int(data["series_index"]), int(data["slice_number"]), float(data["x"]),
                   float(data["y"]), float(data["width"]), float(data["height"]),
                   float(data["score"]), dict(data.get("vertebrae", {})))  # fmt: skip


def gate_slices(probabilities: np.ndarray, threshold: float = 0.5, enabled: bool = True) -> np.ndarray:
    """Boolean ``(Z,)``: the slices stage 2 looks at (some vertebra at ``>= threshold``)."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(VERTEBRAE):
        raise ValueError(f"expected (Z, 7) probabilities, got shape {probabilities.shape}")
    if not enabled:
        return np.ones(len(probabilities), dtype=bool)
    return probabilities.max(axis=1) >= threshold


def assign_boxes(boxes: Sequence[Box], probabilities: np.ndarray, threshold: float = 0.5) -> list[Box]:
    """Each box with the vertebrae present on its slice (``p >= threshold``), evidence ``score*p``."""
    out = []
    for box in boxes:
        p = probabilities[box.series_index]
        present = {v: float(box.score * p[k]) for k, v in enumerate(VERTEBRAE) if p[k] >= threshold}
        out.append(dataclasses.replace(box, vertebrae=present))
    return out


def aggregate_study(boxes: Sequence[Box], config: PredictConfig = PredictConfig()) -> dict[str, float]:
    """Per-vertebra and patient fracture probabilities from assigned boxes (see the module).

    Example:
        >>> b = Box(0, 1, 0, 0, 5, 5, score=0.8, vertebrae={"C2": 0.8})
        >>> p = aggregate_study([b], PredictConfig(vertebra_floor=0.0, patient_floor=0.0,
        ...                                        ceiling=1.0))
        >>> round(p["C2"], 3), round(p["C3"], 3), round(p["patient_overall"], 3)
        (0.8, 0.0, 0.8)
    """
    evidence = dict.fromkeys(VERTEBRAE, 0.0)
    for box in boxes:
        for vertebra, value in box.vertebrae.items():
            value = float(np.clip(value, 0.0, 1.0))
            if config.aggregation == "max":
                evidence[vertebra] = max(evidence[vertebra], value)
            else:
                evidence[vertebra] = 1.0 - (1.0 - evidence[vertebra]) * (1.0 - value)
    values = np.array([evidence[v] for v in VERTEBRAE])
    patient = values.max() if config.aggregation == "max" else 1.0 - np.prod(1.0 - values)
    out = {v: config.vertebra_floor + (config.ceiling - config.vertebra_floor) * evidence[v]
           for v in VERTEBRAE}  # fmt: skip
    out["patient_overall"] = config.patient_floor + (config.ceiling - config.patient_floor) * float(
        patient
    )
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# One study
# --------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """Everything found in one study (JSON-able by :meth:`to_json`, plus report images).

    Attributes:
        uid: the study's name (its folder name: the RSNA StudyInstanceUID).
        folder: the series folder.
        slice_numbers, positions_mm: per slice, in series order (superior first).
        probabilities: ``(Z, 7)`` stage 1 C1..C7 presence.
        gated: ``(Z,)`` slices stage 2 ran on.
        boxes: the assigned stage 2 boxes.
        fracture: C1..C7 and ``patient_overall`` fracture probabilities.
        timings: seconds per step.
        info: geometry and header facts (rows, columns, spacing, head_first, DICOM UID).
        sagittal: uint8 ``(Z, rows)`` sagittal bone-window projection through the spine.
        key_slices: slice number -> uint8 bone-window native slice, for the strongest boxes.
    """

    uid: str
    folder: str
    slice_numbers: np.ndarray
    positions_mm: np.ndarray
    probabilities: np.ndarray
    gated: np.ndarray
    boxes: list[Box]
    fracture: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    sagittal: np.ndarray | None = None
    key_slices: dict[int, np.ndarray] = field(default_factory=dict)

    def vertebra_extent(self, threshold: float = 0.5) -> dict[str, dict[str, Any]]:
        """Per vertebra: the slice numbers where stage 1 finds it (first, last, count)."""
        out = {}
        for k, v in enumerate(VERTEBRAE):
            on = np.flatnonzero(self.probabilities[:, k] >= threshold)
            if len(on):
                out[v] = {"first_slice": int(self.slice_numbers[on[0]]),
                          "last_slice": int(self.slice_numbers[on[-1]]), "n_slices": int(len(on))}  # fmt: skip
        return out

    def to_json(self, threshold: float = 0.5) -> dict[str, Any]:
        """The per-study JSON (see the module docstring)."""
        return {
            "format": RESULT_FORMAT,
            "StudyInstanceUID": self.uid,
            "folder": self.folder,
            "n_slices": int(len(self.slice_numbers)),
            "n_gated": int(self.gated.sum()),
            "info": self.info,
            "fracture_probabilities": {k: round(v, 6) for k, v in self.fracture.items()},
            "vertebra_extent": self.vertebra_extent(threshold),
            "boxes": [b.to_json() for b in self.boxes],
            "slices": [
                {"slice_number": int(n), "series_index": i, "position_mm": round(float(p), 3),
                 "gated": bool(g), **{v: round(float(q), 5) for v, q in zip(VERTEBRAE, probs)}}
                for i, (n, p, g, probs) in enumerate(
                    zip(self.slice_numbers, self.positions_mm, self.gated, self.probabilities))
            ],  # fmt: skip
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyResult:
        """A result read back from its JSON (without the report images)."""
        slices = data["slices"]
        return cls(
            uid=data["StudyInstanceUID"], folder=data["folder"],
            slice_numbers=np.array([s["slice_number"] for s in slices], dtype=np.int64),
            positions_mm=np.array([s["position_mm"] for s in slices], dtype=np.float64),
            probabilities=np.array([[s[v] for v in VERTEBRAE] for s in slices],
                                   dtype=np.float32).reshape(-1, len(VERTEBRAE)),
            gated=np.array([s["gated"] for s in slices], dtype=bool),
            boxes=[Box.from_json(b) for b in data["boxes"]],
            fracture=dict(data["fracture_probabilities"]),
            timings=dict(data.get("timings_s", {})), info=dict(data.get("info", {})),
        )  # fmt: skip


def sagittal_projection(hu: np.ndarray, column_spacing_mm: float, slab_mm: float = 10.0) -> np.ndarray:
    """uint8 ``(Z, rows)`` bone-window maximum projection of a slab through the spine.

    The slab (``slab_mm`` wide, left-right) is centred on the column holding the most bone
    (HU > 250), i.e. the spine's midline, not blindly on the image centre.
    """
    from keras_cspine.data.preprocess import apply_window

    bone = (hu > 250).sum(axis=(0, 1)).astype(np.float64)
    if bone.max() > 0:
        kernel = np.ones(max(1, int(round(slab_mm / max(column_spacing_mm, 1e-3)))))
        centre = int(np.argmax(np.convolve(bone, kernel, mode="same")))
    else:
        centre = hu.shape[2] // 2
    half = max(1, int(round(slab_mm / 2 / max(column_spacing_mm, 1e-3))))
    slab = hu[:, :, max(0, centre - half) : centre + half + 1]
    return np.rint(apply_window(slab.max(axis=2), "bone")).astype(np.uint8)


def predict_study(folder: str | os.PathLike, stage1: Stage1Model, stage2: Stage2Model | None,
                  config: PredictConfig = PredictConfig(), uid: str | None = None) -> StudyResult:  # fmt: skip
    """Run both stages on one study folder and aggregate its findings.

    Args:
        folder: a series folder of ``<n>.dcm`` slices.
        stage1: the vertebrae classifier.
        stage2: the fracture detector; None gives stage 1 only (fracture probabilities = priors).
        config: gating, thresholds and aggregation.
        uid: the study's name (default: the folder name, the RSNA StudyInstanceUID).

    Raises:
        CSpineDataError: the study cannot be read (naming the file at fault).
    """
    from keras_cspine.data.preprocess import apply_window
    from keras_cspine.io.dicom import read_series

    folder = Path(folder)
    timings = dict.fromkeys(("read", "stage1", "stage2"), 0.0)
    started = time.perf_counter()
    hu, meta = read_series(folder, decoder=config.decoder)
    first = meta.slices[0]
    positions = np.asarray(meta.positions_mm, dtype=np.float64)
    sagittal = sagittal_projection(hu, first.pixel_spacing[1])
    timings["read"] = time.perf_counter() - started

    started = time.perf_counter()
    z_mm = np.array([s.image_position[2] for s in meta.slices], dtype=np.float64)
    probabilities = stage1.study_probabilities(
        hu, positions, z_mm, batch_size=config.batch_size, sequence_model=config.sequence_model,
        level_decoding=config.level_decoding,
    )  # fmt: skip
    gated = gate_slices(probabilities, config.presence_threshold, config.gating)
    timings["stage1"] = time.perf_counter() - started

    started = time.perf_counter()
    numbers = np.asarray(meta.slice_numbers, dtype=np.int64)
    boxes: list[Box] = []
    roi = None
    if stage2 is not None:
        roi = stage2.study_roi(hu, numbers, first.pixel_spacing)
        for i in np.flatnonzero(gated):
            xywh, scores = stage2.detect(hu[i], roi)
            boxes.extend(Box(int(i), int(numbers[i]), *map(float, b), score=float(s))
                         for b, s in zip(xywh, scores))  # fmt: skip
    boxes = assign_boxes(boxes, probabilities, config.presence_threshold)
    boxes.sort(key=lambda b: (-b.score, b.series_index))
    fracture = aggregate_study(boxes, config)
    timings["stage2"] = time.perf_counter() - started

    key_slices: dict[int, np.ndarray] = {}
    for box in boxes:
        if len(key_slices) >= config.key_slices:
            break
        if box.slice_number not in key_slices:
            key_slices[box.slice_number] = np.rint(
                apply_window(hu[box.series_index], "bone")).astype(np.uint8)  # fmt: skip
    info = {
        "dicom_study_uid": meta.study_uid, "rows": first.rows, "columns": first.columns,
        "pixel_spacing_mm": list(first.pixel_spacing), "slice_spacing_mm": meta.spacing_mm,
        "head_first": meta.head_first, "transfer_syntax": first.transfer_syntax_uid,
        "stage2_roi": roi.to_json() if roi is not None else None,
    }  # fmt: skip
    return StudyResult(
        uid=uid or folder.name, folder=str(folder), slice_numbers=numbers,
        positions_mm=positions[0] - positions, probabilities=probabilities, gated=gated,
        boxes=boxes, fracture=fracture, timings=timings, info=info, sagittal=sagittal,
        key_slices=key_slices,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Study-level evaluation
# --------------------------------------------------------------------------------------------
def _auc(y_true: np.ndarray, y_score: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if len(np.unique(y_true)) < 2:
        return None  # undefined with one class only
    return float(roc_auc_score(y_true, y_score))


def evaluate_predictions(submission: pd.DataFrame | str | os.PathLike,
                         labels: pd.DataFrame | str | os.PathLike) -> dict[str, Any]:  # fmt: skip
    """Study-level scores of a submission against ``train.csv`` labels.

    Args:
        submission: a ``submission.csv`` (path or frame: ``row_id``, ``fractured``).
        labels: ``train.csv`` (path or frame: ``StudyInstanceUID``, ``patient_overall``, C1..C7).
            The submission's studies found there are scored; the others are counted in
            ``n_unlabelled``.

    Returns:
        ``rsna_weighted_log_loss`` (the competition metric, lower is better), ``auc`` per target
        (None when a target has one class only among the studies), ``mean_vertebra_auc``,
        ``patient_auc``, per-target ``log_loss`` and ``prevalence``, ``n_studies``,
        ``n_unlabelled``.

    Raises:
        CSpineDataError: no study of the submission is labelled, or a study lacks a row.
    """
    from keras_cspine.io.rsna import read_submission, read_train_csv, validate_frame
    from keras_cspine.stage1.metrics import rsna_log_loss_from_frames

    if not isinstance(submission, pd.DataFrame):
        submission = read_submission(submission)
    else:
        submission = validate_frame(submission, "sample_submission", "<submission>")
    if not isinstance(labels, pd.DataFrame):
        labels = read_train_csv(labels)
    uids = sorted({_ROW_TARGET.sub("", r) for r in submission.row_id})
    known = set(labels.StudyInstanceUID.astype(str))
    scored = [u for u in uids if u in known]
    if not scored:
        raise CSpineDataError(None, f"none of the {len(uids)} predicted studies is in the labels")
    solution = labels[labels.StudyInstanceUID.astype(str).isin(scored)].copy()
    solution = solution.sort_values("StudyInstanceUID").reset_index(drop=True)
    lookup = dict(zip(submission.row_id, submission.fractured.astype(float)))
    missing = [f"{u}_{t}" for u in scored for t in TARGETS if f"{u}_{t}" not in lookup]
    if missing:
        raise CSpineDataError(None, f"the submission has no row {missing[0]}")
    y_true = solution[list(TARGETS)].to_numpy(dtype=np.float64)
    y_pred = np.array([[lookup[f"{u}_{t}"] for t in TARGETS] for u in solution.StudyInstanceUID])
    eps = 1e-15
    p = np.clip(y_pred, eps, 1 - eps)
    bce = -(y_true * np.log(p) + (1 - y_true) * np.log(1 - p))
    auc = {t: _auc(y_true[:, j], y_pred[:, j]) for j, t in enumerate(TARGETS)}
    vertebra_aucs = [auc[v] for v in VERTEBRAE if auc[v] is not None]
    return {
        "n_studies": int(len(solution)),
        "n_unlabelled": len(uids) - len(scored),
        "rsna_weighted_log_loss": rsna_log_loss_from_frames(solution, lookup),
        "patient_auc": auc["patient_overall"],
        "mean_vertebra_auc": float(np.mean(vertebra_aucs)) if vertebra_aucs else None,
        "auc": auc,
        "log_loss": {t: float(bce[:, j].mean()) for j, t in enumerate(TARGETS)},
        "prevalence": {t: float(y_true[:, j].mean()) for j, t in enumerate(TARGETS)},
    }


def evaluation_markdown(evaluation: Mapping[str, Any]) -> str:
    """The evaluation as a Markdown table (one row per target)."""

    def fmt(value):
        return "n/a" if value is None else f"{value:.4f}"

    lines = [
        f"Studies: {evaluation['n_studies']}; RSNA weighted log loss "
        f"**{evaluation['rsna_weighted_log_loss']:.4f}** (lower is better); mean vertebra AUC "
        f"{fmt(evaluation['mean_vertebra_auc'])}; patient AUC {fmt(evaluation['patient_auc'])}.",
        "",
        "| target | AUC | log loss | prevalence |",
        "|---|---|---|---|",
    ]
    for t in TARGETS:
        lines.append(f"| {t} | {fmt(evaluation['auc'][t])} | {evaluation['log_loss'][t]:.4f} | "
                     f"{evaluation['prevalence'][t]:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def _load_models(stage1, stage2, runs, config: PredictConfig):
    if stage1 is None:
        stage1 = find_latest_stage1(runs)
        if stage1 is None:
            raise CSpineDataError(runs, "no stage 1 model found: train one (`python -m "
                                        "keras_cspine train`) or pass --stage1")  # fmt: skip
    if not isinstance(stage1, Stage1Model):
        stage1 = Stage1Model.load(stage1)
    if stage2 is None:
        stage2 = find_latest_stage2(runs)
        if stage2 is None:
            raise CSpineDataError(runs, "no stage 2 model found: train one (`python -m "
                                        "keras_cspine detect train`) or pass --stage2")  # fmt: skip
    if stage2 is not None and not isinstance(stage2, Stage2Model):
        stage2 = Stage2Model.load(stage2, conf=config.box_conf, iou=config.box_iou,
                                  threads=config.threads)  # fmt: skip
    return stage1, stage2


def _write_csv(path: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def predict(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stage1: str | os.PathLike | Stage1Model | None = None,
    stage2: str | os.PathLike | Stage2Model | None = None,
    runs: str | os.PathLike = "runs",
    config: PredictConfig = PredictConfig(),
    labels: str | os.PathLike | pd.DataFrame | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Two-stage inference on every study of ``input_path``; writes ``out_dir`` (see the module).

    Args:
        input_path: one study folder, a folder of studies (RSNA ``test_images``) or an RSNA root.
        out_dir: output folder (created). Studies already done there with the same settings and
            models are read back, not recomputed.
        stage1: a stage 1 run directory or ``.keras`` file (default: the newest under ``runs``),
            or a loaded :class:`Stage1Model`.
        stage2: a detection run directory, ``.onnx`` or ``.pt`` (default: the newest under
            ``runs``), or a loaded :class:`Stage2Model`.
        runs: where the defaults are looked for.
        config: :class:`PredictConfig`.
        labels: a ``train.csv`` (path or frame) to evaluate against (:func:`evaluate_predictions`).
        limit: at most this many studies (sorted), for quick looks.
        progress: a progress bar over studies.

    Returns:
        The summary, also written to ``summary.json``.
    """
    from tqdm.auto import tqdm

    from keras_cspine.config import dump_config, save_config
    from keras_cspine.io.rsna import submission_rows, write_submission

    out = Path(out_dir)
    studies = find_studies(input_path)[: limit or None]
    stage1, stage2 = _load_models(stage1, stage2, runs, config)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "predict_config.yaml")
    models = {"stage1": stage1.describe(), "stage2": stage2.describe() if stage2 else None}
    digest = hashlib.sha1(json.dumps([config.digest(), models], sort_keys=True, default=str)
                          .encode()).hexdigest()[:12]  # fmt: skip

    rows, table, errors, reports = [], [], [], {}
    totals = dict.fromkeys(STEPS, 0.0)
    n_slices = n_gated = reused = 0
    bar = tqdm(studies, desc="predict", unit="study", disable=not progress)
    for folder in bar:
        uid = folder.name
        bar.set_postfix_str(uid[-12:])
        json_path = out / "studies" / f"{uid}.json"
        result = None
        if json_path.is_file():
            saved = json.loads(json_path.read_text(encoding="utf-8"))
            if saved.get("settings_digest") == digest:
                result = StudyResult.from_json(saved)
                reused += 1
        if result is None:
            try:
                result = predict_study(folder, stage1, stage2, config, uid=uid)
            except CSpineDataError as err:
                errors.append({"StudyInstanceUID": uid, "path": err.path or str(folder),
                               "problem": err.problem})  # fmt: skip
                print(f"[predict] {uid}: cannot be read: {err}", file=sys.stderr)
                rows.extend(submission_rows(uid, config.prior()))
                table.append({"StudyInstanceUID": uid, **config.prior(), "n_slices": 0,
                              "n_gated": 0, "n_boxes": 0, "status": "failed"})  # fmt: skip
                continue
            if config.report != "none":
                from keras_cspine.pipeline.report import write_study_report

                started = time.perf_counter()
                reports[uid] = str(write_study_report(
                    result, out / "reports" / uid, fmt=config.report,
                    threshold=config.presence_threshold))  # fmt: skip
                result.timings["report"] = time.perf_counter() - started
            write_json(json_path, {**result.to_json(config.presence_threshold),
                                   "settings_digest": digest, "models": models})  # fmt: skip
        else:
            existing = out / "reports" / uid / ("report.md" if config.report == "markdown"
                                                 else "report.html")  # fmt: skip
            if existing.is_file():
                reports[uid] = str(existing)
        for step in STEPS:
            totals[step] += result.timings.get(step, 0.0)
        n_slices += len(result.slice_numbers)
        n_gated += int(result.gated.sum())
        rows.extend(submission_rows(uid, result.fracture))
        table.append({"StudyInstanceUID": uid, **result.fracture, "n_slices": len(result.slice_numbers),
                      "n_gated": int(result.gated.sum()), "n_boxes": len(result.boxes),
                      "status": "ok"})  # fmt: skip
    bar.close()

    files = {"submission": str(out / "submission.csv"), "predictions": str(out / "predictions.csv")}
    write_submission(pd.DataFrame(rows, columns=["row_id", "fractured"]), out / "submission.csv")
    _write_csv(out / "predictions.csv", table,
               ["StudyInstanceUID", *TARGETS, "n_slices", "n_gated", "n_boxes", "status"])  # fmt: skip
    if errors:
        _write_csv(out / "errors.csv", errors, ["StudyInstanceUID", "path", "problem"])
        files["errors"] = str(out / "errors.csv")
    if reports:
        from keras_cspine.pipeline.report import write_index

        files["index"] = str(write_index(table, reports, out))
    ok = len(table) - len(errors)
    summary: dict[str, Any] = {
        "input": str(input_path),
        "out": str(out),
        "n_studies": len(table),
        "n_ok": ok,
        "n_failed": len(errors),
        "n_reused": reused,
        "n_slices": n_slices,
        "n_gated": n_gated,
        "gated_fraction": round(n_gated / n_slices, 4) if n_slices else None,
        "seconds": {k: round(v, 3) for k, v in totals.items()},
        "seconds_per_study": round(sum(totals.values()) / ok, 3) if ok else None,
        "models": models,
        "config": dump_config(config),
        "errors": errors,
        "reports": reports,
        "files": files,
    }
    if labels is not None:
        evaluation = evaluate_predictions(out / "submission.csv", labels)
        write_json(out / "evaluation.json", evaluation)
        with atomic_write(out / "evaluation.md") as handle:
            handle.write(evaluation_markdown(evaluation))
        summary["evaluation"] = evaluation
        files["evaluation"] = str(out / "evaluation.json")
    write_json(out / "summary.json", summary)
    return summary


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine predict``."""
    parser.add_argument("input", help="a study folder of .dcm slices, a folder of studies "
                        "(RSNA test_images) or an RSNA dataset root")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stage1", help="stage 1 run directory or .keras (default: newest in "
                        "--runs)")  # fmt: skip
    parser.add_argument("--stage2", help="stage 2 run directory, .onnx or .pt (default: newest "
                        "in --runs)")  # fmt: skip
    parser.add_argument("--runs", default="runs", help="where default models are looked for")
    parser.add_argument("--config", help="a PredictConfig YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting (repeatable)")  # fmt: skip
    parser.add_argument("--no-gating", action="store_true",
                        help="run stage 2 on every slice, not only where stage 1 sees C1-C7")  # fmt: skip
    parser.add_argument("--no-sequence-model", action="store_true",
                        help="do not use the stage 1 run's sequence model (then its level "
                        "decoder, if any, reads the study)")  # fmt: skip
    parser.add_argument("--no-level-decoding", action="store_true",
                        help="do not use the stage 1 run's level decoder; with "
                        "--no-sequence-model: the per-slice probabilities (the paper)")  # fmt: skip
    parser.add_argument("--report", choices=["html", "markdown", "none"],
                        help="per-study report format (default html)")  # fmt: skip
    parser.add_argument("--labels", help="a train.csv to evaluate the predictions against")
    parser.add_argument("--limit", type=int, help="at most this many studies")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    """The :class:`PredictConfig` of parsed ``predict`` arguments: ``--config`` and ``--set``,
    then the switches (``--no-gating``, ``--no-sequence-model``...)."""
    from keras_cspine.config import load_config

    config = load_config(PredictConfig, args.config, args.overrides)
    changes: dict[str, Any] = {}
    if args.no_gating:
        changes["gating"] = False
    if args.no_sequence_model:
        changes["sequence_model"] = False
    if args.no_level_decoding:
        changes["level_decoding"] = False
    if args.report:
        changes["report"] = args.report
    return dataclasses.replace(config, **changes) if changes else config


def run(args: argparse.Namespace) -> int:
    """Run ``predict`` from parsed arguments; 0 when every study was read, 1 otherwise."""
    config = config_from_args(args)
    summary = predict(args.input, args.out, stage1=args.stage1, stage2=args.stage2,
                      runs=args.runs, config=config, labels=args.labels, limit=args.limit,
                      progress=not args.quiet)  # fmt: skip
    print(summary_text(summary))
    return 0 if summary["n_failed"] == 0 else 1


def summary_text(summary: Mapping[str, Any]) -> str:
    """A few lines saying what :func:`predict` did and where its outputs are."""
    seconds = summary["seconds"]
    lines = [
        f"[predict] {summary['n_ok']}/{summary['n_studies']} studies, {summary['n_slices']} "
        f"slices, stage 2 on {summary['n_gated']} ({(summary['gated_fraction'] or 0):.0%})",
        "[predict] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()),
        f"[predict] submission: {summary['files']['submission']}",
    ]
    if "index" in summary["files"]:
        lines.append(f"[predict] reports: {summary['files']['index']}")
    for error in summary["errors"]:
        lines.append(f"[predict] FAILED {error['StudyInstanceUID']}: {error['problem']}")
    if "evaluation" in summary:
        ev = summary["evaluation"]
        auc = ev["mean_vertebra_auc"]
        lines.append(
            f"[predict] RSNA weighted log loss {ev['rsna_weighted_log_loss']:.4f}, mean vertebra "
            f"AUC {'n/a' if auc is None else f'{auc:.3f}'}, patient AUC "
            f"{'n/a' if ev['patient_auc'] is None else format(ev['patient_auc'], '.3f')} "
            f"({ev['n_studies']} studies)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine.pipeline.predict INPUT --out OUT``."""
    parser = argparse.ArgumentParser(prog="python -m keras_cspine.pipeline.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
