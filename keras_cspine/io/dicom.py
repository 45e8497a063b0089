"""DICOM slices and series: decoding, Hounsfield units and geometry (the paper's dataset and the
input of its Algorithm 1, Section 2.4; RSNA 2022 data layout).

The paper's Algorithm 1 reads each axial CT slice of the RSNA 2022 Cervical Spine Fracture
Detection data with pydicom-style steps (``dcmread``, ``pixel_array``). This module does the same
job with the care the data needs (the decoders below are this package's choice):

- **Hounsfield units**: stored values -> ``value * RescaleSlope + RescaleIntercept`` as float32.
  A missing RescaleSlope / RescaleIntercept means the identity (slope 1, intercept 0), which is
  what the DICOM Modality LUT prescribes when neither the tags nor a Modality LUT Sequence are
  present; the slice is still read, and ``SliceMeta.warnings`` / ``SeriesMeta.warnings`` say so
  (a CT Image must carry both tags, so the HU of such a slice rest on an assumption). A slice with
  a Modality LUT Sequence instead of the tags is refused (this reader does not apply LUTs).
  ``MONOCHROME1`` slices are inverted over the BitsStored range first, so that larger
  always means denser.
- **Compressed transfer syntaxes**: JPEG lossless (1.2.840.10008.1.2.4.57/.70, about a third of the
  RSNA studies), JPEG 2000, RLE and the others pydicom supports. ``decoder="auto"`` uses dicomsdl
  (the ``fast`` extra; about 5x faster than pydicom + pylibjpeg on JPEG lossless, bit-identical)
  for the syntaxes it handles, and pydicom otherwise. A slice with no usable decoder raises an
  error naming the file, the transfer syntax and the package to install.
- **Validation before decoding**: every file is parsed with pydicom first; the pixel data length
  (native syntaxes) or the codestream's own header (JPEG, JPEG-LS, JPEG 2000, HTJ2K: size,
  components, bit depth, and for JPEG the marker segments up to the first scan) is checked against
  Rows x Columns x BitsAllocated. This gives clear errors for truncated or inconsistent files, and
  it is also what makes the native decoders safe to use: dicomsdl and python-gdcm crash the
  interpreter on such files instead of raising. dicomsdl, which parses the header itself, decodes
  only when it finds the pixel data where pydicom found and checked it; pydicom's plugins are
  tried with python-gdcm last (only when nothing else decodes the syntax), and a panic of a Rust
  decoder is reported like any other decoding error. Every corrupt file ends in a
  DicomReadError naming it (``tests/test_fuzz_readers.py`` checks this on thousands of mutated
  files).
- **Series geometry**: slices are ordered by their position along the slice normal (the cross
  product of the ImageOrientationPatient direction cosines), never by file number or
  InstanceNumber. The series order is superior -> inferior (docs/internals.md); the LPS affine of
  the stack maps (column, row, series index) to millimetres, gantry tilt (shear) included.

Bad input raises :class:`keras_cspine.errors.DicomReadError` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.errors import DicomReadError, MissingDependencyError

__all__ = [
    "DECODERS",
    "RESCALE_INTERCEPT_DEFAULTED",
    "RESCALE_SLOPE_DEFAULTED",
    "SeriesMeta",
    "SliceMeta",
    "dicomsdl_available",
    "list_series_files",
    "pydicom_decoder",
    "read_dataset",
    "read_series",
    "read_series_meta",
    "read_slice",
    "series_from_slices",
    "transfer_syntax_name",
]

#: accepted values of the ``decoder`` argument
DECODERS = ("auto", "pydicom", "dicomsdl")

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_NATIVE_LE = frozenset({_IMPLICIT_LE, _EXPLICIT_LE})
_JPEG_LOSSLESS = frozenset({"1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"})
_JPEG_2000 = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
#: syntaxes whose codestream header is checked against the DICOM header before decoding: JPEG
#: (baseline, extended, lossless), JPEG-LS, JPEG 2000 and HTJ2K. A decoder fed a codestream
#: larger or deeper than Rows x Columns x BitsAllocated can write past its buffer: python-gdcm
#: aborts the interpreter on such files, dicomsdl crashes.
_JPEG_FAMILY = _JPEG_LOSSLESS | _JPEG_LS | {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51"}
_J2K_FAMILY = _JPEG_2000 | {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                            "1.2.840.10008.1.2.4.203"}  # fmt: skip
#: transfer syntaxes handed to dicomsdl (checked bit-identical to pydicom in the tests). RLE is
#: left to pydicom: dicomsdl mis-handles some RLE files and gains nothing there. Only 16-bit data
#: (every CT) goes to dicomsdl: its 8-bit JPEG decoder returns garbage on the first call in a
#: process ("Corrupt JPEG data: bad Huffman code", dicomsdl 0.109.4).
_DICOMSDL_SYNTAXES = _NATIVE_LE | _JPEG_LOSSLESS | _JPEG_2000

#: what to install to decode a compressed transfer syntax (first choice, then alternatives)
_INSTALL_HINTS = {
    **dict.fromkeys(_JPEG_LOSSLESS, ("pylibjpeg pylibjpeg-libjpeg", "python-gdcm, dicomsdl")),
    **dict.fromkeys(_JPEG_2000, ("pylibjpeg pylibjpeg-openjpeg", "python-gdcm, dicomsdl")),
    "1.2.840.10008.1.2.4.50": ("pylibjpeg pylibjpeg-libjpeg", "pillow, python-gdcm"),
    "1.2.840.10008.1.2.4.51": ("pylibjpeg pylibjpeg-libjpeg", "pillow, python-gdcm"),
    "1.2.840.10008.1.2.4.80": ("pyjpegls", "python-gdcm"),
    "1.2.840.10008.1.2.4.81": ("pyjpegls", "python-gdcm"),
    "1.2.840.10008.1.2.5": ("pylibjpeg-rle", "numpy (pydicom's own RLE decoder)"),
}

#: entries of ``SliceMeta.warnings`` for a slice without RescaleSlope / RescaleIntercept
RESCALE_SLOPE_DEFAULTED = "RescaleSlope missing: taken as 1"
RESCALE_INTERCEPT_DEFAULTED = "RescaleIntercept missing: taken as 0"

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_NUMERIC_NAME = re.compile(r"^\d+$")
_PIXEL_DATA_TAG = 0x7FE00010


# --------------------------------------------------------------------------------------------
# Metadata records (the contract of docs/internals.md)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SliceMeta:
    """Header facts of one DICOM slice.

    Geometry fields hold NaN when the tag is absent; :func:`read_slice` tolerates that,
    :func:`read_series_meta` does not.

    ``warnings`` (the last field, empty by default) lists what was assumed to read the slice, in
    words: :data:`RESCALE_SLOPE_DEFAULTED` and/or :data:`RESCALE_INTERCEPT_DEFAULTED` when the
    tag is missing and 1 / 0 was used (the DICOM default; a CT Image should carry both tags).
    :attr:`rescale_defaulted` tells whether either was.
    """

    path: str
    study_uid: str
    series_uid: str
    sop_uid: str
    instance_number: int  # InstanceNumber (RSNA: equals the file number); 0 when absent
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (row spacing, column spacing) mm
    image_position: tuple[float, float, float]  # ImagePositionPatient, LPS mm
    image_orientation: tuple[float, ...]  # 6 direction cosines
    slice_thickness: float | None
    rescale_slope: float
    rescale_intercept: float
    photometric_interpretation: str
    transfer_syntax_uid: str
    warnings: tuple[str, ...] = ()  # assumptions made to read the slice (see the docstring)

    @property
    def rescale_defaulted(self) -> bool:
        """True when RescaleSlope or RescaleIntercept was missing and taken as 1 or 0."""
        return RESCALE_SLOPE_DEFAULTED in self.warnings or RESCALE_INTERCEPT_DEFAULTED in self.warnings


@dataclass(frozen=True, eq=False)
class SeriesMeta:
    """Headers of a series folder, in series order (superior -> inferior).

    Attributes:
        folder: the series folder.
        study_uid: StudyInstanceUID of its slices.
        slices: one :class:`SliceMeta` per file, in series order.
        slice_numbers: the file numbers (``<n>.dcm``) in series order.
        positions_mm: position of each slice along ``normal``, decreasing.
        spacing_mm: median distance between neighbouring slices along the normal.
        normal: unit slice normal in LPS, oriented superior (positive z component).
        head_first: True when file numbers increase going inferior (slice 1 at the top).
        affine: 4x4 LPS affine mapping (column, row, series index, 1) to millimetres.
        warnings: the slices' ``SliceMeta.warnings``, one entry per kind with the number of
            slices and the first file names, e.g. ``"RescaleSlope missing: taken as 1 (60 of 60
            slices: 1.dcm, 2.dcm, 3.dcm, ...)"``; empty when nothing was assumed. For a study's
            record; :attr:`rescale_defaulted` tells whether any slice had its rescale defaulted.
    """

    folder: str
    study_uid: str
    slices: tuple[SliceMeta, ...]
    slice_numbers: tuple[int, ...]
    positions_mm: np.ndarray
    spacing_mm: float
    normal: np.ndarray
    head_first: bool
    affine: np.ndarray
    warnings: tuple[str, ...] = ()

    @property
    def rescale_defaulted(self) -> bool:
        """True when some slice had RescaleSlope or RescaleIntercept missing (taken as 1 / 0)."""
        return any(s.rescale_defaulted for s in self.slices)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)`` of the series volume."""
        return (len(self.slices), self.slices[0].rows, self.slices[0].columns)


