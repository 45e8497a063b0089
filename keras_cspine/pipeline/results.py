"""What the two stages find in a study: boxes, the stage 1 gate, the assignment of boxes to
vertebrae and the study-level aggregation (pure functions of the model outputs), and
:class:`StudyResult`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from keras_cspine.io.rsna import VERTEBRAE
from keras_cspine.pipeline.config import DEFAULT_PREDICT_CONFIG, PredictConfig

RESULT_FORMAT = 1

@dataclass(frozen=True)
class Box:
    """One fracture box of stage 2, with the vertebrae it was assigned to.

    Attributes:
        series_index, slice_number: the slice (series order index, file number).
        x, y, width, height: native slice pixels, top-left corner (``train_bounding_boxes.csv``).
        score: detector confidence.
        vertebrae: vertebra -> evidence (``score * p_vertebra``) for the vertebrae present on
            the slice; empty when stage 1 sees none there.
    """

    series_index: int
    slice_number: int
    x: float
    y: float
    width: float
    height: float
    score: float
    vertebrae: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "slice_number": self.slice_number, "series_index": self.series_index,
            "x": round(self.x, 2), "y": round(self.y, 2), "width": round(self.width, 2),
            "height": round(self.height, 2), "score": round(self.score, 5),
            "vertebrae": {k: round(v, 5) for k, v in self.vertebrae.items()},
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Box:
        return cls(int(data["series_index"]), int(data["slice_number"]), float(data["x"]),
                   float(data["y"]), float(data["width"]), float(data["height"]),
                   float(data["score"]), dict(data.get("vertebrae", {})))  # fmt: skip


def gate_slices(probabilities: np.ndarray, threshold: float = 0.5, enabled: bool = True) -> np.ndarray:
    """Boolean ``(Z,)``: the slices stage 2 looks at (some vertebra at ``>= threshold``)."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(VERTEBRAE):
        raise ValueError(f"expected (Z, 7) probabilities, got shape {probabilities.shape}")
    if not enabled:
        return np.ones(len(probabilities), dtype=bool)
    return probabilities.max(axis=1) >= threshold


def refine_slices(candidates: np.ndarray, stride: int, look: Callable[[int], bool]) -> np.ndarray:
    """The slices stage 2 looks at, coarse to fine: every ``stride``-th candidate slice (the
    first and last of each run of candidates included), then, around every slice where ``look``
    (stage 2 on slice ``i``: did it find a box?) says yes, its candidate neighbours, until a
    slice without a box. A fracture seen on at least ``stride`` consecutive slices is found
    whole; ``stride`` 1 looks at every candidate. Returns the boolean ``(Z,)`` of the slices
    looked at; ``look`` is called once per such slice, in increasing order of the first pass.
    """
    candidates = np.asarray(candidates, dtype=bool)
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride!r}")
    index = np.flatnonzero(candidates)
    first = set(index[::stride].tolist())
    if len(index):  # the ends of every run of candidates
        breaks = np.flatnonzero(np.diff(index) > 1)
        first |= {int(index[0]), int(index[-1])} | set(index[breaks].tolist()) | set(
            index[breaks + 1].tolist())
    seen = np.zeros(len(candidates), dtype=bool)
    queue = sorted(first)
    while queue:
        i = queue.pop(0)
        if seen[i]:
            continue
        seen[i] = True
        if look(i):
            queue[:0] = [j for j in (i - 1, i + 1)
                         if 0 <= j < len(candidates) and candidates[j] and not seen[j]]  # fmt: skip
    return seen


def assign_boxes(boxes: Sequence[Box], probabilities: np.ndarray, threshold: float = 0.5) -> list[Box]:
    """Each box with the vertebrae present on its slice (``p >= threshold``), evidence ``score*p``."""
    out = []
    for box in boxes:
        p = probabilities[box.series_index]
        present = {v: float(box.score * p[k]) for k, v in enumerate(VERTEBRAE) if p[k] >= threshold}
        out.append(dataclasses.replace(box, vertebrae=present))
    return out


