"""A synthetic dataset in the RSNA 2022 Cervical Spine Fracture Detection layout (issue 2, sec. 3).

Serves the paper's data, the RSNA 2022 studies (axial neck CT, vertebra segmentations, fracture
boxes; the paper's Figures 3-4 show them): it writes, in exactly the Kaggle layout, CT studies of a
phantom neck so that the whole pipeline (Algorithm 1, stage 1 vertebrae classification, stage 2
fracture detection) runs and is tested without the 300 GB competition data::

    OUT/train_images/<UID>/<n>.dcm       CT Image Storage, file number n == InstanceNumber, 1-based
    OUT/test_images/<UID>/<n>.dcm        a few unlabelled studies, like Kaggle's test set
    OUT/segmentations/<UID>.nii          uint8 labels (1..7 = C1..C7, 8.. = T1..), RSNA axis order
    OUT/train.csv                        StudyInstanceUID, patient_overall, C1..C7
    OUT/train_bounding_boxes.csv         StudyInstanceUID, x, y, width, height, slice_number
    OUT/test.csv, OUT/sample_submission.csv
    OUT/synthetic_manifest.json          seed, preset and the truth of every study

What varies between studies, as in the real data: head-first (file 1 at the top, z decreasing
with the file number) or feet-first file order, JPEG-lossless (1.2.840.10008.1.2.4.70, encoded
with python-gdcm) or uncompressed pixels, unsigned 12/16-bit with RescaleIntercept -1024 or signed
16-bit with intercept 0 (with a -2048 HU padding outside the reconstruction circle), slice count,
slice spacing and thickness, field of view, patient offset, a small gantry-like tilt of the slice
plane (ImageOrientationPatient rotated about x, and the pixels follow it), noise, anatomy size and
lordosis, and above all the *coverage*: scans start above C1 or mid-C1 and end between C6 and T2,
so a slice's relative position does not give its labels away.

The anatomy is rendered in patient coordinates (:mod:`keras_cspine.synthetic.anatomy`), so
pixels, segmentation and boxes agree with the geometry tags by construction. Fractures are
acute, conspicuous cortical breaks as a reader boxes them: a lucent line (a 2-3.5 mm soft-tissue
gap, at least 2 pixels wide), usually with a cortical step-off (a fragment displaced by 1-3 mm,
at least a pixel); a vertebra is labelled fractured exactly when its break shows on at least one
slice, and each such slice has a box drawn around the fracture region (the crack and the
displaced fragment, plus a margin in millimetres; see :func:`_boxes_from_breaks`); slices that
the break only grazes get no box, and boxes that overlap on a slice are merged into one
(:func:`merge_slice_boxes`).
Everything is deterministic for a seed:
the same seed gives byte-identical files, whatever the number of workers.

Example::

    from keras_cspine.synthetic.dataset import generate_dataset
    generate_dataset("data/synth", n_studies=16, seed=0, preset="small")

or ``python -m keras_cspine synth data/synth --studies 16 --seed 0 --preset small``.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.synthetic.anatomy import (
    TISSUES,
    VERTEBRA_NAMES,
    Anatomy,
    Fracture,
    Grid,
    build_anatomy,
    render_chunk,
)
from keras_cspine.utils import atomic_path, atomic_write, write_json

VERTEBRAE = VERTEBRA_NAMES[:7]
"""The labelled cervical vertebrae, C1..C7."""

UID_ROOT = "1.2.826.0.1.3680043."
"""Study UIDs look like Kaggle's: ``1.2.826.0.1.3680043.<number>``."""

JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
MANIFEST = "synthetic_manifest.json"
OUTPUT_NAMES = ("train_images", "test_images", "segmentations", "train.csv",
                "train_bounding_boxes.csv", "test.csv", "sample_submission.csv", MANIFEST)  # fmt: skip
_TMP = ".synthetic_tmp"
_SPLIT_CODE = {"train": 0, "test": 1}

# Fracture frequencies by vertebra, roughly those of the RSNA training set (C2 and C7 lead).
_FRACTURE_WEIGHTS = {"C1": 0.10, "C2": 0.22, "C3": 0.06, "C4": 0.08, "C5": 0.12, "C6": 0.18,
                     "C7": 0.24}  # fmt: skip
_SITE_WEIGHTS = {"body_anterior": 3.0, "body_lateral": 2.0, "lamina": 2.0, "pedicle": 1.5,
                 "spinous": 1.5, "dens": 2.5, "arch": 3.0, "lateral_mass": 1.5}  # fmt: skip
BOX_MARGIN_MM = 3.0
"""Margin (mm) a reader leaves around a fracture region on its slice."""
MIN_BOX_MM = 12.0
"""Smallest box side (mm): RSNA boxes frame the fracture with some bone around it (on 512 px
slices they are typically 15-25 mm across), never just the pixels of a thin crack."""
MIN_BREAK_PIXELS = 2
"""A slice shows a break (and gets a box) when at least this many pixels clearly changed and
:data:`MIN_VISIBLE_MM2` of them changed visibly."""
MIN_VISIBLE_MM2 = 8.0
"""Least area (mm2) of the pixels a break changes by more than ``BREAK_VISIBLE`` HU for its slice
to get a box: a lucent line 2.5 mm wide and 3 mm long, or a step-off of that size. Below it the
break only grazes the slice (a pixel or two of partial volume) and no reader would box it."""
MERGE_OVERLAP = 0.3
"""Boxes of one slice that overlap by more than this fraction of the smaller one are merged
into one: a reader draws one box around one fracture region, even where two breaks meet."""
GAP_MM = (2.0, 3.5)
"""Range of the width (mm) of a fracture's lucent line; at least :data:`MIN_GAP_PIXELS`."""
MIN_GAP_PIXELS = 2.0
"""Narrowest gap in pixels: a one-pixel line drowns in partial volume and noise."""
DISPLACED = 0.7
"""Share of fractures with a displaced fragment (cortical step-off), as in the acute, boxed
fractures of the RSNA set; the rest are undisplaced lucent lines."""
SHIFT_MM = (1.0, 3.0)
"""Range of the displacement (mm) of the fragment; at least one pixel."""
CRACK_RADIUS_MM = (7.0, 11.0)
"""Range of the radius (mm) of the crack around its point: it crosses the cortex and part of the
cancellous bone and shows on several slices."""


