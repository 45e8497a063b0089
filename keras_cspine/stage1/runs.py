"""The stage 1 run folder: one place that names its files, and reads what they hold.

A run folder (``train --run-dir``) is self-contained: everything ``evaluate`` and ``predict`` need
to use the model is in it, nothing is read from the training data folder.

=========================  ==============================================================
file                       what it holds
=========================  ==============================================================
``config.yaml``            the resolved :class:`~keras_cspine.stage1.config.Stage1Config`
``preprocessing.json``     how slices become model inputs (mode, render size, image size,
                           metadata columns and their scaling): :func:`write_preprocessing`
``splits.json``            the study split (and the absolute path of the prepared data)
``data.json``              the PyDataset settings of each split
``model.keras``            the best classifier by validation macro F1
``level_decoder.json``     the study-level decoder (:mod:`keras_cspine.stage1.level_decoding`)
``sequence_model.keras``   the study sequence model (:mod:`keras_cspine.stage1.sequence_model`)
``training_log.csv``       Keras' CSVLogger, appended across resumes; ``history.json``
``backup/``                BackupAndRestore state while training runs
``fit_done.json``          the classifier's fit has ended (resume after it)
``summary.json``           the finished run; ``metrics.json``, ``table1_row.*``, ``table2.*``,
                           ``predictions.csv``, ``figures/`` from the evaluation
=========================  ==============================================================
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

CONFIG_FILE = "config.yaml"
PREPROCESSING_FILE = "preprocessing.json"
SPLITS_FILE = "splits.json"
DATA_FILE = "data.json"
MODEL_FILE = "model.keras"
LEVEL_DECODER_FILE = "level_decoder.json"
SEQUENCE_MODEL_FILE = "sequence_model.keras"
TRAINING_LOG_FILE = "training_log.csv"
HISTORY_FILE = "history.json"
BACKUP_DIR = "backup"
FIT_DONE_FILE = "fit_done.json"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
TABLE1_ROW = "table1_row"  # .csv and .md
TABLE2 = "table2"  # .csv and .md
FIGURES_DIR = "figures"
LOSS_CURVES_FIGURE = "loss_curves.png"


def read_log(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        parsed = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                continue
        out.append(parsed)
    return out


def nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def nanmin(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


def history_from_log(log_path: str | os.PathLike) -> dict[str, list[float]]:
    """The whole training history (all resumes) from the CSVLogger file, one list per key.

    Epochs logged twice (an epoch redone after a kill) keep their last entry.
    """
    by_epoch: dict[int, dict[str, float]] = {}
    for row in read_log(Path(log_path)):
        if "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    epochs = sorted(by_epoch)
    keys = sorted({k for row in by_epoch.values() for k in row})
    return {k: [by_epoch[e].get(k, math.nan) for e in epochs] for k in keys}
