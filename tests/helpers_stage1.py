"""Shared helpers for the stage 1 tests: a tiny prepare output written by hand to the contract.

The images carry their labels: vertebra ``k`` present on a slice draws a bright square in the
``k``-th cell of a 4x2 grid, so a small network can learn the task in a few steps, and the
metadata (position, slice ratio) follows the slice order as ``prepare`` writes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")


def study_uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.{9000 + i}"


def slice_labels(n_slices: int) -> np.ndarray:
    """(Z, 7) presence: vertebrae stacked head to feet, each over a band, neighbours overlapping."""
    labels = np.zeros((n_slices, 7), np.int8)
    band = n_slices / 8.0
    for k in range(7):
        start = int(round((k + 0.5) * band))
        stop = int(round((k + 1.5) * band)) + 1
        labels[start : min(stop, n_slices), k] = 1
    return labels


def draw_image(labels_row: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A uint8 (size, size, 3) grey image encoding the labels as bright squares."""
    image = rng.integers(0, 40, (size, size), dtype=np.uint8)
    cell = size // 4
    for k in np.flatnonzero(labels_row > 0):
        r, c = divmod(int(k), 2)
        image[r * cell + 2 : (r + 1) * cell - 2, c * cell * 2 + 2 : (c + 1) * cell * 2 - 2] = 220
    return np.repeat(image[..., None], 3, axis=2)


def make_prepared(
    root: Path,
    n_studies: int = 4,
    n_slices: int = 16,
    size: int = 32,
    unlabelled: int = 1,
    seed: int = 0,
) -> Path:
    """Write ``root/index.csv``, ``root/cache/<uid>.npy`` and ``root/prepare.json``.

    The last ``unlabelled`` studies have labels -1 (no segmentation). Returns ``root``.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "cache").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(n_studies):
        uid = study_uid(s)
        labels = slice_labels(n_slices)
        known = s < n_studies - unlabelled
        images = np.stack([draw_image(labels[z], size, rng) for z in range(n_slices)])
        np.save(root / "cache" / f"{uid}.npy", images)
        spacing = 2.0
        for z in range(n_slices):
            rows.append(
                {
                    "StudyInstanceUID": uid,
                    "slice_number": z + 1,
                    "series_index": z,
                    "n_slices": n_slices,
                    "z_mm": 100.0 - z * spacing,
                    "position_mm": z * spacing,
                    "slice_ratio": z / (n_slices - 1),
                    **{v: int(labels[z, k]) if known else -1 for k, v in enumerate(VERTEBRAE)},
                    "labels_known": int(known),
                    "has_fracture_box": 0,
                    "boxes": "[]",
                    "rows": size,
                    "columns": size,
                    "cache_file": f"cache/{uid}.npy",
                }
            )
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    (root / "prepare.json").write_text(
        json.dumps({"settings": {"size": size, "mode": "bone", "split": "train"}})
    )
    return root
