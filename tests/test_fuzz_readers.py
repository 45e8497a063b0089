"""Fuzzing of the readers on mutated real files (issue "Trust": every bad input gives the package's
own error naming the file, never another exception, never a hang).

Readers fuzzed, each on its own table of mutations:

- ``io.dicom.read_slice`` (decoders "auto", i.e. dicomsdl where it applies, and "pydicom") on
  pydicom's bundled test files (explicit, implicit and big-endian VR, deflated, JPEG lossless
  (CT_small re-encoded with gdcm), JPEG extended, JPEG-LS, JPEG 2000, RLE) and on slices of the
  synthetic RSNA dataset (explicit VR and JPEG lossless);
- ``io.dicom.read_series`` on a three-slice folder cut from a synthetic study;
- ``io.nifti.align_segmentation`` (and so ``load_segmentation``) on a synthetic study's
  segmentation, against that study's real :class:`SeriesMeta`;
- ``io.rsna.read_train_csv``, ``read_bounding_boxes`` (also through
  ``RsnaLayout.bounding_boxes``), ``read_test_csv`` and ``read_submission`` on the synthetic
  dataset's CSVs.

Mutations: byte flips, byte sets, boundary values, truncations, inserted, deleted and duplicated
byte runs (biased towards the header); DICOM data elements located in the file and deleted, given
bad values (empty, NaN, inf, 1e400, zero, huge, wrong multiplicity, junk text, odd length), a wrong
VR or a new element, and the TransferSyntaxUID rewritten; NIfTI header fields edited (dims,
datatype, bitpix, vox_offset, scaling, sform/qform, pixdim, magic, byte order), files re-encoded
with other dtypes, NaN/negative/out-of-range labels, cropped/padded/transposed/4-D data, a
shifted, flipped, singular or non-finite affine, gzip wrapping, corrupt gzip streams and wrong
extensions; CSV columns dropped, renamed, duplicated, swapped or added, rows deleted or
duplicated, ragged rows, junk cell values (NaN, inf, 1e400, unicode digits, quotes, NUL,
newlines), other delimiters, line ends and encodings (UTF-16, latin-1, BOM), empty files and binary
junk.

The contract checked on every input: the reader returns its documented result (types, shapes,
finite values; every CSV row valid against its JSON Schema) or raises its error class
(DicomReadError, SegmentationError, CsvSchemaError) with the file in the message. Any other
exception, a RuntimeWarning or UserWarning issued from keras_cspine, an input slower than the
deadline or a hang fails the test.

Reproducible: ``derandomize=True`` (the same inputs on every run) and no example database. For
deeper local runs: ``KERAS_CSPINE_FUZZ_SCALE=10`` runs ten times as many inputs and
``KERAS_CSPINE_FUZZ_SEED=<int>`` draws other ones. Each test prints how many inputs it ran.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import gzip
import io
import logging
import math
import os
import shutil
import signal
import struct
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from pydicom.data import get_testdata_file

from keras_cspine.errors import CSpineDataError, CsvSchemaError, DicomReadError, SegmentationError
from keras_cspine.io import dicom, nifti, rsna

SCALE = float(os.environ.get("KERAS_CSPINE_FUZZ_SCALE", "1"))
SEED = os.environ.get("KERAS_CSPINE_FUZZ_SEED")
DEADLINE_MS = 2000  # one input slower than this fails
HANG_S = 30  # one input still running after this is interrupted as a hang

#: inputs per test (times KERAS_CSPINE_FUZZ_SCALE)
EXAMPLES = {
    "read_slice": 3000,
    "read_series": 500,
    "align_segmentation": 1000,
    "csv": 500,  # per CSV reader
}

COUNTS: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


class Blob(bytes):
    """A mutated file; its repr stays short in hypothesis reports (the notes say what changed)."""

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


@contextlib.contextmanager
def quiet():
    """Silence numpy and the libraries while building a mutated input (not while reading it)."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------
# Harness: settings, the contract, the report
# --------------------------------------------------------------------------------------------
def fuzz(test, examples: int):
    """``test`` (already ``@given``) with the fuzzing settings."""
    test = settings(
        max_examples=max(1, round(examples * SCALE)),
        derandomize=SEED is None,
        database=None,
        deadline=DEADLINE_MS,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                               HealthCheck.filter_too_much, HealthCheck.large_base_example],
    )(test)  # fmt: skip
    return test if SEED is None else hypothesis_seed(int(SEED))(test)


class Hang(BaseException):
    """Raised into a reader that runs too long (a BaseException: no reader may turn it into a
    refusal of the input)."""


