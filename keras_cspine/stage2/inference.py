"""Stage 2 at inference (Section 2.6): a YOLO detector exported to ONNX, run by onnxruntime with
the image settings of its export (:class:`Stage2Model`), and the ``.pt`` -> ONNX step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.errors import CSpineDataError


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
    """Export a YOLO ``.pt`` to ONNX beside it, in a subprocess (torch never enters this one).

    The subprocess (``python -m keras_cspine detect onnx``) opens the ``.pt`` with
    ``stage2.offline.safe_load_checkpoint``: a file that would run code is refused, and its
    ``error:`` line becomes the ``CSpineDataError`` raised here.
    """
    weights = Path(weights)
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
        errors = [line[len("error: "):] for line in result.stderr.splitlines()
                  if line.startswith("error: ")]  # fmt: skip
        if errors:  # the command's one-line user error, e.g. a refused checkpoint
            problem = errors[-1].removeprefix(f"{weights}: ")
            raise CSpineDataError(weights, f"ONNX export failed: {problem}")
        raise CSpineDataError(weights, f"ONNX export failed: {result.stderr.strip()[-800:]}")
    return target


class Stage2Model:
    """The stage 2 fracture detector (ONNX, onnxruntime) with its export's image settings.

    Args:
        detector: a ``keras_cspine.stage2.onnx_predictor.OnnxDetector``.
        mode: preprocessing mode of the YOLO export images.
        size: side of the export images (the detector letterboxes them to its input size).
        roi_mm: the export's spine window (``keras_cspine.data.roi``); None: whole slices.
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
        from keras_cspine.data.roi import volume_roi

        return volume_roi(hu, slice_numbers, pixel_spacing, self.roi_mm)

    def detect(self, hu: np.ndarray, roi=None) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``(N, 4)`` as ``x, y, width, height`` in native slice pixels, and scores;
        ``roi``: the study's :meth:`study_roi` when the detector was trained on windows."""
        if (roi is None) != (self.roi_mm is None):
            raise ValueError(f"stage 2 model {self.source} was trained on "
                             + ("whole slices: pass no roi" if self.roi_mm is None
                                else f"{self.roi_mm:g} mm spine windows: pass its study_roi"))
        found = self.detector.predict_slice(hu, mode=self.mode, size=self.size, roi=roi)
        return found.xywh().astype(np.float64), found.scores.astype(np.float64)
