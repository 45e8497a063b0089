"""Stage 1 evaluation: ``python -m keras_cspine evaluate RUN_DIR [--split test]``.

Serves the paper's Section 3 (results): Table 1 (macro F1, exact match ratio, coverage error,
trainable and non-trainable parameters), Table 2 (the per-class ``classification_report``) and
Figure 6 (the training and validation loss curves). All metrics come from scikit-learn on one set
of per-slice predictions of the run's best model (``model.keras``) on a held-out split of studies.

Files written into the run directory (atomically):

- ``metrics.json``: the Table 1 figures, parameter counts, split and sizes;
- ``table1_row.csv`` / ``table1_row.md``: the run's Table 1 row beside the paper's numbers, and,
  beyond the paper, a row after the study-level decoding of :mod:`keras_cspine.stage1.level_decoding`
  (same predictions, decoded study by study) and, when the run has one, a row of its study
  sequence model (:mod:`keras_cspine.stage1.sequence_model`, on the same classifier's slice features);
- ``table2.csv`` / ``table2.md``: the per-class report (of the per-slice predictions);
- ``predictions.csv``: study, slice, true labels, scores (``p_C1``...), decoded scores
  (``decoded_C1``...) and the sequence model's scores (``sequence_C1``...) for every slice;
- ``figures/loss_curves.png``: Figure 6 (loss and macro F1 per epoch, train and validation);
- ``figures/study_levels.png``: C1..C7 slice by slice along the studies the per-slice model gets
  most wrong: truth, per slice, level-decoded, sequence model.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import VERTEBRAE
from keras_cspine.stage1 import runs
from keras_cspine.stage1.config import Stage1Config
from keras_cspine.stage1.metrics import classification_report_frame, multilabel_metrics
from keras_cspine.stage1.runs import history_from_log
from keras_cspine.stage1.sequence_model import (
    apply_sequence_model,
    load_sequence_model,
    slice_features,
)
from keras_cspine.utils import atomic_write, write_json
from keras_cspine.viz import _pyplot, save_figure

#: Table 1 of the paper: row -> (macro F1, exact match ratio, coverage error).
PAPER_TABLE1: dict[str, tuple[float, float, float]] = {
    "Proposed (GCViT)": (0.96, 0.95, 1.26),
    "ViT": (0.94, 0.90, 1.41),
    "ConvNeXt": (0.95, 0.93, 1.35),
    "InceptionV3": (0.92, 0.89, 1.45),
    "ResNet152V2": (0.96, 0.94, 1.26),
    "Swin": (0.95, 0.909, 1.36),
}
#: Parameter counts of the proposed model in Table 1.

TABLE1_COLUMNS = (
    "row", "model", "macro_f1", "exact_match_ratio", "coverage_error", "trainable",
    "non_trainable", "paper_macro_f1", "paper_exact_match_ratio", "paper_coverage_error",
    "paper_trainable", "paper_non_trainable",
    "split", "n_studies", "n_slices", "image_size", "data",
)  # fmt: skip


def markdown_table(frame: pd.DataFrame, floatfmt: str = ".4f", index: bool = False) -> str:
    """A GitHub Markdown table of ``frame`` (no extra dependency)."""
    if index:
        frame = frame.reset_index()

    def cell(value: Any) -> str:
        if isinstance(value, float | np.floating):
            return "" if math.isnan(value) else format(float(value), floatfmt)
        if isinstance(value, int | np.integer):
            return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
        return "" if value is None else str(value)

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join([header, rule, *rows]) + "\n"


def plot_loss_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike,
                     title: str = "") -> Path:  # fmt: skip
    """Figure 6: loss (and macro F1 when logged) per epoch, train vs validation; atomic PNG."""
    plt = _pyplot()

    if not history.get("loss"):
        raise ValueError("history has no 'loss' values to plot")
    epochs = np.arange(1, len(history["loss"]) + 1)
    panels = [("loss", "binary cross-entropy")]
    if history.get("f1_score"):
        panels.append(("f1_score", "macro F1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        ax.plot(epochs, history[key], marker="o", label="train")
        if history.get(f"val_{key}"):
            ax.plot(epochs, history[f"val_{key}"], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def plot_study_levels(predictions: pd.DataFrame, path: str | os.PathLike,
                      n_studies: int = 3) -> Path:  # fmt: skip
    """C1..C7 along whole studies, slice by slice (head left, feet right): the truth, then each
    set of scores in ``predictions`` (``p_``: per slice, ``decoded_``: level decoding,
    ``sequence_``: the sequence model), for the ``n_studies`` studies whose per-slice exact
    match is lowest; atomic PNG."""
    plt = _pyplot()

    kinds = [(prefix, title) for prefix, title in (
        ("", "truth"), ("p_", "per slice (paper)"), ("decoded_", "level decoding"),
        ("sequence_", "sequence model")) if f"{prefix}C1" in predictions.columns]  # fmt: skip
    if predictions.empty or len(kinds) < 2:
        raise ValueError("predictions need rows, the labels C1..C7 and at least one score set")
    truth = predictions[list(VERTEBRAE)].to_numpy() > 0.5
    scores = predictions[[f"p_{v}" for v in VERTEBRAE]].to_numpy() >= 0.5
    exact = pd.Series((truth == scores).all(axis=1), index=predictions.index)
    worst = exact.groupby(predictions["StudyInstanceUID"]).mean().sort_values(kind="stable")
    uids = list(worst.index[:n_studies])
    fig, axes = plt.subplots(len(uids), len(kinds), figsize=(3.2 * len(kinds), 1.5 * len(uids)),
                             squeeze=False)  # fmt: skip
    for r, uid in enumerate(uids):
        study = predictions[predictions["StudyInstanceUID"] == uid].sort_values("series_index")
        for c, (prefix, title) in enumerate(kinds):
            values = study[[f"{prefix}{v}" for v in VERTEBRAE]].to_numpy(dtype=float).T
            ax = axes[r, c]
            ax.imshow(values, aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
                      interpolation="nearest")  # fmt: skip
            ax.set_yticks(range(len(VERTEBRAE)), VERTEBRAE, fontsize=6)
            ax.set_xticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
            if c == 0:
                ax.set_xlabel(f"...{uid[-6:]}: {len(study)} slices, head -> feet", fontsize=7)
            elif prefix:
                match = ((values.T >= 0.5) == (study[list(VERTEBRAE)].to_numpy() > 0.5)).all(1)
                ax.set_xlabel(f"exact match {match.mean():.2f}", fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def table1_row(
    row: str | None, model_name: str, metrics: Mapping[str, float], parameters: Mapping[str, int],
    **extra: Any,
) -> dict[str, Any]:  # fmt: skip
    """One Table 1 row: our figures beside the paper's (blank for models outside the table)."""
    from keras_cspine.stage1.models.factory import PAPER_PARAMETERS

    paper = PAPER_TABLE1.get(row or "", (math.nan, math.nan, math.nan))
    paper_counts = PAPER_PARAMETERS.get(row or "", (None, None))
    out = {
        "row": row or model_name,
        "model": model_name,
        "macro_f1": metrics["macro_f1"],
        "exact_match_ratio": metrics["exact_match_ratio"],
        "coverage_error": metrics["coverage_error"],
        "trainable": int(parameters["trainable"]),
        "non_trainable": int(parameters["non_trainable"]),
        "paper_macro_f1": paper[0],
        "paper_exact_match_ratio": paper[1],
        "paper_coverage_error": paper[2],
        "paper_trainable": paper_counts[0],
        "paper_non_trainable": paper_counts[1],
    }
    out.update(extra)
    return out


