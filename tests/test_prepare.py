"""prepare.py: the slice index + image cache; resumable, atomic, parallel, errors recorded."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from keras_cspine.data.prepare import load_cache, load_index, prepare_dataset, read_settings
from keras_cspine.errors import BoxError, CSpineDataError, DicomReadError
from keras_cspine.io.rsna import VERTEBRAE, RsnaLayout


def test_index_matches_the_data(synthetic_data, prepared):
    layout = RsnaLayout(synthetic_data)
    index = load_index(prepared)
    uids = layout.list_studies()
    assert sorted(index.StudyInstanceUID.unique()) == uids
    for uid in uids:
        study = index[index.StudyInstanceUID == uid]
        n_files = len(list(layout.series_dir(uid).glob("*.dcm")))
        assert len(study) == n_files == study.n_slices.iloc[0]
        assert study.series_index.tolist() == list(range(n_files))
        # series order is superior -> inferior whatever the file order is
        assert np.all(np.diff(study.z_mm.to_numpy()) < 0) or np.all(
            np.diff(study.position_mm.to_numpy()) > 0
        )
        assert study.position_mm.iloc[0] == 0 and np.all(np.diff(study.position_mm) > 0)
        assert study.slice_ratio.iloc[0] == 0 and study.slice_ratio.iloc[-1] == 1
        cache = load_cache(prepared, uid)
        assert cache.shape == (n_files, 32, 32, 3) and cache.dtype == np.uint8
        assert cache.std() > 5, "cached images must not be blank"
    # segmented studies: known labels, every vertebra of the scan present somewhere
    assert (index.labels_known == 1).all()
    assert set(index[list(VERTEBRAE)].to_numpy().ravel()) <= {0, 1}
    assert (index[list(VERTEBRAE)].sum(axis=0) > 0).sum() >= 5


def test_boxes_land_on_the_right_slices(synthetic_data, prepared):
    layout = RsnaLayout(synthetic_data)
    boxes = layout.bounding_boxes()
    index = load_index(prepared)
    with_box = index[index.has_fracture_box == 1]
    assert len(with_box) == len(boxes.groupby(["StudyInstanceUID", "slice_number"]))
    for row in boxes.itertuples():
        hit = index[(index.StudyInstanceUID == row.StudyInstanceUID)
                    & (index.slice_number == row.slice_number)]  # fmt: skip
        assert len(hit) == 1
        assert [row.x, row.y, row.width, row.height] in hit.boxes.iloc[0]


def test_head_first_and_feet_first_agree_on_anatomy(synthetic_data, prepared):
    """In series order, C1 comes before C7 in every study, whatever its file order."""
    index = load_index(prepared)
    for uid, study in index.groupby("StudyInstanceUID"):
        first = {v: study.series_index[study[v] == 1].min() for v in VERTEBRAE
                 if (study[v] == 1).any()}  # fmt: skip
        present = sorted(first, key=lambda v: VERTEBRAE.index(v))
        ordered = [first[v] for v in present]
        assert ordered == sorted(ordered), f"{uid}: vertebrae out of order {first}"


def test_second_run_does_no_work_and_resume_finishes(synthetic_data, tmp_path):
    out = tmp_path / "prep"
    first = prepare_dataset(synthetic_data, out, size=24, workers=1, progress=False, limit=2)
    assert first["studies"] == 2 and first["slices_processed_this_run"] > 0
    index_before = (out / "index.csv").read_bytes()
    again = prepare_dataset(synthetic_data, out, size=24, workers=1, progress=False, limit=2)
    assert again["slices_processed_this_run"] == 0 and again["studies_processed_this_run"] == 0
    assert (out / "index.csv").read_bytes() == index_before
    # "kill" one study: its marker and cache vanish, a stale partial file is left behind
    uid = sorted(load_index(out).StudyInstanceUID.unique())[0]
    (out / "studies" / f"{uid}.json").unlink()
    (out / "cache" / f"{uid}.npy").unlink()
    (out / "cache" / f".{uid}.npy.partial").write_bytes(b"half")
    resumed = prepare_dataset(synthetic_data, out, size=24, workers=1, progress=False)
    assert resumed["studies_processed_this_run"] == len(RsnaLayout(synthetic_data).list_studies()) - 1
    assert not list((out / "cache").glob(".*partial"))
    assert load_cache(out, uid).shape[1:] == (24, 24, 3)
    assert read_settings(out)["studies"] == len(RsnaLayout(synthetic_data).list_studies())


def test_other_settings_refuse_to_mix(synthetic_data, tmp_path):
    out = tmp_path / "prep"
    prepare_dataset(synthetic_data, out, size=24, workers=1, progress=False, limit=1)
    with pytest.raises(CSpineDataError, match="other settings"):
        prepare_dataset(synthetic_data, out, size=32, workers=1, progress=False, limit=1)


@pytest.mark.slow
def test_parallel_equals_serial(synthetic_data, prepared, tmp_path):
    out = tmp_path / "par"
    prepare_dataset(synthetic_data, out, size=32, workers=2, chunk_slices=7, progress=False)
    serial, parallel = load_index(prepared), load_index(out)
    pd.testing.assert_frame_equal(serial, parallel)
    for uid in serial.StudyInstanceUID.unique():
        np.testing.assert_array_equal(load_cache(prepared, uid), load_cache(out, uid))


@pytest.mark.parametrize("mode", ["paper", "multiwindow"])
def test_cache_holds_the_chosen_preprocessing(synthetic_data, tmp_path, mode):
    from keras_cspine.data.preprocess import to_model_image
    from keras_cspine.io.dicom import read_slice

    out = tmp_path / mode
    prepare_dataset(synthetic_data, out, size=16, mode=mode, workers=1, progress=False, limit=1)
    index = load_index(out)
    uid = index.StudyInstanceUID.iloc[0]
    cache = np.asarray(load_cache(out, uid))
    folder = RsnaLayout(synthetic_data).series_dir(uid)
    for row in index.iloc[[0, len(index) // 2, -1]].itertuples():
        hu, _ = read_slice(folder / f"{row.slice_number}.dcm")
        np.testing.assert_array_equal(cache[row.series_index], to_model_image(hu, mode, 16))
    same_channels = np.array_equal(cache[..., 0], cache[..., 2])
    assert same_channels == (mode == "paper")


# -- bad input: raise names the file; skip records it and goes on ------------------------------
def _copy(synthetic_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    return data, RsnaLayout(data)


def test_corrupt_slice_raises_or_is_recorded(synthetic_data, tmp_path):
    data, layout = _copy(synthetic_data, tmp_path)
    bad_uid = layout.list_studies()[1]
    bad = sorted(layout.series_dir(bad_uid).glob("*.dcm"))[3]
    bad.write_bytes(bad.read_bytes()[: len(bad.read_bytes()) // 2])  # truncated
    with pytest.raises(DicomReadError) as info:
        prepare_dataset(data, tmp_path / "strict", size=16, workers=1, progress=False)
    assert bad.name in str(info.value)
    assert not list((tmp_path / "strict" / "cache").glob(".*partial"))
    summary = prepare_dataset(data, tmp_path / "lenient", size=16, workers=1, progress=False,
                              on_error="skip")  # fmt: skip
    assert summary["studies_skipped"] == [bad_uid]
    errors = pd.read_csv(tmp_path / "lenient" / "errors.csv")
    assert errors.path.str.contains(bad.name).any()
    index = load_index(tmp_path / "lenient")
    assert bad_uid not in set(index.StudyInstanceUID)
    assert index.StudyInstanceUID.nunique() == len(layout.list_studies()) - 1


def test_box_outside_the_image(synthetic_data, tmp_path):
    data, layout = _copy(synthetic_data, tmp_path)
    boxes = pd.read_csv(data / "train_bounding_boxes.csv")
    assert len(boxes), "the fixture needs at least one fractured study"
    boxes.loc[0, "x"] = 10_000.0
    boxes.to_csv(data / "train_bounding_boxes.csv", index=False)
    with pytest.raises(BoxError, match="outside"):
        prepare_dataset(data, tmp_path / "strict", size=16, workers=1, progress=False)
    prepare_dataset(data, tmp_path / "skip", size=16, workers=1, progress=False, on_error="skip")
    errors = pd.read_csv(tmp_path / "skip" / "errors.csv")
    assert errors.problem.str.contains("outside").any()
    kept = load_index(tmp_path / "skip").has_fracture_box.sum()
    # only the bad box is dropped: its slice keeps a fracture box if it has another one
    assert kept == len(boxes.drop(index=0).groupby(["StudyInstanceUID", "slice_number"]))


def test_segmentation_of_wrong_shape(synthetic_data, tmp_path):
    import nibabel as nib

    data, layout = _copy(synthetic_data, tmp_path)
    uid = layout.list_studies()[0]
    path = layout.segmentation_path(uid)
    image = nib.load(path, mmap=False)  # the file is overwritten below
    smaller = nib.Nifti1Image(np.asarray(image.dataobj)[:, :, :-3], image.affine)
    nib.save(smaller, path)
    with pytest.raises(CSpineDataError) as info:
        prepare_dataset(data, tmp_path / "strict", size=16, workers=1, progress=False)
    assert path.name in str(info.value)
    prepare_dataset(data, tmp_path / "skip", size=16, workers=1, progress=False, on_error="skip")
    index = load_index(tmp_path / "skip")
    study = index[index.StudyInstanceUID == uid]
    assert (study.labels_known == 0).all() and (study[list(VERTEBRAE)] == -1).all().all()
    assert pd.read_csv(tmp_path / "skip" / "errors.csv").path.str.contains(path.name).any()


def test_index_is_json_clean(prepared):
    raw = pd.read_csv(prepared / "index.csv", dtype=str)
    for value in raw.boxes:
        assert isinstance(json.loads(value), list)
