"""Detection metrics for stage 2 (paper Section 3, Table 3) and the detection confusion matrix.

Table 3 reports precision, recall, mAP50 and mAP50-95 of each YOLO model as Ultralytics computes
them. This module recomputes mAP on the *same predictions* with an implementation of its own
(COCO's definition, written from the COCO evaluation protocol: greedy matching by score, 101-point
interpolated precision, at most ``max_dets`` detections per image) and with pycocotools, so that
Ultralytics' numbers are cross-checked by two independent computations:

>>> gt = {"a": np.array([[0, 0, 10, 10]])}
>>> pred = {"a": (np.array([[0, 0, 10, 10]]), np.array([0.9]))}
>>> evaluate_detections(gt, pred).map50
1.0

Boxes are ``(N, 4)`` arrays of ``x1, y1, x2, y2`` in pixels, keyed by image. Nothing here imports
torch or Ultralytics. Also: the detection confusion matrix (laid out as Ultralytics' own
``confusion_matrix.png``) and the Table 3 writer.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from keras_cspine.errors import MissingDependencyError
from keras_cspine.utils import atomic_write

#: IoU thresholds of mAP50-95 (COCO): 0.50, 0.55, ..., 0.95.
COCO_IOU_THRESHOLDS = tuple(np.round(np.linspace(0.5, 0.95, 10), 2).tolist())

#: The paper's Table 3: precision, recall, mAP50, mAP50-95 on 1,644 images / 1,444 instances.
PAPER_TABLE3 = {
    "yolov8s": (0.940, 0.921, 0.960, 0.747),
    "yolov8m": (0.938, 0.927, 0.959, 0.766),
    "yolov5s": (0.935, 0.919, 0.950, 0.721),
    "yolov5m": (0.932, 0.931, 0.958, 0.748),
}
PAPER_TABLE3_IMAGES = 1644
PAPER_TABLE3_INSTANCES = 1444

GroundTruth = Mapping[object, np.ndarray]
Predictions = Mapping[object, tuple[np.ndarray, np.ndarray]]


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(len(a), len(b))`` of ``x1, y1, x2, y2`` boxes (continuous pixel coordinates)."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    left = np.maximum(a[:, None, 0], b[None, :, 0])
    top = np.maximum(a[:, None, 1], b[None, :, 1])
    right = np.minimum(a[:, None, 2], b[None, :, 2])
    bottom = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(right - left, 0, None) * np.clip(bottom - top, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / union, 0.0)


def _as_boxes(value, where: str) -> np.ndarray:
    boxes = np.asarray(value, dtype=np.float64)
    if boxes.size == 0:
        return np.zeros((0, 4))
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"{where}: boxes must be an (N, 4) array, got shape {boxes.shape}")
    if not np.isfinite(boxes).all() or (boxes[:, 2:] < boxes[:, :2]).any():
        raise ValueError(f"{where}: boxes must be finite x1, y1, x2, y2 with x2 >= x1, y2 >= y1")
    return boxes


def _sorted_predictions(predictions: Predictions, key, max_dets: int):
    boxes, scores = predictions.get(key, (np.zeros((0, 4)), np.zeros(0)))
    boxes = _as_boxes(boxes, f"predictions[{key!r}]")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(scores) != len(boxes):
        raise ValueError(f"predictions[{key!r}]: {len(boxes)} boxes but {len(scores)} scores")
    order = np.argsort(-scores, kind="mergesort")[:max_dets]
    return boxes[order], scores[order]


def _match(gt: np.ndarray, boxes: np.ndarray, threshold: float) -> np.ndarray:
    """COCO matching: each detection, by falling score, takes the unmatched GT of highest IoU."""
    matched = np.zeros(len(boxes), dtype=bool)
    if not len(gt) or not len(boxes):
        return matched
    ious = box_iou(boxes, gt)
    taken = np.zeros(len(gt), dtype=bool)
    for d in range(len(boxes)):
        best, best_iou = -1, min(threshold, 1 - 1e-10)
        for g in range(len(gt)):
            if taken[g] or ious[d, g] < best_iou:
                continue
            best, best_iou = g, ious[d, g]
        if best >= 0:
            taken[best] = True
            matched[d] = True
    return matched


def interpolated_ap(tp: np.ndarray, scores: np.ndarray, n_gt: int) -> float:
    """COCO average precision: precision envelope sampled at 101 recall points.

    ``tp`` flags each detection (already in the evaluation order) as a true positive.
    Returns NaN when there is no ground truth.
    """
    if n_gt == 0:
        return float("nan")
    if len(tp) == 0:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    tp = np.asarray(tp, dtype=bool)[order]
    tps = np.cumsum(tp).astype(np.float64)
    fps = np.cumsum(~tp).astype(np.float64)
    recall = tps / n_gt
    precision = tps / np.maximum(tps + fps, np.spacing(1))
    for i in range(len(precision) - 1, 0, -1):  # envelope: non-increasing from the right
        precision[i - 1] = max(precision[i - 1], precision[i])
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    sampled = np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0)
    return float(sampled.mean())


@dataclass(frozen=True)
class DetectionScores:
    """Average precision of one class at each IoU threshold, and the counts behind it."""

    iou_thresholds: tuple[float, ...]
    ap: tuple[float, ...]
    n_images: int
    n_instances: int
    n_predictions: int

    @property
    def map50(self) -> float:
        return self.ap[self.iou_thresholds.index(0.5)]

    @property
    def map50_95(self) -> float:
        return float(np.mean(self.ap))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "mAP50": self.map50,
            "mAP50-95": self.map50_95,
            "images": self.n_images,
            "instances": self.n_instances,
            "predictions": self.n_predictions,
        }


def evaluate_detections(
    ground_truth: GroundTruth,
    predictions: Predictions,
    iou_thresholds: Sequence[float] = COCO_IOU_THRESHOLDS,
    max_dets: int = 100,
) -> DetectionScores:
    """mAP of single-class detections, COCO definition, independent of Ultralytics and pycocotools.

    Args:
        ground_truth: image key -> ``(N, 4)`` true boxes (xyxy); every evaluated image must be a
            key, with an empty array when it has no box.
        predictions: image key -> ``(boxes (M, 4), scores (M,))``; missing keys mean no
            detection. Keys not in ``ground_truth`` raise ``ValueError``.
        iou_thresholds: IoU thresholds (0.5 must be among them for ``map50``).
        max_dets: at most this many detections per image, by score (COCO uses 100).
    """
    stray = [k for k in predictions if k not in ground_truth]
    if stray:
        raise ValueError(f"predictions for images without ground truth entry: {stray[:3]}")
    keys = sorted(ground_truth, key=str)
    gts = {k: _as_boxes(ground_truth[k], f"ground_truth[{k!r}]") for k in keys}
    preds = {k: _sorted_predictions(predictions, k, max_dets) for k in keys}
    n_gt = sum(len(g) for g in gts.values())
    scores = np.concatenate([preds[k][1] for k in keys]) if keys else np.zeros(0)
    aps = []
    for threshold in iou_thresholds:
        tp = (
            np.concatenate([_match(gts[k], preds[k][0], threshold) for k in keys])
            if keys
            else np.zeros(0, dtype=bool)
        )
        aps.append(interpolated_ap(tp, scores, n_gt))
    return DetectionScores(
        iou_thresholds=tuple(float(t) for t in iou_thresholds),
        ap=tuple(aps),
        n_images=len(keys),
        n_instances=n_gt,
        n_predictions=len(scores),
    )


def pycocotools_map(
    ground_truth: GroundTruth, predictions: Predictions, max_dets: int = 100
) -> dict[str, float]:
    """mAP50 and mAP50-95 of the same inputs computed by pycocotools (the COCO reference code)."""
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - pycocotools is in the dev extra
        raise MissingDependencyError("pycocotools", "dev", "The mAP cross-check") from exc
    keys = sorted(ground_truth, key=str)
    ids = {k: i + 1 for i, k in enumerate(keys)}
    annotations, detections = [], []
    for k in keys:
        for x1, y1, x2, y2 in _as_boxes(ground_truth[k], f"ground_truth[{k!r}]"):
            w, h = x2 - x1, y2 - y1
            annotations.append(
                {"id": len(annotations) + 1, "image_id": ids[k], "category_id": 1,
                 "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        boxes, scores = predictions.get(k, (np.zeros((0, 4)), np.zeros(0)))
        for (x1, y1, x2, y2), s in zip(_as_boxes(boxes, f"predictions[{k!r}]"), np.ravel(scores)):
            detections.append(
                {"image_id": ids[k], "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                 "score": float(s)}
            )  # fmt: skip
    if not annotations:
        return {"mAP50": float("nan"), "mAP50-95": float("nan")}
    if not detections:
        return {"mAP50": 0.0, "mAP50-95": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": [{"id": ids[k]} for k in keys],
            "annotations": annotations,
            "categories": [{"id": 1, "name": "fracture"}],
        }
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(detections)
        evaluator = COCOeval(coco_gt, coco_dt, "bbox")
        evaluator.params.maxDets = [1, 10, max_dets]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, 0, 0, -1]  # (iou, recall), class 0, area all
    per_iou = [float(p[p > -1].mean()) if (p > -1).any() else float("nan") for p in precision]
    return {"mAP50": per_iou[0], "mAP50-95": float(np.mean(per_iou))}


@dataclass(frozen=True)
class ConfusionCounts:
    """Box-level confusion of one class against background (the layout of Ultralytics' confusion
    matrix plot).

    ``matrix[predicted][true]`` with index 0 = fracture, 1 = background: ``[[TP, FP], [FN, 0]]``.
    Image-level counts say whether a slice with a fracture got at least one box.
    """

    tp: int
    fp: int
    fn: int
    image_tp: int
    image_fp: int
    image_fn: int
    image_tn: int
    conf: float
    iou: float
    extra: dict = field(default_factory=dict)

    @property
    def matrix(self) -> np.ndarray:
        return np.array([[self.tp, self.fp], [self.fn, 0]], dtype=np.int64)

    def as_dict(self) -> dict:
        return {
            "conf": self.conf,
            "iou": self.iou,
            "boxes": {"tp": self.tp, "fp": self.fp, "fn": self.fn},
            "images": {
                "tp": self.image_tp, "fp": self.image_fp, "fn": self.image_fn, "tn": self.image_tn
            },
        }  # fmt: skip


def confusion_counts(
    ground_truth: GroundTruth, predictions: Predictions, conf: float = 0.25, iou: float = 0.45
) -> ConfusionCounts:
    """Box- and image-level confusion counts at a confidence and IoU threshold."""
    tp = fp = fn = itp = ifp = ifn = itn = 0
    for key in sorted(ground_truth, key=str):
        gt = _as_boxes(ground_truth[key], f"ground_truth[{key!r}]")
        boxes, scores = _sorted_predictions(predictions, key, max_dets=10**9)
        boxes = boxes[scores >= conf]
        matched = _match(gt, boxes, iou)
        tp += int(matched.sum())
        fp += int((~matched).sum())
        fn += len(gt) - int(matched.sum())
        if len(gt):
            itp += int(len(boxes) > 0)
            ifn += int(len(boxes) == 0)
        else:
            ifp += int(len(boxes) > 0)
            itn += int(len(boxes) == 0)
    return ConfusionCounts(tp, fp, fn, itp, ifp, ifn, itn, conf=conf, iou=iou)


TABLE3_COLUMNS = (
    "model", "images", "instances", "precision", "recall", "mAP50", "mAP50-95",
    "mAP50_ours", "mAP50_pycocotools", "paper_precision", "paper_recall", "paper_mAP50",
    "paper_mAP50-95",
)  # fmt: skip


def table3_row(model: str, metrics: Mapping) -> dict:
    """One Table 3 row from a ``metrics.json`` of ``detect val``, beside the paper's numbers."""
    paper = PAPER_TABLE3.get(model, (None,) * 4)
    cross = metrics.get("cross_check", {})
    return {
        "model": model,
        "images": metrics.get("images"),
        "instances": metrics.get("instances"),
        "precision": metrics.get("precision"),
        "recall": metrics.get("recall"),
        "mAP50": metrics.get("mAP50"),
        "mAP50-95": metrics.get("mAP50-95"),
        "mAP50_ours": cross.get("mAP50_ours"),
        "mAP50_pycocotools": cross.get("mAP50_pycocotools"),
        "paper_precision": paper[0],
        "paper_recall": paper[1],
        "paper_mAP50": paper[2],
        "paper_mAP50-95": paper[3],
    }


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.3f}"
    return str(value)


