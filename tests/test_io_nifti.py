"""Tests of keras_cspine.io.nifti: segmentations aligned to their DICOM series from the geometry
(head-first, feet-first, tilted, any NIfTI axis order), bad files, and vertebra presence."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from helpers_dicom import (
    phantom,
    rsna_nifti_affine,
    rsna_nifti_data,
    segmentation,
    tilted_orientation,
    write_nifti,
    write_series,
)

from keras_cspine.errors import SegmentationError
from keras_cspine.io.dicom import read_series, read_series_meta
from keras_cspine.io.nifti import align_segmentation, load_segmentation, vertebra_presence

SHAPE = (10, 14, 12)  # (Z, Y, X): every axis a different length, so transposes cannot hide


def make_study(tmp_path, **series_kwargs):
    """A DICOM series, its segmentation in series order and the RSNA-style NIfTI of it."""
    geom = write_series(tmp_path / "series", phantom(SHAPE), **series_kwargs)
    seg = segmentation(SHAPE)
    nii = write_nifti(tmp_path / "seg.nii", rsna_nifti_data(seg), rsna_nifti_affine(geom))
    return geom, seg, nii, read_series_meta(tmp_path / "series")


STUDIES = {
    "head first": dict(head_first=True),
    "feet first": dict(head_first=False),
    "head first, tilted": dict(head_first=True, orientation=tilted_orientation(15.0)),
    "feet first, tilted": dict(head_first=False, orientation=tilted_orientation(-8.0)),
    "head first, mirrored rows and columns": dict(orientation=(-1.0, 0, 0, 0, -1.0, 0)),
}


@pytest.mark.parametrize("case", list(STUDIES))
def test_rsna_style_segmentation_aligns_to_series_order(tmp_path, case):
    geom, seg, nii, meta = make_study(tmp_path, **STUDIES[case])
    aligned = align_segmentation(nii, meta)
    assert aligned.dtype == np.uint8 and aligned.shape == SHAPE
    np.testing.assert_array_equal(aligned, seg)
    # the community's rule of thumb gives series order here (k runs inferior -> superior) ...
    data = np.asarray(load_segmentation(nii)[0])
    np.testing.assert_array_equal(aligned, data[:, ::-1, ::-1].transpose(2, 1, 0))
    # ... and "no z flip" gives file-number order, which is series order only when head first
    file_order = data[:, ::-1, :].transpose(2, 1, 0)
    by_number = aligned[np.argsort(meta.slice_numbers)]
    if meta.head_first:
        np.testing.assert_array_equal(aligned, file_order[::-1])
    else:
        np.testing.assert_array_equal(by_number, file_order)


def test_head_first_rule_of_thumb_equals_alignment(tmp_path):
    _, seg, nii, meta = make_study(tmp_path, head_first=True)
    data = rsna_nifti_data(seg)
    assert meta.head_first
    np.testing.assert_array_equal(align_segmentation(nii, meta), data[:, ::-1, ::-1].transpose(2, 1, 0))


def _other_layouts(geom, seg):
    """The same segmentation stored in other axis orders, each with its correct affine."""
    z, y, x = SHAPE
    dr, dc = geom.pixel_spacing
    step = (geom.positions[-1] - geom.positions[0]) / (z - 1)
    lps = np.eye(4)  # data[col, row, series index]
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = geom.row_cosine * dc, geom.col_cosine * dr, step
    lps[:3, 3] = geom.positions[0]
    ras = np.diag([-1.0, -1.0, 1, 1]) @ lps
    plain = seg.transpose(2, 1, 0)
    swap = np.eye(4)[[2, 1, 0, 3]]  # data[series index, row, col]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, x - 1  # data[col reversed, row, index]
    return {
        "column, row, slice (LPS-like)": (plain, ras),
        "slice, row, column": (seg, ras @ swap.T),
        "column reversed": (plain[::-1], ras @ flip),
    }


@pytest.mark.parametrize("layout", ["column, row, slice (LPS-like)", "slice, row, column",
                                    "column reversed"])  # fmt: skip
@pytest.mark.parametrize("head_first", [True, False])
def test_any_axis_order_with_a_correct_affine(tmp_path, layout, head_first):
    geom, seg, _, meta = make_study(tmp_path, head_first=head_first)
    data, affine = _other_layouts(geom, seg)[layout]
    nii = write_nifti(tmp_path / "other.nii", np.ascontiguousarray(data), affine)
    np.testing.assert_array_equal(align_segmentation(nii, meta), seg)


def test_gzipped_float_segmentation(tmp_path):
    geom, seg, _, meta = make_study(tmp_path)
    nii = write_nifti(tmp_path / "seg.nii.gz", rsna_nifti_data(seg).astype(np.float32),
                      rsna_nifti_affine(geom))  # fmt: skip
    with gzip.open(nii) as handle:
        assert handle.read(4)  # really gzipped
    np.testing.assert_array_equal(align_segmentation(nii, meta), seg)


def test_trailing_singleton_axis_is_accepted(tmp_path):
    geom, seg, _, meta = make_study(tmp_path)
    nii = write_nifti(tmp_path / "seg4d.nii", rsna_nifti_data(seg)[..., None],
                      rsna_nifti_affine(geom))  # fmt: skip
    np.testing.assert_array_equal(align_segmentation(nii, meta), seg)


# --------------------------------------------------------------------------------------------
# Bad segmentations
# --------------------------------------------------------------------------------------------
def _shifted(geom, slices):
    affine = rsna_nifti_affine(geom).copy()
    affine[:3, 3] += affine[:3, 2] * slices
    return affine


BAD = {
    "one slice missing": (lambda g, s: (rsna_nifti_data(s)[:, :, 1:], rsna_nifti_affine(g)),
                          r"shape \(12, 14, 9\).*\(Z, Y, X\) = \(10, 14, 12\)"),
    "rows and columns swapped": (lambda g, s: (rsna_nifti_data(s).transpose(1, 0, 2),
                                               rsna_nifti_affine(g)), "does not match the series"),
    "shifted by 3 slices": (lambda g, s: (rsna_nifti_data(s), _shifted(g, 3)),
                            "geometry does not match"),
    "shifted by one slice": (lambda g, s: (rsna_nifti_data(s), _shifted(g, 1)),
                             "geometry does not match"),
    "wrong pixel spacing": (lambda g, s: (rsna_nifti_data(s),
                                          rsna_nifti_affine(g) @ np.diag([1.5, 1.5, 1, 1])),
                            "geometry does not match"),
    "negative labels": (lambda g, s: (rsna_nifti_data(s).astype(np.int16) - 1,
                                      rsna_nifti_affine(g)), r"0\.\.255"),
    "labels above 255": (lambda g, s: (rsna_nifti_data(s).astype(np.int16) * 40,
                                       rsna_nifti_affine(g)), r"0\.\.255"),
    "fractional labels": (lambda g, s: (rsna_nifti_data(s) + np.float32(0.25),
                                        rsna_nifti_affine(g)), "whole numbers"),
    "NaN labels": (lambda g, s: (np.where(rsna_nifti_data(s) == 1, np.nan, 0).astype(np.float32),
                                 rsna_nifti_affine(g)), "NaN"),
    "2-D": (lambda g, s: (rsna_nifti_data(s)[:, :, 0], rsna_nifti_affine(g)), "3-D"),
    "singular affine": (lambda g, s: (rsna_nifti_data(s), np.diag([1.0, 1.0, 0.0, 1.0])),
                        "unusable affine"),
    # found by tests/test_fuzz_readers.py
    "affine beyond a kilometre": (lambda g, s: (rsna_nifti_data(s), np.diag([1.0, 1.0, 1e30, 1.0])),
                                  "unusable affine"),
    "two array axes along one direction": (
        lambda g, s: (rsna_nifti_data(s), np.array([[1e6, 1e6, 0, 0], [0, 1e-10, 0, 0],
                                                    [0, 0, 1e6, 0], [0, 0, 0, 1.0]])),
        "three distinct patient axes"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_segmentation_raises_naming_the_file(tmp_path, case):
    geom, seg, _, meta = make_study(tmp_path)
    build, problem = BAD[case]
    data, affine = build(geom, seg)
    nii = write_nifti(tmp_path / "bad.nii", np.ascontiguousarray(data), affine)
    with pytest.raises(SegmentationError, match=problem) as info:
        align_segmentation(nii, meta)
    assert info.value.path == str(nii) and str(nii) in str(info.value)


def test_segmentation_of_another_series_is_refused(tmp_path):
    geom, seg, nii, _ = make_study(tmp_path / "a")
    write_series(tmp_path / "b", phantom(SHAPE), top=(-20.0, -15.0, 90.0))  # 50 mm higher
    with pytest.raises(SegmentationError, match="geometry does not match"):
        align_segmentation(nii, read_series_meta(tmp_path / "b"))


@pytest.mark.parametrize("content", [b"", b"not a nifti file" * 40, bytes(348)])
def test_unreadable_file(tmp_path, content):
    _, _, _, meta = make_study(tmp_path)
    bad = tmp_path / "broken.nii"
    bad.write_bytes(content)
    with pytest.raises(SegmentationError, match="cannot read NIfTI") as info:
        align_segmentation(bad, meta)
    assert info.value.path == str(bad)


def _with_dim(nii, axis: int, size: int) -> bytes:
    """The bytes of ``nii`` with header dim[axis] set to ``size`` (the data left as is)."""
    import nibabel as nib

    raw = nii.read_bytes()
    header = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(raw[:348]))
    header.structarr["dim"][axis] = size
    return header.binaryblock + raw[348:]


@pytest.mark.parametrize("compressed", [False, True])
def test_header_announcing_more_data_than_the_file_holds(tmp_path, compressed):
    # found by the fuzzer: nibabel zero-fills a buffer of the announced size (7 GB here) before
    # it finds the file too short; the size is now checked before any data is read
    _, _, nii, meta = make_study(tmp_path)
    raw = _with_dim(nii, 3, 32767)
    bad = tmp_path / ("big.nii.gz" if compressed else "big.nii")
    bad.write_bytes(gzip.compress(raw) if compressed else raw)
    with pytest.raises(SegmentationError, match="header announces shape") as info:
        align_segmentation(bad, meta)
    assert info.value.path == str(bad)


def test_gz_name_without_gzip_content(tmp_path):
    _, _, nii, meta = make_study(tmp_path)
    bad = tmp_path / "plain.nii.gz"
    bad.write_bytes(nii.read_bytes())
    with pytest.raises(SegmentationError, match="not a gzip file|not gzip-compressed"):
        align_segmentation(bad, meta)


def test_missing_file(tmp_path):
    _, _, _, meta = make_study(tmp_path)
    with pytest.raises(SegmentationError, match="not found"):
        align_segmentation(tmp_path / "nope.nii", meta)


def test_geometry_tolerance_is_half_a_voxel(tmp_path):
    geom, seg, _, meta = make_study(tmp_path)
    nii = write_nifti(tmp_path / "near.nii", rsna_nifti_data(seg), _shifted(geom, 0.4))
    np.testing.assert_array_equal(align_segmentation(nii, meta), seg)
    far = write_nifti(tmp_path / "far.nii", rsna_nifti_data(seg), _shifted(geom, 0.6))
    with pytest.raises(SegmentationError, match="0.60 voxels"):
        align_segmentation(far, meta)


# --------------------------------------------------------------------------------------------
# Vertebra presence
# --------------------------------------------------------------------------------------------
def test_vertebra_presence_table():
    seg = np.zeros((4, 5, 5), np.uint8)
    seg[0, 0, 0] = 1  # C1, one voxel
    seg[1, :2, :2] = 7  # C7, four voxels
    seg[1, 4, 4] = 3
    seg[2] = 12  # thoracic only
    seg[3, 0, :3] = 2
    presence = vertebra_presence(seg)
    assert presence.dtype == np.uint8 and presence.shape == (4, 7)
    assert presence.tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 0, 0, 0, 0],
    ]
    at_least_3 = vertebra_presence(seg, min_voxels=3)
    assert at_least_3.tolist() == [[0] * 7, [0, 0, 0, 0, 0, 0, 1], [0] * 7, [0, 1, 0, 0, 0, 0, 0]]


def test_vertebra_presence_other_integer_types():
    seg = np.array([[[-1, 3], [300, 19]], [[0, 0], [7, 7]]], dtype=np.int32)
    assert vertebra_presence(seg).tolist() == [[0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1]]


def test_vertebra_presence_matches_segmentation_bands():
    seg = segmentation(SHAPE)
    presence = vertebra_presence(seg)
    for z in range(SHAPE[0]):
        labels = set(np.unique(seg[z])) & set(range(1, 8))
        assert set(np.flatnonzero(presence[z]) + 1) == labels


@pytest.mark.parametrize(
    "seg, kwargs, message",
    [
        (np.zeros((3, 3), np.uint8), {}, "shape"),
        (np.zeros((2, 3, 3), np.float32), {}, "integers"),
        (np.zeros((2, 3, 3), np.uint8), {"min_voxels": 0}, "min_voxels"),
    ],
)
def test_vertebra_presence_rejects_bad_input(seg, kwargs, message):
    with pytest.raises(ValueError, match=message):
        vertebra_presence(seg, **kwargs)


# --------------------------------------------------------------------------------------------
# The synthetic generator's studies (keras_cspine.synthetic.dataset)
# --------------------------------------------------------------------------------------------
SYNTHETIC = {
    "head first, plain, square": dict(head_first=True, compressed=False, tilted=False,
                                      signed=False, nonsquare=False),
    "feet first, jpeg lossless, tilted, signed, non-square": dict(
        head_first=False, compressed=True, tilted=True, signed=True, nonsquare=True),
    "head first, jpeg lossless, tilted, non-square": dict(
        head_first=True, compressed=True, tilted=True, signed=False, nonsquare=True),
    "feet first, plain, signed": dict(head_first=False, compressed=False, tilted=False,
                                      signed=True, nonsquare=False),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_synthetic_study_reads_and_aligns_exactly(tmp_path, case):
    synthetic = pytest.importorskip("keras_cspine.synthetic.dataset")
    study = synthetic.generate_study(tmp_path, seed=11, index=list(SYNTHETIC).index(case),
                                     preset="tiny", **SYNTHETIC[case])  # fmt: skip
    volume, meta = read_series(study.folder)
    np.testing.assert_array_equal(volume, study.hu)
    assert meta.head_first == study.spec.head_first
    assert meta.slice_numbers == tuple(study.spec.file_number(s) for s in range(len(volume)))
    syntaxes = {s.transfer_syntax_uid for s in meta.slices}
    assert syntaxes == {"1.2.840.10008.1.2.4.70" if study.spec.compressed else "1.2.840.10008.1.2.1"}
    for s in (0, len(volume) - 1):
        np.testing.assert_allclose(meta.affine @ [0, 0, s, 1], [*study.spec.grid.ipps[s], 1],
                                   atol=1e-3)  # fmt: skip
    seg = align_segmentation(tmp_path / "segmentations" / f"{study.spec.uid}.nii", meta)
    np.testing.assert_array_equal(seg, study.seg)
    presence = vertebra_presence(seg)
    assert presence.any(axis=0).sum() >= 5  # the scan covers most of C1..C7
    first = presence.argmax(axis=0)[presence.any(axis=0)]
    assert np.all(np.diff(first) >= 0)  # vertebrae appear head to feet in series order
