"""Stage 1 metrics (paper Section 3, Tables 1 and 2) and the RSNA 2022 competition metric.

The paper scores the vertebra classifier with scikit-learn on the same per-slice predictions:

* **macro F1** - ``f1_score(average="macro")`` over C1..C7 at a 0.5 threshold (Table 1);
* **exact match ratio** - ``accuracy_score`` on multi-label indicators: the share of slices whose
  seven labels are all right (Table 1, "EMR");
* **coverage error** - ``coverage_error`` on the *scores* (not thresholded labels): how far down
  the ranked labels one must go to cover every true label; its minimum is the mean number of true
  labels per slice (Table 1);
* the **per-class report** of Table 2 - ``classification_report`` (precision, recall, F1, support).

:func:`rsna_weighted_log_loss` is the RSNA 2022 Cervical Spine Fracture Detection score:
a weighted binary log loss over rows C1..C7 and ``patient_overall`` of each study (weights:
negative vertebra 1, positive vertebra 2, negative patient_overall 7, positive 14), normalised
as the weighted mean over each study's rows and then averaged over studies.

This module imports neither TensorFlow nor torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from keras_cspine.io.rsna import TARGETS as RSNA_TARGETS
from keras_cspine.io.rsna import VERTEBRAE

#: RSNA weights: (negative, positive) for a vertebra row and for the patient_overall row.
RSNA_VERTEBRA_WEIGHTS = (1.0, 2.0)
RSNA_PATIENT_WEIGHTS = (7.0, 14.0)

__all__ = [
    "RSNA_TARGETS",
    "VERTEBRAE",
    "classification_report_frame",
    "coverage_error",
    "exact_match_ratio",
    "macro_f1",
    "multilabel_metrics",
    "rsna_log_loss_from_frames",
    "rsna_weighted_log_loss",
    "threshold",
]


def _as_2d(name: str, array, n_columns: int | None = None) -> np.ndarray:
    out = np.asarray(array, dtype=np.float64)
    if out.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, labels), got shape {out.shape}")
    if n_columns is not None and out.shape[1] != n_columns:
        raise ValueError(f"{name} must have {n_columns} columns, got shape {out.shape}")
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return out


def _check_pair(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y_true = _as_2d("y_true", y_true)
    y_score = _as_2d("y_score", y_score, y_true.shape[1])
    if y_true.shape[0] != y_score.shape[0]:
        raise ValueError(
            f"y_true and y_score differ in length: {y_true.shape[0]} vs {y_score.shape[0]}"
        )
    if y_true.shape[0] == 0:
        raise ValueError("no samples to score")
    if not np.isin(y_true, (0.0, 1.0)).all():
        bad = np.unique(y_true[~np.isin(y_true, (0.0, 1.0))])[:5]
        raise ValueError(f"y_true must hold 0/1 labels (unknown labels removed), found {bad}")
    return y_true.astype(np.int64), y_score


def threshold(y_score, cutoff: float = 0.5) -> np.ndarray:
    """Scores to 0/1 labels: ``score > cutoff`` (the rule of ``keras.metrics.F1Score``)."""
    return (np.asarray(y_score) > cutoff).astype(np.int64)


def macro_f1(y_true, y_score, cutoff: float = 0.5, zero_division: float = 0.0) -> float:
    """Macro-averaged F1 over the label columns (sklearn ``f1_score(average="macro")``).

    A label with no positive in either truth or prediction scores ``zero_division`` (0 by
    default, as scikit-learn and ``keras.metrics.F1Score`` do, but without the warning).
    """
    y_true, y_score = _check_pair(y_true, y_score)
    return float(
        skm.f1_score(
            y_true, threshold(y_score, cutoff), average="macro", zero_division=zero_division
        )
    )


def exact_match_ratio(y_true, y_score, cutoff: float = 0.5) -> float:
    """Share of samples whose labels are all right (sklearn ``accuracy_score``, multi-label)."""
    y_true, y_score = _check_pair(y_true, y_score)
    return float(skm.accuracy_score(y_true, threshold(y_score, cutoff)))


def coverage_error(y_true, y_score) -> float:
    """sklearn ``coverage_error`` on the raw scores (best value: mean true labels per sample).

    Samples without any true label count as 0 in scikit-learn's definition.
    """
    y_true, y_score = _check_pair(y_true, y_score)
    return float(skm.coverage_error(y_true, y_score))


def multilabel_metrics(y_true, y_score, cutoff: float = 0.5) -> dict[str, float]:
    """The Table 1 figures on one set of predictions.

    Returns:
        ``macro_f1``, ``exact_match_ratio``, ``coverage_error``, plus ``min_coverage_error``
        (the mean number of true labels, the best possible coverage error), ``n_samples`` and
        ``cutoff``.
    """
    y_true, y_score = _check_pair(y_true, y_score)
    return {
        "macro_f1": macro_f1(y_true, y_score, cutoff),
        "exact_match_ratio": exact_match_ratio(y_true, y_score, cutoff),
        "coverage_error": coverage_error(y_true, y_score),
        "min_coverage_error": float(y_true.sum(axis=1).mean()),
        "n_samples": int(y_true.shape[0]),
        "cutoff": float(cutoff),
    }


def classification_report_frame(
    y_true,
    y_score,
    names: Sequence[str] = VERTEBRAE,
    cutoff: float = 0.5,
    zero_division: float = 0.0,
) -> pd.DataFrame:
    """The per-class report of Table 2 as a DataFrame (sklearn ``classification_report``).

    Rows are the class names, then ``micro avg``, ``macro avg``, ``weighted avg`` and
    ``samples avg``; columns ``precision``, ``recall``, ``f1-score``, ``support``.
    """
    y_true, y_score = _check_pair(y_true, y_score)
    if len(names) != y_true.shape[1]:
        raise ValueError(f"{len(names)} names for {y_true.shape[1]} label columns")
    report = skm.classification_report(
        y_true,
        threshold(y_score, cutoff),
        target_names=list(names),
        output_dict=True,
        zero_division=zero_division,
    )
    frame = pd.DataFrame(report).T[["precision", "recall", "f1-score", "support"]]
    frame["support"] = frame["support"].astype(int)
    frame.index.name = "class"
    return frame


def rsna_weighted_log_loss(y_true, y_pred, eps: float = 1e-15) -> float:
    """The RSNA 2022 competition score (lower is better).

    Args:
        y_true: (studies, 8) 0/1 labels, columns C1..C7 then patient_overall.
        y_pred: (studies, 8) fracture probabilities in the same order; clipped to
            ``[eps, 1 - eps]`` as in scikit-learn's ``log_loss``.
        eps: clipping bound.

    Returns:
        The mean over studies of each study's weighted mean binary cross-entropy, with weights
        1 / 2 for a negative / positive vertebra row and 7 / 14 for a negative / positive
        patient_overall row.
    """
    y_true = _as_2d("y_true", y_true, len(RSNA_TARGETS))
    y_pred = _as_2d("y_pred", y_pred, len(RSNA_TARGETS))
    if y_true.shape[0] != y_pred.shape[0]:
        raise ValueError(f"{y_true.shape[0]} label rows but {y_pred.shape[0]} prediction rows")
    if y_true.shape[0] == 0:
        raise ValueError("no studies to score")
    if not np.isin(y_true, (0.0, 1.0)).all():
        raise ValueError("y_true must hold 0/1 labels")
    if (y_pred < 0).any() or (y_pred > 1).any():
        raise ValueError("y_pred must hold probabilities in [0, 1]")
    p = np.clip(y_pred, eps, 1.0 - eps)
    bce = -(y_true * np.log(p) + (1.0 - y_true) * np.log(1.0 - p))
    negative = np.array([RSNA_VERTEBRA_WEIGHTS[0]] * 7 + [RSNA_PATIENT_WEIGHTS[0]])
    positive = np.array([RSNA_VERTEBRA_WEIGHTS[1]] * 7 + [RSNA_PATIENT_WEIGHTS[1]])
    weights = np.where(y_true > 0.5, positive, negative)
    per_study = (weights * bce).sum(axis=1) / weights.sum(axis=1)
    return float(per_study.mean())


def rsna_log_loss_from_frames(
    solution: pd.DataFrame, submission: pd.DataFrame | Mapping[str, float]
) -> float:
    """:func:`rsna_weighted_log_loss` from the competition's tables.

    Args:
        solution: ``train.csv``-shaped frame (``StudyInstanceUID``, C1..C7, ``patient_overall``).
        submission: ``sample_submission.csv``-shaped frame (``row_id``, ``fractured``) with
            ``row_id = <UID>_<target>``, or a mapping from row_id to probability.

    Raises:
        KeyError: naming the first missing ``row_id``.
    """
    missing_cols = [c for c in ("StudyInstanceUID", *RSNA_TARGETS) if c not in solution.columns]
    if missing_cols:
        raise ValueError(f"solution lacks columns {missing_cols}")
    if isinstance(submission, pd.DataFrame):
        for col in ("row_id", "fractured"):
            if col not in submission.columns:
                raise ValueError(f"submission lacks the column {col!r}")
        lookup = dict(zip(submission["row_id"].astype(str), submission["fractured"].astype(float)))
    else:
        lookup = {str(k): float(v) for k, v in submission.items()}
    y_true = solution[list(RSNA_TARGETS)].to_numpy(dtype=np.float64)
    y_pred = np.empty_like(y_true)
    for i, uid in enumerate(solution["StudyInstanceUID"].astype(str)):
        for j, target in enumerate(RSNA_TARGETS):
            row_id = f"{uid}_{target}"
            if row_id not in lookup:
                raise KeyError(f"submission has no row {row_id!r}")
            y_pred[i, j] = lookup[row_id]
    return rsna_weighted_log_loss(y_true, y_pred)