def aggregate_study(boxes: Sequence[Box], config: PredictConfig = DEFAULT_PREDICT_CONFIG) -> dict[str, float]:
    """Per-vertebra and patient fracture probabilities from assigned boxes (see the module).

    Example:
        >>> b = Box(0, 1, 0, 0, 5, 5, score=0.8, vertebrae={"C2": 0.8})
        >>> p = aggregate_study([b], PredictConfig(vertebra_floor=0.0, patient_floor=0.0,
        ...                                        ceiling=1.0))
        >>> round(p["C2"], 3), round(p["C3"], 3), round(p["patient_overall"], 3)
        (0.8, 0.0, 0.8)
    """
    evidence = dict.fromkeys(VERTEBRAE, 0.0)
    for box in boxes:
        for vertebra, value in box.vertebrae.items():
            value = float(np.clip(value, 0.0, 1.0))
            if config.aggregation == "max":
                evidence[vertebra] = max(evidence[vertebra], value)
            else:
                evidence[vertebra] = 1.0 - (1.0 - evidence[vertebra]) * (1.0 - value)
    values = np.array([evidence[v] for v in VERTEBRAE])
    patient = values.max() if config.aggregation == "max" else 1.0 - np.prod(1.0 - values)
    out = {v: config.vertebra_floor + (config.ceiling - config.vertebra_floor) * evidence[v]
           for v in VERTEBRAE}  # fmt: skip
    out["patient_overall"] = config.patient_floor + (config.ceiling - config.patient_floor) * float(
        patient
    )
    return {k: float(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# One study
# --------------------------------------------------------------------------------------------
@dataclass
class StudyResult:
    """Everything found in one study (JSON-able by :meth:`to_json`, plus report images).

    Attributes:
        uid: the study's name: the StudyInstanceUID of its DICOM (its folder name only when
            the DICOM has none).
        folder: the series folder; when its name is not ``uid`` (it may be a patient's name),
            its parent folder with the name withheld.
        slice_numbers, positions_mm: per slice, in series order (superior first).
        probabilities: ``(Z, 7)`` stage 1 C1..C7 presence.
        gated: ``(Z,)`` slices stage 2 ran on.
        boxes: the assigned stage 2 boxes.
        fracture: C1..C7 and ``patient_overall`` fracture probabilities.
        timings: seconds per step.
        info: geometry and header facts (rows, columns, spacing, head_first, DICOM UID), where
            the name came from (``study_uid_source``) and ``warnings`` (e.g. a folder named
            by another UID than its DICOM's).
        sagittal: uint8 ``(Z, rows)`` sagittal bone-window projection through the spine.
        key_slices: slice number -> uint8 bone-window native slice, for the strongest boxes.
    """

    uid: str
    folder: str
    slice_numbers: np.ndarray
    positions_mm: np.ndarray
    probabilities: np.ndarray
    gated: np.ndarray
    boxes: list[Box]
    fracture: dict[str, float]
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    sagittal: np.ndarray | None = None
    key_slices: dict[int, np.ndarray] = field(default_factory=dict)

    def vertebra_extent(self, threshold: float = 0.5) -> dict[str, dict[str, Any]]:
        """Per vertebra: the slice numbers where stage 1 finds it (first, last, count)."""
        out = {}
        for k, v in enumerate(VERTEBRAE):
            on = np.flatnonzero(self.probabilities[:, k] >= threshold)
            if len(on):
                out[v] = {"first_slice": int(self.slice_numbers[on[0]]),
                          "last_slice": int(self.slice_numbers[on[-1]]), "n_slices": int(len(on))}  # fmt: skip
        return out

    def to_json(self, threshold: float = 0.5) -> dict[str, Any]:
        """The per-study JSON (see the module docstring)."""
        return {
            "format": RESULT_FORMAT,
            "StudyInstanceUID": self.uid,
            "folder": self.folder,
            "n_slices": int(len(self.slice_numbers)),
            "n_gated": int(self.gated.sum()),
            "info": self.info,
            "fracture_probabilities": {k: round(v, 6) for k, v in self.fracture.items()},
            "vertebra_extent": self.vertebra_extent(threshold),
            "boxes": [b.to_json() for b in self.boxes],
            "slices": [
                {"slice_number": int(n), "series_index": i, "position_mm": round(float(p), 3),
                 "gated": bool(g), **{v: round(float(q), 5) for v, q in zip(VERTEBRAE, probs)}}
                for i, (n, p, g, probs) in enumerate(
                    zip(self.slice_numbers, self.positions_mm, self.gated, self.probabilities))
            ],  # fmt: skip
            "timings_s": {k: round(v, 4) for k, v in self.timings.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StudyResult:
        """A result read back from its JSON (without the report images)."""
        slices = data["slices"]
        return cls(
            uid=data["StudyInstanceUID"], folder=data["folder"],
            slice_numbers=np.array([s["slice_number"] for s in slices], dtype=np.int64),
            positions_mm=np.array([s["position_mm"] for s in slices], dtype=np.float64),
            probabilities=np.array([[s[v] for v in VERTEBRAE] for s in slices],
                                   dtype=np.float32).reshape(-1, len(VERTEBRAE)),
            gated=np.array([s["gated"] for s in slices], dtype=bool),
            boxes=[Box.from_json(b) for b in data["boxes"]],
            fracture=dict(data["fracture_probabilities"]),
            timings=dict(data.get("timings_s", {})), info=dict(data.get("info", {})),
        )  # fmt: skip
