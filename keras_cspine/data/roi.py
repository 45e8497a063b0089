"""The spine window: a square window of the slice around the cervical column, for both stages.

Beyond the paper, which feeds the whole slice to both networks. The column fills a small part of
an axial CT slice (on the synthetic ``small`` preset about a quarter of the field of view), and
fracture lines are a few pixels wide: giving a model only a window of ``roi_mm`` around the
column, rendered at the model's size, enlarges the bone as a bigger image would, at a fraction of
its cost, and drops the jaw, skull and shoulders as distractions. Many RSNA 2022 solutions
cropped to the vertebrae for the same reason. Stage 2 takes it with ``detect export --roi-mm``,
stage 1 with ``prepare --roi-mm`` (its small images then show the vertebra's own shape instead
of a few pixels of it).

The window is found per study from the pixels alone, the same way at prepare or export time and
at inference:

1. :func:`roi_sample` picks up to ``ROI_SAMPLE_SLICES`` slices evenly spread over the series,
   by slice number, so that the export (reading files) and the pipeline (holding the volume)
   look at exactly the same slices;
2. :func:`spine_centre`: the fraction of those slices where each pixel is bone (``> BONE_HU``),
   smoothed with a Gaussian of ``SMOOTH_MM``; its maximum inside the neck is the column, the one
   bone present on every slice of a neck CT (the mandible and skull base show on the top third
   only, ribs and clavicles on the bottom slices). "Inside the neck": the largest region of
   pixels that are tissue (``> BODY_HU``) on at least half of the slices and ``BODY_MARGIN_MM``
   away from air, so that a dense scanner table or head holder, on every slice too but outside
   the body, cannot win;
3. :class:`SpineRoi` is the square of ``roi_mm`` (in pixels, from the pixel spacing) centred
   there. It may reach past the slice edge: :meth:`SpineRoi.crop` pads with the slice's
   minimum (air), as ``keras_cspine.data.preprocess.to_model_image`` pads a non-square slice.

Boxes map both ways: :meth:`SpineRoi.yolo_label` turns a native-pixel box into the YOLO label
of the window image (clipped to slice and window), :meth:`SpineRoi.to_image` into pixels of the
window image, and :meth:`SpineRoi.to_slice` turns boxes found in the window image back into
native slice pixels.

On the synthetic ``small`` studies every fracture box lies within 49 mm of the centre found this
way (99% within 42 mm), so the synthetic config's ``roi_mm: 100`` holds them all. On other data,
check ``export.json``'s ``outside_roi`` count: boxes that fall outside the window are left out
of the export and counted there.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROI_SAMPLE_SLICES = 32
BONE_HU = 250.0
SMOOTH_MM = 10.0
BODY_HU = -300.0
BODY_MARGIN_MM = 5.0


def roi_sample(slice_numbers: Sequence[int], count: int = ROI_SAMPLE_SLICES) -> list[int]:
    """Up to ``count`` slice numbers evenly spread over a series, in ascending order.

    The choice depends only on the set of numbers (not on the order they are given in), so
    the export and the pipeline pick the same slices.

    Example:
        >>> roi_sample(range(1, 11), count=4)
        [1, 4, 7, 10]
    """
    numbers = sorted({int(n) for n in slice_numbers})
    if not numbers:
        raise ValueError("a series with no slices has no region of interest")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count!r}")
    if len(numbers) <= count:
        return numbers
    picks = (np.arange(count) * (len(numbers) - 1)) // max(count - 1, 1)
    return [numbers[i] for i in picks]


def spine_centre(slices_hu: Sequence[np.ndarray], pixel_spacing: Sequence[float]) -> tuple[float, float]:
    """``(row, column)`` of the cervical column in a stack of HU slices of one series.

    The maximum of the bone frequency (fraction of slices with ``HU > BONE_HU``), smoothed
    over ``SMOOTH_MM``, inside the body (see the module). A stack without bone gives the slice
    centre.
    """
    from scipy import ndimage

    if len(slices_hu) == 0:
        raise ValueError("no slices to find the column in")
    shape = np.shape(slices_hu[0])
    if len(shape) != 2 or any(np.shape(s) != shape for s in slices_hu):
        raise ValueError("the slices of a series must be 2-D and of one shape")
    frequency = np.zeros(shape, np.float32)
    tissue = np.zeros(shape, np.float32)
    for hu in slices_hu:
        hu = np.asarray(hu)
        frequency += hu > BONE_HU
        tissue += hu > BODY_HU
    if not frequency.any():
        return (shape[0] - 1) / 2, (shape[1] - 1) / 2
    spacing = (float(pixel_spacing[0]), float(pixel_spacing[1]))
    margin = max(1, int(round(BODY_MARGIN_MM / min(spacing))))
    body = ndimage.binary_erosion(tissue >= len(slices_hu) / 2, iterations=margin)
    parts, count = ndimage.label(body)  # the erosion cut thin links (a table under the neck)
    if count > 1:
        sizes = ndimage.sum_labels(body, parts, index=np.arange(1, count + 1))
        body = parts == 1 + int(np.argmax(sizes))
    body = ndimage.binary_fill_holes(body)
    if (frequency * body).any():  # else (no body found, e.g. a cropped field of view): all bone
        frequency *= body
    sigma = (SMOOTH_MM / spacing[0], SMOOTH_MM / spacing[1])
    smooth = ndimage.gaussian_filter(frequency / len(slices_hu), sigma=sigma, mode="constant")
    row, column = np.unravel_index(int(np.argmax(smooth)), shape)
    return float(row), float(column)


@dataclass(frozen=True)
class SpineRoi:
    """A square window of a slice, in native pixels: rows ``top .. top + side``, columns
    ``left .. left + side``. It may reach past the slice (padded with air when cropped)."""

    top: int
    left: int
    side: int

    def __post_init__(self):
        if self.side < 1:
            raise ValueError(f"side must be >= 1 pixel, got {self.side!r}")

    @classmethod
    def around(cls, centre: Sequence[float], pixel_spacing: Sequence[float],
               roi_mm: float) -> SpineRoi:  # fmt: skip
        """The square of ``roi_mm`` (on the finer pixel axis) centred on ``(row, column)``."""
        if not roi_mm > 0:
            raise ValueError(f"roi_mm must be > 0, got {roi_mm!r}")
        side = max(1, int(round(roi_mm / min(float(s) for s in pixel_spacing))))
        return cls(int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2)), side)

    def crop(self, hu: np.ndarray) -> np.ndarray:
        """The ``(side, side)`` float32 window of a 2-D slice, padded with its minimum."""
        hu = np.asarray(hu, dtype=np.float32)
        if hu.ndim != 2 or hu.size == 0:
            raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
        out = np.full((self.side, self.side), hu.min(), dtype=np.float32)
        r0, c0 = max(self.top, 0), max(self.left, 0)
        r1, c1 = min(self.top + self.side, hu.shape[0]), min(self.left + self.side, hu.shape[1])
        if r1 > r0 and c1 > c0:
            out[r0 - self.top : r1 - self.top, c0 - self.left : c1 - self.left] = hu[r0:r1, c0:c1]
        return out

    def yolo_label(self, box: Sequence[float], rows: int, columns: int):
        """Native ``[x, y, w, h]`` -> ``(label, clipped)``: the YOLO ``(cx, cy, w, h)`` of the box in
        the window image (normalised to it), clipped to the slice and the window; ``label`` is
        None when nothing of the box is left inside."""
        x, y, w, h = (float(v) for v in box)
        x1, y1 = max(x, 0.0, self.left), max(y, 0.0, self.top)
        x2 = min(x + w, float(columns), self.left + self.side)
        y2 = min(y + h, float(rows), self.top + self.side)
        if x2 <= x1 or y2 <= y1:
            return None, True
        clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
        x1, x2 = (x1 - self.left) / self.side, (x2 - self.left) / self.side
        y1, y2 = (y1 - self.top) / self.side, (y2 - self.top) / self.side
        return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), clipped

    def to_slice(self, boxes_xyxy: np.ndarray, image_size: int, rows: int,
                 columns: int) -> np.ndarray:  # fmt: skip
        """``(N, 4)`` ``x1, y1, x2, y2`` boxes of the ``image_size`` window image -> native slice
        pixels, clipped to the ``rows x columns`` slice."""
        boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4) * (self.side / image_size)
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] + self.left).clip(0, columns)
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] + self.top).clip(0, rows)
        return boxes

    def to_image(self, box: Sequence[float], image_size: int) -> tuple[float, float, float, float]:
        """Native ``[x, y, w, h]`` -> ``(x, y, w, h)`` in pixels of the ``image_size`` window image
        (not clipped: a box partly outside the window reaches past the image).

        Example:
            >>> SpineRoi(top=10, left=20, side=100).to_image([30, 60, 10, 20], image_size=50)
            (5.0, 25.0, 5.0, 10.0)
        """
        scale = image_size / self.side
        x, y, w, h = (float(v) for v in box)
        return (x - self.left) * scale, (y - self.top) * scale, w * scale, h * scale

    def to_json(self) -> list[int]:
        return [self.top, self.left, self.side]

    @classmethod
    def from_json(cls, data: Sequence[int]) -> SpineRoi:
        top, left, side = (int(v) for v in data)
        return cls(top, left, side)


def study_roi(slices_hu: Sequence[np.ndarray], pixel_spacing: Sequence[float],
              roi_mm: float) -> SpineRoi:  # fmt: skip
    """The window of ``roi_mm`` around the column of a series, from its :func:`roi_sample`
    slices (see the module)."""
    return SpineRoi.around(spine_centre(slices_hu, pixel_spacing), pixel_spacing, roi_mm)


def volume_roi(hu: np.ndarray, slice_numbers: Sequence[int], pixel_spacing: Sequence[float],
               roi_mm: float) -> SpineRoi:  # fmt: skip
    """:func:`study_roi` of a study held in memory (``(Z, rows, columns)`` HU in series order,
    with its slice numbers), from the same :func:`roi_sample` slices as :func:`read_study_roi`
    reads from its files."""
    index = {int(n): i for i, n in enumerate(slice_numbers)}
    sample = [hu[index[n]] for n in roi_sample(slice_numbers)]
    return study_roi(sample, pixel_spacing, roi_mm)


def read_study_roi(series_dir: str | os.PathLike, roi_mm: float,
                   decoder: str = "auto") -> SpineRoi:  # fmt: skip
    """:func:`study_roi` of a series folder of ``<n>.dcm`` files, reading only its
    :func:`roi_sample` slices."""
    from keras_cspine.errors import CSpineDataError
    from keras_cspine.io.dicom import read_slice

    folder = Path(series_dir)
    numbers = [int(p.stem) for p in folder.glob("*.dcm") if p.stem.isdigit()]
    if not numbers:
        raise CSpineDataError(folder, "no <n>.dcm slices to find the spine region in")
    slices, spacing = [], None
    for number in roi_sample(numbers):
        hu, meta = read_slice(folder / f"{number}.dcm", decoder=decoder)
        if slices and hu.shape != slices[0].shape:
            raise CSpineDataError(folder / f"{number}.dcm", f"slice of shape {hu.shape}, but "
                                  f"the series' slices are {slices[0].shape}")  # fmt: skip
        slices.append(hu)
        spacing = spacing or meta.pixel_spacing
    return study_roi(slices, spacing, roi_mm)