# --------------------------------------------------------------------------------------------
# Optional dicomsdl
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _dicomsdl():
    try:
        import dicomsdl
    except ImportError:
        return None
    return dicomsdl


def dicomsdl_available() -> bool:
    """True when the optional fast decoder dicomsdl (``pip install 'keras_cspine[fast]'``) imports."""
    return _dicomsdl() is not None


def transfer_syntax_name(uid: str) -> str:
    """The registered name of a transfer syntax UID (the UID itself when unknown)."""
    from pydicom.uid import UID

    name = UID(uid).name
    return name if name and name != uid else uid


def _check_decoder(decoder: str) -> None:
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    if decoder == "dicomsdl" and not dicomsdl_available():
        raise MissingDependencyError("dicomsdl", "fast", "decoder='dicomsdl'")


# --------------------------------------------------------------------------------------------
# Reading one file
# --------------------------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DicomReadError(path, "file not found") from None
    except IsADirectoryError:
        raise DicomReadError(path, "is a folder, not a DICOM file") from None
    except OSError as err:
        raise DicomReadError(path, f"cannot read file: {err.strerror or err}") from err


def read_dataset(path: str | os.PathLike, *, stop_before_pixels: bool = False):
    """The pydicom Dataset of a file, with read errors raised as DicomReadError naming it."""
    return _parse(Path(path), Path(path), stop_before_pixels=stop_before_pixels)


