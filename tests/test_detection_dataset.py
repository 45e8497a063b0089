"""The stage 2 YOLO export: labels, negatives, study split, determinism, resume, bad boxes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers_cli import run_cli
from helpers_images import assert_label_on_bright_block
from PIL import Image

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage2.yolo_dataset import (
    ExportConfig,
    box_problem,
    export_yolo_dataset,
    load_manifest,
    read_label_file,
    yolo_label,
)

pytestmark = pytest.mark.detect  # `make test` runs files whole on one worker (--dist loadfile)


@pytest.mark.parametrize(
    "box, problem",
    [
        ((10, 20, 30, 40), None),
        ((0, 0, 100, 80), None),  # the whole image
        ((70.2, 40.3, 30.2, 40.1), None),  # overhangs by less than half a pixel: clipped
        ((71, 10, 30, 10), "reaches outside"),
        ((10, 75, 10, 6), "reaches outside"),
        ((-1, 10, 5, 5), "reaches outside"),
        ((10, 10, 0, 5), "non-positive"),
        ((10, 10, 5, -2), "non-positive"),
        ((10, float("nan"), 5, 5), "non-finite"),
    ],
)
def test_box_problem(box, problem):
    found = box_problem(box, rows=80, columns=100)
    assert found is None if problem is None else problem in found


@pytest.mark.parametrize(
    "box, rows, columns, label, clipped",
    [
        ((10, 20, 30, 40), 100, 100, (0.25, 0.40, 0.30, 0.40), False),
        # 80 x 100 slice: padded by 10 rows above and below to a 100 x 100 square
        ((10, 20, 30, 40), 80, 100, (0.25, 0.50, 0.30, 0.40), False),
        # 100 x 80 slice: padded by 10 columns left and right
        ((10, 20, 30, 40), 100, 80, (0.35, 0.40, 0.30, 0.40), False),
        ((90, 70, 10.4, 10.4), 80, 100, (0.95, 0.85, 0.10, 0.10), True),
    ],
)
def test_yolo_label(box, rows, columns, label, clipped):
    got, was_clipped = yolo_label(box, rows, columns)
    assert got == pytest.approx(label)
    assert was_clipped is clipped


def test_label_lands_on_the_rendered_object():
    """A bright block in a non-square HU slice is where its YOLO label says, after the same
    preprocessing as stage 1 (pad to square, resize)."""
    from keras_cspine.data.preprocess import to_model_image

    hu = np.full((60, 90), -1000.0, dtype=np.float32)
    x, y, w, h = 20, 10, 30, 24
    hu[y : y + h, x : x + w] = 1500.0
    image = to_model_image(hu, mode="bone", size=64)
    label, _ = yolo_label((x, y, w, h), 60, 90)
    assert_label_on_bright_block(image, label)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"size": 4}, "size"),
        ({"mode": "hu"}, "mode"),
        ({"negatives": -1}, "negatives"),
        ({"negative_source": "any"}, "negative_source"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, "test_fraction"),
        ({"on_error": "ignore"}, "on_error"),
        ({"workers": 0}, "workers"),
        ({"holdout": "yes"}, "holdout"),
    ],
)
def test_bad_export_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ExportConfig(**kwargs)


@pytest.fixture(scope="session")
def exported(synthetic_data, tmp_path_factory) -> Path:
    """``detect export`` of the shared tiny synthetic dataset, through the real entry point."""
    out = tmp_path_factory.mktemp("yolo") / "export"
    result = run_cli("detect", "export", str(synthetic_data), str(out), "--size", "64", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "YOLO dataset in" in result.stdout
    return out


def test_export_layout_and_labels(exported, synthetic_data):
    spec = yaml.safe_load((exported / "data.yaml").read_text())
    assert spec["names"] == {0: "fracture"} and Path(spec["path"]) == exported.resolve()
    manifest = load_manifest(exported)
    boxes_csv = pd.read_csv(synthetic_data / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    positives = manifest[manifest.kind == "positive"]
    # every box of the CSV is exported, on the slice it names, with the right label
    assert positives.n_boxes.sum() == len(boxes_csv)
    for row in positives.itertuples():
        csv_rows = boxes_csv[(boxes_csv.StudyInstanceUID == row.StudyInstanceUID)
                             & (boxes_csv.slice_number == row.slice_number)]  # fmt: skip
        assert sorted(map(list, csv_rows[["x", "y", "width", "height"]].to_numpy())) == sorted(
            row.boxes
        )
        label = read_label_file(exported / row.label)
        assert (label[:, 0] == 0).all()
        expected = [yolo_label(b, row.rows, row.columns)[0] for b in row.boxes]
        assert sorted(map(tuple, label[:, 1:].round(6))) == sorted(
            tuple(np.round(e, 6)) for e in expected
        )
    # every image is a 64 x 64 RGB PNG beside its label file
    for row in manifest.itertuples():
        with Image.open(exported / row.image) as image:
            assert image.size == (64, 64) and image.mode == "RGB"
        assert (exported / row.label).is_file()


def test_export_negatives_and_study_split(exported, synthetic_data):
    manifest = load_manifest(exported)
    summary = json.loads((exported / "export.json").read_text())
    labels = pd.read_csv(synthetic_data / "train.csv", dtype={"StudyInstanceUID": str})
    healthy = set(labels.StudyInstanceUID[labels.patient_overall == 0])
    negatives = manifest[manifest.kind == "negative"]
    n_positive = int((manifest.kind == "positive").sum())
    assert len(negatives) == round(0.15 * n_positive) > 0
    assert set(negatives.StudyInstanceUID) <= healthy  # default source: healthy studies
    for row in negatives.itertuples():
        assert (exported / row.label).read_text() == ""
    # split by study: no study in two splits, and both splits have fractures
    split_of = manifest.groupby("StudyInstanceUID").split.nunique()
    assert (split_of == 1).all()
    assert set(manifest[manifest.kind == "positive"].split) == {"train", "val"}
    assert summary["counts"]["val"]["instances"] > 0 and summary["complete"]


def test_export_uses_stage1_preprocessing(exported):
    from keras_cspine.data.preprocess import to_model_image
    from keras_cspine.io.dicom import read_slice

    row = next(load_manifest(exported).itertuples())
    hu, _ = read_slice(row.source)
    with Image.open(exported / row.image) as image:
        np.testing.assert_array_equal(np.asarray(image), to_model_image(hu, "bone", size=64))


def test_export_is_deterministic_and_resumes(synthetic_data, tmp_path):
    config = ExportConfig(size=32, negatives=4, seed=3)
    a = export_yolo_dataset(synthetic_data, tmp_path / "a", config, progress=False)
    b = export_yolo_dataset(synthetic_data, tmp_path / "b", config, progress=False)
    manifest_a = load_manifest(tmp_path / "a")
    pd.testing.assert_frame_equal(manifest_a, load_manifest(tmp_path / "b"))
    assert (manifest_a.kind == "negative").sum() == 4
    for image in manifest_a.image:
        assert (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert a["rendered_this_run"] == b["rendered_this_run"] == len(manifest_a)
    # a second run does nothing; a lost image is rendered again, alone
    again = export_yolo_dataset(synthetic_data, tmp_path / "a", config, progress=False)
    assert again["rendered_this_run"] == 0
    (tmp_path / "a" / manifest_a.image[0]).unlink()
    again = export_yolo_dataset(synthetic_data, tmp_path / "a", config, progress=False)
    assert again["rendered_this_run"] == 1 and (tmp_path / "a" / manifest_a.image[0]).is_file()
    # other settings in the same folder: refused, unless overwrite
    other = ExportConfig(size=48, negatives=4, seed=3)
    with pytest.raises(CSpineDataError, match="other settings"):
        export_yolo_dataset(synthetic_data, tmp_path / "a", other, progress=False)
    export_yolo_dataset(synthetic_data, tmp_path / "a", other, overwrite=True, progress=False)
    with Image.open(tmp_path / "a" / manifest_a.image[0]) as image:
        assert image.size == (48, 48)


def test_holdout_export_is_one_val_split(synthetic_data, exported, tmp_path):
    """``--holdout``: every study (fractured and healthy) in the val split, with the usual labels
    and negatives, for ``detect val`` on studies never trained on; training on it is refused."""
    out = tmp_path / "holdout"
    result = run_cli("detect", "export", str(synthetic_data), str(out), "--size", "64", "--holdout",
                     "--quiet")  # fmt: skip
    assert result.returncode == 0, result.stderr
    manifest = load_manifest(out)
    assert set(manifest.split) == {"val"}
    full = load_manifest(exported)  # the same data exported with a train/val split
    positives = manifest[manifest.kind == "positive"]
    assert set(positives.StudyInstanceUID) == set(full[full.kind == "positive"].StudyInstanceUID)
    assert positives.n_boxes.sum() == full[full.kind == "positive"].n_boxes.sum()
    assert (manifest.kind == "negative").sum() == round(0.15 * len(positives)) > 0
    summary = json.loads((out / "export.json").read_text())
    assert summary["config"]["holdout"] is True and summary["counts"]["train"]["images"] == 0
    spec = yaml.safe_load((out / "data.yaml").read_text())
    assert spec["val"] == "images/val" and not (out / spec["train"]).exists()
    from keras_cspine.stage2.ultralytics_train import train_detector

    with pytest.raises(CSpineDataError, match="held-out"):
        train_detector(out, tmp_path / "run")


@pytest.fixture()
def data_with_bad_boxes(synthetic_data, tmp_path) -> tuple[Path, dict]:
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    boxes = pd.read_csv(data / "train_bounding_boxes.csv", dtype={"StudyInstanceUID": str})
    first = boxes.iloc[0]
    from keras_cspine.io.dicom import read_slice

    _, meta = read_slice(data / "train_images" / first.StudyInstanceUID / f"{first.slice_number}.dcm")
    outside = {**first.to_dict(), "x": meta.columns - 3.0, "width": 10.0}
    missing = {**first.to_dict(), "slice_number": 9999}
    pd.concat([boxes, pd.DataFrame([outside, missing])]).to_csv(
        data / "train_bounding_boxes.csv", index=False
    )
    return data, {"outside": outside, "n_good": len(boxes)}


@pytest.mark.slow
def test_bad_boxes_raise_or_are_recorded(data_with_bad_boxes, tmp_path):
    data, bad = data_with_bad_boxes
    strict = run_cli("detect", "export", str(data), str(tmp_path / "strict"), "--size", "32",
                     "--quiet")  # fmt: skip
    assert strict.returncode != 0
    assert "train_bounding_boxes.csv" in strict.stderr
    assert "9999, which is not in the series" in strict.stderr

    skip = run_cli("detect", "export", str(data), str(tmp_path / "skip"), "--size", "32",
                   "--quiet", "--on-error", "skip")  # fmt: skip
    assert skip.returncode == 0, skip.stderr
    assert "2 errors" in skip.stdout
    errors = pd.read_csv(tmp_path / "skip" / "errors.csv")
    assert errors.problem.str.contains("reaches outside").sum() == 1
    assert errors.problem.str.contains("not in the series").sum() == 1
    assert errors.path.str.endswith("train_bounding_boxes.csv").all()
    manifest = load_manifest(tmp_path / "skip")
    assert manifest.n_boxes.sum() == bad["n_good"]  # the bad boxes are left out, the rest kept
    assert [bad["outside"]["x"], bad["outside"]["y"]] not in [b[:2] for bs in manifest.boxes
                                                             for b in bs]  # fmt: skip
