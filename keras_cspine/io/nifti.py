"""Vertebra segmentations (NIfTI) aligned to their DICOM series, and per-slice vertebra presence
(paper Section 2.4, preprocessing: the masks are loaded, flipped and transposed to match the
DICOM slices, clipped and cast to uint8; they give the C1..C7 slice labels of stage 1).

The RSNA segmentations are stored "sagittally": read naively they come out flipped in z and
mirrored, and the usual fix (``seg[:, ::-1, ::-1].transpose(2, 1, 0)``) is a rule of thumb. Here
the alignment is derived from the geometry instead: the NIfTI affine (voxel -> RAS mm) is
compared with the series affine (voxel -> LPS mm, from ImagePositionPatient and
ImageOrientationPatient) with ``nibabel.orientations``, the array is flipped and transposed into
series order ``(Z, Y, X)``, and every corner voxel centre is then checked to land on the
corresponding DICOM voxel centre within half a voxel. Head-first and feet-first studies, or
segmentations stored in any axis order, come out right; a segmentation of another study, or with
a wrong affine, is refused.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np

from keras_cspine.errors import SegmentationError
from keras_cspine.io.dicom import SeriesMeta

__all__ = [
    "CERVICAL_LABELS",
    "align_segmentation",
    "load_segmentation",
    "vertebra_presence",
]

#: label values of C1..C7 in the RSNA segmentations (8..19 are T1..T12)
CERVICAL_LABELS = (1, 2, 3, 4, 5, 6, 7)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: largest affine entry accepted, in mm (a kilometre: anything beyond is a corrupt header)
_MAX_AFFINE_MM = 1e6


def load_segmentation(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a label volume: ``(uint8 data, 4x4 RAS affine)`` as stored in the file.

    Labels must be whole numbers in 0..255 (a float file holding 0.0, 1.0, ... is accepted).

    The voxel data the header announces is checked against what the file holds before any of it
    is read, so that a corrupt dimension cannot make the reader allocate gigabytes.

    Raises:
        SegmentationError: unreadable file, header and data of different sizes, not 3-D, or
            labels that are not 0..255 integers.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise SegmentationError(path, "segmentation file not found")
    try:
        img = nib.load(os.fspath(path))  # the header only
        _check_data_size(path, img)
        data = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
    except SegmentationError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel/gzip/numpy raise many types
        raise SegmentationError(
            path, f"cannot read NIfTI ({type(err).__name__}: {err})"
        ) from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise SegmentationError(path, f"expected a 3-D label volume, got shape {data.shape}")
    with np.errstate(all="ignore"):
        usable = (np.isfinite(affine).all() and np.abs(affine).max() <= _MAX_AFFINE_MM
                  and abs(np.linalg.det(affine[:3, :3])) >= 1e-9)  # fmt: skip
    if not usable:
        raise SegmentationError(
            path, f"unusable affine (singular, not finite, or entries beyond "
            f"{_MAX_AFFINE_MM:g} mm):\n{affine}",
        )  # fmt: skip
    if data.dtype.kind == "f":
        if not np.isfinite(data).all():
            raise SegmentationError(path, "labels contain NaN or infinite values")
        rounded = np.rint(data)
        if np.abs(data - rounded).max(initial=0.0) > 1e-3:
            raise SegmentationError(path, "labels are not whole numbers")
        data = rounded
    elif data.dtype.kind not in "iub":
        raise SegmentationError(path, f"labels have an unsupported type {data.dtype}")
    low, high = (data.min(), data.max()) if data.size else (0, 0)
    if low < 0 or high > 255:
        raise SegmentationError(path, f"labels must lie in 0..255, found {low}..{high}")
    return data.astype(np.uint8), affine


def _check_data_size(path: Path, img) -> None:
    """Refuse a header announcing more voxel data than the file holds (before reading it).

    For a gzip file the size comes from its trailer (ISIZE: the uncompressed size modulo 2**32),
    so more than 4 GiB of voxel data cannot be checked and is refused as implausible for a label
    volume (an RSNA segmentation holds about 80 MB).
    """
    shape = tuple(int(n) for n in img.shape)
    if any(n < 0 for n in shape):
        raise SegmentationError(path, f"negative dimension in the header: shape {shape}")
    dtype = img.get_data_dtype()
    needed = img.header.get_data_offset() + int(np.prod(shape, dtype=object)) * dtype.itemsize
    with open(path, "rb") as handle:
        head = handle.read(2)
        size = handle.seek(0, os.SEEK_END)
        compressed = path.name.lower().endswith(".gz")
        if compressed and head != b"\x1f\x8b":
            raise SegmentationError(path, "named .gz but not gzip-compressed")
        if compressed:
            if size < 18:
                raise SegmentationError(path, f"truncated gzip file ({size} bytes)")
            handle.seek(-4, os.SEEK_END)
            available = int.from_bytes(handle.read(4), "little")
        else:
            available = size
    if compressed and needed >= 2**32:
        raise SegmentationError(
            path, f"the header announces shape {shape} of {dtype}: {needed} bytes, over 4 GiB "
            "(a corrupt header?)",
        )  # fmt: skip
    if needed > available:
        holds = f"{available} bytes uncompressed" if compressed else f"{available} bytes"
        raise SegmentationError(
            path, f"the header announces shape {shape} of {dtype} ({needed} bytes with the "
            f"header), but the file holds {holds}: a truncated file or a corrupt header",
        )  # fmt: skip


def align_segmentation(
    path: str | os.PathLike, series: SeriesMeta, *, tolerance_voxels: float = 0.5
) -> np.ndarray:
    """Load a NIfTI segmentation and return it in series order: uint8 ``(Z, Y, X)``.

    Index ``[z, y, x]`` of the result is the label of DICOM row ``y``, column ``x`` of the
    ``z``-th slice of ``series`` (superior first), whatever the NIfTI axis order, flips or the
    study's head-first / feet-first numbering.

    Args:
        path: the ``.nii`` / ``.nii.gz`` file.
        series: the :class:`~keras_cspine.io.dicom.SeriesMeta` of the study.
        tolerance_voxels: largest distance, in voxels along each series axis, allowed between
            a NIfTI voxel centre and the DICOM voxel centre it is matched with.

    Raises:
        SegmentationError: unreadable file, shape mismatch (naming both shapes) or geometry that
            does not match the series.
    """
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    path = Path(path)
    data, nii_affine = load_segmentation(path)
    z, y, x = series.shape
    series_ras = _LPS_TO_RAS @ series.affine  # (column, row, series index) -> RAS mm
    nii_ornt = io_orientation(nii_affine)
    if np.isnan(nii_ornt).any() or len(set(nii_ornt[:, 0].tolist())) != 3:
        raise SegmentationError(
            path, "the affine does not map the three array axes onto three distinct patient "
            f"axes (too oblique or degenerate), so it cannot be matched to the series:\n"
            f"{nii_affine}",
        )  # fmt: skip
    transform = ornt_transform(nii_ornt, io_orientation(series_ras))
    aligned = apply_orientation(data, transform)  # axes now (column, row, series index)
    if aligned.shape != (x, y, z):
        raise SegmentationError(
            path, f"shape {data.shape} (as {aligned.shape[::-1]} in series axes Z, Y, X) does "
            f"not match the series {series.folder}: (Z, Y, X) = {(z, y, x)}",
        )  # fmt: skip
    aligned_affine = nii_affine @ inv_ornt_aff(transform, data.shape)
    corners = np.array([[*c, 1.0] for c in itertools.product((0, x - 1), (0, y - 1), (0, z - 1))])
    offset_mm = (aligned_affine @ corners.T - series_ras @ corners.T)[:3]
    offset_vox = np.linalg.solve(series_ras[:3, :3], offset_mm)
    worst = float(np.abs(offset_vox).max())
    if worst > tolerance_voxels:
        raise SegmentationError(
            path, f"geometry does not match the series {series.folder}: voxel centres lie up to "
            f"{worst:.2f} voxels ({float(np.linalg.norm(offset_mm, axis=0).max()):.2f} mm) from "
            f"the DICOM slice positions (tolerance {tolerance_voxels} voxel)",
        )  # fmt: skip
    return np.ascontiguousarray(aligned.transpose(2, 1, 0))


def vertebra_presence(seg_zyx: np.ndarray, min_voxels: int = 1) -> np.ndarray:
    """Per-slice presence of C1..C7: uint8 ``(Z, 7)``, 1 where the slice has at least
    ``min_voxels`` voxels of that label. Thoracic labels (8..19) are ignored.

    Example:
        >>> seg = np.zeros((2, 4, 4), np.uint8); seg[0, 0, 0] = 2; seg[1, 1:3, 1:3] = 9
        >>> vertebra_presence(seg).tolist()
        [[0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0]]
    """
    seg = np.asarray(seg_zyx)
    if seg.ndim != 3:
        raise ValueError(f"expected a (Z, Y, X) label volume, got shape {seg.shape}")
    if seg.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got dtype {seg.dtype}")
    if not isinstance(min_voxels, int | np.integer) or min_voxels < 1:
        raise ValueError(f"min_voxels must be a positive integer, got {min_voxels!r}")
    presence = np.zeros((seg.shape[0], len(CERVICAL_LABELS)), dtype=np.uint8)
    top = max(CERVICAL_LABELS) + 1
    labels = list(CERVICAL_LABELS)
    for k, plane in enumerate(seg):
        flat = plane.ravel()
        if seg.dtype != np.uint8:
            flat = flat[(flat >= 0) & (flat < top)].astype(np.intp)
        presence[k] = np.bincount(flat, minlength=top)[labels] >= min_voxels
    return presence
