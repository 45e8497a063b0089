"""Figures: slices with their vertebra labels and fracture boxes (the paper's Figure 4 style),
a sagittal overview of a study with the extent of each vertebra, and the paper's Figure 3
(fractured vs non-fractured studies per vertebra, from ``train.csv``).

``python -m keras_cspine look PREPARED OUT`` draws them for a prepare folder (Figure 3 when the
dataset's ``train.csv`` is found: ``--train-csv``, or the ``data_dir`` recorded in
``prepare.json``). Everything uses matplotlib's Agg backend and writes each file atomically.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keras_cspine.io.rsna import VERTEBRAE
from keras_cspine.utils import atomic_path, atomic_write

FIGURE3_TITLE = "Fractured vs non-fractured studies per vertebra (paper Figure 3)"

VERTEBRA_COLOURS = ("#e6194b", "#f58231", "#ffe119", "#3cb44b", "#42d4f4", "#4363d8", "#911eb4")

#: File names ``look`` writes (``predict``'s index links them from a prepare folder's figures).
FIGURE3 = "figure3_fracture_counts"
SLICES_FIGURE = "slices.png"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically and close it."""
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def model_box(box: Sequence[float], rows: int, columns: int, size: int) -> list[float]:
    """A native-pixel ``[x, y, w, h]`` box in the coordinates of the ``size`` x ``size`` model image."""
    from keras_cspine.data.preprocess import square_transform

    scale, offset_x, offset_y = square_transform(rows, columns, size)
    x, y, w, h = box
    return [x * scale + offset_x, y * scale + offset_y, w * scale, h * scale]


def label_text(labels: Sequence[int]) -> str:
    """``[0, 1, 1, 0, ...]`` -> ``"C2 C3"``; unknown labels (-1) -> ``"unlabelled"``."""
    labels = list(labels)
    if any(v < 0 for v in labels):
        return "unlabelled"
    names = [v for v, on in zip(VERTEBRAE, labels) if on]
    return " ".join(names) if names else "no C-spine"


