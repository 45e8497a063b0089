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

Studies are named by the StudyInstanceUID of their DICOM (the folder name only when the DICOM
has none); a folder name that is not the study's UID (it may be the patient's name) never
appears in the outputs. Unless given, the models are the newest *finished* runs under ``runs``
(:func:`find_latest_stage1`, :func:`find_latest_stage2`), and ``predict`` says which.

Outputs of :func:`predict` (all written atomically; a rerun keeps the studies already done with
the same settings and the same models, compared by the SHA-256 of their files):

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
from keras_cspine.pipeline.index_page import write_index
from keras_cspine.pipeline.report import ReportPool, save_report_images
from keras_cspine.pipeline.results import (
    Box,
    StudyResult,
    aggregate_study,
    assign_boxes,
    gate_slices,
    refine_slices,
)
from keras_cspine.pipeline.studies import (
    StudyName,
    file_sha256,
    find_latest_stage1,  # noqa: F401 - re-exported (keras_cspine.pipeline.predict's names)
    find_latest_stage2,  # noqa: F401
    find_studies,
    looks_like_uid,
    name_study,
    read_study_uid,
    stage1_run_problem,
    stage1_runs,
    stage2_run_problem,
    stage2_runs,
)
from keras_cspine.stage1.fast_inference import weights_sha256
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
        uid: the study's name (default: the StudyInstanceUID of its DICOM, else the folder name
            when that is a UID).

    Raises:
        CSpineDataError: the study cannot be read (naming the file at fault), or it has no
            StudyInstanceUID to be named by.
    """
    from keras_cspine.data.preprocess import apply_window
    from keras_cspine.io.dicom import read_series

    folder = Path(folder).absolute()
    timings = dict.fromkeys(("read", "stage1", "stage2"), 0.0)
    started = time.perf_counter()
    hu, meta = read_series(folder, decoder=config.decoder)
    named = name_study(folder, meta.study_uid)
    uid = uid or named.uid
    if uid is None:
        raise CSpineDataError(named.folder, "the DICOM holds no valid StudyInstanceUID and the "
                              "folder name is not one: the study cannot be named")  # fmt: skip
    first = meta.slices[0]
    positions = np.asarray(meta.positions_mm, dtype=np.float64)
    sagittal = sagittal_projection(hu, first.pixel_spacing[1])
    timings["read"] = time.perf_counter() - started

    started = time.perf_counter()
    z_mm = np.array([s.image_position[2] for s in meta.slices], dtype=np.float64)
    numbers = np.asarray(meta.slice_numbers, dtype=np.int64)
    stage1_roi = stage1.study_roi(hu, numbers, first.pixel_spacing)
    probabilities = stage1.study_probabilities(
        hu, positions, z_mm, batch_size=config.batch_size, sequence_model=config.sequence_model,
        level_decoding=config.level_decoding, roi=stage1_roi,
    )  # fmt: skip
    gated = gate_slices(probabilities, config.presence_threshold, config.gating)
    timings["stage1"] = time.perf_counter() - started

    started = time.perf_counter()
    boxes: list[Box] = []
    roi = None
    if stage2 is not None:
        roi = (stage1_roi if stage1_roi is not None and stage2.roi_mm == stage1.roi_mm
               else stage2.study_roi(hu, numbers, first.pixel_spacing))  # fmt: skip

        def look(i: int) -> bool:
            xywh, scores = stage2.detect(hu[i], roi)
            boxes.extend(Box(int(i), int(numbers[i]), *map(float, b), score=float(s))
                         for b, s in zip(xywh, scores))  # fmt: skip
            return len(scores) > 0

        stride = config.gate_stride if config.gating else 1
        gated = refine_slices(gated, stride, look)
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
        # the raw tag only when it is a UID (a damaged header may hold anything, names too)
        "dicom_study_uid": meta.study_uid if looks_like_uid(meta.study_uid) else None,
        "rows": first.rows, "columns": first.columns,
        "pixel_spacing_mm": list(first.pixel_spacing), "slice_spacing_mm": meta.spacing_mm,
        "head_first": meta.head_first, "transfer_syntax": first.transfer_syntax_uid,
        "stage2_roi": roi.to_json() if roi is not None else None,
        "stage1_roi": stage1_roi.to_json() if stage1_roi is not None else None,
        "study_uid_source": named.source if uid == named.uid else "given",
        # the study's own warnings (its name; a RescaleSlope/Intercept taken as 1/0 ...)
        "warnings": ([named.warning] if named.warning else []) + list(meta.warnings),
    }  # fmt: skip
    return StudyResult(
        uid=uid, folder=str(folder) if folder.name == uid else named.folder, slice_numbers=numbers,
        positions_mm=positions[0] - positions, probabilities=probabilities, gated=gated,
        boxes=boxes, fracture=fracture, timings=timings, info=info, sagittal=sagittal,
        key_slices=key_slices,
    )  # fmt: skip


def _say(message: str) -> None:
    print(f"[predict] {message}", file=sys.stderr)


def _choose(kind: str, given, runs, found, flag: str, train: str) -> tuple[Path, dict[str, Any]]:
    """The default model of one stage: the newest finished run, and a note of the choice."""
    if given is not None:
        return given, {"chosen": "given"}
    finished = next((r for r in found if r.finished), None)
    skipped = [r for r in found if not r.finished and (finished is None or r.time > finished.time)]
    skipped_text = "; ".join(f"{r.path} ({r.problem})" for r in skipped)
    if finished is None:
        more = f" ({len(skipped)} unfinished: {skipped_text})" if skipped else ""
        raise CSpineDataError(runs, f"no finished {kind} run found{more}: train one (`python -m "
                                    f"keras_cspine {train}`) or pass {flag}")  # fmt: skip
    note = f"{kind}: {finished.path} (the newest finished run under {Path(runs).absolute()})"
    if skipped:
        note += f"; newer unfinished run(s) skipped: {skipped_text}"
    _say(note)
    return finished.path, {"chosen": "newest finished run", "runs": str(Path(runs).absolute()),
                           "skipped_unfinished": [str(r.path) for r in skipped]}  # fmt: skip


def _load_models(stage1, stage2, runs, config: PredictConfig):
    """The two stages (loaded), and how each was chosen."""
    choice: dict[str, Any] = {}
    if not isinstance(stage1, Stage1Model):
        path, choice["stage1"] = _choose("stage 1", stage1, runs, stage1_runs(runs), "--stage1",
                                         "train")  # fmt: skip
        path = Path(path).absolute()
        problem = stage1_run_problem(path) if path.is_dir() else None
        if problem and choice["stage1"]["chosen"] == "given":
            _say(f"stage 1 run {path} is unfinished ({problem}); used as asked")
            choice["stage1"]["unfinished"] = problem
        stage1 = Stage1Model.load(path)
    else:
        choice["stage1"] = {"chosen": "given"}
    if stage1.runner is None:  # a given model that already has its engine keeps it
        stage1.use_engine(config.stage1_engine, threads=config.threads)
    if stage1.engine.get("fallback"):
        _say(f"stage 1 engine {config.stage1_engine}: {stage1.engine['fallback']}; Keras used")
    choice["stage1"]["engine"] = dict(stage1.engine)
    if not isinstance(stage2, Stage2Model):
        path, choice["stage2"] = _choose("stage 2", stage2, runs, stage2_runs(runs), "--stage2",
                                         "detect train")  # fmt: skip
        path = Path(path).absolute()
        run_dir = path if path.is_dir() else path.parent.parent
        if choice["stage2"]["chosen"] == "given" and (run_dir / "run.json").is_file():
            problem = stage2_run_problem(run_dir)
            if problem:
                _say(f"stage 2 run {run_dir} is unfinished ({problem}); used as asked")
                choice["stage2"]["unfinished"] = problem
        stage2 = Stage2Model.load(path, conf=config.box_conf, iou=config.box_iou,
                                  threads=config.threads)  # fmt: skip
    else:
        choice["stage2"] = {"chosen": "given"}
    return stage1, stage2, choice


# --------------------------------------------------------------------------------------------
# What a study's result depends on: the settings and the content of the models
# --------------------------------------------------------------------------------------------
def model_fingerprints(stage1: Stage1Model, stage2: Stage2Model | None) -> dict[str, Any]:
    """Per stage, its settings (``describe()``) and the SHA-256 of what it was read from: the
    stage 1 run's ``model.keras``, ``preprocessing.json``, level decoder and sequence model (the
    weights, for a model built in memory) and the stage 2 ONNX file."""
    files = getattr(stage1, "files", None) or {}
    first = {**stage1.describe(), "sha256": (
        {role: file_sha256(path) for role, path in sorted(files.items())} if files
        else {"weights": weights_sha256(stage1.model)})}  # fmt: skip
    if stage2 is None:
        return {"stage1": first, "stage2": None}
    onnx = getattr(stage2.detector, "model_path", None)
    second = {**stage2.describe(), "sha256": (
        {"onnx": file_sha256(onnx)} if onnx is not None and Path(onnx).is_file() else None)}  # fmt: skip
    return {"stage1": first, "stage2": second}


def _settings_digest(config: PredictConfig, models: dict[str, Any]) -> str:
    """The settings digest of a study's JSON: the settings and the models' content, not where the
    model files are (a moved run keeps its results)."""
    anonymous = {k: ({f: v for f, v in m.items() if f != "source"} if m else m)
                 for k, m in models.items()}  # fmt: skip
    text = json.dumps([config.digest(), anonymous], sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:12]


def _what_changed(saved: dict[str, Any], config: PredictConfig, models: dict[str, Any]) -> str:
    """In words, why a saved study result does not fit the current settings and models."""
    changes = []
    before = saved.get("models") or {}
    for stage in ("stage1", "stage2"):
        now, then = models.get(stage), before.get(stage)
        if (now is None) != (then is None):
            changes.append(f"{stage.replace('stage', 'stage ')} model added or removed")
            continue
        if now is None:
            continue
        old_hashes, new_hashes = then.get("sha256"), now.get("sha256")
        if old_hashes is None:
            changes.append(f"{stage.replace('stage', 'stage ')} model not fingerprinted then")
        elif old_hashes != new_hashes:
            which = sorted(k for k in {*old_hashes, *(new_hashes or {})}
                           if old_hashes.get(k) != (new_hashes or {}).get(k))  # fmt: skip
            changes.append(f"{stage.replace('stage', 'stage ')} model files changed "
                           f"({', '.join(which)})")  # fmt: skip
        rest = ({k: v for k, v in now.items() if k not in ("source", "sha256")},
                {k: v for k, v in then.items() if k not in ("source", "sha256")})
        if rest[0] != rest[1]:
            changes.append(f"{stage.replace('stage', 'stage ')} settings changed")
    if saved.get("config_digest") != config.digest():
        changes.append("predict settings changed")
    return ", ".join(changes) or "written by another version"


def _read_saved(json_path: Path) -> dict[str, Any] | None:
    try:
        saved = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) else None


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise CSpineDataError(out, "exists and is not a folder: --out must be a new folder or "
                                   "one that predict wrote before")  # fmt: skip
    if out.is_dir() and any(out.iterdir()) and not (out / "predict_config.yaml").is_file():
        raise CSpineDataError(out, "is a folder that predict did not write (no "
                                   "predict_config.yaml), and predict would overwrite files in "
                                   "it: choose a new --out")  # fmt: skip
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise CSpineDataError(above, f"is a file, so the output folder {out} cannot be made")


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
    studies: list[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Two-stage inference on every study of ``input_path``; writes ``out_dir`` (see the module).

    Args:
        input_path: one study folder, a folder of studies (RSNA ``test_images``) or an RSNA root.
        out_dir: output folder: new, or written by an earlier ``predict``. Studies already done
            there with the same settings and models (by content) are read back, not recomputed.
        stage1: a stage 1 run directory or ``.keras`` file (default: the newest finished run
            under ``runs``), or a loaded :class:`Stage1Model`.
        stage2: a detection run directory, ``.onnx`` or ``.pt`` (default: the newest finished
            run under ``runs``), or a loaded :class:`Stage2Model`.
        runs: where the defaults are looked for.
        config: :class:`PredictConfig`.
        labels: a ``train.csv`` (path or frame) to evaluate against (:func:`evaluate_predictions`).
        limit: at most this many studies (sorted; >= 1), for quick looks.
        studies: run these study folders (in this order) instead of those of ``input_path``,
            which then only names the input in the summary (one shard of a job array:
            :func:`keras_cspine.pipeline.shards.predict_shard`).
        progress: a progress bar over studies.

    Returns:
        The summary, also written to ``summary.json``.

    Raises:
        CSpineDataError: the input, the output folder or a model is unusable.
        ValueError: ``limit`` < 1.
    """
    from tqdm.auto import tqdm

    from keras_cspine.config import dump_config, save_config
    from keras_cspine.io.rsna import submission_rows, write_submission

    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 (or None: every study), got {limit!r}")
    out = Path(out_dir).absolute()
    _check_out(out)
    studies = (find_studies(input_path, exclude=out) if studies is None
               else [Path(folder).absolute() for folder in studies])[: limit or None]  # fmt: skip
    stage1, stage2, choice = _load_models(stage1, stage2, runs, config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CSpineDataError(out, f"cannot create the output folder: {err.strerror or err}") from err
    save_config(config, out / "predict_config.yaml")
    models = model_fingerprints(stage1, stage2)
    digest = _settings_digest(config, models)

    rows, table, errors, reports, warnings = [], [], [], {}, []
    totals = dict.fromkeys(STEPS, 0.0)
    n_slices = n_gated = reused = redone = 0
    seen: dict[str, str] = {}
    public_input = str(Path(input_path).absolute())

    def fail(name: StudyName, folder: Path, path: str, problem: str) -> None:
        path, problem = name.redact(path, folder), name.redact(problem, folder)
        errors.append({"StudyInstanceUID": name.uid or "", "path": path, "problem": problem})
        _say(f"{name.uid or name.folder}: cannot be read: {path}: {problem}")
        if name.uid is not None and name.uid not in seen:  # the submission stays complete
            seen[name.uid] = name.folder
            rows.extend(submission_rows(name.uid, config.prior()))
            table.append({"StudyInstanceUID": name.uid, **config.prior(), "n_slices": 0,
                          "n_gated": 0, "n_boxes": 0, "status": "failed"})  # fmt: skip

    pool = (ReportPool(config.report_workers, config.report, config.presence_threshold)
            if config.report != "none" else None)  # fmt: skip
    bar = tqdm(studies, desc="predict", unit="study", disable=not progress)
    for folder in bar:
        name = name_study(folder, read_study_uid(folder))
        public_input = name.redact(public_input, folder)
        if name.uid is None:
            fail(name, folder, name.folder, "no valid StudyInstanceUID in its first DICOM file and "
                 "the folder name is not a UID: it cannot be named in the submission; skipped")  # fmt: skip
            continue
        uid = name.uid
        if uid in seen:
            fail(name, folder, name.folder, f"StudyInstanceUID {uid} is also that of "
                 f"{seen[uid]}, read first: one series per study; skipped")  # fmt: skip
            continue
        if name.warning:
            warnings.append({"StudyInstanceUID": uid, "warning": name.warning})
        bar.set_postfix_str(uid[-12:])
        json_path = out / "studies" / f"{uid}.json"
        result = None
        saved = _read_saved(json_path) if json_path.is_file() else None
        if saved is not None:
            if saved.get("settings_digest") == digest:
                try:
                    result = StudyResult.from_json(saved)
                    reused += 1
                except (KeyError, TypeError, ValueError):
                    result = None
            else:
                redone += 1
                if redone == 1:
                    _say(f"{out / 'studies'} holds results made with other models or settings "
                         f"({_what_changed(saved, config, models)}): those studies are redone")  # fmt: skip
        if result is None:
            try:
                result = predict_study(folder, stage1, stage2, config, uid=uid)
            except CSpineDataError as err:
                fail(name, folder, err.path or str(folder), err.problem)
                continue
            seen[uid] = name.folder
            started = time.perf_counter()
            if pool is not None:
                pool.submit(result, out / "reports" / uid)
            else:  # the images a later `report` command draws from
                save_report_images(result, out / "report_data" / f"{uid}.npz")
            result.timings["report"] = time.perf_counter() - started
            write_json(json_path, {**result.to_json(config.presence_threshold),
                                   "settings_digest": digest, "config_digest": config.digest(),
                                   "models": models})  # fmt: skip
        else:
            seen[uid] = name.folder
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
    report_failures: dict[str, str] = {}
    if pool is not None:  # the reports still being drawn: the critical path waits for them
        started = time.perf_counter()
        drawn, report_failures = pool.close()
        totals["report"] += time.perf_counter() - started
        reports.update(drawn)
        for uid, problem in report_failures.items():
            _say(f"{uid}: the report could not be drawn: {problem}")

    files = {"submission": str(out / "submission.csv"), "predictions": str(out / "predictions.csv")}
    write_submission(pd.DataFrame(rows, columns=["row_id", "fractured"]), out / "submission.csv")
    write_csv(out / "predictions.csv", table,
               ["StudyInstanceUID", *TARGETS, "n_slices", "n_gated", "n_boxes", "status"])  # fmt: skip
    if errors:
        write_csv(out / "errors.csv", errors, ["StudyInstanceUID", "path", "problem"])
        files["errors"] = str(out / "errors.csv")
    if reports:
        files["index"] = str(write_index(table, reports, out, models=models))
    ok = len(table) - sum(row["status"] == "failed" for row in table)
    summary: dict[str, Any] = {
        "input": public_input,
        "out": str(out),
        "n_studies": len(studies),
        "n_ok": ok,
        "n_failed": len(errors),
        "n_reused": reused,
        "n_redone": redone,
        "n_slices": n_slices,
        "n_gated": n_gated,
        "gated_fraction": round(n_gated / n_slices, 4) if n_slices else None,
        "seconds": {k: round(v, 3) for k, v in totals.items()},
        "seconds_per_study": round(sum(totals.values()) / ok, 3) if ok else None,
        "models": models,
        "model_choice": choice,
        "config": dump_config(config),
        "errors": errors,
        "warnings": warnings,
        "reports": reports,
        "report_failures": report_failures,
        "report_render_s": round(pool.render_seconds, 3) if pool is not None else 0.0,
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
