"""Study-level evaluation of ``predict``'s submission against a train.csv: the competition's
weighted log loss, per-vertebra and patient AUC."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import TARGETS, VERTEBRAE

_ROW_TARGET = re.compile(r"_(C[1-7]|patient_overall)$")

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
