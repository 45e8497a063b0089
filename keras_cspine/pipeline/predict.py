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

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import TARGETS
from keras_cspine.pipeline.config import DEFAULT_PREDICT_CONFIG, PredictConfig
from keras_cspine.pipeline.evaluate import evaluate_predictions, evaluation_markdown
from keras_cspine.pipeline.report import write_index, write_study_report
from keras_cspine.pipeline.results import (
    Box,
    StudyResult,
    aggregate_study,
    assign_boxes,
    gate_slices,
)
from keras_cspine.pipeline.studies import find_latest_stage1, find_latest_stage2, find_studies
from keras_cspine.stage1.inference import Stage1Model
from keras_cspine.stage2.inference import Stage2Model
from keras_cspine.utils import atomic_write, write_csv, write_json

STEPS = ("read", "stage1", "stage2", "report")


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
                  config: PredictConfig = DEFAULT_PREDICT_CONFIG, uid: str | None = None) -> StudyResult:  # fmt: skip
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


def predict(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    stage1: str | os.PathLike | Stage1Model | None = None,
    stage2: str | os.PathLike | Stage2Model | None = None,
    runs: str | os.PathLike = "runs",
    config: PredictConfig = DEFAULT_PREDICT_CONFIG,
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
    write_csv(out / "predictions.csv", table,
               ["StudyInstanceUID", *TARGETS, "n_slices", "n_gated", "n_boxes", "status"])  # fmt: skip
    if errors:
        write_csv(out / "errors.csv", errors, ["StudyInstanceUID", "path", "problem"])
        files["errors"] = str(out / "errors.csv")
    if reports:
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
