"""The RSNA 2022 Cervical Spine Fracture Detection layout: paths, CSV schemas, study listing.

Serves the paper's data section: the Kaggle folder (or the synthetic one from
``keras_cspine.synthetic.dataset``) as ``train_images/<UID>/<n>.dcm``, ``segmentations/<UID>.nii`` and
the four CSVs. Every CSV is validated against its JSON Schema in ``data_spec/`` when read.

Example:
    >>> layout = RsnaLayout("/kaggle/input/rsna-2022-cervical-spine-fracture-detection")
    >>> labels = layout.train_labels()           # validated DataFrame
    >>> folder = layout.series_dir(labels.StudyInstanceUID[0])
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keras_cspine.errors import CSpineDataError, CsvSchemaError
from keras_cspine.utils import atomic_write

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
TARGETS = (*VERTEBRAE, "patient_overall")
DATA_SPEC_DIR = Path(__file__).resolve().parent.parent / "data_spec"

# Studies that the competition community drops (broken geometry / segmentation mismatch).
KNOWN_BAD_STUDIES = ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema ``data_spec/<name>.schema.json`` (e.g. ``"train"``)."""
    path = DATA_SPEC_DIR / f"{name}.schema.json"
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


@functools.cache
def load_layout() -> dict[str, Any]:
    """``data_spec/layout.json``."""
    with open(DATA_SPEC_DIR / "layout.json", encoding="utf-8") as handle:
        return json.load(handle)


#: integer cells beyond this are refused: float64 (what the checks compute in) holds every
#: integer up to 2**53 exactly, and int64 (what the column becomes) cannot hold 1e19
_MAX_EXACT_INT = 2**53


def _first(bad) -> int:
    return int(np.flatnonzero(np.asarray(bad, dtype=bool))[0])


def _column_problem(series: pd.Series, spec: dict[str, Any]) -> tuple[str | None, pd.Series]:
    """Check one column against a property schema (type, enum, range, pattern).

    Returns ``(problem, values)``: the problem in words (None if fine) and the column converted
    to the schema type (float64 for "integer" and "number" columns, str for "string" ones).
    """
    kind = spec.get("type")
    values = series
    if values.isna().any():
        return f"missing value in row {_first(values.isna()) + 2}", values
    if kind in ("integer", "number"):
        numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        for bad, why in ((np.isnan(numbers), "is not a number"),
                         (~np.isfinite(numbers), "is not a finite number")):  # fmt: skip
            if bad.any():
                first = _first(bad)
                return f"row {first + 2}: {values.iloc[first]!r} {why}", values
        if kind == "integer":
            for bad, why in ((numbers % 1 != 0, "is not an integer"),
                             (np.abs(numbers) > _MAX_EXACT_INT, "is too large for an integer")):  # fmt: skip
                if bad.any():
                    first = _first(bad)
                    return f"row {first + 2}: {values.iloc[first]!r} {why}", values
        values = pd.Series(numbers, index=series.index)
    elif kind == "string":
        values = values.astype(str)
    checks = []
    if "enum" in spec:
        checks.append((~values.isin(spec["enum"]), f"not one of {spec['enum']}"))
    if "minimum" in spec:
        checks.append((values < spec["minimum"], f"below the minimum {spec['minimum']}"))
    if "exclusiveMinimum" in spec:
        checks.append((values <= spec["exclusiveMinimum"], f"not above {spec['exclusiveMinimum']}"))
    if "maximum" in spec:
        checks.append((values > spec["maximum"], f"above the maximum {spec['maximum']}"))
    if "pattern" in spec:
        pattern = re.compile(spec["pattern"])
        bad = ~values.map(lambda v: bool(pattern.search(v)))
        checks.append((bad, f"does not match {spec['pattern']}"))
    for bad, why in checks:
        bad = np.asarray(bad, dtype=bool)
        if bad.any():
            first = _first(bad)
            return f"row {first + 2}: {series.iloc[first]!r} {why}", values
    return None, values


def validate_frame(frame: pd.DataFrame, schema_name: str, path: str | os.PathLike) -> pd.DataFrame:
    """Validate a CSV's DataFrame against ``data_spec/<schema_name>.schema.json``.

    Returns a copy with columns cast to the schema's types (int64, float64, str) and in schema
    order. Numbers must be finite (JSON has no NaN or infinity), integers whole and within
    +-2**53 (exact in float64, and nothing like 1e19 that int64 cannot hold). Raises CsvSchemaError naming the file, the column, the row (1-based, header = 1) and the
    problem.
    """
    schema = load_schema(schema_name)
    props: dict[str, Any] = schema["properties"]
    missing = [c for c in schema["required"] if c not in frame.columns]
    if missing:
        raise CsvSchemaError(
            path, f"missing column(s) {missing}; expected columns {list(props)} ({schema['title']})"
        )
    unknown = [c for c in frame.columns if c not in props]
    if unknown and schema.get("additionalProperties") is False:
        raise CsvSchemaError(path, f"unexpected column(s) {unknown}; expected {list(props)}")
    out = pd.DataFrame(index=frame.index)
    for column, spec in props.items():
        if column not in frame.columns:
            continue
        problem, values = _column_problem(frame[column], spec)
        if problem:
            raise CsvSchemaError(path, f"column {column!r}: {problem}")
        kind = spec.get("type")
        if kind == "integer":
            out[column] = values.astype(np.int64)  # whole numbers within 2**53: exact
        elif kind == "number":
            out[column] = values.astype(np.float64)
        else:
            out[column] = frame[column].astype(str)
    return out.reset_index(drop=True)


