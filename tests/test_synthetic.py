"""synthetic.py: the RSNA-layout synthetic dataset (layout, DICOM, geometry, labels, boxes)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from keras_cspine.cli.synth import main
from keras_cspine.errors import CSpineDataError
from keras_cspine.synthetic.anatomy import TISSUES, VERTEBRA_SHAPES
from keras_cspine.synthetic.dataset import generate_dataset, generate_study
from keras_cspine.synthetic.dicom_writer import _SliceWriter
from keras_cspine.synthetic.study import (
    BOX_MARGIN_MM,
    DISPLACED,
    GAP_MM,
    JPEG_LOSSLESS,
    MANIFEST,
    MERGE_OVERLAP,
    MIN_BOX_MM,
    MIN_GAP_PIXELS,
    MIN_VISIBLE_MM2,
    SHIFT_MM,
    VERTEBRAE,
    merge_slice_boxes,
    render_study,
    sample_study,
)

N_TRAIN, N_TEST, SEED = 6, 2, 11
UID_RE = re.compile(r"^1\.2\.826\.0\.1\.3680043\.\d+$")


# -- helpers -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "rsna"
    generate_dataset(out, n_studies=N_TRAIN, seed=SEED, preset="tiny", n_test=N_TEST,
                     progress=False)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def manifest(dataset) -> dict:
    return json.loads((dataset / MANIFEST).read_text())


def _csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames), list(reader)


def _read_series(folder: Path):
    """(datasets, HU volume) in file-number order."""
    paths = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
    datasets = [pydicom.dcmread(p) for p in paths]
    hu = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept)
                   for d in datasets]).astype(np.float32)  # fmt: skip
    return datasets, hu


def _geometry(datasets):
    iop = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(iop[:3], iop[3:])
    positions = np.array([np.array(d.ImagePositionPatient, float) @ normal for d in datasets])
    return iop, normal, positions


def _seg_in_file_order(nii_path: Path, head_first: bool) -> np.ndarray:
    """The RSNA community fix: (z, y, x) in file-number order."""
    seg = np.asarray(nib.load(nii_path).dataobj)
    if head_first:
        return seg[:, ::-1, ::-1].transpose(2, 1, 0)
    return seg[:, ::-1, :].transpose(2, 1, 0)


def _studies(manifest, split="train"):
    return [s for s in manifest["studies"] if s["split"] == split]


def _series_to_file(study_record, volume_series_order):
    """Series order (superior -> inferior) to file-number order."""
    return volume_series_order if study_record["head_first"] else volume_series_order[::-1]


# -- layout and CSVs ---------------------------------------------------------------------------
def test_layout_and_csv_columns(dataset, manifest):
    columns, train = _csv(dataset / "train.csv")
    assert columns == ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    assert len(train) == N_TRAIN
    columns, boxes = _csv(dataset / "train_bounding_boxes.csv")
    assert columns == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    assert boxes and all("." in b["x"] and "." in b["height"] for b in boxes)  # floats
    columns, test = _csv(dataset / "test.csv")
    assert columns == ["row_id", "StudyInstanceUID", "prediction_type"]
    columns, sub = _csv(dataset / "sample_submission.csv")
    assert columns == ["row_id", "fractured"]
    assert {r["fractured"] for r in sub} == {"0.5"} and [r["row_id"] for r in sub] == [
        r["row_id"] for r in test
    ]
    train_uids = [r["StudyInstanceUID"] for r in train]
    test_uids = sorted({r["StudyInstanceUID"] for r in test})
    assert all(UID_RE.match(u) for u in train_uids + test_uids)
    assert len(set(train_uids + test_uids)) == N_TRAIN + N_TEST
    assert sorted(p.name for p in (dataset / "train_images").iterdir()) == sorted(train_uids)
    assert sorted(p.name for p in (dataset / "test_images").iterdir()) == test_uids
    assert sorted(p.name for p in (dataset / "segmentations").iterdir()) == sorted(
        f"{u}.nii" for u in train_uids
    )
    for uid in test_uids:
        rows = [r for r in test if r["StudyInstanceUID"] == uid]
        assert [r["prediction_type"] for r in rows] == [*VERTEBRAE, "patient_overall"]
        assert all(r["row_id"] == f"{uid}_{r['prediction_type']}" for r in rows)
    assert {b["StudyInstanceUID"] for b in boxes} <= set(train_uids)
    assert not (dataset / ".synthetic_tmp").exists()
    assert manifest["seed"] == SEED and manifest["preset"] == "tiny"
    assert (manifest["n_train"], manifest["n_test"]) == (N_TRAIN, N_TEST)


def test_file_numbers_and_dicom_tags(dataset, manifest):
    required = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                "InstanceNumber", "ImagePositionPatient", "ImageOrientationPatient",
                "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept",
                "BitsAllocated", "BitsStored", "PixelRepresentation", "Rows", "Columns", "KVP",
                "FrameOfReferenceUID")  # fmt: skip
    seen_syntaxes = set()
    for record in manifest["studies"]:
        uid = record["StudyInstanceUID"]
        folder = dataset / f"{record['split']}_images" / uid
        datasets, hu = _read_series(folder)  # decodes every slice, compressed ones included
        numbers = sorted(int(p.stem) for p in folder.glob("*.dcm"))
        assert numbers == list(range(1, record["n_slices"] + 1))
        sops = set()
        for n, ds in zip(numbers, datasets):
            for tag in required:
                assert tag in ds, (uid, tag)
            assert ds.InstanceNumber == n and ds.StudyInstanceUID == uid
            assert ds.SOPClassUID == pydicom.uid.CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.Modality == "CT"
            assert ds.BitsAllocated == 16 and ds.BitsStored in (12, 16) and ds.RescaleSlope == 1
            assert (ds.PixelRepresentation, float(ds.RescaleIntercept)) in ((0, -1024.0), (1, 0.0))
            assert (ds.Rows, ds.Columns) == (record["rows"], record["columns"])
            assert pydicom.uid.UID(ds.SOPInstanceUID).is_valid
            sops.add(ds.SOPInstanceUID)
        assert len(sops) == len(datasets)
        syntax = datasets[0].file_meta.TransferSyntaxUID
        assert syntax == (JPEG_LOSSLESS if record["compressed"] else pydicom.uid.ExplicitVRLittleEndian)
        seen_syntaxes.add(str(syntax))
        assert hu.std() > 100 and hu.max() > 900, "slices must show bone on soft tissue"
    assert seen_syntaxes == {JPEG_LOSSLESS, pydicom.uid.ExplicitVRLittleEndian}


@pytest.mark.parametrize("signed", [False, True])
def test_compressed_slices_decode_bit_identically(tmp_path, signed):
    study = generate_study(tmp_path, seed=3, index=1, preset="tiny", compressed=True,
                           signed=signed, head_first=False)  # fmt: skip
    expected = _series_to_file(study.record, study.hu)
    for plugin in ("pylibjpeg", "gdcm"):
        for n, path in enumerate(sorted(study.folder.glob("*.dcm"), key=lambda p: int(p.stem))):
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == JPEG_LOSSLESS
            ds.pixel_array_options(decoding_plugin=plugin)
            hu = ds.pixel_array.astype(np.float32) + float(ds.RescaleIntercept)
            np.testing.assert_array_equal(hu, expected[n])
    if signed and study.spec.padding_hu is not None:
        assert (expected == -2048).any() and ds.PixelPaddingValue == -2048


@pytest.mark.parametrize("compressed", [False, True])
def test_fast_writer_equals_pydicom_save_as(tmp_path, compressed):
    spec = sample_study(5, 0, "tiny", compressed=compressed, signed=True, head_first=False)
    n = spec.n_slices
    stored = (render_study(spec)[0] - spec.rescale_intercept).astype(np.int32)
    writer = _SliceWriter(spec, tmp_path)
    for s in (0, n - 12, n - 1):  # file numbers with two digits and one
        writer.write(s, stored[s], tmp_path / "fast.dcm")
        expected = writer.dataset(s, stored[s])
        reference = io.BytesIO()
        expected.save_as(reference, enforce_file_format=True)
        if not compressed:
            assert (tmp_path / "fast.dcm").read_bytes() == reference.getvalue()
            continue
        got = pydicom.dcmread(tmp_path / "fast.dcm")
        assert got.file_meta.TransferSyntaxUID == JPEG_LOSSLESS
        assert got.file_meta.MediaStorageSOPInstanceUID == expected.SOPInstanceUID
        for elem in expected:
            if elem.keyword != "PixelData":
                assert got[elem.tag].value == elem.value, elem.keyword
        np.testing.assert_array_equal(got.pixel_array, stored[s])


# -- intensities -------------------------------------------------------------------------------
HU_RANGES = {  # tissue -> (low, high) bounds on its median HU (noise and partial volume included)
    "outside_air": (-1030, -950), "fat": (-140, -60), "soft_tissue": (10, 70),
    "airway": (-1030, -800), "disc": (50, 120), "cancellous": (180, 450), "cortical": (500, 1900),
}  # fmt: skip


@pytest.mark.parametrize("index", [0, 1])
def test_hu_by_tissue(index):
    study = generate_study(None, seed=2, index=index, preset="small", signed=False,
                           bottom=0.9)  # fmt: skip
    for name, (low, high) in HU_RANGES.items():
        values = study.hu[study.tissue == TISSUES[name]]
        assert values.size > 20, name
        assert low <= np.median(values) <= high, (name, np.median(values))
    cortical = study.hu[study.tissue == TISSUES["cortical"]]
    assert np.percentile(cortical, 95) > 1000  # a real cortical shell, not just partial volume
    assert np.median(study.hu[study.tissue == TISSUES["lung"]]) < -700
    # every labelled voxel is bone
    bone = np.isin(study.tissue, [TISSUES["cortical"], TISSUES["cancellous"]])
    assert bone[study.seg > 0].all()


# -- geometry ----------------------------------------------------------------------------------
def test_head_first_and_feet_first_geometry(dataset, manifest):
    seen = set()
    for record in manifest["studies"]:
        datasets, _ = _read_series(dataset / f"{record['split']}_images" / record["StudyInstanceUID"])
        iop, normal, positions = _geometry(datasets)
        steps = np.diff(positions)
        if record["head_first"]:
            assert np.all(steps < 0), "head-first: file 1 at the top, going down"
        else:
            assert np.all(steps > 0), "feet-first: z increasing with the file number"
        np.testing.assert_allclose(np.abs(steps), record["spacing"], atol=2e-3)
        np.testing.assert_allclose(iop, record["image_orientation"], atol=1e-6)
        tilt = np.degrees(np.arctan2(iop[5], iop[4]))
        assert abs(tilt - record["tilt_deg"]) < 1e-3
        # z and the position along the normal agree in sign (the normal points superior)
        z = np.array([float(d.ImagePositionPatient[2]) for d in datasets])
        assert np.all(np.sign(np.diff(z)) == np.sign(steps))
        assert float(datasets[0].SliceThickness) >= record["spacing"] - 1e-3
        seen.add((record["head_first"], record["tilt_deg"] != 0))
    assert seen == {(True, True), (True, False), (False, True), (False, False)} or len(seen) >= 3


def _lps_from_dicom(ds, row, col):
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    return np.array(ds.ImagePositionPatient, float) + col * dc * iop[:3] + row * dr * iop[3:]


def test_nifti_affine_matches_dicom_world_coordinates(dataset, manifest):
    rng = np.random.default_rng(0)
    for record in _studies(manifest):
        uid = record["StudyInstanceUID"]
        image = nib.load(dataset / "segmentations" / f"{uid}.nii")
        assert image.get_data_dtype() == np.uint8
        assert image.header["qform_code"] > 0 and image.header["sform_code"] > 0
        np.testing.assert_allclose(image.get_qform(), image.affine, atol=1e-4)
        data = np.asarray(image.dataobj)
        datasets, hu = _read_series(dataset / "train_images" / uid)
        assert data.shape == (record["columns"], record["rows"], record["n_slices"])
        # k = slices sorted by increasing superior position
        k_positions = np.array([(image.affine @ [0, 0, k, 1])[2] for k in range(data.shape[2])])
        assert np.all(np.diff(k_positions) > 0)
        _, _, positions = _geometry(datasets)
        by_position = np.argsort(positions)  # file indices sorted inferior -> superior
        ii, jj, kk = np.nonzero(data)
        pick = rng.choice(len(ii), size=min(60, len(ii)), replace=False)
        for i, j, k in zip(ii[pick], jj[pick], kk[pick]):
            ras = image.affine @ [i, j, k, 1]
            lps_nifti = np.array([-ras[0], -ras[1], ras[2]])
            file_index = by_position[k]
            row, col = record["rows"] - 1 - j, i
            lps_dicom = _lps_from_dicom(datasets[file_index], row, col)
            np.testing.assert_allclose(lps_nifti, lps_dicom, atol=1e-3)
        # every label sits on bone in the DICOM pixels (nibabel puts it where it belongs)
        rows_idx, k_idx = record["rows"] - 1 - jj, kk
        values = hu[by_position[k_idx], rows_idx, ii]
        assert np.median(values) > 250 and np.mean(values > 150) > 0.9


@pytest.mark.parametrize("head_first", [True, False])
def test_rsna_common_fix_gives_file_order(tmp_path, head_first):
    study = generate_study(tmp_path, seed=4, index=0, preset="tiny", head_first=head_first,
                           tilted=True)  # fmt: skip
    fixed = _seg_in_file_order(tmp_path / "segmentations" / f"{study.spec.uid}.nii", head_first)
    np.testing.assert_array_equal(fixed, _series_to_file(study.record, study.seg))
    _, hu = _read_series(study.folder)
    np.testing.assert_array_equal(hu, _series_to_file(study.record, study.hu))
    assert np.median(hu[fixed > 0]) > 250


# -- labels, boxes, coverage -------------------------------------------------------------------
def _aligned_segmentations(dataset, manifest):
    for record in _studies(manifest):
        uid = record["StudyInstanceUID"]
        yield record, _seg_in_file_order(dataset / "segmentations" / f"{uid}.nii",
                                         record["head_first"])  # fmt: skip


def test_boxes_inside_images_and_on_fractured_vertebrae(dataset, manifest):
    _, boxes = _csv(dataset / "train_bounding_boxes.csv")
    _, labels = _csv(dataset / "train.csv")
    fractured = {r["StudyInstanceUID"]: [i + 1 for i, v in enumerate(VERTEBRAE) if r[v] == "1"]
                 for r in labels}  # fmt: skip
    checked = 0
    for record, seg in _aligned_segmentations(dataset, manifest):
        uid = record["StudyInstanceUID"]
        _, hu = _read_series(dataset / "train_images" / uid)
        for b in (b for b in boxes if b["StudyInstanceUID"] == uid):
            x, y, w, h = (float(b[k]) for k in ("x", "y", "width", "height"))
            n = int(b["slice_number"])
            assert x >= 0 and y >= 0 and w > 0 and h > 0
            assert x + w <= record["columns"] and y + h <= record["rows"]
            assert 1 <= n <= record["n_slices"]
            region = seg[n - 1, int(y) : int(y + h), int(x) : int(x + w)]
            assert np.isin(region, fractured[uid]).any(), (uid, n, "box off its vertebra")
            assert hu[n - 1, int(y) : int(y + h), int(x) : int(x + w)].max() > 500, "no bone in box"
            assert w <= 40 and h <= 40, "a box is around a break, not a whole slice"
            checked += 1
    assert checked > 0


def test_labels_agree_with_boxes(dataset, manifest):
    _, labels = _csv(dataset / "train.csv")
    _, boxes = _csv(dataset / "train_bounding_boxes.csv")
    boxed = {(b["StudyInstanceUID"], int(b["slice_number"])) for b in boxes}
    records = {r["StudyInstanceUID"]: r for r in _studies(manifest)}
    positives = 0
    for row in labels:
        uid = row["StudyInstanceUID"]
        flags = {v: int(row[v]) for v in VERTEBRAE}
        overall = int(row["patient_overall"])
        assert overall == int(any(flags.values()))
        assert overall == int(any(u == uid for u, _ in boxed))
        positives += overall
        record = records[uid]
        assert record["labels"] == {**flags, "patient_overall": overall}
        visible = {f["vertebra"] for f in record["fractures"] if f["visible"]}
        assert visible == {v for v in VERTEBRAE if flags[v]}
        for f in record["fractures"]:
            assert f["vertebra"] in record["coverage"]
            assert all((uid, n) in boxed for n in f["slice_numbers"])
            assert f["visible"] == bool(f["slice_numbers"])
    assert positives == N_TRAIN // 2  # about half the studies are fractured


@pytest.mark.slow
def test_fracture_is_a_visible_cortical_break():
    found, cortical = 0, 0
    for index, preset in enumerate(["small", "tiny", "tiny"]):
        study = generate_study(None, seed=6, index=index, preset=preset, fractured=True)
        spec = study.spec
        broken = render_study(spec, noise=False)[0]
        intact = render_study(spec, noise=False, with_fractures=False)[0]
        for b in study.boxes:
            n = b["slice_number"]
            s = n - 1 if spec.head_first else spec.n_slices - n
            y, x, h, w = int(b["y"]), int(b["x"]), int(b["height"]), int(b["width"])
            before, after = intact[s, y : y + h, x : x + w], broken[s, y : y + h, x : x + w]
            change = np.abs(after - before)  # a gap (bone -> soft tissue) or a displaced step
            assert change.max() > 300 and (change > 150).sum() >= 2, (index, n)
            cortical += bool(((before > 600) & (after < before - 400)).any())
            found += 1
        outside = np.ones(broken.shape, bool)
        for b in study.boxes:
            s = b["slice_number"] - 1 if spec.head_first else spec.n_slices - b["slice_number"]
            outside[s, int(b["y"]) : int(b["y"] + b["height"]), int(b["x"]) : int(b["x"] + b["width"])] = False
        # outside the boxes: only traces on slices that the break grazes, too small to box
        faint = np.abs(broken - intact) * outside
        grazed_mm2 = (faint > 300).reshape(len(faint), -1).sum(axis=1) * spec.grid.dr * spec.grid.dc
        assert grazed_mm2.max() < MIN_VISIBLE_MM2, (index, grazed_mm2.max())
    assert found > 0 and cortical >= 0.8 * found, "most boxes show a dark line through the cortex"


def test_boxes_frame_the_fracture_region_in_millimetres():
    """A reader's box: every clearly changed pixel of the break on its slice, a margin of
    BOX_MARGIN_MM around them, at least MIN_BOX_MM a side (where the image edge does not cut it)."""
    single = [i for i in range(12)  # one break: every box is its box
              if len(sample_study(seed=6, index=i, preset="tiny", fractured=True).fractures) == 1]
    assert len(single) >= 2
    for index in single[:2]:
        study = generate_study(None, seed=6, index=index, preset="tiny", fractured=True,
                               keep_volumes=False)  # fmt: skip
        spec, g = study.spec, study.spec.grid
        (mask,) = render_study(spec, noise=False)[3].values()
        pixel = np.array([g.dc, g.dc, g.dr, g.dr])
        assert study.boxes
        for b in study.boxes:
            s = b["slice_number"] - 1 if spec.head_first else spec.n_slices - b["slice_number"]
            rows, cols = np.nonzero(mask[s] >= 2)
            x, y, w, h = b["x"], b["y"], b["width"], b["height"]
            margin = np.array([cols.min() - x, x + w - cols.max() - 1,
                               rows.min() - y, y + h - rows.max() - 1]) * pixel  # fmt: skip
            edge = np.array([x <= 0, x + w >= g.columns, y <= 0, y + h >= g.rows])
            assert (edge | (margin >= BOX_MARGIN_MM - 1e-3)).all(), (b, margin)
            for size, extent, px, cut in ((w, np.ptp(cols) + 1, g.dc, edge[:2]),
                                          (h, np.ptp(rows) + 1, g.dr, edge[2:])):  # fmt: skip
                if not cut.any():  # out to whole pixels: at most a pixel more at each end
                    assert size * px >= MIN_BOX_MM - 1e-3, b
                    assert size * px <= max(MIN_BOX_MM, extent * px + 2 * BOX_MARGIN_MM) + 2 * px, b


def _box(x, y, w, h, n=5, uid="1.2.3"):
    return {"StudyInstanceUID": uid, "x": x, "y": y, "width": w, "height": h, "slice_number": n}


@pytest.mark.parametrize(
    "boxes, expected",
    [
        ([_box(0, 0, 10, 10)], [(0, 0, 10, 10)]),
        # overlap 5 x 10 = half the smaller box (> MERGE_OVERLAP): one box, their union
        ([_box(0, 0, 10, 10), _box(5, 0, 10, 10)], [(0, 0, 15, 10)]),
        # overlap 2 x 10 = 0.2 of the smaller box: two fracture regions, two boxes
        ([_box(0, 0, 10, 10), _box(8, 0, 10, 10)], [(0, 0, 10, 10), (8, 0, 10, 10)]),
        # touching edges only: two boxes
        ([_box(0, 0, 10, 10), _box(10, 0, 10, 10)], [(0, 0, 10, 10), (10, 0, 10, 10)]),
        # a small box inside a large one
        ([_box(0, 0, 20, 20), _box(5, 5, 4, 4)], [(0, 0, 20, 20)]),
        # chains merge until no pair overlaps: a+b, then (a+b)+c
        ([_box(0, 0, 10, 10), _box(6, 0, 10, 10), _box(12, 0, 10, 10)], [(0, 0, 22, 10)]),
        # other slice or other study: never merged
        ([_box(0, 0, 10, 10), _box(0, 0, 10, 10, n=6)], [(0, 0, 10, 10), (0, 0, 10, 10)]),
        ([_box(0, 0, 10, 10), _box(0, 0, 10, 10, uid="9")], [(0, 0, 10, 10), (0, 0, 10, 10)]),
    ],
)
def test_merge_slice_boxes(boxes, expected):
    assert 0 < MERGE_OVERLAP < 1
    merged = merge_slice_boxes(boxes)
    assert [(b["x"], b["y"], b["width"], b["height"]) for b in merged] == expected
    assert {(b["StudyInstanceUID"], b["slice_number"]) for b in merged} == {
        (b["StudyInstanceUID"], b["slice_number"]) for b in boxes
    }


def test_boxed_slices_show_the_break_and_boxes_do_not_overlap():
    """Every boxed slice shows MIN_VISIBLE_MM2 of clearly changed bone (no box on a slice the break
    only grazes), and no two boxes of a slice overlap by more than MERGE_OVERLAP."""
    from keras_cspine.synthetic.anatomy import BREAK_VISIBLE

    checked = 0
    for index in range(4):
        study = generate_study(None, seed=6, index=index, preset="tiny", fractured=True)
        spec, g = study.spec, study.spec.grid
        broken = render_study(spec, noise=False)[0]
        intact = render_study(spec, noise=False, with_fractures=False)[0]
        visible = np.abs(broken - intact) > BREAK_VISIBLE
        for b in study.boxes:
            s = b["slice_number"] - 1 if spec.head_first else spec.n_slices - b["slice_number"]
            y, x, h, w = int(b["y"]), int(b["x"]), int(b["height"]), int(b["width"])
            assert visible[s, y : y + h, x : x + w].sum() * g.dr * g.dc >= MIN_VISIBLE_MM2 - 1e-6
            checked += 1
        by_slice: dict[int, list] = {}
        for b in study.boxes:
            by_slice.setdefault(b["slice_number"], []).append(b)
        for same in by_slice.values():
            assert merge_slice_boxes(same) == sorted(same, key=lambda b: (b["x"], b["y"]))
    assert checked > 0


def test_fractures_are_conspicuous_and_mostly_displaced():
    """Gaps of GAP_MM (at least MIN_GAP_PIXELS pixels), a step-off of SHIFT_MM in about
    DISPLACED of the fractures (at least a pixel)."""
    gaps, shifts = [], []
    for index in range(40):
        spec = sample_study(seed=3, index=index, preset="small", fractured=True)
        for name, k in spec.fractures:
            frac = spec.anatomy.vertebra(name).fractures[k]
            pixel = spec.grid.dc
            assert max(GAP_MM[0], MIN_GAP_PIXELS * pixel) - 1e-9 <= frac.gap
            assert frac.gap <= max(GAP_MM[1], MIN_GAP_PIXELS * pixel) + 1e-9
            shift = float(np.linalg.norm(frac.shift))
            assert shift == 0 or max(SHIFT_MM[0], pixel) - 1e-9 <= shift <= max(SHIFT_MM[1], pixel)
            gaps.append(frac.gap)
            shifts.append(shift)
    assert len(gaps) >= 40
    assert abs(np.mean(np.array(shifts) > 0) - DISPLACED) < 0.15


@pytest.mark.slow
def test_a_fractured_study_always_shows_its_fractures():
    for index in range(6):
        study = generate_study(None, seed=100, index=index, preset="tiny", fractured=True,
                               keep_volumes=False)  # fmt: skip
        assert study.labels["patient_overall"] == 1
        assert all(f["visible"] and len(f["slice_numbers"]) >= 2 for f in study.record["fractures"])
        intact = generate_study(None, seed=100, index=index, preset="tiny", fractured=False,
                                keep_volumes=False)  # fmt: skip
        assert intact.boxes == [] and intact.labels["patient_overall"] == 0


def test_coverage_varies_between_studies(dataset, manifest):
    records = _studies(manifest) + _studies(manifest, "test")
    coverages = {tuple(r["coverage"]) for r in records}
    assert len(coverages) >= 2
    assert {r["top"] for r in records} == {"above_c1", "mid_c1"}
    lowest = {r["coverage"][-1] for r in records}
    assert len(lowest) >= 2 and lowest <= {"C6", "C7", "T1", "T2", "T3"}
    for record, seg in _aligned_segmentations(dataset, manifest):
        first = seg[0] if record["head_first"] else seg[-1]  # the most superior slice
        if record["top"] == "mid_c1":
            assert (first == 1).any(), "a scan starting mid-C1 shows C1 on its first slice"
        else:
            assert not (first == 1).any(), "a scan starting above C1 begins above it"


def test_each_covered_vertebra_is_labelled_in_order(dataset, manifest):
    for record, seg in _aligned_segmentations(dataset, manifest):
        series = seg if record["head_first"] else seg[::-1]  # superior -> inferior
        present = sorted(int(v) for v in np.unique(series) if v)
        assert present == list(range(1, present[-1] + 1)), "no vertebra missing in the middle"
        assert present[-1] >= 6, "every scan reaches C6"
        names = [VERTEBRAE[v - 1] if v <= 7 else f"T{v - 7}" for v in present]
        assert names == record["coverage"]
        centroids = [np.nonzero(series == v)[0].mean() for v in present]
        assert np.all(np.diff(centroids) > 0), "labels run C1 -> C7 from head to feet"
        # a slice where two vertebrae meet carries both labels
        both = [(series[z] == 1).any() and (series[z] == 2).any() for z in range(len(series))]
        assert any(both), "dens inside the C1 ring"


# -- determinism, CLI, arguments ---------------------------------------------------------------
def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = generate_dataset(tmp_path / "a", n_studies=3, seed=21, preset="tiny", n_test=1,
                         progress=False)  # fmt: skip
    b = generate_dataset(tmp_path / "b", n_studies=3, seed=21, preset="tiny", n_test=1,
                         workers=2, progress=False)  # fmt: skip
    c = generate_dataset(tmp_path / "c", n_studies=3, seed=22, preset="tiny", n_test=1,
                         progress=False)  # fmt: skip
    ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
    assert len(ha) > 50 and ha == hb
    assert ha["train.csv"] != hc["train.csv"]
    manifest = json.loads((a / MANIFEST).read_text())
    assert any(s["compressed"] for s in manifest["studies"])


def test_generate_study_is_deterministic():
    one = generate_study(None, seed=9, index=2, preset="tiny")
    two = generate_study(None, seed=9, index=2, preset="tiny")
    other = generate_study(None, seed=9, index=3, preset="tiny")
    np.testing.assert_array_equal(one.hu, two.hu)
    np.testing.assert_array_equal(one.seg, two.seg)
    assert one.record == two.record and one.spec.uid != other.spec.uid


def test_cli_writes_refuses_and_overwrites(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [str(out), "--studies", "1", "--test-studies", "0", "--preset", "tiny", "--quiet"]
    assert main(args) == 0
    assert "wrote 1 train" in capsys.readouterr().out
    first = _hashes(out)
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0 and _hashes(out) == first
    real = tmp_path / "kaggle"
    (real / "train_images").mkdir(parents=True)
    assert main([str(real), "--studies", "1", "--preset", "tiny", "--overwrite", "--quiet"]) == 2
    assert (real / "train_images").is_dir(), "never deletes what it did not write"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_studies": 0}, "n_studies"),
        ({"preset": "huge"}, "unknown preset"),
        ({"segmentation_fraction": 1.5}, "segmentation_fraction"),
        ({"workers": 0}, "workers"),
        ({"n_test": -1}, "n_test"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        generate_dataset(tmp_path / "x", **{"n_studies": 1, "preset": "tiny", **kwargs})


def test_bad_study_options():
    with pytest.raises(ValueError, match="split"):
        sample_study(0, 0, "tiny", split="val")
    with pytest.raises(ValueError, match="top"):
        sample_study(0, 0, "tiny", top="C3")
    with pytest.raises(CSpineDataError, match="not a folder"):
        path = Path(__file__)
        generate_dataset(path, n_studies=1, preset="tiny")


def test_segmentation_fraction(tmp_path):
    out = generate_dataset(tmp_path / "d", n_studies=4, seed=1, preset="tiny", n_test=0,
                           segmentation_fraction=0.5, progress=False)  # fmt: skip
    assert len(list((out / "segmentations").glob("*.nii"))) == 2
    manifest = json.loads((out / MANIFEST).read_text())
    assert sum(s["segmentation"] for s in manifest["studies"]) == 2
    assert not list((out / "test_images").iterdir())


def test_tiny_study_is_fast(tmp_path):
    generate_study(None, seed=0, index=0, preset="tiny", keep_volumes=False)  # warm imports
    start = time.perf_counter()
    for index in range(3):
        generate_study(tmp_path, seed=0, index=index, preset="tiny", keep_volumes=False)
    per_study = (time.perf_counter() - start) / 3
    assert per_study < 3.0, f"{per_study:.2f} s per tiny study (target < 1 s on a free core)"


# -- level cues (the anatomy that tells C3..C7 apart) ------------------------------------------
def test_vertebral_level_features_follow_anatomy():
    widths = [VERTEBRA_SHAPES[v]["half"][0] * 2 for v in ("C3", "C4", "C5", "C6", "C7")]
    assert np.all(np.diff(widths) > 0) and 14 <= widths[0] <= 16 and 19 <= widths[-1] <= 21
    assert [v for v in VERTEBRA_SHAPES if VERTEBRA_SHAPES[v]["bifid"]] == ["C2", "C3", "C4", "C5"]
    spinous = {v: VERTEBRA_SHAPES[v]["spinous"] for v in VERTEBRA_SHAPES}
    assert spinous["C7"] == max(spinous.values()) and spinous["C6"] < spinous["C7"]
    assert [v for v in VERTEBRA_SHAPES if VERTEBRA_SHAPES[v]["foramen"]] == [
        "C2", "C3", "C4", "C5", "C6"
    ]
    tubercles = {v: VERTEBRA_SHAPES[v]["tubercle"] for v in VERTEBRA_SHAPES}
    assert max(tubercles, key=tubercles.get) == "C6", "the carotid tubercle is C6's"


def _labels_of_slices(study, where):
    """Vertebra names (C1..C7, T1..) on the slices where ``where`` (per-slice bool) holds."""
    names = [*VERTEBRAE, "T1", "T2", "T3"]
    found = set()
    for z in np.nonzero(where)[0]:
        found |= {names[v - 1] for v in np.unique(study.seg[z]) if v}
    return found


@pytest.mark.parametrize("index", [0, 1, 2])
def test_soft_tissue_landmarks_sit_at_their_levels(index):
    study = generate_study(None, seed=8, index=index, preset="tiny", top="above_c1", bottom=1.0)
    tissue, hu = study.tissue, study.hu
    per_slice = tissue.reshape(len(tissue), -1)
    cartilage = (per_slice == TISSUES["cartilage"]).sum(axis=1) >= 3
    gland = (per_slice == TISSUES["gland"]).sum(axis=1) >= 3
    # larynx: thyroid cartilage (C4-C5), arytenoids (C5), cricoid (C6)
    assert {"C4", "C5", "C6"} <= _labels_of_slices(study, cartilage) <= {"C3", "C4", "C5", "C6",
                                                                          "C7"}  # fmt: skip
    # thyroid gland beside the trachea: C6-T1
    assert "C7" in _labels_of_slices(study, gland)
    assert _labels_of_slices(study, gland) <= {"C5", "C6", "C7", "T1", "T2"}
    cart_hu = np.median(hu[tissue == TISSUES["cartilage"]])
    gland_hu = np.median(hu[tissue == TISSUES["gland"]])
    assert 120 <= cart_hu <= 430 and 60 <= gland_hu <= 160
    # unlabelled bone in front of the spine (mandible at C1-C3, hyoid at C3) appears only
    # on slices of C1..C4, never with the lower cervical spine
    bone = np.isin(tissue, [TISSUES["cortical"], TISSUES["cancellous"]]) & (study.seg == 0)
    rows = np.arange(tissue.shape[1])[None, :, None]
    spine_row = np.array([np.nonzero(s)[0].mean() if s.any() else -1 for s in study.seg.any(2)])
    anterior = bone & (rows < spine_row[:, None, None] - 12 / study.spec.grid.dr)
    has_front_bone = anterior.reshape(len(anterior), -1).sum(axis=1) >= 3
    cervical = (study.seg.reshape(len(tissue), -1).max(axis=1) <= 7) & (spine_row >= 0)
    front = _labels_of_slices(study, has_front_bone & cervical)  # (ribs come with T1..T3)
    assert "C2" in front and front <= {"C1", "C2", "C3", "C4"}, front
    # the airway changes shape along the neck: wide pharynx above, round trachea below
    air = per_slice == TISSUES["airway"]
    shape = []
    for z in range(len(tissue)):
        rr, cc = np.nonzero(tissue[z] == TISSUES["airway"])
        if len(rr) > 3:
            shape.append((cc.max() - cc.min() + 1) / (rr.max() - rr.min() + 1))
    neck = study.seg.reshape(len(tissue), -1).max(axis=1) > 1  # slices through C2 and below
    assert air[neck].any(axis=1).all(), "an airway on every slice of the neck"
    assert max(shape) > 1.8 and min(shape) < 1.3