def table1_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows of :func:`table1_row` as a DataFrame in the standard column order."""
    frame = pd.DataFrame(list(rows))
    columns = [c for c in TABLE1_COLUMNS if c in frame.columns]
    return frame[columns + [c for c in frame.columns if c not in columns]]


def write_table(frame: pd.DataFrame, stem: str | os.PathLike, index: bool = False) -> None:
    """Write ``stem.csv`` and ``stem.md`` atomically."""
    stem = Path(stem)
    with atomic_write(stem.with_suffix(".csv"), newline="") as handle:
        frame.to_csv(handle, index=index)
    with atomic_write(stem.with_suffix(".md")) as handle:
        handle.write(markdown_table(frame, index=index))


def predict_sequence(model, sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, y_score)`` of a non-shuffled CSpineSequence, in its frame order."""
    _, scores = slice_features(model, sequence)
    return sequence.labels.astype(np.int64), scores


def _level_decoder(run_dir: Path, prepared: Path, train_studies: Sequence[str]):
    """The run's ``level_decoder.json``; fitted on its training split for runs without one."""
    from keras_cspine.stage1.level_decoding import LevelDecoder, fit_from_prepared

    if (run_dir / runs.LEVEL_DECODER_FILE).is_file():
        return LevelDecoder.load(run_dir / runs.LEVEL_DECODER_FILE)
    decoder = fit_from_prepared(prepared, train_studies)
    decoder.save(run_dir / runs.LEVEL_DECODER_FILE)
    return decoder


def labelled_studies(prepared: str | os.PathLike) -> list[str]:
    """The studies of a prepare folder with known slice labels (a segmentation), sorted."""
    from keras_cspine.data.prepare import load_index

    index = load_index(prepared)
    return sorted(set(index.loc[index["labels_known"] == 1, "StudyInstanceUID"]))


