"""Tests of keras_cspine.io.dicom: slices (HU, decoders, compressed syntaxes, bad files) and
series (ordering, geometry, bad folders), on pydicom's real test files and on files written here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers_dicom import (
    ct_dataset,
    phantom,
    save,
    tilted_orientation,
    to_jpeg_lossless,
    write_series,
)
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_rescale, get_decoder

from keras_cspine.errors import DicomReadError, MissingDependencyError
from keras_cspine.io import dicom
from keras_cspine.io.dicom import read_series, read_series_meta, read_slice

JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
needs_dicomsdl = pytest.mark.skipif(
    not dicom.dicomsdl_available(), reason="dicomsdl (the 'fast' extra) is not installed"
)


def pydicom_file(name: str) -> str:
    """A file of pydicom's bundled test data; fails (never skips) when it is not available."""
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is not available offline"
    return path


def expect_read_error(path, **kwargs) -> DicomReadError:
    with pytest.raises(DicomReadError) as info:
        read_slice(path, **kwargs)
    assert str(path) in str(info.value)
    return info.value


def forbid_pydicom_decoding(monkeypatch):
    """Make any pydicom decode fail, to prove that dicomsdl did the work."""

    def refuse(ds, path, syntax):
        raise AssertionError(f"pydicom was asked to decode {path}")

    monkeypatch.setattr(dicom, "_decode_pydicom", refuse)


# --------------------------------------------------------------------------------------------
# Real files from pydicom's test data
# --------------------------------------------------------------------------------------------
REAL_FILES = [
    ("CT_small.dcm", "1.2.840.10008.1.2.1"),
    ("693_J2KI.dcm", "1.2.840.10008.1.2.4.91"),
    ("J2K_pixelrep_mismatch.dcm", "1.2.840.10008.1.2.4.90"),
    ("MR_small_RLE.dcm", "1.2.840.10008.1.2.5"),
]


@pytest.mark.parametrize("decoder", ["auto", "pydicom"])
@pytest.mark.parametrize("name, syntax", REAL_FILES)
def test_real_file_hu_matches_pydicom_rescale(name, syntax, decoder):
    path = pydicom_file(name)
    ds = pydicom.dcmread(path)
    expected = apply_rescale(ds.pixel_array.astype(np.float64), ds)
    hu, meta = read_slice(path, decoder=decoder)
    assert hu.dtype == np.float32 and hu.shape == (ds.Rows, ds.Columns)
    np.testing.assert_array_equal(hu, expected.astype(np.float32))
    assert meta.transfer_syntax_uid == syntax


def test_real_ct_slice_metadata():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu, meta = read_slice(path)
    assert meta.path == str(path)
    assert (meta.rows, meta.columns) == (128, 128)
    assert meta.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert meta.image_position == tuple(float(v) for v in ds.ImagePositionPatient)
    assert meta.image_orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
    assert meta.slice_thickness == float(ds.SliceThickness)
    assert meta.instance_number == int(ds.InstanceNumber)
    assert (meta.rescale_slope, meta.rescale_intercept) == (1.0, -1024.0)
    assert meta.study_uid == ds.StudyInstanceUID and meta.sop_uid == ds.SOPInstanceUID
    assert meta.photometric_interpretation == "MONOCHROME2"
    assert -1024 <= hu.min() < 0 < hu.max()  # air to bone, in HU


def test_pixel_representation_mismatch_is_sign_corrected():
    # the JPEG 2000 codestream says unsigned, the dataset says signed 13-bit: -2000 is air outside
    # the field of view, which a reader ignoring the mismatch returns as 6192
    hu, _ = read_slice(pydicom_file("J2K_pixelrep_mismatch.dcm"))
    assert hu.min() == -2000.0
    assert hu.max() < 4096