# -- presets -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Preset:
    """Scan settings of a synthetic dataset.

    Args:
        name: preset name.
        matrix: choices of Rows (Columns equal, or wider for ``nonsquare`` of the studies).
        fov_mm: range of the field of view across the columns (mm); pixel = fov / columns.
        slice_spacing_mm: range of the slice spacing drawn first (mm).
        n_slices: allowed slice counts; the spacing is adjusted to the anatomical coverage so
            that the count stays in range.
        noise_hu: range of the Gaussian noise standard deviation (HU).
        nonsquare: fraction of studies with Columns > Rows (catches row/column mix-ups).
        chunk_slices: slices rendered at a time (bounds memory for large presets).
    """

    name: str
    matrix: tuple[int, ...]
    fov_mm: tuple[float, float]
    slice_spacing_mm: tuple[float, float]
    n_slices: tuple[int, int]
    noise_hu: tuple[float, float]
    nonsquare: float = 0.0
    chunk_slices: int = 64


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny", (64, 80, 96), (150.0, 200.0), (2.0, 3.0), (40, 70), (8.0, 20.0), 0.25),
    "small": Preset("small", (128,), (150.0, 210.0), (1.5, 2.0), (80, 120), (10.0, 25.0), 0.25),
    "full": Preset("full", (512,), (160.0, 250.0), (0.5, 1.0), (120, 1000), (15.0, 35.0), 0.0, 24),
}
"""``tiny`` for tests (< 1 s a study), ``small`` for the demo, ``full`` like the real scans."""