def check_overlap(splits: Mapping[str, Sequence[str]], uids: Sequence[str], data: Path,
                  run_dir: Path) -> list[str]:  # fmt: skip
    """The studies of ``uids`` the run was fitted (train split) or selected (val split: its
    checkpoint and learning rate followed them) on; an error naming them unless there are none."""
    seen = {uid: name for name in ("val", "train") for uid in splits.get(name) or ()}
    shared = [uid for uid in uids if uid in seen]
    if shared:
        counts = ", ".join(f"{sum(seen[u] == name for u in shared)} in its {name} split"
                           for name in ("train", "val") if any(seen[u] == name for u in shared))  # fmt: skip
        raise CSpineDataError(data, f"{len(shared)} of its {len(uids)} labelled studies were "
                              f"seen in training by {run_dir} ({counts}; e.g. {shared[0]}): "
                              "their scores would flatter the model; evaluate on other studies, "
                              "or pass --allow-overlap to score them anyway")  # fmt: skip
    return shared


def _check_mode(run_dir: Path, data: Path) -> None:
    """Refuse data prepared with another preprocessing mode or spine window than the run was
    trained on."""
    from keras_cspine.data.prepare import read_settings

    record = runs.read_preprocessing(run_dir)
    settings = read_settings(data).get("settings") or {}
    mode = settings.get("mode")
    if record is not None and mode is not None and record["mode"] != mode:
        raise CSpineDataError(data, f"prepared with mode {mode!r}, but {run_dir} was trained on "
                              f"{record['mode']!r} images: prepare the data with --mode "
                              f"{record['mode']}")  # fmt: skip
    if record is None:
        return
    trained, given = record.get("roi_mm"), settings.get("roi_mm")
    if trained != given:
        def window(mm):
            return f"{mm:g} mm spine windows" if mm else "whole slices"

        option = f"--roi-mm {trained:g}" if trained else "no --roi-mm"
        raise CSpineDataError(data, f"prepared as {window(given)}, but {run_dir} was trained on "
                              f"{window(trained)}: prepare the data with {option}")  # fmt: skip