def _parse(path: Path, source: Any, *, stop_before_pixels: bool):
    """pydicom Dataset of ``source`` (a path or bytes), errors turned into DicomReadError."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    fp = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, stop_before_pixels=stop_before_pixels)
    except FileNotFoundError:
        raise DicomReadError(path, "file not found") from None
    except InvalidDicomError:
        raise DicomReadError(
            path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)"
        ) from None
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on corrupt input
        raise DicomReadError(path, f"unreadable DICOM ({type(err).__name__}: {err})") from err
    for warning in caught:
        message = str(warning.message)
        if "end of file" in message.lower():  # pydicom keeps what it read and only warns
            raise DicomReadError(path, f"file is truncated ({message.split(' in file ')[0]})")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise DicomReadError(
            path, "no TransferSyntaxUID in the file meta information (truncated file?)"
        )
    from pydicom.uid import UID

    syntax = UID(str(ds.file_meta.TransferSyntaxUID))
    if not syntax.is_transfer_syntax:
        raise DicomReadError(
            path, f"TransferSyntaxUID {_short(syntax)} is not a transfer syntax (corrupt file meta "
            "information?)",
        )  # fmt: skip
    return ds


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters for error messages."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def _floats(ds, path: Path, keyword: str, count: int, *, required: bool) -> tuple[float, ...]:
    """A multi-valued decimal tag as floats; NaNs when absent and not required."""
    value = _get(ds, path, keyword)
    if value is None or value == "":
        if required:
            raise DicomReadError(path, f"missing {keyword}, needed to place the slice in its series")
        return (float("nan"),) * count
    items = [value] if isinstance(value, str | bytes | int | float) else list(value)
    try:
        values = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise DicomReadError(path, f"{keyword} is not numeric: {_short(value)}") from None
    if len(values) != count or not all(np.isfinite(values)):
        raise DicomReadError(path, f"{keyword} must hold {count} finite numbers, got {_short(value)}")
    return values


def _get(ds, path: Path, keyword: str) -> Any:
    """``ds.get(keyword)``; a value pydicom cannot convert is a DicomReadError."""
    try:
        return ds.get(keyword)
    except Exception as err:  # noqa: BLE001 - pydicom converts lazily, on access
        raise DicomReadError(path, f"{keyword} cannot be read ({err})") from err


def _number(ds, path: Path, keyword: str, default: float | None = None) -> float | None:
    value = _get(ds, path, keyword)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DicomReadError(path, f"{keyword} is not a number: {_short(value)}") from None
    if not np.isfinite(number):
        raise DicomReadError(path, f"{keyword} is not finite: {_short(value)}")
    return number


def _required_int(ds, path: Path, keyword: str) -> int:
    value = _get(ds, path, keyword)
    if value is None or value == "":
        raise DicomReadError(path, f"missing {keyword}: not an image slice, or a truncated header")
    try:
        number = float(value)  # a list of values (wrong multiplicity) or text raise here
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number != int(number):
        raise DicomReadError(path, f"{keyword} is not a single whole number: {_short(value)}")
    return int(number)


def _check_greyscale(ds, path: Path) -> str:
    """The PhotometricInterpretation of a single-frame greyscale slice (else an error)."""
    photometric = str(_get(ds, path, "PhotometricInterpretation") or "").strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomReadError(
            path, f"expected a greyscale CT slice (MONOCHROME1/2), got PhotometricInterpretation "
            f"{photometric or 'missing'}",
        )  # fmt: skip
    samples = int(_number(ds, path, "SamplesPerPixel", 1) or 1)
    frames = int(_number(ds, path, "NumberOfFrames", 1) or 1)
    if samples != 1 or frames != 1:
        raise DicomReadError(
            path, f"expected one greyscale frame, got SamplesPerPixel={samples}, "
            f"NumberOfFrames={frames}",
        )  # fmt: skip
    return photometric


def _slice_meta(ds, path: Path, *, require_geometry: bool) -> SliceMeta:
    """SliceMeta of a parsed dataset; checks what every CT slice must have."""
    rows = _required_int(ds, path, "Rows")
    columns = _required_int(ds, path, "Columns")
    if rows < 1 or columns < 1:
        raise DicomReadError(path, f"empty image: Rows={rows}, Columns={columns}")
    photometric = _check_greyscale(ds, path)
    slope = _number(ds, path, "RescaleSlope", None)
    intercept = _number(ds, path, "RescaleIntercept", None)
    notes = _rescale_notes(ds, path, slope, intercept)
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    orientation = _floats(ds, path, "ImageOrientationPatient", 6, required=require_geometry)
    if require_geometry:
        row_cos, col_cos = np.asarray(orientation[:3]), np.asarray(orientation[3:])
        if (abs(np.linalg.norm(row_cos) - 1) > 0.01 or abs(np.linalg.norm(col_cos) - 1) > 0.01
                or abs(float(row_cos @ col_cos)) > 0.01):  # fmt: skip
            raise DicomReadError(
                path, f"ImageOrientationPatient {orientation} is not two orthogonal unit vectors"
            )
    spacing = _floats(ds, path, "PixelSpacing", 2, required=require_geometry)
    if require_geometry and min(spacing) <= 0:
        raise DicomReadError(path, f"PixelSpacing must be positive, got {spacing}")
    return SliceMeta(
        path=str(path),
        study_uid=str(_get(ds, path, "StudyInstanceUID") or ""),
        series_uid=str(_get(ds, path, "SeriesInstanceUID") or ""),
        sop_uid=str(_get(ds, path, "SOPInstanceUID") or ""),
        instance_number=int(_number(ds, path, "InstanceNumber", 0)),
        rows=rows,
        columns=columns,
        pixel_spacing=spacing,
        image_position=_floats(ds, path, "ImagePositionPatient", 3, required=require_geometry),
        image_orientation=orientation,
        slice_thickness=_number(ds, path, "SliceThickness", None),
        rescale_slope=float(slope),
        rescale_intercept=float(intercept),
        photometric_interpretation=photometric,
        transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
        warnings=notes,
    )


def _rescale_notes(ds, path: Path, slope: float | None, intercept: float | None) -> tuple[str, ...]:
    """Check RescaleSlope / RescaleIntercept (None: absent); the notes for SliceMeta.warnings."""
    if slope == 0:
        raise DicomReadError(path, "RescaleSlope is 0")
    if slope is not None and not _F32_TINY <= abs(slope) <= _F32_MAX:
        raise DicomReadError(path, f"RescaleSlope {slope:g} is outside the float32 range of HU")
    if intercept is not None and abs(intercept) > _F32_MAX:
        raise DicomReadError(path, f"RescaleIntercept {intercept:g} is outside the float32 range")
    notes = tuple(note for value, note in ((slope, RESCALE_SLOPE_DEFAULTED),
                                           (intercept, RESCALE_INTERCEPT_DEFAULTED))
                  if value is None)  # fmt: skip
    if notes and _get(ds, path, "ModalityLUTSequence"):
        raise DicomReadError(
            path, "the stored values are mapped by a Modality LUT Sequence instead of "
            "RescaleSlope/RescaleIntercept; this reader does not apply LUTs",
        )  # fmt: skip
    return notes


def _codestream_size(frame: bytes, syntax: str) -> tuple[int, int, int, int] | None:
    """(rows, columns, components, bits per sample) declared by a JPEG, JPEG-LS, JPEG 2000 or
    HTJ2K codestream; None when no frame header is found."""
    if syntax in _JPEG_FAMILY:
        # walk the marker segments from SOI to the first scan (SOS): the frame header gives the
        # size; a Huffman lossless frame also needs its tables (DHT) before the scan
        markers = _SOF_MARKERS | {0xF7} if syntax in _JPEG_LS else _SOF_MARKERS  # F7: SOF55
        i = 2 if frame[:2] == b"\xff\xd8" else -1
        size, huffman_tables = None, False
        while 0 <= i < len(frame) - 3:
            if frame[i] != 0xFF:
                return None
            marker = frame[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            length = int.from_bytes(frame[i + 2 : i + 4], "big")
            if length < 2 or i + 2 + length > len(frame):
                return None  # a segment running past the end: corrupt
            if marker in markers and size is None and length >= 8:
                rows = int.from_bytes(frame[i + 5 : i + 7], "big")
                columns = int.from_bytes(frame[i + 7 : i + 9], "big")
                size = (rows, columns, frame[i + 9], frame[i + 4], marker)
            elif marker == 0xC4:
                huffman_tables = True
            elif marker == 0xDA:  # SOS
                if size is None or (size[4] in (0xC3, 0xC7) and not huffman_tables):
                    return None
                return size[:4]
            i += 2 + length
        return None
    if syntax in _J2K_FAMILY:
        i = frame.find(b"\xff\x4f\xff\x51")  # SOC then SIZ, also inside a JP2 wrapper
        if i < 0 or len(frame) < i + 43:
            return None
        x, y, x0, y0 = (int.from_bytes(frame[i + 8 + 4 * k : i + 12 + 4 * k], "big")
                        for k in range(4))  # fmt: skip
        components = int.from_bytes(frame[i + 40 : i + 42], "big")
        return y - y0, x - x0, components, (frame[i + 42] & 0x7F) + 1
    return None


@dataclass(frozen=True)
class _Layout:
    """How the stored values are laid out (from the header, checked against the pixel data)."""

    rows: int
    columns: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    checked: bool = True  # pixel data size verified (else dicomsdl must not see it)
    pixel_offset: int | None = None  # where pydicom found the PixelData value in the file
    pixel_length: int = 0  # its length in bytes (native syntaxes) or of its fragments


def _pixel_layout(ds, path: Path, syntax: str) -> _Layout:
    """Check that PixelData is present and consistent with Rows x Columns, before any decoder
    sees it (dicomsdl crashes the interpreter on truncated or mis-sized pixel data)."""
    rows = _required_int(ds, path, "Rows")
    columns = _required_int(ds, path, "Columns")
    if rows < 1 or columns < 1:
        raise DicomReadError(path, f"empty image: Rows={rows}, Columns={columns}")
    _check_greyscale(ds, path)
    if "PixelData" not in ds:
        raise DicomReadError(path, "no PixelData element (not an image, or the file is truncated)")
    bits = int(_number(ds, path, "BitsAllocated", 0))
    if bits not in (8, 16, 32):
        raise DicomReadError(path, f"unsupported BitsAllocated {bits} for a CT slice")
    stored_bits = int(_number(ds, path, "BitsStored", bits))
    if not 1 <= stored_bits <= bits:
        raise DicomReadError(path, f"BitsStored {stored_bits} does not fit BitsAllocated {bits}")
    signed = int(_number(ds, path, "PixelRepresentation", 0)) == 1
    try:
        element = ds.get_item(_PIXEL_DATA_TAG)  # raw: no conversion, no copy
    except Exception as err:  # noqa: BLE001 - pydicom converts lazily: a bad VR raises here
        raise DicomReadError(path, f"PixelData cannot be read ({err})") from err
    if not isinstance(element.value, bytes | bytearray):
        raise DicomReadError(
            path, f"PixelData is not a byte string (VR {getattr(element, 'VR', None)!s}): a "
            "corrupt element header",
        )  # fmt: skip
    layout = _Layout(rows, columns, bits, stored_bits, signed,
                     pixel_offset=getattr(element, "value_tell", None),
                     pixel_length=len(element.value))  # fmt: skip
    from pydicom.uid import UID

    if not UID(syntax).is_encapsulated:
        expected = rows * columns * bits // 8
        found = len(element.value)
        if found not in (expected, expected + 1):  # one padding byte allowed
            raise DicomReadError(
                path, f"pixel data holds {found} bytes but Rows x Columns = {rows} x "
                f"{columns} at {bits} bits needs {expected} (truncated file, or wrong "
                "Rows/Columns)",
            )  # fmt: skip
        return layout
    from pydicom.encaps import generate_frames

    try:
        frame = next(generate_frames(element.value, number_of_frames=1))
    except Exception as err:  # noqa: BLE001 - malformed encapsulation
        raise DicomReadError(path, f"malformed encapsulated pixel data ({err})") from err
    size = _codestream_size(frame, syntax)
    if size is None:
        if syntax in _JPEG_FAMILY or syntax in _J2K_FAMILY:
            raise DicomReadError(
                path, f"no complete {transfer_syntax_name(syntax)} frame header found in the "
                "pixel data (corrupt or truncated codestream)",
            )  # fmt: skip
        return dataclasses.replace(layout, checked=False)  # RLE and others: not checked
    if (size[0], size[1]) != (rows, columns):
        raise DicomReadError(
            path, f"the {transfer_syntax_name(syntax)} codestream is {size[0]} x {size[1]} "
            f"pixels but Rows x Columns say {rows} x {columns}",
        )  # fmt: skip
    if size[2] != 1:
        raise DicomReadError(path, f"the codestream has {size[2]} components, expected 1")
    if not 1 <= size[3] <= bits:
        raise DicomReadError(
            path, f"the codestream holds {size[3]}-bit samples, which do not fit BitsAllocated "
            f"{bits}",
        )  # fmt: skip
    return layout


def pydicom_decoder(path: str | os.PathLike, syntax: str):
    """pydicom's decoder for the transfer syntax ``syntax``, which must have a usable plugin.

    Raises:
        DicomReadError: naming ``path``, the transfer syntax and the package to install.
    """
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
        available = decoder.is_available
    except NotImplementedError:
        available = False
    if not available:
        first, alternatives = _INSTALL_HINTS.get(
            syntax, ("pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg", "python-gdcm")
        )
        raise DicomReadError(
            path, f"cannot decode pixel data: no decoder installed for transfer syntax {syntax} "
            f"({transfer_syntax_name(syntax)}); install one with `pip install {first}` "
            f"(alternatives: {alternatives})",
        )  # fmt: skip
    return decoder


#: pydicom's decoding plugins in the order tried here (pydicom's own order puts python-gdcm first).
#: python-gdcm is used only when no other plugin can decode the syntax: on some corrupt JPEG
#: codestreams it aborts the interpreter (an uncaught C++ exception) instead of raising.
_PLUGIN_ORDER = ("pylibjpeg", "pydicom", "pyjpegls", "pillow", "gdcm")


def _decode_pydicom(ds, path: Path, syntax: str) -> np.ndarray:
    available = tuple(pydicom_decoder(path, syntax).available_plugins)  # () when native
    plugins = sorted(available, key=lambda p: (_PLUGIN_ORDER + (p,)).index(p))
    if len(plugins) > 1 and "gdcm" in plugins:
        plugins.remove("gdcm")
    failures = []
    for plugin in plugins or [""]:
        try:
            if plugin:
                ds.pixel_array_options(decoding_plugin=plugin)
            return ds.pixel_array
        except BaseException as err:  # noqa: BLE001 - decoder plugins raise anything
            if not (isinstance(err, Exception) or _is_rust_panic(err)):
                raise  # KeyboardInterrupt, SystemExit and the like
            failures.append((plugin, err))
    why = "; ".join(f"{p + ': ' if p else ''}{type(e).__name__}: {e}" for p, e in failures)
    raise DicomReadError(
        path, f"cannot decode {transfer_syntax_name(syntax)} pixel data ({why})"
    ) from failures[-1][1]


def _is_rust_panic(err: BaseException) -> bool:
    """A panic of a Rust decoder (pylibjpeg-rle): pyo3's PanicException is a BaseException."""
    return type(err).__name__ == "PanicException"