def get_preset(preset: str | Preset) -> Preset:
    """A :class:`Preset` from its name (or the preset itself)."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


# -- a study's specification -------------------------------------------------------------------
@dataclass
class StudySpec:
    """Everything drawn for one study before rendering (geometry, encoding, anatomy, fractures).

    ``grid.ipps`` are the ImagePositionPatient values in *series order* (superior to inferior);
    file number of series index s is ``s + 1`` when ``head_first`` else ``n_slices - s``.
    """

    uid: str
    split: str
    index: int
    seed: int
    preset: Preset
    anatomy: Anatomy
    grid: Grid
    head_first: bool
    compressed: bool
    pixel_representation: int
    bits_stored: int
    rescale_intercept: float
    padding_hu: float | None
    tilt_deg: float
    spacing: float
    slice_thickness: float
    spacing_tag: bool
    noise_hu: float
    top: str
    segmentation: bool
    fractures: list[tuple[str, int]] = field(default_factory=list)  # (bone name, index)

    @property
    def n_slices(self) -> int:
        return len(self.grid.ipps)

    @property
    def iop(self) -> tuple[float, ...]:
        return (*self.grid.row_dir, *self.grid.col_dir)

    def file_number(self, series_index: int) -> int:
        """RSNA file number (== InstanceNumber) of a series index."""
        return series_index + 1 if self.head_first else self.n_slices - series_index

    def nifti_affine(self) -> np.ndarray:
        """RAS affine of the RSNA-style array ``data[i, j, k]`` (i = column, j = row reversed,
        k = slices by increasing superior position)."""
        g = self.grid
        lowest = g.ipps[-1]  # most inferior slice = k 0
        n = len(g.ipps)  # mean step: the IPPs are rounded to 0.1 um each, the affine is exact
        k_step = (g.ipps[0] - g.ipps[-1]) / (n - 1) if n > 1 else g.normal * self.spacing
        lps = np.eye(4)
        lps[:3, 0] = g.row_dir * g.dc
        lps[:3, 1] = -g.col_dir * g.dr
        lps[:3, 2] = k_step
        lps[:3, 3] = lowest + (g.rows - 1) * g.dr * g.col_dir
        return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@dataclass
class SyntheticStudy:
    """A generated study: its spec, labels, boxes and (optionally) the volumes.

    Attributes:
        spec: the :class:`StudySpec`.
        record: the manifest entry (JSON-ready).
        labels: {"C1".."C7", "patient_overall"} -> 0/1.
        boxes: rows of train_bounding_boxes.csv (dicts).
        seg: uint8 labels (Z, rows, columns) in series order.
        hu: float32 HU exactly as written (Z, rows, columns) in series order, or None.
        tissue: uint8 tissue codes (:data:`TISSUES`), or None.
        folder: the series folder written, or None.
    """

    spec: StudySpec
    record: dict[str, Any]
    labels: dict[str, int]
    boxes: list[dict[str, Any]]
    seg: np.ndarray
    hu: np.ndarray | None = None
    tissue: np.ndarray | None = None
    folder: Path | None = None


def _r(value: float, digits: int) -> float:
    """Round for a DS tag and read back, so the geometry used equals the geometry written."""
    value = round(float(value), digits)
    return 0.0 if value == 0 else float(_ds(value))


def _ds(value: float) -> str:
    """A DICOM decimal string of at most 16 characters."""
    text = f"{float(value):.6f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    if len(text) > 16:
        text = f"{float(value):.10g}"[:16]
    return text


def _study_rng(seed: int, split: str, index: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_CODE[split], int(index), *extra])


def sample_study(
    seed: int = 0,
    index: int = 0,
    preset: str | Preset = "tiny",
    *,
    split: str = "train",
    uid: str | None = None,
    head_first: bool | None = None,
    compressed: bool | None = None,
    tilted: bool | None = None,
    signed: bool | None = None,
    fractured: bool | None = None,
    top: str | None = None,
    bottom: float | None = None,
    nonsquare: bool | None = None,
    segmentation: bool = True,
) -> StudySpec:
    """Draw one study's geometry, encoding, anatomy and fractures (no pixels yet).

    Args:
        seed, index, split: identify the study; the same triple always gives the same study.
        preset: a :data:`PRESETS` name or a :class:`Preset`.
        uid: StudyInstanceUID (default ``1.2.826.0.1.3680043.<number from the seed>``).
        head_first, compressed, tilted, signed, fractured, nonsquare: force a property
            (None = drawn at random).
        top: "above_c1" (the scan starts 5-30 mm above C1, with the skull base) or "mid_c1".
        bottom: where the scan ends, from 0 (the middle of C6) to 1 (the bottom of T2).
        segmentation: whether a segmentation file is written for it (train split only).
    """
    if split not in _SPLIT_CODE:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    preset = get_preset(preset)
    rng = _study_rng(seed, split, index)
    anatomy = build_anatomy(rng)

    def draw(flag, p):
        value = bool(rng.random() < p)
        return value if flag is None else bool(flag)

    head_first = draw(head_first, 0.7)
    compressed = draw(compressed, 1 / 3)
    tilted = draw(tilted, 1 / 3)
    signed = draw(signed, 0.25)
    fractured = draw(fractured, 0.5)
    nonsquare = draw(nonsquare, preset.nonsquare)
    top = top if top is not None else ("above_c1" if rng.random() < 0.5 else "mid_c1")
    if top not in ("above_c1", "mid_c1"):
        raise ValueError(f"top must be 'above_c1' or 'mid_c1', got {top!r}")
    bottom = float(rng.random()) if bottom is None else float(bottom)
    if uid is None:
        uid = UID_ROOT + str(int(rng.integers(10000, 33000)))

    # Coverage along the spine (spine-frame z), then the scan geometry in patient space.
    ext = anatomy.extents
    z_top = (ext["C1"][1] + rng.uniform(5.0, 30.0) if top == "above_c1"
             else sum(ext["C1"]) / 2 + rng.uniform(-3.0, 3.0))  # fmt: skip
    c6_mid = sum(ext["C6"]) / 2
    z_bottom = c6_mid + bottom * (ext["T2"][0] - c6_mid)
    tilt = float(rng.choice([-1.0, 1.0]) * rng.uniform(2.0, 8.0)) if tilted else 0.0
    t = np.radians(tilt)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, _r(np.cos(t), 6), _r(np.sin(t), 6)])
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    p_top, p_bottom = anatomy.world((0, 0, z_top)), anatomy.world((0, 0, z_bottom))
    extent = float((p_top - p_bottom) @ normal)
    spacing = rng.uniform(*preset.slice_spacing_mm)
    n = int(np.clip(round(extent / spacing) + 1, *preset.n_slices))
    spacing = _r(extent / (n - 1), 4)
    rows = int(rng.choice(preset.matrix))
    columns = rows + (16 if rows < 256 else 64) * int(nonsquare)
    pixel = _r(rng.uniform(*preset.fov_mm) / columns, 6)
    # Centre the field of view near the neck, with a random patient offset.
    mid = anatomy.world((0.0, 8.0, (z_top + z_bottom) / 2))
    offset = row_dir * rng.uniform(-12, 12) + col_dir * rng.uniform(-12, 12)
    centre_top = mid + (p_top @ normal - mid @ normal) * normal + offset
    ipp0 = centre_top - (columns - 1) / 2 * pixel * row_dir - (rows - 1) / 2 * pixel * col_dir
    ipps = np.array([[_r(v, 4) for v in ipp0 - s * spacing * normal] for s in range(n)])
    grid = Grid(ipps, row_dir, col_dir, pixel, pixel, rows, columns)

    thickness = _r(spacing * float(rng.choice([1.0, 1.0, 1.25, 1.5])), 3)
    spec = StudySpec(
        uid=uid, split=split, index=int(index), seed=int(seed), preset=preset, anatomy=anatomy,
        grid=grid, head_first=head_first, compressed=compressed,
        pixel_representation=int(signed), bits_stored=16 if signed or rng.random() < 0.3 else 12,
        rescale_intercept=0.0 if signed else -1024.0,
        padding_hu=-2048.0 if signed and rng.random() < 0.7 else None, tilt_deg=round(tilt, 4),
        spacing=spacing, slice_thickness=thickness, spacing_tag=bool(rng.random() < 0.5),
        noise_hu=float(rng.uniform(*preset.noise_hu)), top=top,
        segmentation=bool(segmentation) and split == "train",
    )  # fmt: skip
    if fractured:
        _sample_fractures(rng, spec)
    return spec


def _slice_position(spec: StudySpec, world: np.ndarray) -> float:
    """Distance of a world point below the first (most superior) slice, along the normal."""
    return float((spec.grid.ipps[0] - world) @ spec.grid.normal)


def _sample_fractures(rng: np.random.Generator, spec: StudySpec) -> None:
    """Choose 1-3 fractured vertebrae inside the coverage and a visible break for each.

    The fracture patterns of the paper's data (the RSNA 2022 boxes): vertebrae weighted by
    :data:`_FRACTURE_WEIGHTS`, sites by :data:`_SITE_WEIGHTS`, a lucent line of :data:`GAP_MM`
    (at least :data:`MIN_GAP_PIXELS` pixels), displaced by :data:`SHIFT_MM` in :data:`DISPLACED`
    of the cases, over a crack of radius :data:`CRACK_RADIUS_MM`.
    """
    anatomy, depth = spec.anatomy, (spec.n_slices - 1) * spec.spacing
    margin = 1.5 * spec.spacing + 2.0
    candidates = []
    for name in VERTEBRAE:
        lo, hi = anatomy.extents[name]
        a = _slice_position(spec, anatomy.world((0, 0, hi)))
        b = _slice_position(spec, anatomy.world((0, 0, lo)))
        covered = min(b, depth) - max(a, 0.0)
        if covered > 0.9 * (b - a):
            candidates.append(name)
    if not candidates:
        return
    k = min(int(rng.choice([1, 2, 3], p=[0.6, 0.3, 0.1])), len(candidates))
    weights = np.array([_FRACTURE_WEIGHTS[c] for c in candidates])
    order = rng.choice(candidates, size=len(candidates), replace=False, p=weights / weights.sum())
    pixel, placed = spec.grid.dc, []
    for name in order:  # weighted order; skip a vertebra where no break fits inside the scan
        bone = anatomy.vertebra(str(name))
        kinds = sorted(bone.sites)
        w = np.array([_SITE_WEIGHTS.get(kind, 1.0) for kind in kinds])
        for _ in range(2 if rng.random() < 0.15 else 1):
            for _attempt in range(30):
                kind = str(rng.choice(kinds, p=w / w.sum()))
                point, normal = bone.sites[kind](rng)
                pos = _slice_position(spec, anatomy.bone_world(bone, point))
                if margin <= pos <= depth - margin:
                    break
            else:
                continue
            shift = np.zeros(3)
            if rng.random() < DISPLACED:  # step-off: mostly along the crack plane, some opening
                tangent = np.cross(normal, rng.normal(size=3))
                direction = normal * rng.uniform(0, 1) + tangent / np.linalg.norm(tangent)
                size = max(float(rng.uniform(*SHIFT_MM)), pixel)
                shift = direction / np.linalg.norm(direction) * size
            gap = max(float(rng.uniform(*GAP_MM)), MIN_GAP_PIXELS * pixel)
            radius = float(rng.uniform(*CRACK_RADIUS_MM))
            bone.fractures.append(Fracture(kind, point, normal, gap, radius, shift))
        if bone.fractures:
            placed.append(bone.name)
        if len(placed) == k:
            break
    spec.fractures.extend((name, i) for name in sorted(placed, key=VERTEBRAE.index)
                          for i in range(len(anatomy.vertebra(name).fractures)))  # fmt: skip


# -- rendering ---------------------------------------------------------------------------------
def _stored_range(spec: StudySpec) -> tuple[int, int]:
    if spec.pixel_representation:
        return -32768, 32767
    return 0, (1 << spec.bits_stored) - 1


def render_study(spec: StudySpec, *, with_fractures: bool = True, noise: bool = True,
                 s0: int = 0, s1: int | None = None):  # fmt: skip
    """Render series slices ``s0:s1`` of a study.

    Returns ``(hu, seg, tissue, breaks)``: float32 HU exactly as stored (rounded, clipped, with
    noise and padding), uint8 labels, uint8 tissue codes, each (slices, rows, columns) in series
    order, and the break masks {(bone, fracture index): uint8 array, 1 where the break touched a
    pixel, 2 where it clearly shows} (see :func:`keras_cspine.synthetic.anatomy.render_chunk`).
    """
    s1 = spec.n_slices if s1 is None else s1
    hu, seg, tissue, breaks = render_chunk(spec.anatomy, spec.grid, s0, s1, with_fractures)
    if noise:
        for s in range(s0, s1):  # per-slice streams: independent of the chunking
            rng = _study_rng(spec.seed, spec.split, spec.index, 1, s)
            hu[s - s0] += rng.standard_normal(hu.shape[1:], dtype=np.float32) * spec.noise_hu
    if spec.padding_hu is not None:
        g = spec.grid
        rr, cc = np.mgrid[0 : g.rows, 0 : g.columns]
        radius = min(g.rows, g.columns) / 2
        outside = (rr - (g.rows - 1) / 2) ** 2 + (cc - (g.columns - 1) / 2) ** 2 > radius**2
        hu[:, outside] = spec.padding_hu
        tissue[:, outside] = TISSUES["padding"]
    lo, hi = _stored_range(spec)
    stored = np.clip(np.rint(hu) - spec.rescale_intercept, lo, hi)
    return (stored + spec.rescale_intercept).astype(np.float32), seg, tissue, breaks


def _boxes_from_breaks(spec: StudySpec, s0: int, breaks) -> dict[tuple[str, int], list[dict]]:
    """Per fracture, one box per slice where the break shows, drawn as a reader draws it.

    A slice shows the break when at least :data:`MIN_BREAK_PIXELS` pixels clearly changed (by
    more than ``BREAK_STRONG`` HU) and those changed by more than ``BREAK_VISIBLE`` HU cover
    :data:`MIN_VISIBLE_MM2`: a crack grazing the edge slice of a break (a pixel or two of partial
    volume, or only cancellous bone) is not something a reader would box. The
    box frames the fracture region of that slice (the clearly changed pixels: the lucent line and
    the stepped-off cortex of a displaced fragment; not the faint partial-volume halo) with
    :data:`BOX_MARGIN_MM` around it, widened about its centre to at least :data:`MIN_BOX_MM`,
    out to whole native pixels (the margin and size are millimetres, whatever the pixel spacing).
    """
    g = spec.grid
    out: dict[tuple[str, int], list[dict]] = {}
    for key, mask in breaks.items():
        flat = mask.reshape(len(mask), -1)
        strong = (flat >= 2).sum(axis=1)
        visible_mm2 = (flat == 3).sum(axis=1) * (g.dr * g.dc)
        shows = (strong >= MIN_BREAK_PIXELS) & (visible_mm2 >= MIN_VISIBLE_MM2 - 1e-9)
        for i in np.nonzero(shows)[0]:
            rows, cols = np.nonzero(mask[i] >= 2)
            x, width = _box_side(cols.min(), cols.max() + 1, g.dc, g.columns)
            y, height = _box_side(rows.min(), rows.max() + 1, g.dr, g.rows)
            out.setdefault(key, []).append({
                "StudyInstanceUID": spec.uid, "x": x, "y": y, "width": width, "height": height,
                "slice_number": spec.file_number(s0 + int(i)),
            })  # fmt: skip
    return out


def _box_side(lo: int, hi: int, pixel_mm: float, size: int) -> tuple[float, float]:
    """Start and length of one side of a box around the pixel range ``[lo, hi)``: the margin and
    the minimum length in mm, out to whole pixels, clipped to ``[0, size]``."""
    margin, least = BOX_MARGIN_MM / pixel_mm, MIN_BOX_MM / pixel_mm
    a, b = lo - margin, hi + margin
    if b - a < least:
        a, b = (a + b - least) / 2, (a + b + least) / 2
    start, stop = max(int(np.floor(a + 1e-6)), 0), min(int(np.ceil(b - 1e-6)), size)
    return float(start), float(stop - start)


def merge_slice_boxes(boxes: Sequence[dict]) -> list[dict]:
    """Merge the boxes of each slice that overlap by more than :data:`MERGE_OVERLAP` of the
    smaller box into their union (repeated until none does): one box per fracture region, as a
    reader draws them, where two breaks of a study meet on a slice. Order: slice, x, y."""
    by_slice: dict[tuple[str, int], list[list[float]]] = {}
    for b in boxes:
        by_slice.setdefault((b["StudyInstanceUID"], b["slice_number"]), []).append(
            [b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]]
        )
    merged = []
    for (uid, number), rects in by_slice.items():
        changed = True
        while changed:
            changed = False
            for i in range(len(rects)):
                for j in range(i + 1, len(rects)):
                    a, c = rects[i], rects[j]
                    iw = min(a[2], c[2]) - max(a[0], c[0])
                    ih = min(a[3], c[3]) - max(a[1], c[1])
                    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (c[2] - c[0]) * (c[3] - c[1]))
                    if iw > 0 and ih > 0 and iw * ih > MERGE_OVERLAP * smaller:
                        rects[i] = [min(a[0], c[0]), min(a[1], c[1]), max(a[2], c[2]),
                                    max(a[3], c[3])]  # fmt: skip
                        del rects[j]
                        changed = True
                        break
                if changed:
                    break
        merged += [{"StudyInstanceUID": uid, "x": r[0], "y": r[1], "width": r[2] - r[0],
                    "height": r[3] - r[1], "slice_number": number} for r in rects]  # fmt: skip
    return sorted(merged, key=lambda b: (b["slice_number"], b["x"], b["y"]))


# -- writing -----------------------------------------------------------------------------------
def _dicom_dataset(spec: StudySpec, s: int, stored: np.ndarray):
    """The pydicom Dataset of series slice ``s`` (uncompressed, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
    )

    g, number = spec.grid, spec.file_number(s)
    dtype = "<i2" if spec.pixel_representation else "<u2"
    sop = UID(f"{spec.uid}.1.{number}")
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    patient = spec.uid.rsplit(".", 1)[-1]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20220724"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "keras_cspine synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = _ds(spec.slice_thickness)
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "BONE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = UID(spec.uid)
    ds.SeriesInstanceUID = UID(f"{spec.uid}.1")
    ds.StudyID = patient
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in g.ipps[s]]
    ds.ImageOrientationPatient = [_ds(v) for v in spec.iop]
    ds.FrameOfReferenceUID = UID(f"{spec.uid}.2")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(g.ipps[s][2])
    if spec.spacing_tag:
        ds.SpacingBetweenSlices = _ds(spec.spacing)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = g.rows, g.columns
    ds.PixelSpacing = [_ds(g.dr), _ds(g.dc)]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = spec.pixel_representation
    if spec.padding_hu is not None:
        padding = int(spec.padding_hu - spec.rescale_intercept)
        ds.add_new(0x00280120, "SS" if spec.pixel_representation else "US", padding)
    ds.WindowCenter = ["400", "40"]
    ds.WindowWidth = ["1800", "400"]
    ds.RescaleIntercept = _ds(spec.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype=dtype).tobytes())
    return ds