def evaluate_run(
    run_dir: str | os.PathLike,
    split: str = "test",
    prepared: str | os.PathLike | None = None,
    batch_size: int | None = None,
    *,
    data: str | os.PathLike | None = None,
    allow_overlap: bool = False,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate a training run's best model on one split, or on any prepared data, and write the
    tables and figures.

    Args:
        run_dir: a directory written by :func:`keras_cspine.stage1.train.train_stage1`.
        split: "test", "val" or "train" (the studies listed in ``splits.json``).
        prepared: another prepare folder holding those studies (default: the training one).
        batch_size: prediction batch size (default: the run's).
        data: a prepare folder whose every labelled study is scored instead of a split (e.g. a
            set drawn with another seed, or another hospital's). Refused when it holds studies
            of the run's train or val split (by StudyInstanceUID), or was prepared with another
            mode than the run's.
        allow_overlap: score ``data`` even when it shares studies with the run's training.
        out_dir: where the files of a ``data`` evaluation go (default
            ``RUN/evaluations/<data folder name>``; a split's evaluation writes into the run).

    Returns:
        ``{"split", "data", "n_studies", "n_slices", "overlap", "metrics",
        "metrics_level_decoded", "parameters", "table1_row", "table1_row_level_decoded",
        "metrics_sequence_model", "table1_row_sequence_model", "table2", "files"}`` (the two
        sequence model entries None for runs without one; ``split`` is "data" for ``data``).
    """
    import keras

    from keras_cspine.config import load_config
    from keras_cspine.stage1.dataset import CSpineSequence
    from keras_cspine.stage1.models.factory import count_parameters, get_spec
    run_dir = Path(run_dir)
    for name in (runs.CONFIG_FILE, runs.SPLITS_FILE, runs.MODEL_FILE):
        if not (run_dir / name).is_file():
            raise CSpineDataError(run_dir / name, "missing: not a finished training run directory")
    config = load_config(Stage1Config, run_dir / runs.CONFIG_FILE)
    with open(run_dir / runs.SPLITS_FILE, encoding="utf-8") as handle:
        splits = json.load(handle)
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    overlap: list[str] = []
    if data is not None:
        source = Path(data)
        uids = labelled_studies(source)
        if not uids:
            raise CSpineDataError(source / "index.csv", "no study with known labels (labels_known "
                                  "1: a segmentation) to score")  # fmt: skip
        _check_mode(run_dir, source)
        if allow_overlap:
            seen = set(splits.get("train") or ()) | set(splits.get("val") or ())
            overlap = [uid for uid in uids if uid in seen]
        else:
            check_overlap(splits, uids, source, run_dir)
        split = "data"
        where = Path(out_dir) if out_dir is not None else run_dir / "evaluations" / source.resolve().name
    else:
        if not splits.get(split):
            raise CSpineDataError(run_dir / runs.SPLITS_FILE, f"the {split!r} split is empty")
        source = Path(prepared or splits["prepared"])
        uids, where = splits[split], run_dir
    prepared = Path(prepared or splits["prepared"])

    model = keras.saving.load_model(run_dir / runs.MODEL_FILE)
    sequence = CSpineSequence(
        source, uids, batch_size=batch_size or config.train.batch_size,
        inputs=get_spec(config.model.name).inputs, metadata_columns=config.data.metadata_columns,
        image_size=config.data.image_size,
    )  # fmt: skip
    features, y_score = slice_features(model, sequence)
    y_true = sequence.labels.astype(np.int64)
    metrics = multilabel_metrics(y_true, y_score)
    parameters = count_parameters(model)
    report = classification_report_frame(y_true, y_score, VERTEBRAE)
    decoder = _level_decoder(run_dir, prepared, splits["train"])
    frame = sequence.frame
    y_decoded = decoder.decode_studies(y_score, frame["StudyInstanceUID"].to_numpy(),
                                       frame["series_index"].to_numpy(),
                                       frame["position_mm"].to_numpy())  # fmt: skip
    metrics_decoded = multilabel_metrics(y_true, y_decoded)
    y_sequence = metrics_sequence = None
    if (run_dir / runs.SEQUENCE_MODEL_FILE).is_file():
        sequence_model = load_sequence_model(run_dir / runs.SEQUENCE_MODEL_FILE)
        y_sequence = apply_sequence_model(sequence_model, features,
                                          frame["StudyInstanceUID"].to_numpy(),
                                          frame["series_index"].to_numpy())  # fmt: skip
        metrics_sequence = multilabel_metrics(y_true, y_sequence)

    files = {}
    extra = {
        "split": split, "n_studies": len(sequence.study_uids), "n_slices": sequence.num_samples,
        "image_size": sequence.image_size, "data": str(source),
    }  # fmt: skip
    row = table1_row(config.paper_row, config.model.name, metrics, parameters, **extra)
    row_decoded = table1_row(None, config.model.name, metrics_decoded, parameters, **extra)
    row_decoded["row"] = f"{row['row']} + level decoding"
    rows = [row, row_decoded]
    row_sequence = None
    if metrics_sequence is not None:
        row_sequence = table1_row(None, config.model.name, metrics_sequence, parameters, **extra)
        row_sequence["row"] = f"{row['row']} + sequence model"
        rows.append(row_sequence)
    write_table(table1_frame(rows), where / runs.TABLE1_ROW)
    files["table1_row"] = str(where / f"{runs.TABLE1_ROW}.csv")
    write_table(report, where / runs.TABLE2, index=True)
    files["table2"] = str(where / f"{runs.TABLE2}.csv")

    predictions = sequence.frame[["StudyInstanceUID", "slice_number", "series_index"]].copy()
    for k, name in enumerate(VERTEBRAE):
        predictions[name] = y_true[:, k]
    for k, name in enumerate(VERTEBRAE):
        predictions[f"p_{name}"] = np.round(y_score[:, k], 6)
    for k, name in enumerate(VERTEBRAE):
        predictions[f"decoded_{name}"] = np.round(y_decoded[:, k], 6)
    if y_sequence is not None:
        for k, name in enumerate(VERTEBRAE):
            predictions[f"sequence_{name}"] = np.round(y_sequence[:, k], 6)
    with atomic_write(where / runs.PREDICTIONS_FILE, newline="") as handle:
        predictions.to_csv(handle, index=False)
    files["predictions"] = str(where / runs.PREDICTIONS_FILE)
    files["study_levels"] = str(plot_study_levels(predictions,
                                                  where / "figures" / "study_levels.png"))

    history = history_from_log(run_dir / runs.TRAINING_LOG_FILE)
    if history.get("loss") and data is None:
        figure = plot_loss_curves(
            history, run_dir / runs.FIGURES_DIR / runs.LOSS_CURVES_FIGURE, title=f"{config.name} (Figure 6)"
        )
        files["loss_curves"] = str(figure)

    result = {
        "split": split,
        "data": str(source),
        "n_studies": extra["n_studies"],
        "n_slices": extra["n_slices"],
        "overlap": overlap,
        "metrics": metrics,
        "metrics_level_decoded": metrics_decoded,
        "parameters": parameters,
        "table1_row": row,
        "table1_row_level_decoded": row_decoded,
        "metrics_sequence_model": metrics_sequence,
        "table1_row_sequence_model": row_sequence,
        "table2": json.loads(report.to_json(orient="index")),
        "files": files,
    }
    write_json(where / runs.METRICS_FILE, result)
    return result
