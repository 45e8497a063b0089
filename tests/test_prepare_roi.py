"""Stage 1 on the spine window: ``prepare --roi-mm`` crops every slice of a study to the window
around its cervical column (keras_cspine.data.roi), records the window, and inference crops the
same window from the volume, so that the model sees at ``predict`` what it trained on."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from keras_cspine.data.prepare import PrepareSettings, load_cache, load_roi, prepare_dataset
from keras_cspine.data.preprocess import to_model_image
from keras_cspine.data.roi import SpineRoi, read_study_roi, volume_roi
from keras_cspine.errors import CSpineDataError
from keras_cspine.io.dicom import read_series

ROI_MM = 60.0


@pytest.fixture(scope="module")
def roi_prepared(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("roi") / "prep"
    summary = prepare_dataset(synthetic_data, out, size=32, mode="bone", roi_mm=ROI_MM, workers=1,
                              progress=False)  # fmt: skip
    return out, summary


def _uids(synthetic_data):
    return sorted(p.name for p in (synthetic_data / "train_images").iterdir())


def test_each_study_is_cached_as_its_window(roi_prepared, synthetic_data):
    out, summary = roi_prepared
    assert summary["settings"]["roi_mm"] == ROI_MM
    for uid in _uids(synthetic_data)[:2]:
        series = synthetic_data / "train_images" / uid
        roi = load_roi(out, uid)
        assert roi == read_study_roi(series, ROI_MM)  # the window detect export finds too
        hu, meta = read_series(series)
        assert roi == volume_roi(hu, meta.slice_numbers, meta.slices[0].pixel_spacing, ROI_MM)
        cache = load_cache(out, uid)
        assert cache.shape == (len(hu), 32, 32, 3)
        for i in (0, len(hu) // 2, len(hu) - 1):
            np.testing.assert_array_equal(cache[i], to_model_image(roi.crop(hu[i]), "bone", 32))


def test_whole_slice_caches_record_no_window(prepared, synthetic_data):
    assert load_roi(prepared, _uids(synthetic_data)[0]) is None


def test_the_window_is_part_of_the_settings(roi_prepared, synthetic_data):
    """A folder prepared with a window is refused for other settings; the digest of a whole-slice
    folder is what it was before windows existed (no rebuild of existing caches)."""
    out, _ = roi_prepared
    with pytest.raises(CSpineDataError, match="prepared with other settings"):
        prepare_dataset(synthetic_data, out, size=32, mode="bone", workers=1, progress=False)
    import hashlib

    old = json.dumps({"size": 224, "mode": "bone", "split": "train", "cache_format": 1},
                     sort_keys=True)  # fmt: skip
    assert PrepareSettings().digest() == hashlib.sha1(old.encode()).hexdigest()[:12]
    assert PrepareSettings(roi_mm=100).digest() != PrepareSettings().digest()
    assert PrepareSettings(roi_mm=100) == PrepareSettings(roi_mm=100.0)


@pytest.mark.parametrize("roi_mm", [0, -5, 10, 600, True, "100", float("nan"), float("inf")])
def test_illegal_windows_are_refused(roi_mm):
    with pytest.raises(ValueError, match="roi_mm"):
        PrepareSettings(roi_mm=roi_mm)


@pytest.mark.parametrize("value", ["0", "abc", "1e9"])
def test_the_command_line_refuses_a_bad_window(value, synthetic_data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "keras_cspine", "prepare", str(synthetic_data),
                             str(tmp_path / "p"), "--roi-mm", value], capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "--roi-mm" in result.stderr and not (tmp_path / "p").exists()


def test_a_damaged_marker_is_named(roi_prepared, synthetic_data, tmp_path):
    import shutil

    out, _ = roi_prepared
    copy = tmp_path / "copy"
    shutil.copytree(out / "studies", copy / "studies")
    uid = _uids(synthetic_data)[0]
    (copy / "studies" / f"{uid}.json").write_text("{not json")
    with pytest.raises(CSpineDataError) as err:
        load_roi(copy, uid)
    assert str(err.value).startswith(str(copy / "studies" / f"{uid}.json"))


def test_inference_crops_the_window_it_was_trained_on(roi_prepared, synthetic_data, tmp_path):
    """A run trained on windows records ``roi_mm``; ``Stage1Model`` then builds from DICOM the
    very images the training cache holds, and ``predict_study`` gives them to it."""
    from test_pipeline import write_ratio_classifier

    from keras_cspine.pipeline.predict import Stage1Model, predict_study
    from keras_cspine.stage1 import runs
    from keras_cspine.stage1.config import Stage1Config
    from keras_cspine.stage1.train import _write_preprocessing

    out, _ = roi_prepared
    run = tmp_path / "run"
    run.mkdir()
    write_ratio_classifier(run / runs.MODEL_FILE)
    _write_preprocessing(run, out, Stage1Config(), SimpleNamespace(cache_size=32, image_size=32))
    assert json.loads((run / runs.PREPROCESSING_FILE).read_text())["roi_mm"] == ROI_MM
    stage1 = Stage1Model.load(run)
    assert stage1.roi_mm == ROI_MM and stage1.describe()["roi_mm"] == ROI_MM

    uid = _uids(synthetic_data)[1]
    hu, meta = read_series(synthetic_data / "train_images" / uid)
    roi = stage1.study_roi(hu, meta.slice_numbers, meta.slices[0].pixel_spacing)
    assert roi == load_roi(out, uid)
    np.testing.assert_array_equal(stage1.images(hu, roi).astype(np.uint8), load_cache(out, uid))
    with pytest.raises(ValueError, match="spine windows"):
        stage1.images(hu)
    z = np.array([s.image_position[2] for s in meta.slices])
    with pytest.raises(ValueError, match="spine windows"):
        stage1.predict(hu, np.asarray(meta.positions_mm), z)

    result = predict_study(synthetic_data / "train_images" / uid, stage1, None)
    assert result.info["stage1_roi"] == roi.to_json()
    given = Stage1Model.load(run / runs.MODEL_FILE, mode="bone", render_size=32)
    assert given.roi_mm == ROI_MM  # mode and size given: the window the run recorded stays
    bare = tmp_path / "bare.keras"
    bare.write_bytes((run / runs.MODEL_FILE).read_bytes())
    whole = Stage1Model.load(bare, mode="bone", render_size=32)
    assert whole.roi_mm is None and whole.study_roi(hu, meta.slice_numbers, (1.0, 1.0)) is None
    with pytest.raises(ValueError, match="whole slices"):
        whole.images(hu, SpineRoi(0, 0, 10))


def test_the_look_figure_draws_boxes_in_the_window(roi_prepared):
    """Boxes in native pixels land where the window image shows them."""
    roi = SpineRoi(top=40, left=30, side=120)
    assert roi.to_image([90, 100, 12, 24], image_size=60) == (30.0, 30.0, 6.0, 12.0)
    from keras_cspine.data.prepare import load_index
    from keras_cspine.viz import figure_slices

    out, _ = roi_prepared
    index = load_index(out)
    rows = list(index.index[index.has_fracture_box == 1][:2])
    assert rows, "the tiny synthetic set has fracture boxes"
    figure = figure_slices(index, out, rows, ncols=2)
    for ax, row_id in zip(figure.axes, rows):
        row = index.loc[row_id]
        window = load_roi(out, row.StudyInstanceUID)
        drawn = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
        assert drawn == [pytest.approx(window.to_image(box, 32)) for box in row.boxes]


def test_a_study_whose_window_cannot_be_found_is_named_and_left_out(synthetic_data, tmp_path):
    """The window is read from a sample of the study's slices before its chunks are rendered: a
    corrupt one stops ``prepare`` naming the file, or (``on_error="skip"``) leaves that study out,
    recorded in errors.csv, with no partial cache, while the others are prepared."""
    import shutil

    import pandas as pd

    data = tmp_path / "rsna"
    shutil.copytree(synthetic_data, data, symlinks=True)
    uid = _uids(data)[0]
    bad = data / "train_images" / uid / "1.dcm"  # the first slice is always in the sample
    bad.unlink()
    bad.write_bytes(b"not a DICOM file at all")
    with pytest.raises(CSpineDataError) as err:
        prepare_dataset(data, tmp_path / "strict", size=32, roi_mm=ROI_MM, workers=1,
                        progress=False)  # fmt: skip
    assert str(err.value).startswith(str(bad))
    out = tmp_path / "skip"
    summary = prepare_dataset(data, out, size=32, roi_mm=ROI_MM, workers=1, on_error="skip",
                              progress=False)  # fmt: skip
    assert summary["studies_skipped"] == [uid] and summary["studies"] == len(_uids(data)) - 1
    errors = pd.read_csv(out / "errors.csv")
    assert errors.path.tolist() == [str(bad)]
    assert sorted(p.name for p in (out / "cache").iterdir()) == sorted(
        f"{u}.npy" for u in _uids(data)[1:])  # fmt: skip
