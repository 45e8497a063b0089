"""Stage 2 figures: YOLO training curves (losses and validation metrics per epoch, from
Ultralytics' ``results.csv``), the detection confusion matrix and a grid of predicted against true
fracture boxes.

Matplotlib with the Agg backend; every figure is written atomically. No torch import.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage2.metrics import ConfusionCounts

LOSS_COLUMNS = ("box_loss", "cls_loss", "dfl_loss")
METRIC_COLUMNS = (
    ("metrics/precision(B)", "precision"),
    ("metrics/recall(B)", "recall"),
    ("metrics/mAP50(B)", "mAP50"),
    ("metrics/mAP50-95(B)", "mAP50-95"),
)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    from keras_cspine.viz import save_figure

    return save_figure(fig, path)


def plot_training_curves(results_csv: str | os.PathLike, out: str | os.PathLike, title: str = ""):
    """Losses (train and val) and validation metrics per epoch from Ultralytics' ``results.csv``."""
    import pandas as pd

    path = Path(results_csv)
    if not path.is_file():
        raise CSpineDataError(path, "no results.csv: the run has not finished an epoch")
    frame = pd.read_csv(path)
    frame.columns = [c.strip() for c in frame.columns]
    if "epoch" not in frame.columns:
        raise CSpineDataError(path, "not an Ultralytics results.csv (no 'epoch' column)")
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    epoch = frame["epoch"]
    for ax, loss in zip(axes[:3], LOSS_COLUMNS):
        for split, style in (("train", "-"), ("val", "--")):
            column = f"{split}/{loss}"
            if column in frame:
                ax.plot(epoch, frame[column], style, marker=".", label=split)
        ax.set_title(loss.replace("_", " "))
        ax.set_xlabel("epoch")
        ax.legend()
    for column, label in METRIC_COLUMNS:
        if column in frame:
            axes[3].plot(epoch, frame[column], marker=".", label=label)
    axes[3].set_ylim(0, 1.02)
    axes[3].set_title("validation metrics")
    axes[3].set_xlabel("epoch")
    axes[3].legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_confusion(counts: ConfusionCounts, out: str | os.PathLike, title: str = ""):
    """Box-level confusion matrix (predicted x true, fracture / background) and image-level one."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    image_matrix = np.array(
        [[counts.image_tp, counts.image_fp], [counts.image_fn, counts.image_tn]], dtype=np.int64
    )
    for ax, matrix, name in (
        (axes[0], counts.matrix, f"boxes (conf >= {counts.conf:g}, IoU >= {counts.iou:g})"),
        (axes[1], image_matrix, "slices (any box = fracture)"),
    ):
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            colour = "white" if value > matrix.max() / 2 else "black"
            ax.text(j, i, str(value), ha="center", va="center", color=colour, fontsize=12)
        ax.set_xticks([0, 1], ["fracture", "background"])
        ax.set_yticks([0, 1], ["fracture", "background"])
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.set_title(name, fontsize=10)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, out)


def plot_prediction_grid(
    samples: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
    out: str | os.PathLike,
    conf: float = 0.25,
    ncols: int = 4,
    title: str = "",
):
    """Images with true boxes (green) and predicted boxes at ``conf`` or above (red, with score).

    ``samples``: ``(name, image (H, W, 3) uint8, true xyxy (N, 4), predicted xyxy (M, 4), scores)``.
    """
    from matplotlib.patches import Rectangle

    if not samples:
        raise ValueError("no samples to draw")
    plt = _pyplot()
    nrows = int(np.ceil(len(samples) / ncols))
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.2 * ncols, 3.6 * nrows), squeeze=False, layout="constrained"
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, image, truth, boxes, scores) in zip(axes.ravel(), samples):
        ax.imshow(image)
        for x1, y1, x2, y2 in np.reshape(truth, (-1, 4)):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime", lw=1.5))
        keep = np.asarray(scores) >= conf
        for (x1, y1, x2, y2), score in zip(np.reshape(boxes, (-1, 4))[keep], np.asarray(scores)[keep]):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="red", lw=1.2, ls="--"))
            ax.text(x1, y1, f"{score:.2f}", color="red", fontsize=7, va="bottom")
        ax.set_title(name if len(name) <= 28 else "..." + name[-25:], fontsize=7)
    fig.suptitle(f"{title + ': ' if title else ''}green = ground truth, red = predicted (score)")
    return _save(fig, out)