@needs_dicomsdl
def test_dicomsdl_first_decode_in_a_fresh_process_is_exact(tmp_path, slice_hu):
    # dicomsdl's 8-bit JPEG decoder fails on its first call in a process (pydicom's
    # SC_rgb_jpeg_gdcm.dcm decodes to garbage once, then correctly); read_slice hands dicomsdl only
    # 16-bit data. Check that path where the bug would bite: the very first decode of a process.
    src = save(ct_dataset(slice_hu, bits_stored=12), tmp_path / "plain.dcm")
    jpeg = to_jpeg_lossless(src, tmp_path / "jpeg.dcm")
    code = (
        "import sys, numpy as np; from keras_cspine.io.dicom import read_slice; "
        "auto, _ = read_slice(sys.argv[1], decoder='dicomsdl'); "
        "ref, _ = read_slice(sys.argv[1], decoder='pydicom'); "
        "sys.exit(0 if np.array_equal(auto, ref) else 3)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(jpeg)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_eight_bit_files_never_reach_dicomsdl(monkeypatch):
    path = pydicom_file("SC_rgb_jpeg_gdcm.dcm")  # 8-bit JPEG Lossless SV1 (RGB)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == JPEG_LOSSLESS_SV1
    monkeypatch.setattr(dicom, "_open_dicomsdl", lambda raw: pytest.fail("8-bit data sent to dicomsdl"))
    error = expect_read_error(path)
    assert "MONOCHROME" in error.problem and "RGB" in error.problem


# --------------------------------------------------------------------------------------------
# Files written here: every transfer syntax, both decoders
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slice_hu() -> np.ndarray:
    return phantom((1, 48, 40), seed=3)[0]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("syntax", ["explicit", "jpeg_lossless", "rle", "j2k"])
@pytest.mark.parametrize("decoder", ["auto", "pydicom", "dicomsdl"])
def test_written_slice_roundtrip(tmp_path, slice_hu, syntax, signed, decoder):
    if decoder == "dicomsdl" and not dicom.dicomsdl_available():
        pytest.skip("dicomsdl (the 'fast' extra) is not installed")
    intercept = 0.0 if signed else -1024.0
    ds = ct_dataset(slice_hu, signed=signed, intercept=intercept, instance_number=7,
                    position=(1.5, -2.0, 33.0))  # fmt: skip
    path = save(ds, tmp_path / "7.dcm", syntax)
    hu, meta = read_slice(path, decoder=decoder)
    np.testing.assert_array_equal(hu, slice_hu.astype(np.float32))
    assert meta.transfer_syntax_uid == str(pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    assert meta.instance_number == 7 and meta.image_position == (1.5, -2.0, 33.0)
    assert meta.pixel_spacing == (0.5, 0.5) and meta.rescale_intercept == intercept


@needs_dicomsdl
@pytest.mark.parametrize("syntax", ["explicit", "jpeg_lossless", "j2k"])
def test_dicomsdl_and_pydicom_identical_on_written_files(tmp_path, slice_hu, syntax, monkeypatch):
    path = save(ct_dataset(slice_hu, bits_stored=12), tmp_path / "1.dcm", syntax)
    by_pydicom, _ = read_slice(path, decoder="pydicom")
    forbid_pydicom_decoding(monkeypatch)
    by_dicomsdl, _ = read_slice(path, decoder="dicomsdl")
    by_auto, _ = read_slice(path, decoder="auto")
    np.testing.assert_array_equal(by_dicomsdl, by_pydicom)
    np.testing.assert_array_equal(by_auto, by_pydicom)


@needs_dicomsdl
@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_dicomsdl_and_pydicom_identical_on_real_files(name, monkeypatch):
    path = pydicom_file(name)
    by_pydicom, _ = read_slice(path, decoder="pydicom")
    forbid_pydicom_decoding(monkeypatch)
    by_dicomsdl, _ = read_slice(path, decoder="dicomsdl")
    np.testing.assert_array_equal(by_dicomsdl, by_pydicom)


def _without_optional_tags(hu):
    ds = ct_dataset(hu, slope=None, thickness=None)
    del ds.ImagePositionPatient, ds.InstanceNumber
    return ds


HEADER_CASES = {
    "CT_small": lambda tmp, hu: Path(pydicom_file("CT_small.dcm")),
    "693_J2KI": lambda tmp, hu: Path(pydicom_file("693_J2KI.dcm")),
    "written, jpeg lossless": lambda tmp, hu: save(
        ct_dataset(hu, slope=0.5, intercept=-1030.5, instance_number=12,
                   position=(-1.25, 3.5, -77.125), pixel_spacing=(0.488281, 0.488281)),
        tmp / "1.dcm", "jpeg_lossless"),
    "written, optional tags missing": lambda tmp, hu: save(_without_optional_tags(hu),
                                                           tmp / "1.dcm"),
}  # fmt: skip


@needs_dicomsdl
@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_dicomsdl_header_path_gives_the_same_slice_meta(tmp_path, slice_hu, case, monkeypatch):
    path = HEADER_CASES[case](tmp_path, slice_hu)
    _, by_pydicom = read_slice(path, decoder="pydicom")

    def refuse(*args, **kwargs):
        raise AssertionError("the pydicom header path was used")

    monkeypatch.setattr(dicom, "_slice_meta", refuse)
    _, by_dicomsdl = read_slice(path, decoder="dicomsdl")
    assert repr(by_dicomsdl) == repr(by_pydicom)  # repr: NaN geometry compares equal


def test_auto_without_dicomsdl_uses_pydicom(tmp_path, slice_hu, monkeypatch):
    path = save(ct_dataset(slice_hu), tmp_path / "1.dcm", "jpeg_lossless")
    monkeypatch.setattr(dicom, "_dicomsdl", lambda: None)
    hu, _ = read_slice(path)
    np.testing.assert_array_equal(hu, slice_hu)
    with pytest.raises(MissingDependencyError, match=r"keras_cspine\[fast\]"):
        read_slice(path, decoder="dicomsdl")


@pytest.mark.parametrize("signed", [False, True])
def test_monochrome1_is_inverted_back(tmp_path, slice_hu, signed):
    intercept = 0.0 if signed else -1024.0
    ds = ct_dataset(slice_hu, photometric="MONOCHROME1", signed=signed, bits_stored=12,
                    intercept=intercept)  # fmt: skip
    stored = ds.pixel_array  # really inverted on disk: air is bright
    assert stored[0, 0] > stored.mean()
    hu, meta = read_slice(save(ds, tmp_path / "1.dcm"))
    assert meta.photometric_interpretation == "MONOCHROME1"
    np.testing.assert_array_equal(hu, slice_hu)


def test_rescale_slope_and_intercept_are_applied(tmp_path, slice_hu):
    ds = ct_dataset(slice_hu, slope=0.5, intercept=-1024.0)  # stored = 2 * (hu + 1024)
    hu, meta = read_slice(save(ds, tmp_path / "1.dcm"))
    assert meta.rescale_slope == 0.5
    np.testing.assert_array_equal(hu, slice_hu)


@pytest.mark.parametrize("decoder", ["auto", "pydicom"])
def test_missing_rescale_tags_mean_identity(tmp_path, slice_hu, decoder):
    # documented choice: no RescaleSlope / RescaleIntercept = the identity Modality LUT, recorded
    ds = ct_dataset(slice_hu + 1024, slope=None, intercept=None)
    assert "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    hu, meta = read_slice(save(ds, tmp_path / "1.dcm"), decoder=decoder)
    assert (meta.rescale_slope, meta.rescale_intercept) == (1.0, 0.0)
    np.testing.assert_array_equal(hu, slice_hu + 1024)
    assert meta.rescale_defaulted
    assert meta.warnings == (dicom.RESCALE_SLOPE_DEFAULTED, dicom.RESCALE_INTERCEPT_DEFAULTED)


@pytest.mark.parametrize(
    "slope, intercept, expected",
    [(None, -1024.0, (dicom.RESCALE_SLOPE_DEFAULTED,)),
     (1.0, None, (dicom.RESCALE_INTERCEPT_DEFAULTED,)),
     (1.0, -1024.0, ())],
)  # fmt: skip
def test_rescale_defaulted_is_recorded_per_tag(tmp_path, slice_hu, slope, intercept, expected):
    ds = ct_dataset(slice_hu + (1024 if intercept is None else 0), slope=slope, intercept=intercept)
    _, meta = read_slice(save(ds, tmp_path / "1.dcm"))
    assert meta.warnings == expected and meta.rescale_defaulted == bool(expected)


def test_series_meta_says_which_slices_had_rescale_defaulted(tmp_path):
    write_series(tmp_path, phantom((5, 8, 8)) + 1024, slope=None, intercept=0.0)
    meta = read_series_meta(tmp_path)
    assert meta.rescale_defaulted
    assert meta.warnings == (
        f"{dicom.RESCALE_SLOPE_DEFAULTED} (5 of 5 slices: 1.dcm, 2.dcm, 3.dcm, ...)",
    )
    _, meta2 = read_series(tmp_path)
    assert meta2.warnings == meta.warnings and meta2.slices == meta.slices


def test_series_with_rescale_tags_has_no_warnings(tmp_path):
    write_series(tmp_path, phantom((3, 8, 8)))
    meta = read_series_meta(tmp_path)
    assert meta.warnings == () and not meta.rescale_defaulted


def test_modality_lut_sequence_without_rescale_is_refused(tmp_path, slice_hu):
    from pydicom.dataset import Dataset

    ds = ct_dataset(slice_hu + 1024, slope=None, intercept=None)
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.ModalityLUTType = "HU"
    lut.LUTData = np.arange(256, dtype=np.uint16).tobytes()
    ds.ModalityLUTSequence = [lut]
    error = expect_read_error(save(ds, tmp_path / "1.dcm"))
    assert "Modality LUT Sequence" in error.problem


def test_single_slice_without_geometry_reads_with_nan_geometry(tmp_path, slice_hu):
    ds = ct_dataset(slice_hu)
    del ds.ImagePositionPatient, ds.PixelSpacing
    hu, meta = read_slice(save(ds, tmp_path / "1.dcm"))
    np.testing.assert_array_equal(hu, slice_hu)
    assert np.isnan(meta.image_position).all() and np.isnan(meta.pixel_spacing).all()


def test_unknown_decoder_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'gdcm'"):
        read_slice(tmp_path / "1.dcm", decoder="gdcm")


# --------------------------------------------------------------------------------------------
# Missing decoder
# --------------------------------------------------------------------------------------------
@pytest.fixture
def no_jpeg_lossless_plugins(monkeypatch):
    """pydicom's JPEG Lossless SV1 decoder with every plugin unavailable, as on a bare install."""
    decoder = get_decoder(JPEG_LOSSLESS_SV1)
    monkeypatch.setattr(decoder, "_available", {})
    monkeypatch.setattr(decoder, "_unavailable", {"pylibjpeg": ("pylibjpeg", "pylibjpeg-libjpeg")})
    assert not decoder.is_available


@pytest.mark.parametrize("decoder", ["pydicom", "auto-without-dicomsdl"])
def test_missing_decoder_names_file_syntax_and_package(
    tmp_path, slice_hu, monkeypatch, no_jpeg_lossless_plugins, decoder
):
    path = save(ct_dataset(slice_hu), tmp_path / "1.dcm", "jpeg_lossless")
    if decoder == "auto-without-dicomsdl":
        monkeypatch.setattr(dicom, "_dicomsdl", lambda: None)
        decoder = "auto"
    error = expect_read_error(path, decoder=decoder)
    assert JPEG_LOSSLESS_SV1 in error.problem
    assert "JPEG Lossless" in error.problem
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in error.problem


@needs_dicomsdl
def test_missing_pydicom_plugin_does_not_matter_with_dicomsdl(
    tmp_path, slice_hu, no_jpeg_lossless_plugins
):
    path = save(ct_dataset(slice_hu), tmp_path / "1.dcm", "jpeg_lossless")
    hu, _ = read_slice(path)
    np.testing.assert_array_equal(hu, slice_hu)


# --------------------------------------------------------------------------------------------
# Bad files: each one a DicomReadError naming the file, with every decoder
# --------------------------------------------------------------------------------------------
def _write_good(tmp_path, hu, syntax="explicit", **kwargs) -> Path:
    return save(ct_dataset(hu, **kwargs), tmp_path / "good.dcm", syntax)


def bad_random_bytes(tmp_path, hu):
    path = tmp_path / "1.dcm"
    path.write_bytes(np.random.default_rng(0).bytes(4000))
    return path, "not a DICOM file"


def bad_text_file(tmp_path, hu):
    path = tmp_path / "1.dcm"
    path.write_text("StudyInstanceUID,patient_overall\n1.2.3,0\n")
    return path, "not a DICOM file"


def bad_empty_file(tmp_path, hu):
    path = tmp_path / "1.dcm"
    path.write_bytes(b"")
    return path, "DICOM"


def _truncated(syntax, keep):
    def make(tmp_path, hu):
        data = _write_good(tmp_path, hu, syntax).read_bytes()
        path = tmp_path / "1.dcm"
        path.write_bytes(data[: int(len(data) * keep)])
        return path, r"truncated|PixelData|decode|codestream"

    return make


def bad_no_pixel_data(tmp_path, hu):
    ds = ct_dataset(hu)
    del ds.PixelData
    return save(ds, tmp_path / "1.dcm"), "no PixelData"


def _rows_changed(syntax, delta):
    def make(tmp_path, hu):
        ds = pydicom.dcmread(_write_good(tmp_path, hu, syntax))
        ds.Rows = ds.Rows + delta
        path = tmp_path / "1.dcm"
        ds.save_as(path)
        return path, r"Rows x Columns|Rows/Columns"

    return make


def bad_garbage_codestream(tmp_path, hu):
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(_write_good(tmp_path, hu, "jpeg_lossless"))
    ds.PixelData = encapsulate([np.random.default_rng(1).bytes(600)])
    path = tmp_path / "1.dcm"
    ds.save_as(path)
    return path, "no complete JPEG Lossless.* frame header found"  # refused before decoding


def bad_not_greyscale(tmp_path, hu):
    ds = ct_dataset(hu)
    ds.PhotometricInterpretation = "RGB"
    return save(ds, tmp_path / "1.dcm"), "greyscale"


def bad_missing_rows(tmp_path, hu):
    ds = ct_dataset(hu)
    del ds.Rows
    return save(ds, tmp_path / "1.dcm"), "missing Rows"


# -- cases found by tests/test_fuzz_readers.py ----------------------------------------------
def _patched(tmp_path, hu, old: bytes, new: bytes, syntax="explicit", **kwargs):
    """A good file with the bytes ``old`` (found once) replaced by ``new``."""
    data = _write_good(tmp_path, hu, syntax, **kwargs).read_bytes()
    assert data.count(old) == 1, old
    path = tmp_path / "1.dcm"
    path.write_bytes(data.replace(old, new))
    return path


def bad_rows_multivalued(tmp_path, hu):
    ds = ct_dataset(hu)
    ds.add_new(0x00280010, "US", [48, 48])
    return save(ds, tmp_path / "1.dcm"), "Rows is not a single whole number"


def bad_rows_as_text(tmp_path, hu):
    ds = ct_dataset(hu)
    ds.add_new(0x00280010, "LO", "abc")
    return save(ds, tmp_path / "1.dcm"), "Rows is not a single whole number"


def bad_unknown_transfer_syntax(tmp_path, hu):
    path = _patched(tmp_path, hu, b"1.2.840.10008.1.2.1\x00", b"1.2.3.4.5.6.7.8.9.10")
    return path, "not a transfer syntax"


def bad_pixel_data_vr(tmp_path, hu):
    return _patched(tmp_path, hu, b"\xe0\x7f\x10\x00OW", b"\xe0\x7f\x10\x00XX"), "PixelData"


def _huge_rescale(slope):
    def make(tmp_path, hu):
        ds = ct_dataset(hu)
        ds.RescaleSlope = slope
        return save(ds, tmp_path / "1.dcm"), "float32 range"

    return make


def bad_jpeg_without_huffman_tables(tmp_path, hu):
    from pydicom.encaps import encapsulate, generate_frames

    ds = pydicom.dcmread(_write_good(tmp_path, hu, "jpeg_lossless"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    at = frame.index(b"\xff\xc4")
    frame = frame[:at] + frame[at + 2 + int.from_bytes(frame[at + 2 : at + 4], "big") :]
    ds.PixelData = encapsulate([frame])
    path = tmp_path / "1.dcm"
    ds.save_as(path)
    # the fuzzer's file had a corrupt DHT marker, on which python-gdcm aborted the interpreter
    return path, "no complete JPEG Lossless.* frame header"


def bad_jpeg_deeper_than_bits_allocated(tmp_path, hu):
    ds = pydicom.dcmread(_write_good(tmp_path, hu, "jpeg_lossless"))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    path = tmp_path / "1.dcm"
    ds.save_as(path)
    return path, "16-bit samples, which do not fit BitsAllocated 8"


def bad_jpeg_ls_columns(tmp_path, hu):
    ds = pydicom.dcmread(pydicom_file("MR_small_jpeg_ls_lossless.dcm"))
    ds.Columns = 4096  # python-gdcm aborts on this one
    path = tmp_path / "1.dcm"
    ds.save_as(path)
    return path, r"codestream is 64 x 64 pixels but Rows x Columns say 64 x 4096"


BAD_FILES = {
    "random bytes": bad_random_bytes,
    "text file": bad_text_file,
    "empty file": bad_empty_file,
    "truncated explicit, half": _truncated("explicit", 0.5),
    "truncated explicit, header only": _truncated("explicit", 0.05),
    "truncated explicit, 3 bytes short": _truncated("explicit", 0.999),
    "truncated jpeg lossless, half": _truncated("jpeg_lossless", 0.5),
    "truncated jpeg 2000, half": _truncated("j2k", 0.5),
    "no PixelData": bad_no_pixel_data,
    "explicit, Rows too large": _rows_changed("explicit", +4),
    "explicit, Rows too small": _rows_changed("explicit", -4),
    "jpeg lossless, Rows too large": _rows_changed("jpeg_lossless", +4),
    "jpeg lossless, Rows too small": _rows_changed("jpeg_lossless", -4),
    "jpeg 2000, Rows too small": _rows_changed("j2k", -4),
    "jpeg lossless, garbage codestream": bad_garbage_codestream,
    "RGB photometric": bad_not_greyscale,
    "missing Rows": bad_missing_rows,
    "Rows multi-valued": bad_rows_multivalued,
    "Rows as text": bad_rows_as_text,
    "unknown TransferSyntaxUID": bad_unknown_transfer_syntax,
    "PixelData with an unknown VR": bad_pixel_data_vr,
    "RescaleSlope beyond float32": _huge_rescale("1e39"),
    "RescaleSlope x stored values beyond float32": _huge_rescale("1e35"),
    "jpeg lossless without Huffman tables": bad_jpeg_without_huffman_tables,
    "jpeg lossless deeper than BitsAllocated": bad_jpeg_deeper_than_bits_allocated,
    "jpeg-ls, Columns too large": bad_jpeg_ls_columns,
}


@pytest.mark.parametrize("decoder", ["auto", "pydicom"])
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_dicom_read_error(tmp_path, slice_hu, case, decoder):
    path, problem = BAD_FILES[case](tmp_path, slice_hu)
    error = expect_read_error(path, decoder=decoder)
    assert re.search(problem, error.problem), error.problem


class PanicException(BaseException):
    """Stands in for pyo3's PanicException (pylibjpeg-rle panics on some corrupt RLE data)."""


@pytest.mark.parametrize("raised, escapes", [(PanicException, False), (KeyboardInterrupt, True)])
def test_decoder_panics_are_read_errors_but_interrupts_are_not(
    tmp_path, slice_hu, monkeypatch, raised, escapes
):
    path = save(ct_dataset(slice_hu), tmp_path / "1.dcm", "rle")

    def panic(self):
        raise raised("index out of bounds")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(panic))
    if escapes:
        with pytest.raises(raised):
            read_slice(path, decoder="pydicom")
    else:
        assert "index out of bounds" in expect_read_error(path, decoder="pydicom").problem


def test_python_gdcm_is_the_last_resort(tmp_path, slice_hu, monkeypatch):
    # python-gdcm, first in pydicom's order, aborts the interpreter on some corrupt codestreams
    available = get_decoder(JPEG_LOSSLESS_SV1).available_plugins
    if not {"gdcm", "pylibjpeg"} <= set(available):
        pytest.skip(f"needs python-gdcm and pylibjpeg, found {available}")
    asked = []
    options = pydicom.dataset.Dataset.pixel_array_options

    def spy(self, **kwargs):
        asked.append(kwargs.get("decoding_plugin"))
        return options(self, **kwargs)

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array_options", spy)
    hu, _ = read_slice(save(ct_dataset(slice_hu), tmp_path / "1.dcm", "jpeg_lossless"),
                       decoder="pydicom")  # fmt: skip
    np.testing.assert_array_equal(hu, slice_hu)
    assert asked == ["pylibjpeg"]


@needs_dicomsdl
def test_dicomsdl_is_not_used_when_it_parses_the_header_differently(
    tmp_path, slice_hu, monkeypatch
):
    # found by the fuzzer: dicomsdl segfaults asking for pixel data its own parser did not find
    path = save(ct_dataset(slice_hu), tmp_path / "1.dcm", "jpeg_lossless")
    layout = dicom._pixel_layout

    def elsewhere(ds, path, syntax):  # as if pydicom had found PixelData elsewhere
        found = layout(ds, path, syntax)
        return dicom.dataclasses.replace(found, pixel_offset=found.pixel_offset + 2)

    def refuse(sdl):
        raise AssertionError("dicomsdl decoded pixel data it disagrees on")

    monkeypatch.setattr(dicom, "_pixel_layout", elsewhere)
    monkeypatch.setattr(dicom, "_decode_dicomsdl", refuse)
    hu, _ = read_slice(path, decoder="dicomsdl")
    np.testing.assert_array_equal(hu, slice_hu)


def test_missing_file_is_a_dicom_read_error(tmp_path):
    expect_read_error(tmp_path / "404.dcm")


# --------------------------------------------------------------------------------------------
# Series
# --------------------------------------------------------------------------------------------
SERIES_CASES = {
    "head first": dict(head_first=True),
    "feet first": dict(head_first=False),
    "tilted 20 degrees": dict(orientation=tilted_orientation(20.0)),
    "tilted, feet first, numbers from 41": dict(orientation=tilted_orientation(-12.0),
                                                head_first=False, first_number=41),  # fmt: skip
    "jpeg lossless": dict(syntax="jpeg_lossless"),
    "rle, signed": dict(syntax="rle", signed=True, intercept=0.0),
    "flipped axes (normal points inferior)": dict(orientation=(-1.0, 0, 0, 0, 1.0, 0)),
}


@pytest.mark.parametrize("case", list(SERIES_CASES))
def test_series_order_geometry_and_pixels(tmp_path, case):
    kwargs = SERIES_CASES[case]
    volume = phantom((7, 24, 20), seed=1)
    geom = write_series(tmp_path / "study", volume, **kwargs)
    read, meta = read_series(tmp_path / "study")
    # pixels in series order (superior first), whatever the file numbering
    np.testing.assert_array_equal(read, volume)
    assert meta.shape == volume.shape
    assert meta.slice_numbers == geom.numbers
    assert [Path(s.path) for s in meta.slices] == list(geom.paths)
    assert meta.head_first == kwargs.get("head_first", True)
    assert meta.study_uid == geom.study_uid
    # positions along the normal decrease; the normal points superior
    assert np.all(np.diff(meta.positions_mm) < 0)
    assert meta.normal[2] > 0 and np.isclose(np.linalg.norm(meta.normal), 1)
    expected_spacing = 1.25 * abs(np.cross(geom.row_cosine, geom.col_cosine)[2])
    assert meta.spacing_mm == pytest.approx(expected_spacing)
    # the affine maps (column, row, index) onto each slice's ImagePositionPatient and in-plane axes
    for s, position in enumerate(geom.positions):
        np.testing.assert_allclose(meta.affine @ [0, 0, s, 1], [*position, 1], atol=1e-9)
    dr, dc = geom.pixel_spacing
    np.testing.assert_allclose(meta.affine[:3, 0], geom.row_cosine * dc, atol=1e-12)
    np.testing.assert_allclose(meta.affine[:3, 1], geom.col_cosine * dr, atol=1e-12)


def test_series_meta_reads_no_pixels_and_matches_read_series(tmp_path):
    geom = write_series(tmp_path, phantom((4, 16, 16)), head_first=False)
    meta = read_series_meta(tmp_path)
    _, meta2 = read_series(tmp_path)
    assert meta.slices == meta2.slices and meta.slice_numbers == geom.numbers
    np.testing.assert_array_equal(meta.affine, meta2.affine)


def test_single_slice_series(tmp_path):
    volume = phantom((1, 16, 16))
    write_series(tmp_path, volume)
    read, meta = read_series(tmp_path)
    np.testing.assert_array_equal(read, volume)
    assert meta.slice_numbers == (1,) and meta.head_first
    assert meta.affine[2, 2] < 0  # one step goes inferior


def test_other_files_are_ignored(tmp_path):
    write_series(tmp_path, phantom((3, 16, 16)))
    (tmp_path / "notes.txt").write_text("not a slice")
    (tmp_path / "sub.dcm").mkdir()  # a folder, not a file
    assert read_series_meta(tmp_path).slice_numbers == (1, 2, 3)


def _series(tmp_path, n=4, **kwargs):
    return write_series(tmp_path / "s", phantom((n, 16, 16)), **kwargs)


def _edit(path: Path, **changes) -> Path:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)
    return path


# each case builds a bad series folder in tmp_path / "s" and returns (culprit, expected problem)
def series_empty(tmp_path):
    (tmp_path / "s").mkdir()
    return tmp_path / "s", "no .dcm files"


def series_missing_folder(tmp_path):
    return tmp_path / "s", "not found"


def series_mixed_orientation(tmp_path):
    path = _series(tmp_path).paths[2]
    return _edit(path, ImageOrientationPatient=list(tilted_orientation(10.0))), "mixed orientations"


def series_duplicate_position(tmp_path):
    geom = _series(tmp_path)
    _edit(geom.paths[3], ImagePositionPatient=[float(v) for v in geom.positions[1]])
    return geom.paths[3], "duplicate slice position: 2.dcm and 4.dcm"


def series_missing_position(tmp_path):
    return _edit(_series(tmp_path).paths[1], ImagePositionPatient=None), (
        "missing ImagePositionPatient")  # fmt: skip


def series_missing_orientation(tmp_path):
    return _edit(_series(tmp_path).paths[0], ImageOrientationPatient=None), (
        "missing ImageOrientationPatient")  # fmt: skip


def series_missing_spacing(tmp_path):
    return _edit(_series(tmp_path).paths[3], PixelSpacing=None), "missing PixelSpacing"


def series_non_numeric_position(tmp_path):
    path = _series(tmp_path, top=(1.0, 2.0, 3.0), n=1).paths[0]
    data = path.read_bytes()
    assert data.count(b"1.0\\2.0\\3.0") == 1
    path.write_bytes(data.replace(b"1.0\\2.0\\3.0", b"1.0\\2.0\\x.y"))
    return path, "ImagePositionPatient"


def series_non_numeric_name(tmp_path):
    geom = _series(tmp_path)
    renamed = geom.paths[1].with_name("slice_b.dcm")
    geom.paths[1].rename(renamed)
    return renamed, "not a slice number"


def series_non_dicom_member(tmp_path):
    _series(tmp_path)
    intruder = tmp_path / "s" / "9.dcm"
    intruder.write_text("<html>not a slice</html>")
    return intruder, "not a DICOM file"


def series_two_series(tmp_path):
    return _edit(_series(tmp_path).paths[2], SeriesInstanceUID="1.2.3.4"), "one series per folder"


def series_size_mismatch(tmp_path):
    geom = _series(tmp_path)
    ds = ct_dataset(phantom((1, 20, 16))[0], study_uid=geom.study_uid,
                    series_uid=pydicom.dcmread(geom.paths[0]).SeriesInstanceUID,
                    position=(0, 0, -30))  # fmt: skip
    return save(ds, tmp_path / "s" / "5.dcm"), "size 20x16 differs"


def series_sagittal(tmp_path):
    geom = _series(tmp_path, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    return geom.paths[0], "not an axial series"


BAD_SERIES = {
    "empty folder": series_empty,
    "missing folder": series_missing_folder,
    "mixed orientations": series_mixed_orientation,
    "duplicate positions": series_duplicate_position,
    "missing ImagePositionPatient": series_missing_position,
    "missing ImageOrientationPatient": series_missing_orientation,
    "missing PixelSpacing": series_missing_spacing,
    "non-numeric ImagePositionPatient": series_non_numeric_position,
    "non-numeric file name": series_non_numeric_name,
    "non-DICOM file in the folder": series_non_dicom_member,
    "two series in one folder": series_two_series,
    "slice of another size": series_size_mismatch,
    "sagittal series": series_sagittal,
}


@pytest.mark.parametrize("case", list(BAD_SERIES))
def test_bad_series_raises_naming_the_file(tmp_path, case):
    culprit, problem = BAD_SERIES[case](tmp_path)
    with pytest.raises(DicomReadError) as info:
        read_series_meta(tmp_path / "s")
    assert info.value.path == str(culprit)
    assert problem in info.value.problem
    assert str(culprit) in str(info.value)


def test_truncated_slice_in_series_fails_in_read_series(tmp_path):
    geom = _series(tmp_path)
    data = geom.paths[2].read_bytes()
    geom.paths[2].write_bytes(data[: len(data) * 2 // 3])
    read_series_meta(tmp_path / "s")  # headers are intact
    with pytest.raises(DicomReadError, match="truncated") as info:
        read_series(tmp_path / "s")
    assert info.value.path == str(geom.paths[2])


# --------------------------------------------------------------------------------------------
# The synthetic dataset (keras_cspine.synthetic.dataset)
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_synthetic_studies_read_as_series(synthetic_data):
    from keras_cspine.io.rsna import RsnaLayout

    layout = RsnaLayout(synthetic_data)
    uids = layout.list_studies("train")
    assert uids
    seen_syntaxes, seen_head_first = set(), set()
    for uid in uids:
        volume, meta = read_series(layout.series_dir(uid, "train"))
        assert volume.shape == meta.shape and volume.dtype == np.float32
        assert meta.study_uid == uid
        assert np.all(np.diff(meta.positions_mm) < 0)
        # a neck CT: air around, bone inside
        assert volume.min() <= -900 and volume.max() >= 300
        seen_syntaxes |= {s.transfer_syntax_uid for s in meta.slices}
        seen_head_first.add(meta.head_first)
    assert seen_syntaxes and seen_head_first
