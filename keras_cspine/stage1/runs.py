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
``tensorboard/``           Keras' TensorBoard logs (``train/``, ``validation/``): losses, macro
                           F1 and learning rate per epoch, continued across resumes
``backup/``                BackupAndRestore state while training runs
``fit_done.json``          the classifier's fit has ended (resume after it)
``summary.json``           the finished run; ``metrics.json``, ``table1_row.*``, ``table2.*``,
                           ``predictions.csv``, ``figures/`` from the evaluation
=========================  ==============================================================
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from keras_cspine.errors import CSpineDataError
from keras_cspine.utils import write_json

CONFIG_FILE = "config.yaml"
PREPROCESSING_FILE = "preprocessing.json"
SPLITS_FILE = "splits.json"
DATA_FILE = "data.json"
MODEL_FILE = "model.keras"
LEVEL_DECODER_FILE = "level_decoder.json"
SEQUENCE_MODEL_FILE = "sequence_model.keras"
TRAINING_LOG_FILE = "training_log.csv"
HISTORY_FILE = "history.json"
TENSORBOARD_DIR = "tensorboard"
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


# --------------------------------------------------------------------------------------------
# preprocessing.json: how the run's slices became model inputs
# --------------------------------------------------------------------------------------------
PREPROCESSING_FORMAT = 1


def write_preprocessing(run_dir: str | os.PathLike, *, mode: str, render_size: int,
                        image_size: int, metadata_columns: Sequence[str],
                        metadata_scale: Mapping[str, float], source: str | None = None,
                        roi_mm: float | None = None) -> Path:  # fmt: skip
    """Record beside ``model.keras`` how slices become the model's inputs, so that the run alone
    says it (``predict`` on another machine, after the prepared data is gone).

    Args:
        mode: the :mod:`keras_cspine.data.preprocess` mode (``paper``, ``bone``, ...).
        render_size: the side the slices were rendered at (``prepare --size``).
        image_size: the model's input side (slices are resampled from ``render_size``).
        metadata_columns: the features of the ``metadata`` input, in order.
        metadata_scale: the factor each metadata column is multiplied by.
        source: the prepared folder the values were read from (for the record only).
        roi_mm: the spine window the slices were cropped to (``prepare --roi-mm``); None: whole
            slices (then left out of the file).
    """
    path = Path(run_dir) / PREPROCESSING_FILE
    write_json(path, {
        "format": PREPROCESSING_FORMAT,
        "mode": str(mode),
        "render_size": int(render_size),
        "image_size": int(image_size),
        "metadata_columns": list(metadata_columns),
        "metadata_scale": {c: float(metadata_scale.get(c, 1.0)) for c in metadata_columns},
        "source": source,
        **({"roi_mm": float(roi_mm)} if roi_mm is not None else {}),
    })  # fmt: skip
    return path


def read_preprocessing(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The run's ``preprocessing.json`` (None when the run has none); a damaged file raises
    :class:`~keras_cspine.errors.CSpineDataError` naming it."""
    path = Path(run_dir) / PREPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in ("mode", "render_size", "image_size", "metadata_columns")
                   if k not in data]  # fmt: skip
    except (OSError, ValueError, TypeError) as err:
        raise CSpineDataError(path, f"unreadable ({err})") from err
    if not isinstance(data, dict) or missing:
        raise CSpineDataError(path, f"not a preprocessing record: missing {missing}")
    if data.get("format", 1) > PREPROCESSING_FORMAT:
        raise CSpineDataError(path, f"format {data['format']} is newer than this package reads "
                                    f"({PREPROCESSING_FORMAT}); update keras_cspine")  # fmt: skip
    return data

