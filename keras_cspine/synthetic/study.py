"""The synthetic studies of :mod:`keras_cspine.synthetic.dataset`: presets, the random draw of
a study (:func:`sample_study`, fractures included), its rendering to HU, the boxes a reader would
draw around each break. Deterministic for a seed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.synthetic.anatomy import (
    TISSUES,
    VERTEBRA_NAMES,
    Anatomy,
    Fracture,
    Grid,
    build_anatomy,
    render_chunk,
)

VERTEBRAE = VERTEBRA_NAMES[:7]
"""The labelled cervical vertebrae, C1..C7."""

UID_ROOT = "1.2.826.0.1.3680043."
"""Study UIDs start like Kaggle's: ``1.2.826.0.1.3680043.<number>`` (see :func:`study_uid`)."""
UID_DIGITS = 16
"""Digits of the number after :data:`UID_ROOT` (36 characters in all): the number is also the
study's PatientID and StudyID (VR SH: at most 16 characters), and ``.1.<slice number>`` (the
SOP Instance UIDs) stays well within DICOM's 64."""


def study_uid(**identity: Any) -> str:
    """The StudyInstanceUID of the synthetic study ``identity`` names (for a dataset: its seed,
    sizes, preset, segmentation share, split and index): :data:`UID_ROOT` and a number from
    the SHA-256 of ``identity``. The same identity always gives the same UID; two datasets drawn
    with other seeds or sizes share none (about 1 chance in 10**16 per pair of studies), as real
    DICOM UIDs are unique, so that a study of one set never passes for one of another.

    Example:
        >>> study_uid(seed=0, n_train=4, n_test=1, split="train", index=0)[:20]
        '1.2.826.0.1.3680043.'
    """
    import hashlib
    import json

    payload = json.dumps({"generator": "keras_cspine.synthetic", **identity}, sort_keys=True,
                         separators=(",", ":"), default=str)  # fmt: skip
    number = int.from_bytes(hashlib.sha256(payload.encode()).digest(), "big")
    number = number % (9 * 10 ** (UID_DIGITS - 1)) + 10 ** (UID_DIGITS - 1)  # no leading zero
    return f"{UID_ROOT}{number}"

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
    "demo": Preset("demo", (128,), (150.0, 210.0), (2.0, 3.0), (40, 80), (10.0, 25.0), 0.25),
    "full": Preset("full", (512,), (160.0, 250.0), (0.5, 1.0), (120, 1000), (15.0, 35.0), 0.0, 24),
}
"""``tiny`` for tests (< 1 s a study); ``demo`` for the demo (the ``small`` matrix at 2-3 mm slices:
more studies for the same number of slices); ``small`` for finer slices; ``full`` like the real
scans."""


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
        uid: StudyInstanceUID (default: :func:`study_uid` of the seed, preset, split and index).
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
        rng.integers(10000, 33000)  # keeps the draws that follow (the study's geometry) as they were
        uid = study_uid(seed=int(seed), preset=preset.name, split=split, index=int(index))

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
