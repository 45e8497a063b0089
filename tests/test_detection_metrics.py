"""Stage 2 metrics: our own mAP on hand-made cases, agreement with pycocotools, Table 3 files."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from keras_cspine.stage2 import metrics as dm

pytestmark = pytest.mark.detect


def _pred(*rows):
    """``(x1, y1, x2, y2, score)`` rows -> (boxes, scores)."""
    arr = np.asarray(rows, dtype=float).reshape(-1, 5)
    return arr[:, :4], arr[:, 4]


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),
        ([0, 0, 10, 10], [10, 10, 20, 20], 0.0),  # touching corners
        ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),  # inside
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # degenerate: no division by zero
    ],
)
def test_box_iou_cases(a, b, expected):
    assert dm.box_iou(np.array([a]), np.array([b]))[0, 0] == pytest.approx(expected)


def test_perfect_and_empty_predictions():
    gt = {"a": np.array([[0, 0, 10, 10]]), "b": np.zeros((0, 4))}
    perfect = dm.evaluate_detections(gt, {"a": _pred([0, 0, 10, 10, 0.9])})
    assert perfect.map50 == 1.0 and perfect.map50_95 == 1.0
    assert (perfect.n_images, perfect.n_instances, perfect.n_predictions) == (2, 1, 1)
    nothing = dm.evaluate_detections(gt, {})
    assert nothing.map50 == 0.0
    assert np.isnan(dm.evaluate_detections({"b": np.zeros((0, 4))}, {}).map50)  # no ground truth


def test_hand_computed_average_precision():
    # Two true boxes; detections by score: TP (0.9), FP (0.8), TP (0.7).
    # Precision envelope: 1 up to recall 0.5, then 2/3 up to recall 1.0. COCO samples 101
    # recall points: 51 of them (0.00..0.50) at precision 1, 50 (0.51..1.00) at 2/3.
    gt = {"a": np.array([[0, 0, 10, 10], [20, 20, 30, 30]])}
    pred = {"a": _pred([0, 0, 10, 10, 0.9], [50, 50, 60, 60, 0.8], [20, 20, 30, 30, 0.7])}
    expected = (51 * 1.0 + 50 * 2 / 3) / 101
    assert dm.evaluate_detections(gt, pred).map50 == pytest.approx(expected)
    assert dm.pycocotools_map(gt, pred)["mAP50"] == pytest.approx(expected)


def test_iou_threshold_is_inclusive_and_duplicates_are_false_positives():
    gt = {"a": np.array([[0, 0, 10, 10]])}
    # IoU exactly 0.5 (the upper half of the box: 50 / 100) counts at the 0.5 threshold.
    half = _pred([0, 0, 10, 5, 0.9])
    assert dm.box_iou(half[0], gt["a"])[0, 0] == 0.5
    assert dm.evaluate_detections(gt, {"a": half}, iou_thresholds=(0.5,)).map50 == 1.0
    assert dm.pycocotools_map(gt, {"a": half})["mAP50"] == pytest.approx(1.0)
    # A duplicate of a matched box is a false positive ranked below the true one: AP stays 1.
    dup = _pred([0, 0, 10, 10, 0.9], [0, 0, 10, 10, 0.8])
    assert dm.evaluate_detections(gt, {"a": dup}).map50 == 1.0
    # ... but ranked above it, it costs precision at every recall: AP 0.5.
    ranked = _pred([0, 0, 10, 10, 0.8], [30, 30, 40, 40, 0.9])
    assert dm.evaluate_detections(gt, {"a": ranked}).map50 == pytest.approx(0.5)


def test_max_dets_truncates_per_image():
    gt = {"a": np.array([[0, 0, 10, 10]])}
    pred = {"a": _pred([30, 30, 40, 40, 0.9], [0, 0, 10, 10, 0.5])}
    assert dm.evaluate_detections(gt, pred, max_dets=1).map50 == 0.0
    assert dm.evaluate_detections(gt, pred, max_dets=2).map50 == pytest.approx(0.5)


@pytest.mark.parametrize(
    "ground_truth, predictions, match",
    [
        ({"a": np.zeros((2, 3))}, {}, "shape"),
        ({"a": np.array([[5, 5, 0, 0]])}, {}, "x2 >= x1"),
        ({"a": np.array([[0, 0, np.nan, 1]])}, {}, "finite"),
        ({"a": np.zeros((0, 4))}, {"b": _pred([0, 0, 1, 1, 0.5])}, "without ground truth"),
        ({"a": np.zeros((0, 4))}, {"a": (np.zeros((2, 4)), np.zeros(1))}, "scores"),
    ],
)
def test_bad_inputs_raise(ground_truth, predictions, match):
    with pytest.raises(ValueError, match=match):
        dm.evaluate_detections(ground_truth, predictions)


def _random_case(seed: int, n_images: int = 12):
    """Jittered copies of true boxes plus clutter, with a few tied scores and empty images."""
    rng = np.random.default_rng(seed)
    gt, pred = {}, {}
    for i in range(n_images):
        n = int(rng.integers(0, 4))
        xy = rng.uniform(0, 80, (n, 2))
        wh = rng.uniform(4, 30, (n, 2))
        boxes = np.concatenate([xy, xy + wh], axis=1)
        gt[f"img{i}"] = boxes
        jitter = boxes + rng.normal(0, rng.uniform(0.5, 4), boxes.shape)
        jitter[:, 2:] = np.maximum(jitter[:, 2:], jitter[:, :2] + 1)
        m = int(rng.integers(0, 5))
        cxy = rng.uniform(0, 90, (m, 2))
        clutter = np.concatenate([cxy, cxy + rng.uniform(3, 25, (m, 2))], axis=1)
        all_boxes = np.concatenate([jitter, clutter])
        scores = np.round(rng.uniform(0, 1, len(all_boxes)), 2)  # rounding makes ties
        if len(all_boxes):
            pred[f"img{i}"] = (all_boxes, scores)
    return gt, pred


@pytest.mark.parametrize("seed", range(8))
def test_own_implementation_agrees_with_pycocotools(seed):
    gt, pred = _random_case(seed)
    ours = dm.evaluate_detections(gt, pred)
    coco = dm.pycocotools_map(gt, pred)
    assert ours.map50 == pytest.approx(coco["mAP50"], abs=1e-9)
    assert ours.map50_95 == pytest.approx(coco["mAP50-95"], abs=1e-9)
    assert 0.0 < ours.map50 < 1.0  # a case that exercises both hits and misses


def test_confusion_counts_boxes_and_images():
    gt = {
        "hit": np.array([[0, 0, 10, 10], [20, 20, 30, 30]]),
        "miss": np.array([[0, 0, 10, 10]]),
        "clean": np.zeros((0, 4)),
        "alarm": np.zeros((0, 4)),
    }
    pred = {
        "hit": _pred([0, 0, 10, 10, 0.9], [50, 50, 60, 60, 0.6], [20, 20, 30, 30, 0.1]),
        "alarm": _pred([0, 0, 5, 5, 0.3]),
    }
    counts = dm.confusion_counts(gt, pred, conf=0.25, iou=0.45)
    assert (counts.tp, counts.fp, counts.fn) == (1, 2, 2)  # 0.1 box is below conf
    assert counts.matrix.tolist() == [[1, 2], [2, 0]]
    assert (counts.image_tp, counts.image_fn, counts.image_fp, counts.image_tn) == (1, 1, 1, 1)


def test_write_table3(tmp_path):
    metrics = {
        "images": 23, "instances": 20, "precision": 0.9, "recall": 0.85, "mAP50": 0.88,
        "mAP50-95": 0.5, "cross_check": {"mAP50_ours": 0.87, "mAP50_pycocotools": 0.87},
    }  # fmt: skip
    rows = [dm.table3_row("yolov8s", metrics), dm.table3_row("custom", metrics)]
    csv_path, md_path = dm.write_table3(rows, tmp_path)
    with open(csv_path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [r["model"] for r in read] == ["yolov8s", "custom"]
    assert float(read[0]["paper_mAP50"]) == 0.96 and read[1]["paper_mAP50"] == ""
    assert float(read[0]["mAP50_pycocotools"]) == 0.87
    text = open(md_path).read()
    assert "| yolov8s | 23 | 20 | 0.900 | 0.850 | 0.880 | 0.500 | 0.870 / 0.870 " in text
    assert "0.940 / 0.921 / 0.960 / 0.747" in text and "1,644 images" in text