_VARYING = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)
"""SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation, PixelData."""
_PIXEL_DATA_OB_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"


def _encode(elements) -> bytes:
    """Explicit VR little endian bytes of data elements (pydicom's own element writer)."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    part = Dataset()
    for elem in elements:
        part.add(elem)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, part)
    return fp.getvalue()


def _element(tag: int, vr: str, value: str | bytes) -> bytes:
    """One explicit VR little endian data element (UI, IS, DS or OW), padded to even length."""
    data = value.encode("ascii") if isinstance(value, str) else value
    if len(data) % 2:
        data += b"\x00" if vr in ("UI", "OW") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr == "OW":
        return head + b"\x00\x00" + struct.pack("<I", len(data)) + data
    return head + struct.pack("<H", len(data)) + data


class _SliceWriter:
    """Writes a study's slices fast: the constant header is encoded once by pydicom, and only the
    per-slice elements (:data:`_VARYING`: UIDs, numbers, positions, pixels) are encoded for each
    slice. The bytes equal ``Dataset.save_as(enforce_file_format=True)`` of the same dataset
    (tested), at a tenth of the cost.

    For a compressed study, python-gdcm encodes the pixels as JPEG lossless SV1 (transfer syntax
    1.2.840.10008.1.2.4.70; pydicom cannot encode it). GDCM would also fill missing type-2
    attributes with the current time, so only its encapsulated PixelData element is kept, verbatim:
    the files stay byte-identical for a seed.
    """

    def __init__(self, spec: StudySpec, scratch: Path):
        template = _dicom_dataset(spec, 0, np.zeros((spec.grid.rows, spec.grid.columns)))
        self.spec, self.scratch = spec, scratch
        self._meta_cache: dict[tuple[int, bool], bytes] = {}
        self.runs: list[bytes | int] = []  # encoded constant runs and varying tags, in tag order
        constant: list = []
        for elem in template:
            if int(elem.tag) in _VARYING:
                if constant:
                    self.runs.append(_encode(constant))
                    constant = []
                self.runs.append(int(elem.tag))
            else:
                constant.append(elem)
        if constant:
            self.runs.append(_encode(constant))

    def dataset(self, s: int, stored: np.ndarray):
        """The full pydicom Dataset of a slice (uncompressed), for reference and tests."""
        return _dicom_dataset(self.spec, s, stored)


    def write(self, s: int, stored: np.ndarray, path: Path) -> None:
        """Write series slice ``s`` with stored pixel values ``stored`` to ``path``."""
        g, number = self.spec.grid, self.spec.file_number(s)
        sop = f"{self.spec.uid}.1.{number}"
        dtype = "<i2" if self.spec.pixel_representation else "<u2"
        varying = {
            0x00080018: _element(0x00080018, "UI", sop),
            0x00200013: _element(0x00200013, "IS", str(number)),
            0x00200032: _element(0x00200032, "DS", "\\".join(_ds(v) for v in g.ipps[s])),
            0x00201041: _element(0x00201041, "DS", _ds(g.ipps[s][2])),
            0x7FE00010: _element(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype).tobytes()),
        }
        if self.spec.compressed:
            plain = self.scratch / "plain.dcm"
            plain.write_bytes(self._assemble(sop, varying, compressed=False))
            varying[0x7FE00010] = self._jpeg_lossless(plain, path)
        path.write_bytes(self._assemble(sop, varying, compressed=self.spec.compressed))

    def _assemble(self, sop: str, varying: dict[int, bytes], compressed: bool) -> bytes:
        parts = [b"\x00" * 128 + b"DICM", self._meta(sop, compressed)]
        parts += [run if isinstance(run, bytes) else varying[run] for run in self.runs]
        return b"".join(parts)

    def _meta(self, sop: str, compressed: bool) -> bytes:
        """File meta bytes, encoded by pydicom once per UID length (the UID is then swapped in)."""
        key = (len(sop), compressed)
        if key not in self._meta_cache:
            from pydicom.dataset import FileMetaDataset
            from pydicom.filebase import DicomBytesIO
            from pydicom.filewriter import write_file_meta_info
            from pydicom.uid import (
                PYDICOM_IMPLEMENTATION_UID,
                UID,
                CTImageStorage,
                ExplicitVRLittleEndian,
            )

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = UID("9" * len(sop))
            meta.TransferSyntaxUID = UID(JPEG_LOSSLESS) if compressed else ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_file_meta_info(fp, meta, enforce_standard=True)
            self._meta_cache[key] = fp.getvalue()
        template = self._meta_cache[key]
        marker = _element(0x00020003, "UI", "9" * len(sop))
        at = template.index(marker)
        return template[:at] + _element(0x00020003, "UI", sop) + template[at + len(marker) :]

    def _jpeg_lossless(self, plain: Path, path: Path) -> bytes:
        """The encapsulated PixelData element (tag to end of file) of the slice, from GDCM."""
        try:
            import gdcm
        except ImportError as exc:  # pragma: no cover - python-gdcm is a core dependency
            raise ImportError("JPEG-lossless studies need python-gdcm: pip install python-gdcm") from exc
        packed = self.scratch / "packed.dcm"
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        if not reader.Read():
            raise CSpineDataError(plain, "GDCM could not read the slice it was given to compress")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise CSpineDataError(path, "GDCM could not encode the slice as JPEG lossless")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(packed))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise CSpineDataError(packed, "GDCM could not write the JPEG-lossless slice")
        data = packed.read_bytes()
        start = data.find(_PIXEL_DATA_OB_UNDEFINED)
        if start < 0 or not data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"):
            raise CSpineDataError(packed, "GDCM output has no encapsulated PixelData at its end")
        return data[start:]


def _check_decodes(path: Path, expected: np.ndarray) -> None:
    """Decode a written slice with pydicom (+ pylibjpeg) and compare with what was meant."""
    import pydicom

    decoded = pydicom.dcmread(path).pixel_array
    if not np.array_equal(decoded, expected):
        raise CSpineDataError(path, "the written slice does not decode to the pixels it was given")


def _write_nifti(spec: StudySpec, seg: np.ndarray, path: Path) -> None:
    """The RSNA-style segmentation: data[i, j, k] = seg[Z-1-k, rows-1-j, i], RAS affine."""
    import nibabel as nib

    data = np.ascontiguousarray(seg[::-1, ::-1, :].transpose(2, 1, 0), dtype=np.uint8)
    affine = spec.nifti_affine()
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(np.uint8)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)


def _record(spec: StudySpec, seg_present: Sequence[int], per_fracture: dict, labels: dict) -> dict:
    """The manifest entry of a study (JSON-ready, deterministic)."""
    g = spec.grid
    fractures = []
    for bone_name, k in spec.fractures:
        frac = spec.anatomy.vertebra(bone_name).fractures[k]
        boxes = per_fracture.get((bone_name, k), [])
        fractures.append({
            "vertebra": bone_name, "kind": frac.kind, "gap_mm": round(frac.gap, 3),
            "displacement_mm": round(float(np.linalg.norm(frac.shift)), 3),
            "visible": bool(boxes), "slice_numbers": sorted(b["slice_number"] for b in boxes),
        })  # fmt: skip
    return {
        "StudyInstanceUID": spec.uid, "split": spec.split, "index": spec.index,
        "head_first": spec.head_first, "compressed": spec.compressed,
        "transfer_syntax": JPEG_LOSSLESS if spec.compressed else "1.2.840.10008.1.2.1",
        "rows": g.rows, "columns": g.columns, "pixel_spacing": [g.dr, g.dc],
        "n_slices": spec.n_slices, "spacing": spec.spacing, "slice_thickness": spec.slice_thickness,
        "tilt_deg": spec.tilt_deg, "image_orientation": [float(v) for v in spec.iop],
        "pixel_representation": spec.pixel_representation, "bits_stored": spec.bits_stored,
        "rescale_intercept": spec.rescale_intercept, "padding_hu": spec.padding_hu,
        "noise_hu": round(spec.noise_hu, 3), "top": spec.top,
        "coverage": [VERTEBRA_NAMES[v - 1] for v in sorted(seg_present) if v],
        "segmentation": spec.segmentation, "labels": labels, "fractures": fractures,
    }  # fmt: skip


def _render_and_write(spec: StudySpec, root: Path | None, *, keep_volumes: bool) -> SyntheticStudy:
    """Render a study chunk by chunk and write its slices (and segmentation) under ``root``."""
    g, n = spec.grid, spec.n_slices
    seg = np.zeros((n, g.rows, g.columns), np.uint8)
    hu_all = np.zeros(seg.shape, np.float32) if keep_volumes else None
    tissue_all = np.zeros(seg.shape, np.uint8) if keep_volumes else None
    per_fracture: dict[tuple[str, int], list[dict]] = {}
    folder = staging = None
    if root is not None:
        folder = root / f"{spec.split}_images" / spec.uid
        (root / _TMP).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{spec.uid}.", dir=root / _TMP))
        (staging / "series").mkdir()
        writer = _SliceWriter(spec, staging)
    checked = False
    try:
        for s0 in range(0, n, spec.preset.chunk_slices):
            s1 = min(s0 + spec.preset.chunk_slices, n)
            hu, seg[s0:s1], tissue, breaks = render_study(spec, s0=s0, s1=s1)
            for key, boxes in _boxes_from_breaks(spec, s0, breaks).items():
                per_fracture.setdefault(key, []).extend(boxes)
            if keep_volumes:
                hu_all[s0:s1], tissue_all[s0:s1] = hu, tissue
            if staging is None:
                continue
            stored = (hu - spec.rescale_intercept).astype(np.int32)
            for s in range(s0, s1):
                path = staging / "series" / f"{spec.file_number(s)}.dcm"
                writer.write(s, stored[s - s0], path)
                if spec.compressed and not checked:  # one decode per study, all in the tests
                    dtype = np.int16 if spec.pixel_representation else np.uint16
                    _check_decodes(path, stored[s - s0].astype(dtype))
                    checked = True
        present = np.unique(seg)
        labels = {v: 0 for v in VERTEBRAE}
        for bone_name, _k in per_fracture:
            labels[bone_name] = 1
        labels["patient_overall"] = int(any(labels[v] for v in VERTEBRAE))
        boxes = merge_slice_boxes([b for rows in per_fracture.values() for b in rows])
        record = _record(spec, present.tolist(), per_fracture, labels)
        if staging is not None:
            for stale in (staging / "plain.dcm", staging / "packed.dcm"):
                stale.unlink(missing_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "series", folder)
            if spec.segmentation:
                _write_nifti(spec, seg, root / "segmentations" / f"{spec.uid}.nii")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return SyntheticStudy(spec, record, labels, boxes, seg, hu_all, tissue_all, folder)


def generate_study(out_dir: str | os.PathLike | None = None, *, seed: int = 0, index: int = 0,
                   preset: str | Preset = "tiny", keep_volumes: bool = True,
                   **options: Any) -> SyntheticStudy:  # fmt: skip
    """Generate one study; write it in the RSNA layout under ``out_dir`` when given.

    Writes ``<out_dir>/<split>_images/<uid>/<n>.dcm`` and, for a train study,
    ``<out_dir>/segmentations/<uid>.nii`` (no CSVs: see :func:`generate_dataset`).

    Args:
        out_dir: dataset root, or None to only render in memory.
        seed, index, preset: see :func:`sample_study`.
        keep_volumes: keep ``hu`` and ``tissue`` on the returned object.
        **options: forwarded to :func:`sample_study` (split, uid, head_first, compressed,
            tilted, signed, fractured, top, bottom, nonsquare, segmentation).

    Returns:
        A :class:`SyntheticStudy` with labels, boxes, the segmentation in series order and the
        manifest record.
    """
    spec = sample_study(seed, index, preset, **options)
    root = None if out_dir is None else Path(out_dir)
    return _render_and_write(spec, root, keep_volumes=keep_volumes)


def _study_job(job: dict) -> dict:
    """Worker entry point: generate and write one study, return what the CSVs need."""
    study = generate_study(job.pop("root"), keep_volumes=False, **job)
    return {"record": study.record, "labels": study.labels, "boxes": study.boxes}


def _balanced(rng: np.random.Generator, n: int, fraction: float) -> list[bool]:
    """Exactly round(n * fraction) True values (at least one when n >= 2), shuffled."""
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    flags = np.zeros(n, bool)
    flags[rng.permutation(n)[:k]] = True
    return flags.tolist()


def _plan(n_train: int, n_test: int, seed: int, segmentation_fraction: float) -> list[dict]:
    """Dataset-level draws: unique UIDs and balanced study properties (so that even a small
    dataset has head- and feet-first, compressed, tilted, signed, fractured and intact studies)."""
    rng = np.random.default_rng([int(seed), 99])
    numbers = rng.choice(np.arange(10000, 33000), size=n_train + n_test, replace=False)
    jobs = []
    for split, n, offset in (("train", n_train, 0), ("test", n_test, n_train)):
        flags = {
            "head_first": [not f for f in _balanced(rng, n, 1 / 3)],
            "compressed": _balanced(rng, n, 1 / 3),
            "tilted": _balanced(rng, n, 1 / 3),
            "signed": _balanced(rng, n, 1 / 4),
            "fractured": _balanced(rng, n, 1 / 2),
            "top": ["above_c1" if f else "mid_c1" for f in _balanced(rng, n, 1 / 2)],
            "segmentation": _balanced(rng, n, segmentation_fraction) if split == "train" else
            [False] * n,
        }  # fmt: skip
        bottoms = (rng.permutation(n) + rng.random(n)) / max(n, 1)  # stratified C6 .. T2
        for i in range(n):
            job = {key: values[i] for key, values in flags.items()}
            job.update(split=split, index=i, bottom=float(bottoms[i]),
                       uid=UID_ROOT + str(int(numbers[offset + i])))  # fmt: skip
            jobs.append(job)
    return jobs


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CSpineDataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CSpineDataError(out, "is not empty; pass overwrite=True (--overwrite) to "
                                       "replace a synthetic dataset there")  # fmt: skip
        if not (out / MANIFEST).is_file():
            raise CSpineDataError(out, f"is not empty and has no {MANIFEST}: refusing to "
                                       "overwrite what may be real data")  # fmt: skip
        for name in (*OUTPUT_NAMES, _TMP):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate_dataset(
    out_dir: str | os.PathLike,
    n_studies: int = 8,
    seed: int = 0,
    preset: str | Preset = "small",
    *,
    n_test: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    segmentation_fraction: float = 1.0,
) -> Path:
    """Write a synthetic dataset in the RSNA 2022 layout; returns ``out_dir``.

    Args:
        out_dir: the dataset folder (created; must be empty unless ``overwrite``).
        n_studies: training studies (train.csv, boxes, segmentations).
        seed: the same seed gives byte-identical files, whatever ``workers`` is.
        preset: "tiny" (tests), "small" (demo) or "full" (realistic), or a :class:`Preset`.
        n_test: unlabelled studies in test_images/ (default: n_studies // 4, between 1 and 3).
        workers: processes writing studies in parallel.
        overwrite: replace an earlier synthetic dataset in ``out_dir``.
        progress: show a progress bar over studies.
        segmentation_fraction: share of training studies with a segmentation (RSNA: ~4%).

    Example:
        >>> generate_dataset("data/synth", n_studies=4, seed=0, preset="tiny")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if int(n_studies) < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies!r}")
    n_test = min(3, max(1, int(n_studies) // 4)) if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test!r}")
    if not 0.0 <= segmentation_fraction <= 1.0:
        raise ValueError(f"segmentation_fraction must be in [0, 1], got {segmentation_fraction!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    preset = get_preset(preset)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    for folder in ("train_images", "test_images", "segmentations"):
        (out / folder).mkdir(exist_ok=True)
    jobs = _plan(int(n_studies), n_test, int(seed), float(segmentation_fraction))
    for job in jobs:
        job.update(root=out, seed=int(seed), preset=preset)
    bar = tqdm(total=len(jobs), desc="synth", unit="study", disable=not progress)
    results: list[dict] = []
    try:
        if workers == 1:
            for job in jobs:
                results.append(_study_job(dict(job)))
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")  # safe after TensorFlow/torch imports
            with ProcessPoolExecutor(int(workers), mp_context=context) as pool:
                for result in pool.map(_study_job, [dict(job) for job in jobs]):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
        shutil.rmtree(out / _TMP, ignore_errors=True)

    train = [r for r in results if r["record"]["split"] == "train"]
    test = [r for r in results if r["record"]["split"] == "test"]
    _write_csv(out / "train.csv", ("StudyInstanceUID", "patient_overall", *VERTEBRAE),
               [{"StudyInstanceUID": r["record"]["StudyInstanceUID"], **r["labels"]}
                for r in train])  # fmt: skip
    _write_csv(out / "train_bounding_boxes.csv",
               ("StudyInstanceUID", "x", "y", "width", "height", "slice_number"),
               [b for r in train for b in r["boxes"]])  # fmt: skip
    targets = (*VERTEBRAE, "patient_overall")
    test_rows = [{"row_id": f"{r['record']['StudyInstanceUID']}_{t}",
                  "StudyInstanceUID": r["record"]["StudyInstanceUID"], "prediction_type": t}
                 for r in test for t in targets]  # fmt: skip
    _write_csv(out / "test.csv", ("row_id", "StudyInstanceUID", "prediction_type"), test_rows)
    _write_csv(out / "sample_submission.csv", ("row_id", "fractured"),
               [{"row_id": row["row_id"], "fractured": 0.5} for row in test_rows])  # fmt: skip
    from keras_cspine import __version__

    write_json(out / MANIFEST, {
        "generator": "keras_cspine.synthetic.dataset", "version": __version__, "seed": int(seed),
        "preset": preset.name, "preset_settings": asdict(preset), "n_train": len(train),
        "n_test": len(test), "studies": [r["record"] for r in results],
    })  # fmt: skip
    return out


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``synthetic_manifest.json`` of a dataset written by :func:`generate_dataset`."""
    import json

    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise CSpineDataError(path, "no synthetic manifest: not a synthetic dataset?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CSpineDataError(path, f"invalid JSON: {exc}") from exc


# -- command line ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``python -m keras_cspine synth``."""
    parser.add_argument("out", help="output folder (RSNA layout)")
    parser.add_argument("--studies", type=int, default=8, help="training studies (default 8)")
    parser.add_argument("--test-studies", type=int, default=None,
                        help="unlabelled test studies (default studies//4, 1..3)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="tiny (tests), small (demo, default) or full (512 px, realistic)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--segmentation-fraction", type=float, default=1.0,
                        help="share of training studies with a segmentation (default 1)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier synthetic dataset in OUT")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``synth`` from parsed arguments; 0 on success, 2 on bad input."""
    start = time.perf_counter()
    try:
        out = generate_dataset(
            args.out, n_studies=args.studies, seed=args.seed, preset=args.preset,
            n_test=args.test_studies, workers=args.workers, overwrite=args.overwrite,
            progress=not args.quiet, segmentation_fraction=args.segmentation_fraction,
        )  # fmt: skip
    except (CSpineDataError, ValueError) as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    manifest = load_manifest(out)
    fractured = sum(s["labels"]["patient_overall"] for s in manifest["studies"]
                    if s["split"] == "train")  # fmt: skip
    print(f"wrote {manifest['n_train']} train ({fractured} fractured) and {manifest['n_test']} "
          f"test studies ({args.preset}) to {out} in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine.synthetic.dataset OUT [--studies N] [--seed S] [--preset P]``."""
    parser = configure_parser(argparse.ArgumentParser(
        prog="python -m keras_cspine.synthetic.dataset",
        description="Write a synthetic dataset in the RSNA 2022 cervical spine layout."))  # fmt: skip
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
