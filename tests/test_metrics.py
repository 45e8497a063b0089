"""Table 1/2 metrics and the RSNA competition metric, on hand-made cases with known values."""

import math

import numpy as np
import pandas as pd
import pytest

from keras_cspine.stage1 import metrics as M

Y_TRUE = np.array([[1, 0], [0, 1], [1, 1]])
Y_SCORE = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.8]])  # labels [[1,0],[1,1],[0,1]]


def test_macro_f1_by_hand():
    # class 0: tp 1, fp 1, fn 1 -> 0.5; class 1: tp 2, fp 0, fn 0 -> 1.0
    assert M.macro_f1(Y_TRUE, Y_SCORE) == pytest.approx(0.75)


def test_exact_match_ratio_by_hand():
    assert M.exact_match_ratio(Y_TRUE, Y_SCORE) == pytest.approx(1 / 3)
    assert M.exact_match_ratio(Y_TRUE, Y_TRUE * 0.9) == 1.0


def test_threshold_is_strict_like_keras():
    assert M.threshold([[0.5, 0.50001]]).tolist() == [[0, 1]]


def test_coverage_error_uses_scores():
    y_true = [[1, 0, 0], [0, 1, 1]]
    y_score = [[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]]
    # sample 1: its label ranks 1st -> 1; sample 2: lowest true label ranks 3rd -> 3
    assert M.coverage_error(y_true, y_score) == pytest.approx(2.0)
    out = M.multilabel_metrics(y_true, y_score)
    assert out["min_coverage_error"] == pytest.approx(1.5)
    perfect = M.multilabel_metrics(y_true, np.asarray(y_true) * 0.8 + 0.1)
    assert perfect["coverage_error"] == pytest.approx(perfect["min_coverage_error"])
    assert perfect["macro_f1"] == 1.0 and perfect["exact_match_ratio"] == 1.0


def test_macro_f1_matches_keras_f1score():
    import keras

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, (64, 7)).astype("float32")
    y_score = np.clip(y_true * 0.6 + rng.uniform(0, 0.5, (64, 7)), 0, 1).astype("float32")
    metric = keras.metrics.F1Score(average="macro", threshold=0.5)
    metric.update_state(y_true, y_score)
    assert float(metric.result()) == pytest.approx(M.macro_f1(y_true, y_score), abs=1e-5)


def test_classification_report_frame():
    report = M.classification_report_frame(Y_TRUE, Y_SCORE, names=("A", "B"))
    assert list(report.columns) == ["precision", "recall", "f1-score", "support"]
    assert report.loc["A", "f1-score"] == pytest.approx(0.5)
    assert report.loc["B", "precision"] == pytest.approx(1.0)
    assert report.loc["A", "support"] == 2 and report.loc["B", "support"] == 2
    assert report.loc["macro avg", "f1-score"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="names"):
        M.classification_report_frame(Y_TRUE, Y_SCORE)  # 7 names for 2 columns


@pytest.mark.parametrize(
    "y_true, y_score, match",
    [
        ([1, 0], [0.1, 0.2], "2-D"),
        ([[1, 0]], [[0.1, 0.2, 0.3]], "columns"),
        ([[1, 0], [0, 1]], [[0.1, 0.2]], "length"),
        ([[-1, 0]], [[0.1, 0.2]], "0/1"),
        ([[1, 0]], [[np.nan, 0.2]], "NaN"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "no samples"),
    ],
)
def test_bad_inputs(y_true, y_score, match):
    with pytest.raises(ValueError, match=match):
        M.multilabel_metrics(y_true, y_score)


# ----------------------------------------------------------------------------------- RSNA
def test_rsna_uniform_half_is_ln2():
    y_true = np.array([[1, 0, 0, 0, 0, 0, 1, 1], [0] * 8])
    assert M.rsna_weighted_log_loss(y_true, np.full((2, 8), 0.5)) == pytest.approx(math.log(2))


def test_rsna_weights_by_hand():
    # study A: C1 fractured (p 0.5), other vertebrae negative (p 0.1), overall positive (p 0.9)
    a_true = [1, 0, 0, 0, 0, 0, 0, 1]
    a_pred = [0.5, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9]
    loss_a = (2 * math.log(2) + 6 * -math.log(0.9) + 14 * -math.log(0.9)) / (2 + 6 + 14)
    # study B: all negative, overall predicted 0.2, vertebrae 0.5
    b_true = [0] * 8
    b_pred = [0.5] * 7 + [0.2]
    loss_b = (7 * math.log(2) + 7 * -math.log(0.8)) / (7 + 7)
    got = M.rsna_weighted_log_loss([a_true, b_true], [a_pred, b_pred])
    assert got == pytest.approx((loss_a + loss_b) / 2, rel=1e-12)
    # the per-study mean differs from a pooled weighted mean over all rows
    pooled = (22 * loss_a + 14 * loss_b) / 36
    assert abs(got - pooled) > 1e-3


def test_rsna_perfect_and_clipped():
    y = np.array([[1, 0, 1, 0, 0, 0, 0, 1]], float)
    assert M.rsna_weighted_log_loss(y, y) == pytest.approx(0.0, abs=1e-12)
    worst = M.rsna_weighted_log_loss(y, 1 - y)
    assert math.isfinite(worst) and worst == pytest.approx(-math.log(1e-15), rel=1e-2)


def test_rsna_from_frames():
    solution = pd.DataFrame(
        [["1.2.3", 1, 0, 0, 0, 0, 0, 0, 1], ["1.2.4", 0, 0, 0, 0, 0, 0, 0, 0]],
        columns=["StudyInstanceUID", *M.VERTEBRAE, "patient_overall"],
    )
    rows = [
        {"row_id": f"{uid}_{t}", "fractured": 0.5}
        for uid in ("1.2.3", "1.2.4")
        for t in M.RSNA_TARGETS
    ]
    assert M.rsna_log_loss_from_frames(solution, pd.DataFrame(rows)) == pytest.approx(math.log(2))
    with pytest.raises(KeyError, match="1.2.4_patient_overall"):
        M.rsna_log_loss_from_frames(solution, pd.DataFrame(rows[:-1]))


@pytest.mark.parametrize(
    "y_true, y_pred, match",
    [
        (np.zeros((1, 7)), np.zeros((1, 7)), "8 columns"),
        (np.zeros((1, 8)), np.full((1, 8), 1.5), r"\[0, 1\]"),
        (np.full((1, 8), 2), np.zeros((1, 8)), "0/1"),
        (np.zeros((2, 8)), np.zeros((1, 8)), "prediction rows"),
    ],
)
def test_rsna_bad_inputs(y_true, y_pred, match):
    with pytest.raises(ValueError, match=match):
        M.rsna_weighted_log_loss(y_true, y_pred)