def read_csv(path: str | os.PathLike, schema_name: str) -> pd.DataFrame:
    """Read a CSV as strings and validate it (see :func:`validate_frame`)."""
    path = Path(path)
    if not path.is_file():
        raise CsvSchemaError(path, "file not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CsvSchemaError(path, f"not a readable CSV: {err}") from err
    return validate_frame(frame, schema_name, path)


def read_train_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``train.csv``: one row per study; unique UIDs and patient_overall == max(C1..C7)."""
    frame = read_csv(path, "train")
    duplicated = frame.StudyInstanceUID.duplicated()
    if duplicated.any():
        uid = frame.StudyInstanceUID[duplicated].iloc[0]
        raise CsvSchemaError(path, f"StudyInstanceUID {uid} appears more than once")
    inconsistent = frame.patient_overall != frame[list(VERTEBRAE)].max(axis=1)
    if inconsistent.any():
        row = int(np.flatnonzero(inconsistent.to_numpy())[0])
        raise CsvSchemaError(
            path,
            f"row {row + 2} ({frame.StudyInstanceUID[row]}): patient_overall "
            f"{frame.patient_overall[row]} != max(C1..C7)",
        )
    return frame


def read_bounding_boxes(path: str | os.PathLike) -> pd.DataFrame:
    """``train_bounding_boxes.csv``: x, y, width, height (native pixels), slice_number."""
    return read_csv(path, "train_bounding_boxes")


def read_test_csv(path: str | os.PathLike) -> pd.DataFrame:
    """``test.csv``; checks row_id == <StudyInstanceUID>_<prediction_type>."""
    frame = read_csv(path, "test")
    expected = frame.StudyInstanceUID + "_" + frame.prediction_type
    bad = frame.row_id != expected
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise CsvSchemaError(
            path, f"row {row + 2}: row_id {frame.row_id[row]!r} != {expected[row]!r}"
        )
    return frame


def read_submission(path: str | os.PathLike) -> pd.DataFrame:
    """``sample_submission.csv`` or a ``submission.csv`` written by ``predict``."""
    return read_csv(path, "sample_submission")


def write_submission(frame: pd.DataFrame, path: str | os.PathLike) -> None:
    """Validate and write a submission (row_id, fractured) atomically."""
    frame = validate_frame(frame[["row_id", "fractured"]], "sample_submission", path)
    with atomic_write(path, newline="") as handle:
        frame.to_csv(handle, index=False)


def submission_rows(study_uid: str, probabilities: dict[str, float]) -> list[dict[str, Any]]:
    """The eight submission rows of one study, in the competition's order (C1..C7, overall)."""
    return [
        {"row_id": f"{study_uid}_{target}", "fractured": float(probabilities[target])}
        for target in TARGETS
    ]


@dataclass(frozen=True)
class RsnaLayout:
    """A folder in the RSNA 2022 layout (the Kaggle input, or ``synth`` output).

    Args:
        root: the dataset folder holding train.csv, train_images/ and so on.
    """

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))
        if not self.root.is_dir():
            raise CSpineDataError(self.root, "dataset folder not found")

    # -- paths -----------------------------------------------------------------------------
    @property
    def train_images(self) -> Path:
        return self.root / "train_images"

    @property
    def test_images(self) -> Path:
        return self.root / "test_images"

    @property
    def segmentations(self) -> Path:
        return self.root / "segmentations"

    def series_dir(self, uid: str, split: str = "train") -> Path:
        """``<split>_images/<uid>`` (raises when it does not exist)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        folder = self.root / f"{split}_images" / uid
        if not folder.is_dir():
            raise CSpineDataError(folder, f"no {split} series folder for study {uid}")
        return folder

    def segmentation_path(self, uid: str) -> Path | None:
        """``segmentations/<uid>.nii`` (or ``.nii.gz``), or None for a study without one."""
        for suffix in (".nii", ".nii.gz"):
            path = self.segmentations / f"{uid}{suffix}"
            if path.is_file():
                return path
        return None

    def list_studies(self, split: str = "train") -> list[str]:
        """Study UIDs that have an image folder, sorted."""
        folder = self.root / f"{split}_images"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir())

    # -- CSVs ------------------------------------------------------------------------------
    def train_labels(self) -> pd.DataFrame:
        return read_train_csv(self.root / "train.csv")

    def bounding_boxes(self) -> pd.DataFrame:
        """Boxes, checked to belong to studies of train.csv; empty frame when the file is absent."""
        path = self.root / "train_bounding_boxes.csv"
        if not path.is_file():
            props = load_schema("train_bounding_boxes")["properties"]
            return pd.DataFrame({c: pd.Series(dtype=object) for c in props})
        boxes = read_bounding_boxes(path)
        train_csv = self.root / "train.csv"
        if train_csv.is_file():
            known = set(self.train_labels().StudyInstanceUID)
            stray = sorted(set(boxes.StudyInstanceUID) - known)
            if stray:
                raise CsvSchemaError(path, f"study {stray[0]} has boxes but is not in train.csv")
        return boxes

    def test_rows(self) -> pd.DataFrame:
        return read_test_csv(self.root / "test.csv")