def _open_dicomsdl(raw: bytes, layout: _Layout):
    """dicomsdl's DataSet over ``raw`` (validated by :func:`_pixel_layout`), or None.

    dicomsdl parses the file itself, and it crashes the interpreter when asked for pixel data it
    did not find or that does not fit the header. So it is used only when it sees the pixel data
    where pydicom found and checked it (same offset and length) with the same layout; a corrupt
    header the two parsers read differently goes to pydicom.
    """
    if layout.pixel_offset is None:
        return None
    try:
        sdl = _dicomsdl().open_memory(raw, copy_data=False)  # raw outlives the DataSet
        element = sdl.getDataElement("PixelData")
        info = sdl.getPixelDataInfo()
        agrees = (
            element.offset() == layout.pixel_offset
            and (element.length() == layout.pixel_length or str(element.vr()).endswith("PIXSEQ"))
            and (info["Rows"], info["Cols"]) == (layout.rows, layout.columns)
            and (info["NumberOfFrames"], info["SamplesPerPixel"]) == (1, 1)
            and (info["BitsAllocated"], info["BitsStored"]) == (layout.bits_allocated,
                                                                 layout.bits_stored)
            and bool(info["PixelRepresentation"]) == layout.signed
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - dicomsdl.DicomException and friends: pydicom takes over
        return None
    return sdl if agrees else None


def _slice_meta_dicomsdl(sdl, ds, path: Path, syntax: str, photometric: str) -> SliceMeta | None:
    """SliceMeta from dicomsdl's already-parsed header (much cheaper than pydicom's value
    conversion); None on anything unusual, so that the pydicom path reports it."""

    def floats(keyword: str, count: int) -> tuple[float, ...] | None:
        value = getattr(sdl, keyword)
        if value is None:
            return (float("nan"),) * count
        values = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
        return values if len(values) == count and np.isfinite(values).all() else None

    def number(keyword: str, default: float | None) -> float | None:
        value = getattr(sdl, keyword)
        if value is None:
            return default
        if isinstance(value, list) or not np.isfinite(float(value)):
            raise ValueError(keyword)
        return float(value)

    try:
        geometry = (floats("PixelSpacing", 2), floats("ImagePositionPatient", 3),
                    floats("ImageOrientationPatient", 6))  # fmt: skip
        if any(g is None for g in geometry):
            return None
        slope, intercept = number("RescaleSlope", None), number("RescaleIntercept", None)
        if slope == 0:
            return None
        notes = _rescale_notes(ds, path, slope, intercept)
        return SliceMeta(
            path=str(path),
            study_uid=str(sdl.StudyInstanceUID or ""),
            series_uid=str(sdl.SeriesInstanceUID or ""),
            sop_uid=str(sdl.SOPInstanceUID or ""),
            instance_number=int(number("InstanceNumber", 0)),
            rows=int(sdl.Rows),
            columns=int(sdl.Columns),
            pixel_spacing=geometry[0],
            image_position=geometry[1],
            image_orientation=geometry[2],
            slice_thickness=number("SliceThickness", None),
            rescale_slope=1.0 if slope is None else slope,
            rescale_intercept=0.0 if intercept is None else intercept,
            photometric_interpretation=photometric,
            transfer_syntax_uid=syntax,
            warnings=notes,
        )
    except Exception:  # noqa: BLE001 - odd values: let pydicom parse and report them
        return None


def _decode_dicomsdl(sdl) -> np.ndarray | None:
    """Stored values decoded by dicomsdl, or None when it refuses (then pydicom has a go)."""
    try:
        return np.asarray(sdl.pixelData(storedvalue=True))
    except Exception:  # noqa: BLE001 - dicomsdl.DicomException and friends: fall back
        return None


def _stored_to_hu(stored: np.ndarray, layout: _Layout, meta: SliceMeta) -> np.ndarray:
    """Stored values -> float32 HU: unused high bits, MONOCHROME1 inversion, rescale."""
    values = stored
    bits_stored = layout.bits_stored
    reach = abs(meta.rescale_slope) * 2.0**bits_stored + abs(meta.rescale_intercept)
    if reach > _F32_MAX:
        raise DicomReadError(
            meta.path, f"RescaleSlope {meta.rescale_slope:g} and RescaleIntercept "
            f"{meta.rescale_intercept:g} take {bits_stored}-bit stored values beyond the float32 "
            "range",
        )  # fmt: skip
    if bits_stored < layout.bits_allocated:
        # keep the low BitsStored bits, sign-extended when signed (PS3.5 8.1.1); this also
        # undoes codecs that report signed data as unsigned (JPEG 2000 sign mismatch)
        width = values.dtype.itemsize * 8
        if layout.signed:
            values = values.astype(np.dtype(f"int{width}"), copy=False)
            values = (values << (width - bits_stored)) >> (width - bits_stored)
        else:
            values = values & values.dtype.type((1 << bits_stored) - 1)
    if meta.photometric_interpretation == "MONOCHROME1":
        low, high = ((-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if layout.signed
                     else (0, (1 << bits_stored) - 1))  # fmt: skip
        values = np.float64(low + high) - values  # exact in float64
    hu = values.astype(np.float32)
    if meta.rescale_slope != 1.0:
        hu *= np.float32(meta.rescale_slope)
    if meta.rescale_intercept != 0.0:
        hu += np.float32(meta.rescale_intercept)
    return hu


def read_slice(path: str | os.PathLike, *, decoder: str = "auto") -> tuple[np.ndarray, SliceMeta]:
    """Read one DICOM slice as Hounsfield units.

    Args:
        path: a single-frame greyscale DICOM file.
        decoder: "auto" (dicomsdl when installed and the transfer syntax is one it handles,
            else pydicom), "pydicom", or "dicomsdl" (fails if not installed; syntaxes it does not
            handle still go to pydicom).

    Returns:
        ``(hu, meta)``: float32 ``(rows, columns)`` HU (``MONOCHROME1`` inverted so that larger
        is denser) and the slice's :class:`SliceMeta`.

    Raises:
        DicomReadError: unreadable, truncated, inconsistent or undecodable files, naming the file.

    Example:
        >>> hu, meta = read_slice("train_images/1.2.826.0.1.3680043.10001/1.dcm")  # doctest: +SKIP
        >>> hu.dtype, meta.rows, meta.pixel_spacing  # doctest: +SKIP
        (dtype('float32'), 512, (0.25, 0.25))
    """
    _check_decoder(decoder)
    path = Path(path)
    raw = _read_bytes(path)
    ds = _parse(path, raw, stop_before_pixels=False)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    layout = _pixel_layout(ds, path, syntax)  # must pass before dicomsdl sees the bytes
    meta = stored = None
    if (decoder != "pydicom" and syntax in _DICOMSDL_SYNTAXES and dicomsdl_available()
            and layout.checked and layout.bits_allocated == 16):  # fmt: skip
        sdl = _open_dicomsdl(raw, layout)
        if sdl is not None:
            photometric = str(ds.PhotometricInterpretation).strip()
            meta = _slice_meta_dicomsdl(sdl, ds, path, syntax, photometric)
            stored = _decode_dicomsdl(sdl) if meta is not None else None
    if meta is None:
        meta = _slice_meta(ds, path, require_geometry=False)
    if stored is None:
        stored = _decode_pydicom(ds, path, syntax)
    if stored.shape != (meta.rows, meta.columns):
        raise DicomReadError(
            path, f"decoded pixel data has shape {stored.shape}, expected Rows x Columns = "
            f"({meta.rows}, {meta.columns})",
        )  # fmt: skip
    return _stored_to_hu(stored, layout, meta), meta


# --------------------------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------------------------
def list_series_files(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(file number, path)`` of the ``<n>.dcm`` files of an RSNA series folder, by number.

    Raises:
        DicomReadError: the folder is missing or holds no ``.dcm`` file, or a ``.dcm`` file name
            is not a slice number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomReadError(folder, "series folder not found")
    numbered = []
    for path in folder.iterdir():
        if path.suffix.lower() != ".dcm" or not path.is_file():
            continue
        if not _NUMERIC_NAME.match(path.stem):
            raise DicomReadError(
                path, "file name is not a slice number (the RSNA layout names slices <n>.dcm)"
            )
        numbered.append((int(path.stem), path))
    if not numbered:
        raise DicomReadError(folder, "no .dcm files in the series folder")
    numbered.sort()
    for (a, pa), (b, pb) in zip(numbered, numbered[1:]):
        if a == b:
            raise DicomReadError(pb, f"slice number {b} is used twice (also by {pa.name})")
    return numbered


def _same(a: Sequence[float], b: Sequence[float], tol: float) -> bool:
    return bool(np.allclose(a, b, rtol=0.0, atol=tol))


def read_series_meta(folder: str | os.PathLike) -> SeriesMeta:
    """Read the headers of a series folder (no pixel data) and order its slices.

    Slices are sorted by position along the slice normal, superior first. All slices must share
    the series, size, orientation and pixel spacing; two slices at the same position are an error.

    Args:
        folder: a folder of ``<n>.dcm`` files of one axial series (RSNA layout).

    Returns:
        The :class:`SeriesMeta`, in series order.

    Raises:
        DicomReadError: naming the file at fault (or the folder when it is empty).
    """
    folder = Path(folder)
    numbered = list_series_files(folder)
    metas = []
    for _, path in numbered:
        ds = _parse(path, path, stop_before_pixels=True)
        metas.append(_slice_meta(ds, path, require_geometry=True))
    return series_from_slices(folder, [n for n, _ in numbered], metas)


_GEOMETRY_TAGS = (
    ("image_position", "ImagePositionPatient"),
    ("image_orientation", "ImageOrientationPatient"),
    ("pixel_spacing", "PixelSpacing"),
)


def series_from_slices(
    folder: str | os.PathLike, numbers: Sequence[int], metas: Sequence[SliceMeta]
) -> SeriesMeta:
    """Order and check the slices of one series whose headers were already read.

    ``numbers[i]`` is the file number of ``metas[i]``. This is what :func:`read_series_meta`
    does after reading the headers; ``prepare`` calls it with the :class:`SliceMeta` that
    :func:`read_slice` returned while decoding, so every file is parsed once.

    Raises:
        DicomReadError: naming the file at fault (missing geometry, mixed series, sizes,
            orientations or spacings, duplicate positions, a non-axial series).
    """
    folder = Path(folder)
    if not metas or len(numbers) != len(metas):
        raise DicomReadError(folder, f"{len(numbers)} file numbers for {len(metas)} slices")
    for meta in metas:
        for field, tag in _GEOMETRY_TAGS:
            if not np.all(np.isfinite(getattr(meta, field))):
                raise DicomReadError(meta.path, f"missing {tag} (needed to order the series)")
        row_cos = np.asarray(meta.image_orientation[:3])
        col_cos = np.asarray(meta.image_orientation[3:])
        if (abs(np.linalg.norm(row_cos) - 1) > 0.01 or abs(np.linalg.norm(col_cos) - 1) > 0.01
                or abs(float(row_cos @ col_cos)) > 0.01):  # fmt: skip
            raise DicomReadError(
                meta.path,
                f"ImageOrientationPatient {meta.image_orientation} is not two orthogonal unit vectors",
            )
        if min(meta.pixel_spacing) <= 0:
            raise DicomReadError(meta.path, f"PixelSpacing must be positive, got {meta.pixel_spacing}")
    first = metas[0]
    for meta in metas[1:]:
        where = Path(meta.path)
        if meta.series_uid != first.series_uid:
            raise DicomReadError(
                where, f"belongs to series {meta.series_uid}, but {Path(first.path).name} to "
                f"{first.series_uid}: one series per folder",
            )  # fmt: skip
        if (meta.rows, meta.columns) != (first.rows, first.columns):
            raise DicomReadError(
                where, f"size {meta.rows}x{meta.columns} differs from {first.rows}x"
                f"{first.columns} of {Path(first.path).name}",
            )  # fmt: skip
        if not _same(meta.image_orientation, first.image_orientation, 1e-3):
            raise DicomReadError(
                where, f"mixed orientations: ImageOrientationPatient {meta.image_orientation} "
                f"differs from {first.image_orientation} of {Path(first.path).name}",
            )  # fmt: skip
        if not _same(meta.pixel_spacing, first.pixel_spacing, 1e-3):
            raise DicomReadError(
                where, f"PixelSpacing {meta.pixel_spacing} differs from {first.pixel_spacing} of "
                f"{Path(first.path).name}",
            )  # fmt: skip

    row_cos = np.asarray(first.image_orientation[:3])
    col_cos = np.asarray(first.image_orientation[3:])
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    if abs(normal[2]) < 0.5:
        raise DicomReadError(
            first.path, f"not an axial series: the slice normal {np.round(normal, 3).tolist()} is "
            "more than 60 degrees from the head-feet axis",
        )  # fmt: skip
    if normal[2] < 0:
        normal = -normal  # point superior
    positions = np.array([m.image_position for m in metas], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(-along, kind="stable")
    along = along[order]
    gaps = -np.diff(along)
    spacing = float(np.median(gaps)) if len(gaps) else float(first.slice_thickness or 0.0)
    tol = max(1e-4, 0.01 * spacing)
    for k in np.flatnonzero(gaps < tol):
        a, b = metas[order[k]], metas[order[k + 1]]
        raise DicomReadError(
            b.path, f"duplicate slice position: {Path(a.path).name} and {Path(b.path).name} both "
            f"lie at {along[k]:.3f} mm along the slice normal",
        )  # fmt: skip

    slices = tuple(metas[i] for i in order)
    numbers = tuple(int(numbers[i]) for i in order)
    dr, dc = first.pixel_spacing
    affine = np.eye(4)
    affine[:3, 0] = row_cos * dc
    affine[:3, 1] = col_cos * dr
    if len(slices) > 1:
        affine[:3, 2] = (positions[order[-1]] - positions[order[0]]) / (len(slices) - 1)
    else:
        affine[:3, 2] = -normal * (spacing or 1.0)
    affine[:3, 3] = positions[order[0]]
    return SeriesMeta(
        folder=str(folder),
        study_uid=first.study_uid,
        slices=slices,
        slice_numbers=numbers,
        positions_mm=along,
        spacing_mm=spacing,
        normal=normal,
        head_first=bool(numbers[0] <= numbers[-1]),
        affine=affine,
        warnings=_series_warnings(slices),
    )


def _series_warnings(slices: Sequence[SliceMeta]) -> tuple[str, ...]:
    """The slices' warnings, one entry per kind: how many slices, and the first file names."""
    where: dict[str, list[str]] = {}
    for sl in slices:
        for note in sl.warnings:
            where.setdefault(note, []).append(Path(sl.path).name)
    return tuple(
        f"{note} ({len(names)} of {len(slices)} slices: {', '.join(names[:3])}"
        f"{', ...' if len(names) > 3 else ''})"
        for note, names in where.items()
    )


def read_series(
    folder: str | os.PathLike, *, decoder: str = "auto"
) -> tuple[np.ndarray, SeriesMeta]:
    """Read a series folder as a float32 HU volume ``(Z, Y, X)`` in series order.

    Args:
        folder: a folder of ``<n>.dcm`` files of one axial series.
        decoder: see :func:`read_slice`.

    Returns:
        ``(volume, meta)``: index 0 of ``volume`` is the most superior slice.

    Example:
        >>> volume, meta = read_series("train_images/1.2.826.0.1.3680043.10001")  # doctest: +SKIP
        >>> volume.shape == meta.shape  # doctest: +SKIP
        True
    """
    _check_decoder(decoder)
    meta = read_series_meta(folder)
    volume = np.empty(meta.shape, dtype=np.float32)
    for i, sl in enumerate(meta.slices):
        volume[i], _ = read_slice(sl.path, decoder=decoder)
    return volume, meta