@contextlib.contextmanager
def watchdog(seconds: float):
    """Interrupt the block with :class:`Hang` after ``seconds``, where signals allow."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def hang(signum, frame):
        raise Hang(f"input still running after {seconds} s: the reader hangs")

    previous = signal.signal(signal.SIGALRM, hang)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_reader(reader: str, error_class: type[CSpineDataError], blame: str | os.PathLike, call):
    """``call()``: its result, or None when it raised ``error_class`` naming ``blame``.

    Any other exception propagates (and fails the test); so do warnings issued from keras_cspine
    (numeric overflow and the like). Warnings of the third-party parsers about the corrupt input
    are the point of the exercise and are ignored.
    """
    with warnings.catch_warnings(), watchdog(HANG_S):
        warnings.simplefilter("ignore")
        warnings.filterwarnings("error", category=RuntimeWarning, module="keras_cspine")
        warnings.filterwarnings("error", category=UserWarning, module="keras_cspine")
        try:
            result = call()
        except CSpineDataError as err:
            assert isinstance(err, error_class), (
                f"{reader} raised {type(err).__name__}, expected {error_class.__name__}: {err}"
            )
            assert os.fspath(blame) in str(err), f"{reader}: the message does not name {blame}: {err}"
            assert err.problem.strip(), f"{reader}: empty problem in {err!r}"
            COUNTS[reader][type(err).__name__] += 1
            note(f"refused: {err}")
            return None
    COUNTS[reader]["loaded"] += 1
    note("loaded")
    return result


def report(capsys, reader: str, examples: int, started: float) -> None:
    """Print the count of inputs run (stderr with capture off: shows under pytest-xdist too)."""
    counts = COUNTS[reader]
    total = sum(counts.values())
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    with capsys.disabled():
        sys.stderr.write(f"\n[fuzz] {reader}: {total} inputs in {time.monotonic() - started:.1f} s "
                         f"({outcomes})\n")  # fmt: skip
        sys.stderr.flush()
    assert total >= 0.5 * max(1, round(examples * SCALE)), f"only {total} inputs ran"


# --------------------------------------------------------------------------------------------
# Byte-level mutations (every file type)
# --------------------------------------------------------------------------------------------
BOUNDARY_BYTES = (
    b"\x00", b"\xff", b"\x7f", b"\x80", b"\x00\x00", b"\xff\xff", b"\xff\x7f", b"\x00\x80",
    b"\xff\xff\xff\xff", b"\x00\x00\x00\x80", b"\xfe\xff\xdd\xe0", b"\xfe\xff\x00\xe0",
    b"\xe0\x7f\x10\x00", b"\xff\xd9", b"\xff\xd8", b"\xff\x4f\xff\x51", b"DICM", b"\n", b"\r\n",
    b",", b'"', b"\xef\xbb\xbf", b"\xc3", b"\x80\x80", b"\x1f\x8b",
)  # fmt: skip


@st.composite
def byte_edits(draw, data: bytes, hot: int) -> bytes:
    """1 to 4 byte-level edits of ``data``; positions favour its first ``hot`` bytes."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        n = len(out)
        kind = draw(st.sampled_from(("flip", "set", "boundary", "truncate", "insert", "delete",
                                     "duplicate")))  # fmt: skip
        if n == 0:
            kind = "insert"
        at = 0 if n == 0 else draw(st.integers(0, max(0, min(hot, n) - 1)) | st.integers(0, n - 1))
        if kind == "flip":
            out[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            out[at] = draw(st.integers(0, 255))
        elif kind == "boundary":
            token = draw(st.sampled_from(BOUNDARY_BYTES))
            out[at : at + len(token)] = token
        elif kind == "truncate":
            del out[at:]
        elif kind == "insert":
            run = draw(st.binary(min_size=1, max_size=64)
                       | st.builds(lambda b, k: bytes([b]) * k, st.integers(0, 255),
                                   st.integers(1, 300)))  # fmt: skip
            out[at:at] = run
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 256))]
        else:
            src = draw(st.integers(0, n - 1))
            out[at:at] = out[src : src + draw(st.integers(1, 256))]
        note(f"byte edit: {kind} at {at}")
    return bytes(out)


# --------------------------------------------------------------------------------------------
# DICOM: seeds and element-level edits
# --------------------------------------------------------------------------------------------
_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
_DEFLATED = "1.2.840.10008.1.2.1.99"

#: elements the readers look at: edited more often than the others
KEY_ELEMENTS = (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel", "PhotometricInterpretation", "NumberOfFrames", "RescaleSlope",
    "RescaleIntercept", "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
    "SliceThickness", "InstanceNumber", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "PixelData", "TransferSyntaxUID", "Modality",
)  # fmt: skip

TEXT_VALUES = (
    b"", b" ", b"abc", b"nan", b"NaN", b"inf", b"-inf", b"1e400", b"-1e400", b"0", b"-0",
    b"1e-300", b"1\\2", b"1\\0\\0\\0\\1\\0", b"0\\0\\0\\0\\0\\0", b"1\\0\\0\\0\\0\\1",
    b"0.5\\0.5", b"0\\0", b"-1\\1", b"1\\2\\3", b"3.4e38", b"1e39", b"-1e39", b"1e20", b"1e300",
    b"-1024", b"2", b"0.5", b"-1", b"99999999999999999999", b"1.5", b"1A", b"\x00", b"\xff\xfe",
    b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"1.2.3",
    b"1.2.840.10008.1.2.4.50", b"x" * 70, b"1e-45\\1e-45", b"1e10\\1e10\\1e10",
    # geometry: positions, orientations and spacings that are well-formed but absurd
    b"1e300\\0\\0", b"-1e300\\0\\-1e300", b"0\\0\\1e300", b"0\\0\\-1e300", b"nan\\0\\0",
    b"0\\0\\1e-300", b"0\\0\\0", b"0\\1\\0\\0\\0\\1", b"1\\0\\0\\0\\0.9\\0.1",
    b"1\\0\\0\\1\\0\\0", b"1\\0\\0\\0\\0.7071\\0.7071", b"1e300\\0\\0\\0\\1\\0",
    b"1e-300\\1e-300", b"1e300\\1e300", b"1e-10\\1e-10", b"-0.5\\0.5",
)  # fmt: skip
INT_VALUES = (0, 1, 2, 7, 8, 12, 15, 16, 17, 31, 32, 33, 64, 255, 256, 4096, 0x7FFF, 0x8000, 0xFFFF)
FLOAT_VALUES = (math.nan, math.inf, -math.inf, 0.0, 1e38, -1e38, 1.0, 1e-40)
NEW_VRS = (b"US", b"SS", b"UL", b"DS", b"IS", b"LO", b"CS", b"UI", b"FD", b"UN", b"OB", b"SQ",
           b"XX", b"\x00\x00")  # fmt: skip
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.5", "1.2.3.4", "", "abc",
)  # fmt: skip
#: elements that may be added: (group, element, VR, value)
NEW_ELEMENTS = (
    (0x0028, 0x0008, b"IS", b"2 "),  # NumberOfFrames
    (0x0028, 0x0008, b"IS", b"0 "),
    (0x0028, 0x1053, b"DS", b"0 "),  # RescaleSlope
    (0x0028, 0x1053, b"DS", b"1e39"),
    (0x0028, 0x1052, b"DS", b"nan "),  # RescaleIntercept
    (0x0028, 0x0002, b"US", b"\x03\x00"),  # SamplesPerPixel
    (0x0028, 0x3000, b"SQ", b""),  # ModalityLUTSequence, empty
)


