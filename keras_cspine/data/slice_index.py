"""The rows of a study in ``index.csv`` (``keras_cspine.data.prepare``): its C1..C7 presence per
slice from the segmentation, its fracture boxes by slice, and the slice geometry.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from keras_cspine.errors import BoxError
from keras_cspine.io.rsna import VERTEBRAE, RsnaLayout


def slice_labels(layout: RsnaLayout, uid: str, meta) -> tuple[np.ndarray, bool]:
    """(Z, 7) presence labels from the segmentation, or -1 and False when there is none."""
    seg_path = layout.segmentation_path(uid)
    if seg_path is None:
        return np.full((len(meta.slices), len(VERTEBRAE)), -1, np.int8), False
    from keras_cspine.io.nifti import align_segmentation, vertebra_presence

    seg = align_segmentation(seg_path, meta)
    return vertebra_presence(seg).astype(np.int8), True


def study_boxes(
    boxes: pd.DataFrame, uid: str, meta, boxes_path: Path, errors: list[dict[str, str]], strict: bool
) -> dict[int, list[list[float]]]:
    """Boxes of a study keyed by slice number, each checked to lie inside its slice."""
    by_slice: dict[int, list[list[float]]] = {}
    if boxes.empty:
        return by_slice
    rows_of = {n: (s.rows, s.columns) for n, s in zip(meta.slice_numbers, meta.slices)}
    for row in boxes[boxes.StudyInstanceUID == uid].itertuples(index=False):
        number = int(row.slice_number)
        box = [float(row.x), float(row.y), float(row.width), float(row.height)]
        problem = None
        if number not in rows_of:
            problem = f"study {uid}: box on slice {number}, which is not in the series"
        else:
            rows, columns = rows_of[number]
            if box[0] + box[2] > columns + 0.5 or box[1] + box[3] > rows + 0.5:
                problem = (
                    f"study {uid} slice {number}: box {box} reaches outside the "
                    f"{columns}x{rows} image"
                )
        if problem:
            if strict:
                raise BoxError(boxes_path, problem)
            errors.append({"path": str(boxes_path), "problem": problem})
            continue
        by_slice.setdefault(number, []).append(box)
    return by_slice


def index_rows(uid: str, meta, labels: np.ndarray, known: bool, boxes, cache_file: str) -> list[dict]:
    """The rows of ``index.csv`` of one study (series order), as ``INDEX_COLUMNS`` names them."""
    n = len(meta.slices)
    positions = np.asarray(meta.positions_mm, dtype=float)
    rows = []
    for i, (number, sl) in enumerate(zip(meta.slice_numbers, meta.slices)):
        slice_boxes = boxes.get(int(number), [])
        rows.append(
            {
                "StudyInstanceUID": uid,
                "slice_number": int(number),
                "series_index": i,
                "n_slices": n,
                "z_mm": round(float(sl.image_position[2]), 4),
                "position_mm": round(float(positions[0] - positions[i]), 4),
                "slice_ratio": round(i / (n - 1), 6) if n > 1 else 0.0,
                **{v: int(labels[i, k]) for k, v in enumerate(VERTEBRAE)},
                "labels_known": int(known),
                "has_fracture_box": int(bool(slice_boxes)),
                "boxes": json.dumps(slice_boxes),
                "rows": int(sl.rows),
                "columns": int(sl.columns),
                "cache_file": cache_file,
            }
        )
    return rows
