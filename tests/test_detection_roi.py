"""Stage 2's spine window (keras_cspine.data.roi): where it is found, how boxes map into it
and back, and the YOLO export that renders it. No torch here."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from helpers_cli import run_cli
from helpers_images import assert_label_on_bright_block

from keras_cspine.data.roi import (
    SpineRoi,
    read_study_roi,
    roi_sample,
    spine_centre,
    study_roi,
)
from keras_cspine.stage2.yolo_dataset import load_manifest, read_label_file

pytestmark = pytest.mark.detect


def test_roi_sample_is_even_and_independent_of_order():
    numbers = list(range(1, 101))
    sample = roi_sample(numbers, count=5)
    assert sample == [1, 25, 50, 75, 100]
    assert roi_sample(numbers[::-1], count=5) == sample
    assert roi_sample([7, 3, 5], count=32) == [3, 5, 7]
    with pytest.raises(ValueError, match="no slices"):
        roi_sample([])


def test_spine_centre_is_the_bone_on_every_slice():
    """In a neck (soft tissue in air), a small bone disc on every slice beats a much bigger bone
    arc (a jaw) on a third of them, and a thick dense table under the neck on all of them."""
    rows, columns = 112, 128
    yy, xx = np.mgrid[:rows, :columns]
    neck = (yy - 55) ** 2 / 45**2 + (xx - 64) ** 2 / 55**2 < 1
    disc = (yy - 62) ** 2 + (xx - 70) ** 2 < 6**2
    arc = (np.abs(np.hypot(yy - 40, xx - 64) - 30) < 3) & (yy < 40)
    table = (yy >= 101) & (yy < 110)  # 2 px of air (a mattress) under the neck, then the table
    stack = []
    for k in range(30):
        hu = np.full((rows, columns), -1000.0, np.float32)
        hu[neck] = 40.0
        hu[disc] = 900.0
        hu[table] = 600.0
        if k < 10:
            hu[arc] = 1600.0
        stack.append(hu)
    assert arc.sum() > 3 * disc.sum() and table.sum() > 10 * disc.sum()
    row, column = spine_centre(stack, (1.0, 1.0))
    assert abs(row - 62) <= 1 and abs(column - 70) <= 1
    # no bone at all: the slice centre
    assert spine_centre([np.zeros((rows, columns))], (1.0, 1.0)) == ((rows - 1) / 2, (columns - 1) / 2)
    with pytest.raises(ValueError, match="one shape"):
        spine_centre([np.zeros((4, 4)), np.zeros((4, 5))], (1.0, 1.0))


def test_window_size_comes_from_the_pixel_spacing():
    roi = SpineRoi.around((50.0, 60.0), (0.5, 0.5), roi_mm=40.0)
    assert roi == SpineRoi(top=10, left=20, side=80)
    assert SpineRoi.from_json(roi.to_json()) == roi
    with pytest.raises(ValueError, match="roi_mm"):
        SpineRoi.around((0, 0), (1, 1), roi_mm=0)


def test_crop_pads_with_air_past_the_slice_edge():
    hu = np.arange(20 * 30, dtype=np.float32).reshape(20, 30) - 1000.0
    inside = SpineRoi(top=2, left=5, side=10).crop(hu)
    np.testing.assert_array_equal(inside, hu[2:12, 5:15])
    edge = SpineRoi(top=-4, left=24, side=10).crop(hu)
    assert edge.shape == (10, 10)
    np.testing.assert_array_equal(edge[4:, :6], hu[:6, 24:30])
    assert (edge[:4] == hu.min()).all() and (edge[:, 6:] == hu.min()).all()


def test_boxes_map_into_the_window_and_back():
    roi = SpineRoi(top=10, left=-6, side=50)
    rows, columns, size = 64, 64, 200
    (cx, cy, w, h), clipped = roi.yolo_label((20, 30, 10, 8), rows, columns)
    assert not clipped
    assert (cx, cy, w, h) == pytest.approx(((26 + 5) / 50, (20 + 4) / 50, 10 / 50, 8 / 50))
    # the label, read on a size x size window image, goes back to the native box
    image_box = np.array([[(cx - w / 2) * size, (cy - h / 2) * size,
                           (cx + w / 2) * size, (cy + h / 2) * size]])  # fmt: skip
    np.testing.assert_allclose(roi.to_slice(image_box, size, rows, columns), [[20, 30, 30, 38]])
    # a box across the window's bottom edge is clipped to it; one outside gives no label
    (_, cy, _, h), clipped = roi.yolo_label((20, 55, 10, 10), rows, columns)
    assert clipped and h == pytest.approx(5 / 50) and cy == pytest.approx(47.5 / 50)
    assert roi.yolo_label((50, 5, 6, 6), rows, columns) == (None, True)


def test_label_lands_on_the_rendered_object_in_the_window():
    from keras_cspine.data.preprocess import to_model_image

    hu = np.full((90, 120), -1000.0, dtype=np.float32)
    x, y, w, h = 70, 40, 12, 9
    hu[y : y + h, x : x + w] = 1500.0
    roi = SpineRoi(top=20, left=50, side=45)
    image = to_model_image(roi.crop(hu), mode="bone", size=90)
    label, _ = roi.yolo_label((x, y, w, h), 90, 120)
    assert_label_on_bright_block(image, label, size_tol=2.5)


def test_synthetic_fractures_lie_inside_the_window(synthetic_data):
    """The window found from 32 slices holds every box of the synthetic studies, and the window
    follows the pixels: moving the study moves it."""
    from keras_cspine.io.dicom import read_series

    boxes = pd.read_csv(synthetic_data / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    assert len(boxes) > 0
    for uid, rows in boxes.groupby("StudyInstanceUID"):
        folder = synthetic_data / "train_images" / uid
        roi = read_study_roi(folder, roi_mm=100.0)
        assert (rows.x >= roi.left).all() and (rows.y >= roi.top).all()
        assert (rows.x + rows.width <= roi.left + roi.side).all()
        assert (rows.y + rows.height <= roi.top + roi.side).all()
    hu, meta = read_series(folder)
    spacing = meta.slices[0].pixel_spacing
    sample = [hu[i] for i, n in enumerate(meta.slice_numbers) if n in roi_sample(meta.slice_numbers)]
    assert study_roi(sample, spacing, 100.0) == roi  # the same slices as the pipeline's
    shifted = [np.roll(s, (5, -7), axis=(0, 1)) for s in sample]
    moved = study_roi(shifted, spacing, 100.0)
    assert abs(moved.top - roi.top - 5) <= 1 and abs(moved.left - roi.left + 7) <= 1


def test_read_study_roi_names_the_folder(tmp_path):
    from keras_cspine.errors import CSpineDataError

    with pytest.raises(CSpineDataError, match="no <n>.dcm") as info:
        read_study_roi(tmp_path, roi_mm=100.0)
    assert str(tmp_path) in str(info.value)


def test_export_with_spine_window(synthetic_data, tmp_path):
    """``detect export --roi-mm``: window images whose labels are the boxes in the window."""
    out = tmp_path / "roi"
    result = run_cli("detect", "export", str(synthetic_data), str(out), "--size", "64",
                     "--roi-mm", "100", "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "export.json").read_text())
    assert summary["config"]["roi_mm"] == 100.0
    assert sum(c["outside_roi"] for c in summary["counts"].values()) == 0
    manifest = load_manifest(out)
    rois = {}
    for row in manifest.itertuples():
        roi = SpineRoi.from_json(row.roi)
        # one window per study, the one read_study_roi finds
        rois.setdefault(row.StudyInstanceUID, roi)
        assert rois[row.StudyInstanceUID] == roi
        label = read_label_file(out / row.label)
        expected = [roi.yolo_label(b, row.rows, row.columns)[0] for b in row.boxes]
        assert sorted(map(tuple, label[:, 1:].round(6))) == sorted(
            tuple(np.round(e, 6)) for e in expected)  # fmt: skip
    uid = next(iter(rois))
    assert rois[uid] == read_study_roi(synthetic_data / "train_images" / uid, 100.0)
    # another window size is another export: refused in the same folder
    again = run_cli("detect", "export", str(synthetic_data), str(out), "--size", "64",
                    "--roi-mm", "80", "--quiet")  # fmt: skip
    assert again.returncode != 0 and "other settings" in again.stderr


def test_export_counts_boxes_outside_the_window(synthetic_data, tmp_path):
    """A window too small for the fractures leaves their boxes out, counted, never mislabelled."""
    from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset

    summary = export_yolo_dataset(synthetic_data, tmp_path / "tiny_roi",
                                  ExportConfig(size=32, roi_mm=12.0, holdout=True), progress=False)  # fmt: skip
    outside = sum(c["outside_roi"] for c in summary["counts"].values())
    assert outside > 0
    manifest = load_manifest(tmp_path / "tiny_roi")
    boxes = pd.read_csv(synthetic_data / "train_bounding_boxes.csv")
    assert manifest.n_boxes.sum() + outside == len(boxes)
    assert (manifest.kind == "positive").any()  # some boxes were kept, not all dropped
    for row in manifest[manifest.kind == "positive"].itertuples():
        assert len(read_label_file(tmp_path / "tiny_roi" / row.label)) == row.n_boxes > 0


def test_export_with_an_unreadable_window_slice(synthetic_data, tmp_path):
    """A slice the window needs that cannot be read stops the export naming the file, or with
    on_error="skip" leaves that study out, recorded in errors.csv."""
    import shutil

    from keras_cspine.errors import CSpineDataError
    from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset

    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data, symlinks=True)
    boxes = pd.read_csv(data / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    uid = boxes.StudyInstanceUID.iloc[0]
    folder = data / "train_images" / uid
    number = roi_sample([int(p.stem) for p in folder.glob("*.dcm")])[1]
    assert number not in set(boxes.slice_number[boxes.StudyInstanceUID == uid])
    (folder / f"{number}.dcm").write_bytes(b"not a DICOM file")
    with pytest.raises(CSpineDataError, match=f"{number}.dcm"):
        export_yolo_dataset(data, tmp_path / "strict", ExportConfig(size=32, roi_mm=100.0),
                            progress=False)  # fmt: skip
    summary = export_yolo_dataset(data, tmp_path / "skip", ExportConfig(
        size=32, roi_mm=100.0, on_error="skip", holdout=True), progress=False)  # fmt: skip
    errors = pd.read_csv(tmp_path / "skip" / "errors.csv")
    assert errors.path.str.endswith(f"{number}.dcm").any()
    assert uid not in set(load_manifest(tmp_path / "skip").StudyInstanceUID)
    assert summary["errors"] >= 1