def figure_slices(index, prepared: str | os.PathLike, rows_to_show, ncols: int = 4, title: str = ""):
    """A grid of cached slices with their C1..C7 labels and fracture boxes.

    Args:
        index: the prepare index (``keras_cspine.data.prepare.load_index``).
        prepared: the prepare folder (for the cache).
        rows_to_show: index labels (row positions of ``index``) to draw.
    """
    from matplotlib.patches import Rectangle

    from keras_cspine.data.prepare import load_cache, load_roi

    plt = _pyplot()
    rows_to_show = list(rows_to_show)
    nrows = max(1, int(np.ceil(len(rows_to_show) / ncols)))
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.6 * ncols, 2.9 * nrows), squeeze=False)
    caches: dict[str, np.ndarray] = {}
    windows: dict[str, object] = {}  # the study's spine window when prepared with roi_mm
    for ax in axes.ravel():
        ax.axis("off")
    for ax, row_id in zip(axes.ravel(), rows_to_show):
        row = index.loc[row_id]
        uid = row.StudyInstanceUID
        if uid not in caches:
            caches[uid], windows[uid] = load_cache(prepared, uid), load_roi(prepared, uid)
        image = np.asarray(caches[uid][int(row.series_index)])
        size = image.shape[0]
        ax.imshow(image)
        for box in row.boxes:
            window = windows[uid]
            x, y, w, h = (model_box(box, int(row.rows), int(row.columns), size) if window is None
                          else window.to_image(box, size))  # fmt: skip
            ax.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor="red", linewidth=1.5))
        labels = [int(row[v]) for v in VERTEBRAE]
        fracture = "  FRACTURE" if row.boxes else ""
        ax.set_title(f"...{uid[-5:]} #{int(row.slice_number)}\n{label_text(labels)}{fracture}",
                     fontsize=8, color="red" if fracture else "black")  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def pick_slices(index, n: int = 12, seed: int = 0) -> list:
    """Rows worth looking at: fracture slices, vertebra junctions, and an even spread."""
    rng = np.random.default_rng(seed)
    labels = index[list(VERTEBRAE)].to_numpy()
    fractures = index.index[index.has_fracture_box == 1].to_numpy()
    junctions = index.index[(labels == 1).sum(axis=1) >= 2].to_numpy()
    chosen: list = []
    for pool, share in ((fractures, n // 3), (junctions, n // 3)):
        if len(pool):
            chosen += list(rng.choice(pool, size=min(share, len(pool)), replace=False))
    rest = np.setdiff1d(index.index.to_numpy(), chosen)
    if len(rest):
        chosen += list(rng.choice(rest, size=min(n - len(chosen), len(rest)), replace=False))
    return sorted(chosen, key=lambda i: (index.loc[i].StudyInstanceUID, index.loc[i].series_index))


def figure_sagittal(index, prepared: str | os.PathLike, uid: str, probabilities=None):
    """Sagittal overview of one study from its cache, with a band per vertebra.

    The left panel is the mid-sagittal reconstruction (rows = series order, head at the top); the
    right panel shows, per slice, the vertebrae labelled (ground truth) and, when given,
    ``probabilities`` (Z, 7) from a stage 1 model as shaded bars.
    """
    from keras_cspine.data.prepare import load_cache

    plt = _pyplot()
    study = index[index.StudyInstanceUID == uid].sort_values("series_index")
    if study.empty:
        raise ValueError(f"study {uid!r} is not in the index")
    cache = load_cache(prepared, uid)
    mid = cache.shape[2] // 2
    sagittal = np.asarray(cache[:, :, mid, :])  # (Z, size, 3): rows = slices
    z_extent = float(study.position_mm.max()) or 1.0
    fig, (ax_img, ax_lab) = plt.subplots(1, 2, figsize=(7, 6), gridspec_kw={"width_ratios": [3, 2]})
    ax_img.imshow(sagittal, aspect="auto", extent=(0, sagittal.shape[1], z_extent, 0))
    ax_img.set_ylabel("mm below the first slice")
    ax_img.set_xlabel("anterior <-> posterior (model px)")
    ax_img.set_title(f"study ...{uid[-8:]}")
    labels = study[list(VERTEBRAE)].to_numpy()
    z = study.position_mm.to_numpy()
    for k, _name in enumerate(VERTEBRAE):
        colour = VERTEBRA_COLOURS[k]
        if probabilities is not None:
            ax_lab.fill_betweenx(z, k, k + np.asarray(probabilities)[:, k] * 0.9, color=colour, alpha=0.5,
                                 step="mid")  # fmt: skip
        on = labels[:, k] == 1
        if on.any():
            ax_lab.plot(np.full(on.sum(), k + 0.45), z[on], "|", color=colour, markersize=4)
            # one narrow column per vertebra, so that overlaps (dens in the C1 ring) stay visible
            ax_img.axhspan(z[on].min(), z[on].max(), xmin=0.012 * k, xmax=0.012 * (k + 1),
                           color=colour)  # fmt: skip
        boxes_on = study.has_fracture_box.to_numpy() == 1
        if boxes_on.any():
            ax_img.plot(np.full(boxes_on.sum(), sagittal.shape[1] * 0.98), z[boxes_on], "<",
                        color="red", markersize=4)  # fmt: skip
    ax_lab.set_xticks(np.arange(7) + 0.45, VERTEBRAE)
    ax_lab.set_ylim(z_extent, 0)
    ax_lab.set_title("labels" if probabilities is None else "labels | probabilities")
    fig.tight_layout()
    return fig


def fracture_counts(train_csv_or_frame):
    """Studies fractured / not fractured per vertebra, from ``train.csv`` (paper Figure 3).

    Args:
        train_csv_or_frame: a path to an RSNA ``train.csv`` (read and validated with
            :func:`keras_cspine.io.rsna.read_train_csv`) or its frame (checked against the same
            schema, ``data_spec/train.schema.json``).

    Returns:
        A DataFrame with columns ``vertebra`` (C1..C7), ``fractured``, ``not_fractured``.
    """
    import pandas as pd

    from keras_cspine.io.rsna import read_train_csv, validate_frame

    if isinstance(train_csv_or_frame, pd.DataFrame):
        frame = validate_frame(train_csv_or_frame, "train", "<train.csv frame>")
    else:
        frame = read_train_csv(train_csv_or_frame)
    labels = frame[list(VERTEBRAE)].to_numpy()
    fractured = (labels == 1).sum(axis=0).astype(int)
    return pd.DataFrame({"vertebra": list(VERTEBRAE), "fractured": fractured,
                         "not_fractured": len(frame) - fractured})  # fmt: skip


def figure_fracture_counts(train_csv_or_frame):
    """The paper's Figure 3: grouped bars of fractured / non-fractured studies per vertebra.

    Args:
        train_csv_or_frame: a path to ``train.csv`` or its frame (see :func:`fracture_counts`).

    Returns:
        ``(figure, counts)``: the matplotlib figure and the counts frame (vertebra, fractured,
        not_fractured).
    """
    plt = _pyplot()
    counts = fracture_counts(train_csv_or_frame)
    x = np.arange(len(counts))
    width = 0.4
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for offset, column, label, colour in (
        (-width / 2, "not_fractured", "non-fractured", "#4363d8"),
        (width / 2, "fractured", "fractured", "#e6194b"),
    ):
        bars = ax.bar(x + offset, counts[column], width, label=label, color=colour)
        ax.bar_label(bars, fontsize=8, padding=1)
    ax.set_xticks(x, counts.vertebra)
    ax.set_xlabel("vertebra")
    ax.set_ylabel("studies")
    ax.set_title(FIGURE3_TITLE)
    top = int(counts[["fractured", "not_fractured"]].to_numpy().max(initial=0))
    ax.set_ylim(0, top * 1.3 + 1)  # headroom for the legend above the tallest bar's number
    ax.legend(loc="upper center", ncol=2)
    fig.tight_layout()
    return fig, counts


def write_fracture_counts(train_csv_or_frame, out: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``figure3_fracture_counts.png`` and ``figure3_fracture_counts.csv`` into ``out``."""
    out = Path(out)
    fig, counts = figure_fracture_counts(train_csv_or_frame)
    png = save_figure(fig, out / f"{FIGURE3}.png")
    csv = out / f"{FIGURE3}.csv"
    with atomic_write(csv, newline="") as handle:
        counts.to_csv(handle, index=False)
    return png, csv


def find_train_csv(prepared: str | os.PathLike, train_csv: str | os.PathLike | None = None
                   ) -> tuple[Path | None, str]:  # fmt: skip
    """``(path, "")`` of the ``train.csv`` for a prepare folder, or ``(None, why not)``.

    ``train_csv`` wins when given (it must exist); otherwise ``data_dir`` of ``prepare.json``.
    """
    if train_csv is not None:
        path = Path(train_csv)
        return (path, "") if path.is_file() else (None, f"{path} does not exist")
    settings_path = Path(prepared) / "prepare.json"
    try:
        settings = json.loads(settings_path.read_text())
    except (OSError, ValueError) as err:
        return None, f"cannot read {settings_path} ({err.__class__.__name__}); pass --train-csv"
    data_dir = settings.get("data_dir")
    if not data_dir:
        return None, f"{settings_path} records no data_dir; pass --train-csv"
    path = Path(data_dir) / "train.csv"
    if not path.is_file():
        return None, f"{path} (the data_dir of {settings_path}) does not exist; pass --train-csv"
    return path, ""


def look(prepared: str | os.PathLike, out: str | os.PathLike, n_slices: int = 12,
         n_studies: int = 3, seed: int = 0, train_csv: str | os.PathLike | None = None,
         log=print) -> list[Path]:  # fmt: skip
    """Write ``slices.png``, ``sagittal_<uid>.png`` and, when ``train.csv`` is found (see
    :func:`find_train_csv`), ``figure3_fracture_counts.png`` / ``.csv`` for a prepare folder.

    ``log`` receives the one line saying why Figure 3 was skipped, if it was.
    """
    from keras_cspine.data.prepare import load_index

    index = load_index(prepared)
    out = Path(out)
    written = [save_figure(figure_slices(index, prepared, pick_slices(index, n_slices, seed)),
                           out / SLICES_FIGURE)]  # fmt: skip
    for uid in sorted(index.StudyInstanceUID.unique())[:n_studies]:
        written.append(save_figure(figure_sagittal(index, prepared, uid), out / f"sagittal_{uid}.png"))
    csv_path, why = find_train_csv(prepared, train_csv)
    if csv_path is None:
        log(f"Figure 3 skipped: {why}")
    else:
        written.extend(write_fracture_counts(csv_path, out))
    return written