def write_table3(rows: Sequence[Mapping], out_dir: str | os.PathLike) -> tuple[str, str]:
    """Write ``table3.csv`` and ``table3.md`` (one row per model); return their paths."""
    out_dir = os.fspath(out_dir)
    csv_path = os.path.join(out_dir, "table3.csv")
    md_path = os.path.join(out_dir, "table3.md")
    with atomic_write(csv_path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=TABLE3_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in TABLE3_COLUMNS})
    header = (
        "| Model | Images | Instances | P | R | mAP50 | mAP50-95 | mAP50 (ours / pycocotools) "
        "| Paper P / R / mAP50 / mAP50-95 |"
    )
    lines = [
        "Table 3: fracture detection on the held-out split (paper: "
        f"{PAPER_TABLE3_IMAGES:,} images, {PAPER_TABLE3_INSTANCES:,} instances).",
        "",
        header,
        "|" + "---|" * 9,
    ]
    for row in rows:
        paper = " / ".join(
            _fmt(row.get(c))
            for c in ("paper_precision", "paper_recall", "paper_mAP50", "paper_mAP50-95")
        )
        lines.append(
            f"| {row['model']} | {_fmt(row.get('images'))} | {_fmt(row.get('instances'))} "
            f"| {_fmt(row.get('precision'))} | {_fmt(row.get('recall'))} "
            f"| {_fmt(row.get('mAP50'))} | {_fmt(row.get('mAP50-95'))} "
            f"| {_fmt(row.get('mAP50_ours'))} / {_fmt(row.get('mAP50_pycocotools'))} "
            f"| {paper if row.get('paper_mAP50') is not None else '-'} |"
        )
    with atomic_write(md_path) as handle:
        handle.write("\n".join(lines) + "\n")
    return csv_path, md_path
