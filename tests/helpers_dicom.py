"""Shared test helpers: small CT slices and series written with pydicom, compressed copies,
and RSNA-style NIfTI segmentations, all built from explicit geometry.

The geometry is computed here from first principles (direction cosines, positions, spacings), not
with ``keras_cspine.io``, so that the readers are checked against an independent construction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)

#: transfer syntax short names accepted by the writers below
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "jpeg_lossless": JPEGLosslessSV1,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
}


def ct_dataset(
    hu: np.ndarray,
    *,
    position: Sequence[float] = (0.0, 0.0, 0.0),
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.5, 0.5),
    thickness: float | None = 1.0,
    instance_number: int = 1,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    signed: bool = False,
    bits_stored: int = 16,
    photometric: str = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Dataset:
    """A single-frame CT Image dataset holding ``hu`` (rows, columns) as stored integers.

    Stored values are ``round((hu - intercept) / slope)`` in uint16 (``signed=False``) or int16;
    with ``photometric="MONOCHROME1"`` they are also inverted over the ``bits_stored`` range, so
    that a correct reader returns ``hu`` again.
    """
    hu = np.asarray(hu, dtype=np.float64)
    s = 1.0 if slope is None else slope
    b = 0.0 if intercept is None else intercept
    stored = np.rint((hu - b) / s)
    lo, hi = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (0, 2**bits_stored - 1)
    if stored.min() < lo or stored.max() > hi:
        raise ValueError(f"values {stored.min()}..{stored.max()} do not fit {bits_stored} bits")
    if photometric == "MONOCHROME1":
        stored = lo + hi - stored
    stored = stored.astype(np.int16 if signed else np.uint16)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.Modality = "CT"
    ds.PatientID = "TEST"
    ds.InstanceNumber = int(instance_number)
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if thickness is not None:
        ds.SliceThickness = float(thickness)
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.PixelData = stored.tobytes()
    return ds


def save(ds: Dataset, path: str | os.PathLike, syntax: str = "explicit") -> Path:
    """Write ``ds`` to ``path`` with the transfer syntax ``syntax`` (a key of :data:`SYNTAXES`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if syntax == "jpeg_lossless":
        plain = path.with_name(path.name + ".plain")
        ds.save_as(plain, enforce_file_format=True)
        to_jpeg_lossless(plain, path)
        plain.unlink()
        return path
    if syntax in ("rle", "j2k"):
        ds = ds.copy()
        ds.compress(SYNTAXES[syntax])
    elif syntax != "explicit":
        raise ValueError(f"unknown syntax {syntax!r}")
    ds.save_as(path, enforce_file_format=True)
    return path


def to_jpeg_lossless(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Re-encode ``src`` as JPEG Lossless SV1 (1.2.840.10008.1.2.4.70) with python-gdcm."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(os.fspath(src))
    if not reader.Read():
        raise RuntimeError(f"gdcm cannot read {src}")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise RuntimeError(f"gdcm cannot encode {src} as JPEG lossless")
    writer = gdcm.ImageWriter()
    writer.SetFileName(os.fspath(dst))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    if not writer.Write():
        raise RuntimeError(f"gdcm cannot write {dst}")
    return Path(dst)


@dataclass(frozen=True)
class SeriesGeometry:
    """What :func:`write_series` wrote, in series order (superior -> inferior)."""

    paths: tuple[Path, ...]  # file of each series index
    numbers: tuple[int, ...]  # file number of each series index
    positions: np.ndarray  # (Z, 3) ImagePositionPatient, LPS mm
    row_cosine: np.ndarray  # direction of increasing column index
    col_cosine: np.ndarray  # direction of increasing row index
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    shape: tuple[int, int, int]  # (Z, Y, X)
    study_uid: str


def tilted_orientation(degrees: float) -> tuple[float, ...]:
    """Axial orientation with a gantry tilt of ``degrees`` about the patient's left-right axis."""
    t = np.deg2rad(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))


def write_series(
    folder: str | os.PathLike,
    hu: np.ndarray,
    *,
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    slice_step: float = 1.25,
    orientation: Sequence[float] = AXIAL,
    top: Sequence[float] = (-20.0, -15.0, 40.0),
    head_first: bool = True,
    syntax: str = "explicit",
    first_number: int = 1,
    shuffle_names: bool = False,
    **dataset_kwargs,
) -> SeriesGeometry:
    """Write ``hu`` (Z, Y, X), given in series order (superior first), as ``<n>.dcm`` files.

    Slice ``s`` sits at ``top - s * slice_step * (0, 0, 1)`` (LPS; the table moves along z, so a
    tilted ``orientation`` gives a sheared stack). Head-first numbering gives file number
    ``first_number`` to the most superior slice; feet-first to the most inferior one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hu = np.asarray(hu)
    z = hu.shape[0]
    study_uid = dataset_kwargs.pop("study_uid", None) or generate_uid()
    series_uid = dataset_kwargs.pop("series_uid", None) or generate_uid()
    positions = np.array([np.asarray(top, float) - s * slice_step * np.array([0, 0, 1.0])
                          for s in range(z)])  # fmt: skip
    numbers = [first_number + (s if head_first else z - 1 - s) for s in range(z)]
    paths = []
    for s in range(z):
        ds = ct_dataset(
            hu[s], position=positions[s], orientation=orientation, pixel_spacing=pixel_spacing,
            instance_number=numbers[s], study_uid=study_uid, series_uid=series_uid,
            **dataset_kwargs,
        )  # fmt: skip
        paths.append(save(ds, folder / f"{numbers[s]}.dcm", syntax))
    cos = np.asarray(orientation, float)
    return SeriesGeometry(
        paths=tuple(paths), numbers=tuple(numbers), positions=positions,
        row_cosine=cos[:3], col_cosine=cos[3:], pixel_spacing=tuple(pixel_spacing),
        shape=tuple(hu.shape), study_uid=study_uid,
    )  # fmt: skip


def rsna_nifti_affine(geom: SeriesGeometry) -> np.ndarray:
    """RAS affine of the RSNA layout: i = column, j = row reversed, k = slices by increasing z."""
    z, y, _ = geom.shape
    dr, dc = geom.pixel_spacing
    step = (geom.positions[-1] - geom.positions[0]) / max(z - 1, 1)  # series order, goes inferior
    lps = np.eye(4)
    lps[:3, 0] = geom.row_cosine * dc
    lps[:3, 1] = -geom.col_cosine * dr
    lps[:3, 2] = -step
    lps[:3, 3] = geom.positions[-1] + geom.col_cosine * dr * (y - 1)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def rsna_nifti_data(seg_zyx: np.ndarray) -> np.ndarray:
    """The RSNA array ``data[i, j, k]`` of a segmentation given in series order ``(Z, Y, X)``."""
    return np.ascontiguousarray(np.asarray(seg_zyx)[::-1, ::-1, :].transpose(2, 1, 0))


def write_nifti(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray) -> Path:
    """Save ``data`` with ``affine`` (sform and qform) as NIfTI-1."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), None)
    img.set_sform(affine, code=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        try:
            img.set_qform(affine, code=1)
        except nib.spatialimages.HeaderDataError:  # a singular affine, written on purpose
            img.set_qform(None, code=0)
    nib.save(img, os.fspath(path))
    return Path(path)


def phantom(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A small HU volume: air, a soft-tissue disc, a bright off-centre "bone" that moves with z,
    plus noise; asymmetric in every axis so that flips and transposes are caught."""
    rng = np.random.default_rng(seed)
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    vol = np.full(shape, -1000.0)
    body = (yy - y / 2) ** 2 + (xx - x / 2) ** 2 < (0.45 * min(x, y)) ** 2
    vol[body] = 40.0
    bone = (np.abs(yy - y * 0.35 - zz * 0.5) < y / 8) & (np.abs(xx - x * 0.6) < x / 6)
    vol[bone & body] = 700.0 + 20 * zz[bone & body]
    vol += rng.normal(0, 10, shape)
    return np.clip(np.rint(vol), -1024, 3000)


def segmentation(shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 labels (Z, Y, X): bands of C1..C7 down the series, one T1 band, an off-centre box."""
    z, y, x = shape
    seg = np.zeros(shape, np.uint8)
    for s in range(z):
        label = 1 + (s * 8) // z  # 1..8 from top to bottom
        seg[s, y // 4 : y // 2, x // 3 : x // 3 + max(2, s % 5 + 2)] = label
    return seg