@dataclass(frozen=True)
class Element:
    """Where one top-level data element lies in a file."""

    keyword: str
    tag: int
    vr: str
    start: int  # first byte of the tag
    length_at: int  # the length field
    length_size: int  # 2 or 4 bytes
    value_at: int
    value_end: int
    little: bool
    implicit: bool


class DicomSeed:
    """A real DICOM file to mutate (a plain class: hypothesis reports show only its name)."""

    def __init__(self, name: str, raw: bytes, elements: tuple[Element, ...], hot: int):
        self.name, self.raw = name, raw
        self.elements = elements  # empty for deflated files (offsets are in the inflated stream)
        self.hot = hot  # header and the start of the pixel data

    def __repr__(self) -> str:
        return f"DicomSeed({self.name!r})"


def locate_elements(raw: bytes) -> tuple[Element, ...]:
    """The top-level elements of a DICOM file with their byte offsets (pydicom's value_tell)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw))
    syntax = str(ds.file_meta.TransferSyntaxUID)
    elements = []
    ts_at = raw.find(b"\x02\x00\x10\x00UI", 128, 1024)
    if ts_at > 0:
        length = int.from_bytes(raw[ts_at + 6 : ts_at + 8], "little")
        elements.append(Element("TransferSyntaxUID", 0x00020010, "UI", ts_at, ts_at + 6, 2,
                                ts_at + 8, ts_at + 8 + length, True, False))  # fmt: skip
    if syntax == _DEFLATED:
        return tuple(elements)
    implicit, little = ds.original_encoding
    for tag, elem in ds._dict.items():
        tell, length = getattr(elem, "value_tell", None), getattr(elem, "length", None)
        if tell is None or length is None or length == 0xFFFFFFFF:
            continue
        vr = str(elem.VR) if not implicit else pydicom.datadict.dictionary_VR(tag) \
            if pydicom.datadict.dictionary_has_tag(tag) else "UN"  # fmt: skip
        if implicit:
            start, length_at, size = tell - 8, tell - 4, 4
        elif vr in _LONG_VRS:
            start, length_at, size = tell - 12, tell - 4, 4
        else:
            start, length_at, size = tell - 8, tell - 2, 2
        keyword = pydicom.datadict.keyword_for_tag(tag) or f"{int(tag):08x}"
        elements.append(Element(keyword, int(tag), vr, start, length_at, size, tell,
                                tell + length, little, implicit))  # fmt: skip
    return tuple(elements)


def _pack_length(n: int, element: Element) -> bytes:
    fmt = ("<" if element.little else ">") + ("H" if element.length_size == 2 else "I")
    return struct.pack(fmt, min(n, 0xFFFF if element.length_size == 2 else 0xFFFFFFFF))


@st.composite
def element_value(draw, element: Element) -> bytes:
    """A bad or odd value for ``element``, encoded for its VR."""
    end = "<" if element.little else ">"
    vr = element.vr
    if element.keyword == "TransferSyntaxUID":
        uid = draw(st.sampled_from(TRANSFER_SYNTAXES)).encode()
        return uid + b"\x00" * (len(uid) % 2) if draw(st.booleans()) else uid
    if vr in ("US", "SS", "UL", "SL"):
        fmt = {"US": "H", "SS": "h", "UL": "I", "SL": "i"}[vr]
        bits = struct.calcsize(fmt) * 8
        values = draw(st.lists(st.sampled_from(INT_VALUES), min_size=1, max_size=3))
        packed = b"".join(struct.pack(end + fmt.upper(), v % (1 << bits)) for v in values)
        return draw(st.sampled_from((packed, packed, b"", packed[:1])))
    if vr in ("FL", "FD"):
        return struct.pack(end + ("f" if vr == "FL" else "d"), draw(st.sampled_from(FLOAT_VALUES)))
    text = draw(st.sampled_from(TEXT_VALUES))
    pad = b"\x00" if vr == "UI" else b" "
    return text + pad * (len(text) % 2) if draw(st.integers(0, 3)) else text


#: what orders and checks a series: edited most in the series test
SERIES_ELEMENTS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                   "SeriesInstanceUID", "StudyInstanceUID", "Rows", "Columns", "SliceThickness",
                   "InstanceNumber", "RescaleSlope", "RescaleIntercept")  # fmt: skip


@st.composite
def element_edits(draw, seed: DicomSeed, focus: tuple[str, ...] = KEY_ELEMENTS) -> bytes:
    """1 to 3 edits of distinct data elements, applied from the end of the file backwards."""
    if not seed.elements:
        return seed.raw
    by_name = {e.keyword: e for e in seed.elements}
    key = [by_name[k] for k in focus if k in by_name]
    chosen = draw(st.lists(st.sampled_from(key) | st.sampled_from(seed.elements),
                           min_size=1, max_size=3, unique_by=lambda e: e.start))  # fmt: skip
    edits = []
    for element in chosen:
        kind = draw(st.sampled_from(("delete", "value", "value", "value", "vr", "add")))
        if kind == "vr" and element.implicit:
            kind = "value"
        edits.append((element, kind))
    out = seed.raw
    for element, kind in sorted(edits, key=lambda e: -e[0].start):
        if kind == "delete":
            out = out[: element.start] + out[element.value_end :]
        elif kind == "vr":
            out = out[: element.start + 4] + draw(st.sampled_from(NEW_VRS)) + out[element.start + 6 :]
        elif kind == "add":
            group, elem, vr, value = draw(st.sampled_from(NEW_ELEMENTS))
            end = "<" if element.little else ">"
            head = struct.pack(end + "HH", group, elem)
            if element.implicit:
                head += struct.pack(end + "I", len(value))
            elif vr.decode() in _LONG_VRS:
                head += vr + b"\x00\x00" + struct.pack(end + "I", len(value))
            else:
                head += vr + struct.pack(end + "H", len(value))
            out = out[: element.start] + head + value + out[element.start :]
        elif element.keyword == "PixelData":
            old = out[element.value_at : element.value_end]
            how = draw(st.sampled_from(("empty", "short", "long", "text")))
            value = {"empty": b"", "short": old[: draw(st.integers(0, max(0, len(old) - 1)))],
                     "long": old + old[: draw(st.integers(1, 4096))],
                     "text": b"nan "}[how]  # fmt: skip
            out = (out[: element.length_at] + _pack_length(len(value), element) + value
                   + out[element.value_end :])  # fmt: skip
        else:
            value = draw(element_value(element))
            out = (out[: element.length_at] + _pack_length(len(value), element) + value
                   + out[element.value_end :])  # fmt: skip
        note(f"element edit: {kind} {element.keyword} ({element.vr})")
    return out


@st.composite
def mutated_dicom(draw, seed: DicomSeed, focus: tuple[str, ...] = KEY_ELEMENTS) -> bytes:
    plan = draw(st.sampled_from(("elements", "elements", "bytes", "both")))
    note(f"seed {seed.name}, plan {plan}")
    data = seed.raw
    if plan in ("elements", "both"):
        data = draw(element_edits(seed, focus))
    if plan in ("bytes", "both") or not seed.elements:
        data = draw(byte_edits(data, seed.hot))
    return Blob(data)


def make_dicom_seed(name: str, raw: bytes) -> DicomSeed:
    elements = locate_elements(raw)
    pixel = raw.rfind(b"\xe0\x7f\x10\x00")
    hot = (pixel + 96) if pixel > 0 else min(len(raw), 2048)
    return DicomSeed(name, raw, elements, min(hot, len(raw)))


#: pydicom's bundled files used as seeds (all read fine unmutated)
PYDICOM_SEEDS = (
    "CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm",
    "693_J2KI.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm",
    "MR_small_jpeg_ls_lossless.dcm", "JPGExtended.dcm", "rtdose_1frame.dcm", "image_dfl.dcm",
)  # fmt: skip


def pydicom_file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not available offline"
    return Path(path)


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def synthetic_series(synthetic_data) -> dict[str, list[Path]]:
    """Files of the synthetic studies by transfer syntax: {"explicit": [...], "jpeg": [...]}."""
    found: dict[str, list[Path]] = {}
    for folder in sorted((synthetic_data / "train_images").iterdir()):
        files = [p for _, p in dicom.list_series_files(folder)]
        syntax = str(pydicom.dcmread(files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
        found.setdefault("jpeg" if syntax == "1.2.840.10008.1.2.4.70" else "explicit", files)
    return found


@pytest.fixture(scope="module")
def dicom_seeds(work_dir, synthetic_series) -> list[DicomSeed]:
    from helpers_dicom import to_jpeg_lossless

    seeds = [make_dicom_seed(name, pydicom_file(name).read_bytes()) for name in PYDICOM_SEEDS]
    jpeg = to_jpeg_lossless(pydicom_file("CT_small.dcm"), work_dir / "CT_small_jpeg_lossless.dcm")
    seeds.append(make_dicom_seed("CT_small.dcm as JPEG lossless", jpeg.read_bytes()))
    for kind, files in sorted(synthetic_series.items()):
        seeds.append(make_dicom_seed(f"synthetic {kind} slice", files[len(files) // 2].read_bytes()))
    for seed in seeds:  # every seed reads unmutated (and the decoders are warm for the deadline)
        for decoder in ("auto", "pydicom"):
            hu, _ = dicom.read_slice(io_path(work_dir, seed.raw), decoder=decoder)
            assert np.isfinite(hu).all(), seed.name
    return seeds


def io_path(folder: Path, data: bytes, name: str = "slice.dcm") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def check_slice(result, path: Path) -> None:
    hu, meta = result
    assert isinstance(meta, dicom.SliceMeta) and meta.path == str(path)
    assert isinstance(hu, np.ndarray) and hu.dtype == np.float32
    assert hu.shape == (meta.rows, meta.columns) and meta.rows >= 1 and meta.columns >= 1
    assert np.isfinite(hu).all(), "non-finite HU"
    assert np.isfinite(meta.rescale_slope) and meta.rescale_slope != 0
    assert np.isfinite(meta.rescale_intercept)
    assert isinstance(meta.warnings, tuple) and all(isinstance(w, str) for w in meta.warnings)


def test_fuzz_read_slice(dicom_seeds, work_dir, capsys):
    started = time.monotonic()
    folder = work_dir / "slices"
    folder.mkdir(exist_ok=True)

    @given(st.sampled_from(dicom_seeds).flatmap(mutated_dicom),
           st.sampled_from(("auto", "pydicom")))  # fmt: skip
    def one(data, decoder):
        path = io_path(folder, data)
        result = run_reader("read_slice", DicomReadError, path,
                            lambda: dicom.read_slice(path, decoder=decoder))  # fmt: skip
        if result is not None:
            check_slice(result, path)

    fuzz(one, EXAMPLES["read_slice"])()
    report(capsys, "read_slice", EXAMPLES["read_slice"], started)


# --------------------------------------------------------------------------------------------
# DICOM series: a three-slice folder
# --------------------------------------------------------------------------------------------
FOLDER_OPS = ("mutate", "mutate", "mutate", "delete", "copy as new number", "non-numeric name",
              "zero-padded duplicate number", "subfolder named .dcm", "foreign file",
              "empty file", "other file")  # fmt: skip


@st.composite
def series_plan(draw, n_files: int):
    ops = draw(st.lists(st.tuples(st.sampled_from(FOLDER_OPS), st.integers(0, n_files - 1)),
                        min_size=1, max_size=3))  # fmt: skip
    return ops


def test_fuzz_read_series(synthetic_series, dicom_seeds, work_dir, capsys):
    started = time.monotonic()
    kinds = sorted(synthetic_series)
    source = {kind: files[len(files) // 2 : len(files) // 2 + 3] for kind, files in synthetic_series.items()}
    seeds = {kind: [make_dicom_seed(p.name, p.read_bytes()) for p in files]
             for kind, files in source.items()}  # fmt: skip
    foreign = [s for s in dicom_seeds if s.name in ("CT_small.dcm", "MR_small.dcm")]
    folder = work_dir / "series" / "1.2.826.0.1.3680043.99"
    for kind in kinds:  # each unmutated folder reads
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for p in source[kind]:
            shutil.copy(p, folder / p.name)
        assert dicom.read_series(folder)[0].shape[0] == 3

    @given(st.sampled_from(kinds), st.data())
    def one(kind, data):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        files = {int(p.stem): p.read_bytes() for p in source[kind]}
        numbers = sorted(files)
        extra: dict[str, bytes | None] = {}  # other entries: name -> bytes (None: a folder)
        for op, k in data.draw(series_plan(len(numbers)), label="folder ops"):
            number = numbers[k]
            if op == "mutate" and number in files:
                files[number] = data.draw(mutated_dicom(seeds[kind][k], SERIES_ELEMENTS),
                                          label=f"{number}.dcm")  # fmt: skip
            elif op == "delete" and len(files) > 1:
                files.pop(number, None)
            elif op == "copy as new number" and number in files:
                files[max(numbers) + 1 + k] = files[number]
            elif op == "non-numeric name":
                extra["a1.dcm"] = files.get(number, b"")
            elif op == "zero-padded duplicate number" and number in files:
                extra[f"0{number}.dcm"] = files[number]
            elif op == "subfolder named .dcm":
                extra[f"{max(numbers) + 7}.dcm"] = None
            elif op == "foreign file":
                files[number] = data.draw(st.sampled_from(foreign)).raw
            elif op == "empty file":
                files[number] = b""
            elif op == "other file":
                extra["notes.txt"] = b"not a slice"
        for number, raw in files.items():
            (folder / f"{number}.dcm").write_bytes(raw)
        for name, raw in extra.items():
            if raw is None:
                (folder / name).mkdir()
            else:
                (folder / name).write_bytes(raw)
        decoder = data.draw(st.sampled_from(("auto", "pydicom")), label="decoder")
        result = run_reader("read_series", DicomReadError, folder,
                            lambda: dicom.read_series(folder, decoder=decoder))  # fmt: skip
        if result is None:
            return
        volume, meta = result
        numbers_on_disk = sorted(int(p.stem) for p in folder.iterdir()
                                 if p.suffix == ".dcm" and p.is_file() and p.stem.isdigit())  # fmt: skip
        assert isinstance(meta, dicom.SeriesMeta) and volume.dtype == np.float32
        assert volume.shape == meta.shape and volume.shape[0] == len(numbers_on_disk)
        assert np.isfinite(volume).all()
        assert sorted(meta.slice_numbers) == numbers_on_disk
        assert np.all(np.diff(meta.positions_mm) < 0) and np.isfinite(meta.affine).all()
        assert meta.spacing_mm > 0 or len(files) == 1
        assert isinstance(meta.warnings, tuple)

    fuzz(one, EXAMPLES["read_series"])()
    report(capsys, "read_series", EXAMPLES["read_series"], started)


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------
NAN, INF = math.nan, math.inf
HEADER_EDITS = {
    "sizeof_hdr": (0, 540, 347, 1 << 30),
    "datatype": (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048,
                 2304, 9999),
    "bitpix": (0, 1, 8, 16, 32, 64, 7),
    "vox_offset": (0.0, 348.0, 351.0, 352.0, 353.0, 356.0, 1e9, -1.0, NAN),
    "scl_slope": (NAN, INF, -INF, 0.0, 1e30, -1.0, 0.5, 2.0, 1e-30),
    "scl_inter": (NAN, INF, -1.0, 0.5, 300.0, -300.0, 1e30),
    "qform_code": (0, 1, 2, 3, 4, 5, 99, -1),
    "sform_code": (0, 1, 2, 3, 4, 5, 99, -1),
    "quatern_b": (NAN, INF, 2.0, -2.0, 0.0, 1.0),
    "quatern_c": (NAN, 2.0, 0.0, 1.0),
    "quatern_d": (NAN, 2.0, 0.0, 1.0),
    "qoffset_x": (NAN, INF, 1e30),
    "magic": (b"ni1", b"n+2", b"xxx", b""),
}  # fmt: skip
ARRAY_EDITS = {  # field: (indices, values); "orig" values are computed from the current entry
    "dim": (range(8), (0, 1, 2, 3, 4, 5, 7, 8, -1, 32767, -32768, "+1", "-1")),
    "pixdim": (range(8), (0.0, -1.0, NAN, INF, 1e-30, 1e30, -0.0)),
    "srow_x": (range(4), (NAN, INF, 0.0, 1e30, -1e30, 1e-30, "*2", "*-1", "+1")),
    "srow_y": (range(4), (NAN, 0.0, 1e30, "*2", "*-1", "+1")),
    "srow_z": (range(4), (NAN, 0.0, -1e30, "*2", "*-1", "+1")),
}


@st.composite
def nifti_header_edit(draw, raw: bytes) -> bytes:
    import nibabel as nib

    with quiet():
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348]))
    arr = header.structarr
    for _ in range(draw(st.integers(1, 3))):
        field = draw(st.sampled_from((*HEADER_EDITS, *ARRAY_EDITS, "byteswap")))
        if field == "byteswap":
            header = header.as_byteswapped()
            arr = header.structarr
        elif field in HEADER_EDITS:
            with quiet():
                arr[field] = np.array(draw(st.sampled_from(HEADER_EDITS[field]))).astype(
                    arr[field].dtype
                )
        else:
            indices, values = ARRAY_EDITS[field]
            i = draw(st.sampled_from(indices))
            value, old = draw(st.sampled_from(values)), float(arr[field][i])
            if isinstance(value, str):
                value = {"+1": old + 1, "-1": old - 1, "*2": old * 2, "*-1": -old}[value]
            with quiet():
                arr[field][i] = np.array(value).astype(arr[field].dtype)
        note(f"header edit: {field}")
    return arr.tobytes() + raw[348:]


@st.composite
def nifti_reencode(draw, data: np.ndarray, affine: np.ndarray) -> bytes:
    """A valid NIfTI-1 file with other content: dtype, labels, shape or affine changed."""
    import nibabel as nib

    good_affine = affine
    data, affine = np.array(data), np.array(affine)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(("dtype", "labels", "shape", "affine")))
        if kind == "dtype":
            dtype = draw(st.sampled_from(("uint8", "int8", "int16", "uint16", "int32", "float32",
                                          "float64", "complex64")))  # fmt: skip
            with quiet():
                data = data.astype(dtype)
        elif kind == "labels":
            value = draw(st.sampled_from((-1, 256, 300, 2.5, NAN, INF, -INF, 1e30, 0.4999, 255, 19,
                                          20, 1e-4)))  # fmt: skip
            if data.dtype.kind in "iu":
                info = np.iinfo(data.dtype)
                if not (math.isfinite(value) and float(value).is_integer()
                        and info.min <= value <= info.max):  # fmt: skip
                    data = data.astype(np.float32)
            index = tuple(draw(st.integers(0, s - 1)) for s in data.shape)
            data[index] = value
        elif kind == "shape":
            how = draw(st.sampled_from(("crop", "pad", "swap", "4d", "4d x2", "2d")))
            axis = draw(st.integers(0, data.ndim - 1))
            if how == "crop" and data.shape[axis] > 1:
                data = np.delete(data, 0 if draw(st.booleans()) else -1, axis=axis)
            elif how == "pad":
                widths = [(0, 0)] * data.ndim
                widths[axis] = (draw(st.integers(0, 2)), draw(st.integers(1, 2)))
                data = np.pad(data, widths)
            elif how == "swap" and data.ndim >= 2:
                data = np.swapaxes(data, axis, (axis + 1) % data.ndim)
            elif how == "4d":
                data = data[..., None]
            elif how == "4d x2":
                data = np.stack([data, data], axis=-1)
            elif how == "2d":
                data = data[..., 0]
        else:
            how = draw(st.sampled_from(("shift", "flip", "permute", "scale", "singular", "nan",
                                        "huge", "tiny")))  # fmt: skip
            j = draw(st.integers(0, 2))
            if how == "shift":
                affine[:3, 3] += affine[:3, j] * draw(st.sampled_from((0.3, 0.6, 1.0, 5.0, -1.0)))
            elif how == "flip":
                affine[:3, j] *= -1
            elif how == "permute":
                affine[:3, [j, (j + 1) % 3]] = affine[:3, [(j + 1) % 3, j]]
            elif how == "scale":
                affine[:3, j] *= 2
            elif how == "singular":
                affine[:3, j] = 0
            elif how == "nan":
                affine[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = NAN
            elif how == "huge":
                affine[draw(st.integers(0, 2)), draw(st.integers(0, 3))] = 1e30
            else:
                affine[:3, :3] *= 1e-12
        note(f"re-encode: {kind}")
    with quiet():
        raw = nib.Nifti1Image(data, good_affine, dtype=data.dtype).to_bytes()
        if np.array_equal(affine, good_affine):
            return raw
        # the edited affine goes into the sform (which readers prefer), written as is: nibabel
        # refuses to encode a singular or non-finite one
        arr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw[:348])).structarr
        arr["srow_x"], arr["srow_y"], arr["srow_z"] = affine[0], affine[1], affine[2]
        arr["sform_code"] = 1
        return arr.tobytes() + raw[348:]


class NiftiSeed:
    """A real segmentation and its series (a plain class: short in hypothesis reports)."""

    def __init__(self, raw: bytes, data: np.ndarray, affine: np.ndarray, series: dicom.SeriesMeta):
        self.raw, self.data, self.affine, self.series = raw, data, affine, series

    def __repr__(self) -> str:
        return f"NiftiSeed({Path(self.series.folder).name!r})"


@st.composite
def mutated_nifti(draw, seed: NiftiSeed) -> tuple[bytes, str]:
    plan = draw(st.sampled_from(("header", "header", "reencode", "reencode", "bytes", "mixed")))
    note(f"plan {plan}")
    if plan == "header":
        data = draw(nifti_header_edit(seed.raw))
    elif plan == "reencode":
        data = draw(nifti_reencode(seed.data, seed.affine))
    elif plan == "bytes":
        data = draw(byte_edits(seed.raw, 352))
    else:
        data = draw(byte_edits(draw(nifti_header_edit(draw(nifti_reencode(seed.data, seed.affine)))),
                               352))  # fmt: skip
    suffix = ".nii"
    wrap = draw(st.sampled_from(("none", "none", "gzip", "gzip corrupt", "gzip as .nii",
                                 "plain as .nii.gz")))  # fmt: skip
    if wrap.startswith("gzip"):
        data = gzip.compress(data, mtime=0)
        suffix = ".nii.gz" if wrap != "gzip as .nii" else ".nii"
        if wrap == "gzip corrupt":
            data = draw(byte_edits(data, len(data)))
    elif wrap == "plain as .nii.gz":
        suffix = ".nii.gz"
    note(f"wrap {wrap}")
    return Blob(data), suffix


@pytest.fixture(scope="module")
def nifti_seed(synthetic_data) -> NiftiSeed:
    import nibabel as nib

    layout = rsna.RsnaLayout(synthetic_data)
    uid = next(u for u in layout.list_studies() if layout.segmentation_path(u))
    path = layout.segmentation_path(uid)
    series = dicom.read_series_meta(layout.series_dir(uid))
    img = nib.load(path)
    assert nifti.align_segmentation(path, series).shape == series.shape
    return NiftiSeed(path.read_bytes(), np.asarray(img.dataobj), img.affine, series)


def test_fuzz_align_segmentation(nifti_seed, work_dir, capsys, caplog):
    started = time.monotonic()
    caplog.set_level(logging.CRITICAL, logger="nibabel")  # its header checks log every fix-up
    folder = work_dir / "nifti"
    folder.mkdir(exist_ok=True)

    @given(mutated_nifti(nifti_seed))
    def one(mutated):
        data, suffix = mutated
        for old in folder.iterdir():
            old.unlink()
        path = io_path(folder, data, "seg" + suffix)
        seg = run_reader("align_segmentation", SegmentationError, path,
                         lambda: nifti.align_segmentation(path, nifti_seed.series))  # fmt: skip
        if seg is not None:
            assert isinstance(seg, np.ndarray) and seg.dtype == np.uint8
            assert seg.shape == nifti_seed.series.shape and seg.flags.c_contiguous

    fuzz(one, EXAMPLES["align_segmentation"])()
    report(capsys, "align_segmentation", EXAMPLES["align_segmentation"], started)


# --------------------------------------------------------------------------------------------
# CSVs
# --------------------------------------------------------------------------------------------
JUNK_CELLS = (
    "", " ", "NaN", "nan", "NA", "N/A", "null", "None", "abc", "1e400", "-1e400", "inf", "-inf",
    "Infinity", "-1", "0", "1", "2", "0.5", "1.0", "1e30", "-0", "9223372036854775807",
    "9223372036854775808", "1e19", "-1e19", "1_000", "0x10", " 1", "1 ", "\u0661", "\uff11",
    "1,5", '"', '""', "\n", "\u00e9", "\x00", "a" * 5000, "1.2.3", "1.2.826.0.1.3680043.20397",
    "C1", "C8", "patient_overall", "True", "1e-400", "+1", "1.", ".5", "5e-324", "\ud800",
)  # fmt: skip
CSV_OPS = ("cell", "cell", "cell", "header cell", "drop column", "add column", "duplicate column",
           "swap columns", "delete row", "duplicate row", "ragged row", "no rows", "no header",
           "blank line")  # fmt: skip
ENCODINGS = ("utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16", "utf-32")


@st.composite
def mutated_csv(draw, text: str) -> bytes:
    plan = draw(st.sampled_from(("cells", "cells", "cells", "bytes", "cells+bytes", "junk")))
    note(f"plan {plan}")
    if plan == "junk":
        return draw(st.sampled_from((b"", b"\xef\xbb\xbf", b"\n", b" \n\n", b"\x00" * 16, b",,,\n"))
                    | st.binary(max_size=2000))  # fmt: skip
    rows = [list(r) for r in csv.reader(io.StringIO(text))]
    if plan != "bytes":
        for _ in range(draw(st.integers(1, 4))):
            op = draw(st.sampled_from(CSV_OPS))
            width = max((len(r) for r in rows), default=0)
            i = draw(st.integers(1, max(1, len(rows) - 1)))
            j = draw(st.integers(0, max(0, width - 1)))
            cell = draw(st.sampled_from(JUNK_CELLS))
            if op == "cell" and i < len(rows) and j < len(rows[i]):
                rows[i][j] = cell if draw(st.integers(0, 3)) else rows[i][j] + cell
            elif op == "header cell" and rows and j < len(rows[0]):
                rows[0][j] = draw(st.sampled_from((cell, rows[0][j].lower(), rows[0][j] + " ",
                                                   rows[0][(j + 1) % len(rows[0])])))  # fmt: skip
            elif op == "drop column":
                rows = [r[:j] + r[j + 1 :] for r in rows]
            elif op == "add column":
                name = draw(st.sampled_from(("extra", "", "x", "StudyInstanceUID", "C1")))
                rows = [r + ([name] if k == 0 else [cell]) for k, r in enumerate(rows)]
            elif op == "duplicate column":
                rows = [r + r[j : j + 1] for r in rows]
            elif op == "swap columns" and width > 1:
                k = (j + 1) % width
                rows = [[*r] for r in rows]
                for r in rows:
                    if max(j, k) < len(r):
                        r[j], r[k] = r[k], r[j]
            elif op == "delete row" and i < len(rows):
                del rows[i]
            elif op == "duplicate row" and i < len(rows):
                rows.insert(i, list(rows[i]))
            elif op == "ragged row" and i < len(rows):
                rows[i] = rows[i][: j] if draw(st.booleans()) else rows[i] + [cell]
            elif op == "no rows":
                rows = rows[:1]
            elif op == "no header":
                rows = rows[1:]
            elif op == "blank line":
                rows.insert(i, [])
            note(f"csv edit: {op} ({i}, {j}) {cell[:20]!r}")
    delimiter = draw(st.sampled_from((",", ",", ",", ";", "\t")))
    terminator = draw(st.sampled_from(("\n", "\n", "\r\n", "\r")))
    quoting = draw(st.sampled_from((csv.QUOTE_MINIMAL, csv.QUOTE_MINIMAL, csv.QUOTE_ALL)))
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator=terminator, quoting=quoting).writerows(rows)
    encoding = draw(st.sampled_from(ENCODINGS))
    note(f"written with {delimiter!r}, {terminator!r}, quoting {quoting}, {encoding}")
    data = buffer.getvalue().encode(encoding, errors="replace")
    if "bytes" in plan:
        data = draw(byte_edits(data, len(data)))
    return data


CSV_READERS = {
    "train.csv": ("train", "read_train_csv", rsna.read_train_csv),
    "train_bounding_boxes.csv": ("train_bounding_boxes", "read_bounding_boxes",
                                 rsna.read_bounding_boxes),
    "test.csv": ("test", "read_test_csv", rsna.read_test_csv),
    "sample_submission.csv": ("sample_submission", "read_submission", rsna.read_submission),
}  # fmt: skip


def check_frame(frame, schema_name: str) -> None:
    import jsonschema

    schema = rsna.load_schema(schema_name)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(schema["properties"])
    assert not frame.isna().any().any()
    validator = jsonschema.Draft202012Validator(schema)
    for column, spec in schema["properties"].items():
        kind = spec.get("type")
        dtype = frame[column].dtype
        if kind == "integer":
            assert dtype == np.int64, (column, dtype)
        elif kind == "number":
            assert dtype == np.float64, (column, dtype)
            assert np.isfinite(frame[column].to_numpy()).all(), f"non-finite {column}"
        else:
            assert all(isinstance(v, str) for v in frame[column]), column
    for record in frame.to_dict("records"):
        validator.validate(record)


@pytest.mark.parametrize("name", list(CSV_READERS))
def test_fuzz_csv_reader(name, synthetic_data, work_dir, capsys):
    started = time.monotonic()
    schema_name, reader, read = CSV_READERS[name]
    text = (synthetic_data / name).read_text(encoding="utf-8")
    check_frame(read(synthetic_data / name), schema_name)
    folder = work_dir / f"csv-{schema_name}"
    folder.mkdir(exist_ok=True)
    shutil.copy(synthetic_data / "train.csv", folder / "train.csv")
    via_layout = name == "train_bounding_boxes.csv"

    @given(mutated_csv(text), st.booleans())
    def one(data, layout):
        path = io_path(folder, data, name)
        if via_layout and layout:  # also checks the boxes' studies against train.csv
            frame = run_reader(reader, CsvSchemaError, path,
                               lambda: rsna.RsnaLayout(folder).bounding_boxes())  # fmt: skip
        else:
            frame = run_reader(reader, CsvSchemaError, path, lambda: read(path))
        if frame is None:
            return
        check_frame(frame, schema_name)
        if name == "train.csv":
            assert not frame.StudyInstanceUID.duplicated().any()
            assert (frame.patient_overall == frame[list(rsna.VERTEBRAE)].max(axis=1)).all()
        elif name == "test.csv":
            assert (frame.row_id == frame.StudyInstanceUID + "_" + frame.prediction_type).all()

    fuzz(one, EXAMPLES["csv"])()
    report(capsys, reader, EXAMPLES["csv"], started)
