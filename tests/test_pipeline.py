"""pipeline.py: gating, box assignment, aggregation, study-level evaluation and ``predict``.

The end-to-end tests run the real pipeline (DICOM reading, a saved ``.keras`` stage 1 model, an
ONNX stage 2 model run by onnxruntime through ``OnnxDetector``) with two small models whose
behaviour is known by construction, so that the outputs can be checked exactly:

- stage 1 says "all seven vertebrae present" exactly on the slices whose slice ratio is >= 0.5
  (a metadata Dense layer with weights set by hand), so the gate is known;
- stage 2 is an ONNX graph that outputs one box of score 0.9 (and one of 0.1, below the
  confidence threshold) on every image, so every gated slice gets exactly one box.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import TARGETS, VERTEBRAE, read_submission
from keras_cspine.pipeline.predict import (
    Box,
    PredictConfig,
    aggregate_study,
    assign_boxes,
    evaluate_predictions,
    find_latest_stage1,
    find_latest_stage2,
    find_studies,
    gate_slices,
)

UID_A = "1.2.826.0.1.3680043.101"
UID_B = "1.2.826.0.1.3680043.102"
DETECTOR_SIZE = 64


# --------------------------------------------------------------------------------------------
# Known-behaviour models
# --------------------------------------------------------------------------------------------
def write_box_detector(path, size: int = DETECTOR_SIZE):
    """An ONNX 'YOLO' whose raw output (1, 5, 2) holds a 0.9 box and a 0.1 box on any image."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    boxes = np.array([[[size / 2, size / 4], [size / 2, size / 4], [8, 6], [6, 4], [0.9, 0.1]]],
                     dtype=np.float32)  # (1, 4 + 1 class, 2 anchors): cx, cy, w, h, score
    nodes = [
        helper.make_node("ReduceMean", ["images"], ["mean"], axes=[1, 2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "zero"], ["zeroed"]),
        helper.make_node("Reshape", ["zeroed", "shape"], ["zeroed3"]),
        helper.make_node("Add", ["zeroed3", "boxes"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "constant_boxes",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 5, 2])],
        initializer=[numpy_helper.from_array(np.zeros(1, np.float32), "zero"),
                     numpy_helper.from_array(np.array([1, 1, 1], np.int64), "shape"),
                     numpy_helper.from_array(boxes, "boxes")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    helper.set_model_props(model, {"names": "{0: 'fracture'}", "imgsz": f"[{size}, {size}]"})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_ratio_classifier(path, image_size: int = 32):
    """A .keras stage 1 model: every vertebra present (p >= 0.5) iff slice_ratio >= 0.5."""
    import keras

    image = keras.Input((image_size, image_size, 3), name="image")
    metadata = keras.Input((2,), name="metadata")
    x = keras.layers.GlobalAveragePooling2D()(image)
    x = keras.layers.Dense(7, kernel_initializer="zeros", name="image_logits")(x)
    m = keras.layers.Dense(7, name="metadata_logits")(metadata)
    out = keras.layers.Activation("sigmoid", name="vertebrae")(keras.layers.Add()([x, m]))
    model = keras.Model({"image": image, "metadata": metadata}, out)
    # metadata = (position_mm * 0.01, slice_ratio): logit = 20 * slice_ratio - 10
    model.get_layer("metadata_logits").set_weights(
        [np.array([[0.0] * 7, [20.0] * 7], np.float32), np.full(7, -10.0, np.float32)]
    )
    model.save(path)
    return path


def expected_gate(n: int) -> np.ndarray:
    ratio = np.arange(n) / (n - 1)
    logit = 20.0 * ratio - 10.0
    return 1.0 / (1.0 + np.exp(-logit)) >= 0.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    return write_ratio_classifier(folder / "stage1.keras"), write_box_detector(folder / "det.onnx")


@pytest.fixture
def study_folders(synthetic_data, tmp_path):
    """Three readable studies (links to the synthetic ones) and one with a corrupt slice."""
    root = tmp_path / "test_images"
    root.mkdir()
    uids = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[:3]
    for uid in uids:
        os.symlink(synthetic_data / "train_images" / uid, root / uid)
    broken = root / "1.2.826.0.1.3680043.99999"
    shutil.copytree(synthetic_data / "train_images" / uids[0], broken)
    (broken / "1.dcm").write_bytes(b"not a DICOM file at all")
    return root, uids, broken.name


# --------------------------------------------------------------------------------------------
# Configuration and discovery
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, fragment", [
    ({"presence_threshold": 1.5}, "presence_threshold"),
    ({"box_conf": -0.1}, "box_conf"),
    ({"aggregation": "mean"}, "aggregation"),
    ({"vertebra_floor": 0.99, "ceiling": 0.9}, "floor"),
    ({"patient_floor": -0.1}, "floor"),
    ({"batch_size": 0}, "batch_size"),
    ({"report": "pdf"}, "report"),
    ({"key_slices": -1}, "key_slices"),
])  # fmt: skip
def test_predict_config_rejects_bad_values(changes, fragment):
    with pytest.raises(ValueError, match=fragment):
        PredictConfig(**changes)


def test_switches_of_the_command_line():
    import argparse

    from keras_cspine.cli.predict import config_from_args, configure_parser

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert config_from_args(parser.parse_args(["in", "--out", "o"])) == PredictConfig()
    args = parser.parse_args(["in", "--out", "o", "--no-sequence-model", "--no-level-decoding",
                              "--no-gating", "--report", "none", "--set", "box_conf=0.5"])  # fmt: skip
    assert config_from_args(args) == PredictConfig(
        sequence_model=False, level_decoding=False, gating=False, report="none", box_conf=0.5
    )


def test_predict_config_prior_and_digest():
    config = PredictConfig(vertebra_floor=0.03, patient_floor=0.2)
    assert config.prior() == {**dict.fromkeys(VERTEBRAE, 0.03), "patient_overall": 0.2}
    assert config.digest() == PredictConfig(vertebra_floor=0.03, patient_floor=0.2,
                                            report="none").digest()  # fmt: skip
    assert config.digest() != PredictConfig(vertebra_floor=0.03, patient_floor=0.2,
                                            gating=False).digest()  # fmt: skip


def test_find_studies_layouts(synthetic_data, tmp_path):
    train = synthetic_data / "train_images"
    one = sorted(train.iterdir())[0]
    assert find_studies(one) == [one]
    assert find_studies(train) == sorted(train.iterdir())
    assert find_studies(synthetic_data) == sorted((synthetic_data / "test_images").iterdir())
    (tmp_path / "empty").mkdir()
    with pytest.raises(CSpineDataError, match="no study folders"):
        find_studies(tmp_path / "empty")
    with pytest.raises(CSpineDataError, match="not found"):
        find_studies(tmp_path / "missing")


def finish_stage1_run(folder):
    """Mark a stage 1 run folder finished, as ``train`` does last (``summary.json``)."""
    (folder / "summary.json").write_text("{}")


def finish_stage2_run(folder):
    """Mark a detection run finished, as ``detect train`` does (``run.json`` trained, then
    ``metrics.json`` last)."""
    (folder / "run.json").write_text('{"trained": true}')
    (folder / "metrics.json").write_text("{}")


def test_latest_runs_are_found_by_time(tmp_path):
    assert find_latest_stage1(tmp_path / "none") is None
    old, new = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    for folder, stamp in ((old, 1_000_000), (new, 2_000_000)):
        (folder / "weights").mkdir(parents=True)
        finish_stage1_run(folder)
        finish_stage2_run(folder)
        for name in ("model.keras", "weights/best.onnx", "summary.json", "metrics.json"):
            (folder / name).write_bytes(b"x")
            os.utime(folder / name, (stamp, stamp))
    (new / "backup").mkdir()
    (new / "backup" / "model.keras").write_bytes(b"x")
    os.utime(new / "backup" / "model.keras", (3_000_000, 3_000_000))
    assert find_latest_stage1(tmp_path / "runs") == old  # b's backup/: training not over
    assert find_latest_stage2(tmp_path / "runs") == new / "weights" / "best.onnx"
    shutil.rmtree(new / "backup")
    assert find_latest_stage1(tmp_path / "runs") == new


# --------------------------------------------------------------------------------------------
# Gating, assignment, aggregation
# --------------------------------------------------------------------------------------------
def test_gate_slices():
    p = np.zeros((4, 7))
    p[1, 2] = 0.6
    p[2, 6] = 0.5
    p[3, 0] = 0.49
    assert gate_slices(p, 0.5).tolist() == [False, True, True, False]
    assert gate_slices(p, 0.4).tolist() == [False, True, True, True]
    assert gate_slices(p, 0.5, enabled=False).all()
    with pytest.raises(ValueError, match=r"\(Z, 7\)"):
        gate_slices(np.zeros((4, 3)))


def test_boxes_go_to_the_vertebrae_present_on_their_slice():
    p = np.zeros((3, 7), np.float32)
    p[1, [1, 2, 3]] = [0.9, 0.6, 0.2]  # C2 and C3 present, C4 not
    boxes = [Box(1, 11, 0, 0, 4, 4, score=0.5), Box(0, 10, 0, 0, 4, 4, score=0.8)]
    assigned = assign_boxes(boxes, p, threshold=0.5)
    assert assigned[0].vertebrae == pytest.approx({"C2": 0.45, "C3": 0.3})
    assert assigned[1].vertebrae == {}  # no cervical vertebra on slice 0


def _floorless(aggregation):
    return PredictConfig(aggregation=aggregation, vertebra_floor=0.0, patient_floor=0.0, ceiling=1.0)


@pytest.mark.parametrize("aggregation, c2, c3, patient", [
    ("max", 0.6, 0.3, 0.6),
    ("noisy_or", 1 - 0.4 * 0.5, 0.3, 1 - (0.4 * 0.5) * 0.7),
])  # fmt: skip
def test_aggregation_known_values(aggregation, c2, c3, patient):
    boxes = [Box(0, 1, 0, 0, 1, 1, 0.6, {"C2": 0.6}), Box(1, 2, 0, 0, 1, 1, 0.5, {"C2": 0.5}),
             Box(2, 3, 0, 0, 1, 1, 0.3, {"C3": 0.3})]  # fmt: skip
    p = aggregate_study(boxes, _floorless(aggregation))
    assert p["C2"] == pytest.approx(c2)
    assert p["C3"] == pytest.approx(c3)
    assert p["C1"] == 0.0 and p["C7"] == 0.0
    assert p["patient_overall"] == pytest.approx(patient)


def test_aggregation_floor_and_ceiling():
    config = PredictConfig(vertebra_floor=0.1, patient_floor=0.2, ceiling=0.9)
    assert aggregate_study([], config) == config.prior()
    full = aggregate_study([Box(0, 1, 0, 0, 1, 1, 1.0, {"C5": 1.0})], config)
    assert full["C5"] == pytest.approx(0.9) and full["patient_overall"] == pytest.approx(0.9)
    half = aggregate_study([Box(0, 1, 0, 0, 1, 1, 0.5, {"C5": 0.5})], config)
    assert half["C5"] == pytest.approx(0.1 + 0.8 * 0.5)
    assert half["patient_overall"] == pytest.approx(0.2 + 0.7 * 0.5)


# --------------------------------------------------------------------------------------------
# Study-level evaluation on hand-made cases
# --------------------------------------------------------------------------------------------
def _labels(rows):
    return pd.DataFrame([{"StudyInstanceUID": uid, "patient_overall": max(v), **dict(zip(VERTEBRAE, v))}
                         for uid, v in rows])  # fmt: skip


def _submission(predictions):
    return pd.DataFrame([{"row_id": f"{uid}_{t}", "fractured": p[t]}
                         for uid, p in predictions.items() for t in TARGETS])  # fmt: skip


def test_evaluation_known_values():
    labels = _labels([(UID_A, [0] * 7), (UID_B, [1, 0, 0, 0, 0, 0, 0])])
    pred_a = dict.fromkeys(TARGETS, 0.5)
    pred_b = {**dict.fromkeys(TARGETS, 0.1), "C1": 0.8, "patient_overall": 0.9}
    result = evaluate_predictions(_submission({UID_A: pred_a, UID_B: pred_b}), labels)
    # study A: every row 0.5 -> ln 2 whatever the weights
    # study B: C1 positive (w 2), C2..C7 negative (w 1 each), patient positive (w 14)
    loss_b = (2 * -math.log(0.8) + 6 * -math.log(0.9) + 14 * -math.log(0.9)) / (2 + 6 + 14)
    assert result["rsna_weighted_log_loss"] == pytest.approx((math.log(2) + loss_b) / 2)
    assert result["n_studies"] == 2 and result["n_unlabelled"] == 0
    assert result["auc"]["C1"] == 1.0  # positive B 0.8 > negative A 0.5
    assert result["patient_auc"] == 1.0
    assert result["auc"]["C2"] is None  # one class only
    assert result["mean_vertebra_auc"] == 1.0
    assert result["log_loss"]["C1"] == pytest.approx((math.log(2) - math.log(0.8)) / 2)
    assert result["prevalence"]["patient_overall"] == 0.5


def test_evaluation_auc_of_a_wrong_ranking_and_ties():
    uids = [f"1.2.826.0.1.3680043.{200 + i}" for i in range(4)]
    labels = _labels([(uids[0], [0, 1, 0, 0, 0, 0, 0]), (uids[1], [0, 1, 0, 0, 0, 0, 0]),
                      (uids[2], [0] * 7), (uids[3], [0] * 7)])  # fmt: skip
    preds = {}
    for i, uid in enumerate(uids):
        preds[uid] = {**dict.fromkeys(TARGETS, 0.3), "C2": [0.2, 0.4, 0.6, 0.4][i],
                      "patient_overall": 0.5}  # fmt: skip
    result = evaluate_predictions(_submission(preds), labels)
    # C2 pairs (pos, neg): (0.2, 0.6) wrong, (0.2, 0.4) wrong, (0.4, 0.6) wrong, (0.4, 0.4) tie
    assert result["auc"]["C2"] == pytest.approx(0.5 / 4)
    assert result["patient_auc"] == pytest.approx(0.5)  # all tied


def test_evaluation_skips_unlabelled_and_requires_rows(tmp_path):
    labels = _labels([(UID_A, [0] * 7)])
    other = "1.2.826.0.1.3680043.999"
    result = evaluate_predictions(
        _submission({UID_A: dict.fromkeys(TARGETS, 0.5), other: dict.fromkeys(TARGETS, 0.5)}),
        labels,
    )
    assert result["n_studies"] == 1 and result["n_unlabelled"] == 1
    assert result["rsna_weighted_log_loss"] == pytest.approx(math.log(2))
    with pytest.raises(CSpineDataError, match="none of the 1"):
        evaluate_predictions(_submission({other: dict.fromkeys(TARGETS, 0.5)}), labels)
    partial = _submission({UID_A: dict.fromkeys(TARGETS, 0.5)}).iloc[:-1]
    with pytest.raises(CSpineDataError, match="patient_overall"):
        evaluate_predictions(partial, labels)
    path = tmp_path / "train.csv"
    labels.to_csv(path, index=False)
    sub = tmp_path / "submission.csv"
    _submission({UID_A: dict.fromkeys(TARGETS, 0.5)}).to_csv(sub, index=False)
    assert evaluate_predictions(sub, path)["n_studies"] == 1


# --------------------------------------------------------------------------------------------
# Models and the whole command
# --------------------------------------------------------------------------------------------
def test_stage1_settings_come_from_the_run_folder_alone(models, tmp_path):
    import json

    from keras_cspine.config import save_config
    from keras_cspine.stage1 import runs
    from keras_cspine.stage1.config import DataConfig, Stage1Config
    from keras_cspine.stage1.inference import Stage1Model

    run_dir, prepared = tmp_path / "run", tmp_path / "prep"
    run_dir.mkdir()
    prepared.mkdir()
    shutil.copy(models[0], run_dir / "model.keras")
    save_config(Stage1Config(data=DataConfig(metadata_columns=("position_mm", "slice_ratio"),
                                             prepare_mode="bone")), run_dir / "config.yaml")  # fmt: skip
    (run_dir / "splits.json").write_text(json.dumps({"train": [], "prepared": str(prepared)}))
    (prepared / "prepare.json").write_text(json.dumps({"settings": {"mode": "paper", "size": 48}}))
    # a run of an older keras_cspine (no preprocessing.json): read through its data, with a warning
    with pytest.warns(UserWarning, match="no preprocessing.json"):
        stage1 = Stage1Model.load(run_dir)
    assert (stage1.mode, stage1.render_size, stage1.image_size) == ("paper", 48, 32)
    shutil.rmtree(prepared)  # ... and once its data is gone, it cannot say: an error, not a guess
    with pytest.raises(CSpineDataError, match="no preprocessing.json and its training data"):
        Stage1Model.load(run_dir)
    # the run's own record: nothing else is read
    runs.write_preprocessing(run_dir, mode="multiwindow", render_size=40, image_size=32,
                             metadata_columns=("slice_ratio", "position_mm"),
                             metadata_scale={"position_mm": 0.02})  # fmt: skip
    stage1 = Stage1Model.load(run_dir)
    assert (stage1.mode, stage1.render_size, stage1.image_size) == ("multiwindow", 40, 32)
    assert stage1.metadata_columns == ("slice_ratio", "position_mm")
    meta = stage1.metadata(np.array([10.0, 9.0, 8.0]), np.zeros(3))
    np.testing.assert_allclose(meta[:, 1], [0.0, 0.02, 0.04])  # the recorded scale
    runs.write_preprocessing(run_dir, mode="bone", render_size=64, image_size=64,
                             metadata_columns=("position_mm", "slice_ratio"), metadata_scale={})  # fmt: skip
    with pytest.raises(CSpineDataError, match="takes 32 px images but its run recorded 64 px"):
        Stage1Model.load(run_dir)
    (run_dir / "preprocessing.json").write_text("{not json")
    with pytest.raises(CSpineDataError, match="preprocessing.json: unreadable"):
        Stage1Model.load(run_dir)
    assert Stage1Model.load(models[0]).describe()["mode"] == "bone"  # bare file: defaults
    with pytest.raises(CSpineDataError, match="stage 1 model not found"):
        Stage1Model.load(tmp_path / "nothing")


@pytest.mark.slow
def test_a_copied_run_predicts_the_same_without_its_data(synthetic_data, tmp_path, monkeypatch):
    """Trained on slices prepared at 48 px for a 32 px model; copied to another folder, its
    prepared data deleted, loaded from another working directory: the same probabilities."""
    from keras_cspine.data.prepare import prepare_dataset
    from keras_cspine.io.dicom import read_series
    from keras_cspine.stage1.inference import Stage1Model
    from keras_cspine.stage1.train import load_stage1_config, train_stage1

    monkeypatch.chdir(tmp_path)
    prepare_dataset(synthetic_data, "prep48", size=48, mode="multiwindow", workers=1,
                    progress=False)  # a relative path, as a user types it  # fmt: skip
    config = load_stage1_config("stage1_synthetic_small", [
        "data.image_size=32", "train.epochs=1", "train.batch_size=8", "train.evaluate=false",
        "sequence.enabled=false", "data.val_fraction=0.25", "data.test_fraction=0.0",
        "model.options={backbone_kwargs: {embed_dim: 8, depths: [1, 1, 1, 1], "
        "num_heads: [1, 1, 1, 1], window_size: [4, 2, 1, 1]}}",
    ])  # fmt: skip
    train_stage1(config, "prep48", "run", verbose=0)
    uid = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[0]
    hu, meta = read_series(synthetic_data / "train_images" / uid)
    z = np.array([s.image_position[2] for s in meta.slices])
    before = Stage1Model.load("run")
    assert (before.mode, before.render_size, before.image_size) == ("multiwindow", 48, 32)
    expected = before.predict(hu, np.asarray(meta.positions_mm), z)

    shutil.copytree(tmp_path / "run", tmp_path / "elsewhere" / "copied")
    shutil.rmtree(tmp_path / "prep48")
    (tmp_path / "other").mkdir()
    monkeypatch.chdir(tmp_path / "other")
    after = Stage1Model.load(tmp_path / "elsewhere" / "copied")
    assert after.describe() | {"source": None} == before.describe() | {"source": None}
    np.testing.assert_allclose(after.predict(hu, np.asarray(meta.positions_mm), z), expected,
                               atol=1e-6)  # fmt: skip


def test_stage2_looks_at_the_spine_window_of_its_export(models, synthetic_data, tmp_path):
    """A detector trained on ``detect export --roi-mm`` windows gets the same window of each
    study at inference (found from the same slices), and its boxes come back to the slice."""
    import json

    from keras_cspine.data.roi import read_study_roi
    from keras_cspine.pipeline.predict import Stage1Model, Stage2Model, predict_study

    run = tmp_path / "detect"
    (run / "weights").mkdir(parents=True)
    (tmp_path / "export").mkdir()
    shutil.copy(models[1], run / "weights" / "best.onnx")
    (run / "run.json").write_text(json.dumps({"data": str(tmp_path / "export" / "data.yaml")}))
    (tmp_path / "export" / "export.json").write_text(json.dumps(
        {"config": {"mode": "bone", "size": DETECTOR_SIZE, "roi_mm": 60.0}}))  # fmt: skip
    stage2 = Stage2Model.load(run)
    assert stage2.roi_mm == 60.0 and stage2.describe()["roi_mm"] == 60.0

    folder = sorted((synthetic_data / "train_images").iterdir())[0]
    result = predict_study(folder, Stage1Model.load(models[0]), stage2, PredictConfig())
    roi = read_study_roi(folder, 60.0)
    assert result.info["stage2_roi"] == roi.to_json()
    # the constant 0.9 box (centred in the window image; 8 x 6) in slice pixels
    scale = roi.side / DETECTOR_SIZE
    corner = DETECTOR_SIZE / 2 - np.array([4, 3])
    expected = [roi.left + corner[0] * scale, roi.top + corner[1] * scale, 8 * scale, 6 * scale]
    assert len(result.boxes) == result.gated.sum() > 0
    for box in result.boxes:
        assert [box.x, box.y, box.width, box.height] == pytest.approx(expected, abs=1e-3)
    # a window detector needs the window; a whole-slice one refuses it
    hu = np.zeros((64, 64), np.float32)
    with pytest.raises(ValueError, match="spine windows"):
        stage2.detect(hu)
    whole = Stage2Model.load(models[1])
    assert whole.roi_mm is None and whole.study_roi(hu[None], [1], (1.0, 1.0)) is None
    with pytest.raises(ValueError, match="whole slices"):
        whole.detect(hu, roi)


def test_inference_inputs_equal_the_training_inputs(models, synthetic_data, prepared):
    """Images and metadata built from DICOM at inference == what CSpineSequence trains on."""
    from keras_cspine.data.prepare import load_cache
    from keras_cspine.io.dicom import read_series
    from keras_cspine.pipeline.predict import Stage1Model
    from keras_cspine.stage1.dataset import CSpineSequence

    uid = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[1]
    stage1 = Stage1Model.load(models[0], mode="bone", render_size=32)
    hu, meta = read_series(synthetic_data / "train_images" / uid)
    z = np.array([s.image_position[2] for s in meta.slices])
    sequence = CSpineSequence(prepared, [uid], batch_size=len(hu), labels=False,
                              drop_unknown=False)  # fmt: skip
    (batch,) = sequence[0]
    np.testing.assert_allclose(stage1.metadata(np.asarray(meta.positions_mm), z), batch["metadata"],
                               atol=1e-5)  # fmt: skip
    np.testing.assert_array_equal(stage1.images(hu), batch["image"])
    np.testing.assert_array_equal(stage1.images(hu).astype(np.uint8), load_cache(prepared, uid))


def test_level_decoding_replaces_the_per_slice_probabilities(models, synthetic_data, tmp_path):
    from keras_cspine.pipeline.predict import Stage1Model, predict_study
    from keras_cspine.stage1.level_decoding import LevelDecoder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(models[0], run_dir / "model.keras")
    spine = np.zeros((12, 7), np.int8)
    for k in range(7):
        spine[1 + k : 3 + k, k] = 1  # C1, C1+C2, C2+C3, ... one level lower every slice
    decoder = LevelDecoder.fit([spine, spine[3:]])
    decoder.save(run_dir / "level_decoder.json")
    stage1 = Stage1Model.load(run_dir, mode="bone", render_size=32)
    assert stage1.describe()["level_decoder"] is True
    uid = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[0]
    folder = synthetic_data / "train_images" / uid
    raw = predict_study(folder, stage1, None, PredictConfig(level_decoding=False, report="none"))
    decoded = predict_study(folder, stage1, None, PredictConfig(report="none"))
    # the ratio classifier calls all seven vertebrae present on the lower half of the study,
    # which no spine shows; decoded, at most two adjacent vertebrae remain on any slice
    assert (raw.probabilities >= 0.5).sum(axis=1).max() == 7
    assert (decoded.probabilities >= 0.5).sum(axis=1).max() <= 2
    from keras_cspine.stage1.level_decoding import slice_spacing

    spacing = slice_spacing(raw.positions_mm)
    np.testing.assert_allclose(decoded.probabilities, decoder.decode(raw.probabilities, spacing),
                               atol=1e-5)  # fmt: skip


def test_sequence_model_reads_the_study_before_the_level_decoder(models, synthetic_data,
                                                                 tmp_path):  # fmt: skip
    from keras_cspine.pipeline.predict import Stage1Model, predict_study
    from keras_cspine.stage1.level_decoding import LevelDecoder
    from keras_cspine.stage1.sequence_model import (
        SequenceConfig,
        apply_sequence_model,
        build_sequence_model,
    )

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(models[0], run_dir / "model.keras")
    spine = np.repeat(np.eye(7, dtype=np.int8), 2, axis=0)
    LevelDecoder.fit([spine]).save(run_dir / "level_decoder.json")
    keras_model = build_sequence_model(7, SequenceConfig(projection=8, units=8))  # 7 logits in
    keras_model.save(run_dir / "sequence_model.keras")
    stage1 = Stage1Model.load(run_dir, mode="bone", render_size=32)
    assert stage1.describe()["sequence_model"] is True
    uid = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[0]
    folder = synthetic_data / "train_images" / uid
    plain = PredictConfig(sequence_model=False, level_decoding=False, report="none")
    raw = predict_study(folder, stage1, None, plain)
    read = predict_study(folder, stage1, None, PredictConfig(report="none"))
    # the sequence model's input: the ratio classifier's logits (the input of its sigmoid)
    logits = np.log(raw.probabilities) - np.log1p(-raw.probabilities)
    n = len(logits)
    expected = apply_sequence_model(keras_model, logits, np.zeros(n), np.arange(n))
    np.testing.assert_allclose(read.probabilities, expected, atol=1e-4)
    decoded = predict_study(folder, stage1, None, PredictConfig(sequence_model=False,
                                                                report="none"))  # fmt: skip
    from keras_cspine.stage1.level_decoding import slice_spacing

    np.testing.assert_allclose(
        decoded.probabilities,
        stage1.level_decoder.decode(raw.probabilities, slice_spacing(raw.positions_mm)), atol=1e-5,
    )  # fmt: skip
    with pytest.raises(ValueError, match="reads 5 slice features"):
        Stage1Model(stage1.model, sequence_model=build_sequence_model(5))


def test_sagittal_projection_follows_the_spine():
    from keras_cspine.pipeline.predict import sagittal_projection

    hu = np.full((5, 20, 30), -1000.0, np.float32)
    hu[:, 8:12, 21:23] = 2000.0  # a bony column right of the image centre
    sagittal = sagittal_projection(hu, column_spacing_mm=1.0, slab_mm=4.0)
    assert sagittal.shape == (5, 20) and sagittal.dtype == np.uint8
    assert (sagittal[:, 8:12] == 255).all() and (sagittal[:, :8] == 0).all()


@pytest.mark.slow
def test_predict_end_to_end(models, study_folders, synthetic_data, tmp_path):
    import json

    from keras_cspine.cli.predict import main
    from keras_cspine.pipeline.predict import predict

    root, uids, broken = study_folders
    out = tmp_path / "out"
    config = PredictConfig(box_conf=0.25)
    summary = predict(root, out, stage1=models[0], stage2=models[1], config=config,
                      labels=synthetic_data / "train.csv", progress=False)  # fmt: skip

    # the broken study is reported, the others complete, and the submission stays whole
    assert summary["n_failed"] == 1 and summary["n_ok"] == 3
    errors = pd.read_csv(out / "errors.csv")
    assert errors.StudyInstanceUID.tolist() == [broken] and "1.dcm" in errors.path[0]
    submission = read_submission(out / "submission.csv")
    assert len(submission) == 8 * 4
    fallback = submission[submission.row_id.str.startswith(broken)].fractured.tolist()
    assert fallback == [config.vertebra_floor] * 7 + [config.patient_floor]

    for uid in uids:
        study = json.loads((out / "studies" / f"{uid}.json").read_text())
        n = study["n_slices"]
        gate = expected_gate(n)
        assert [s["gated"] for s in study["slices"]] == gate.tolist()
        assert [s["series_index"] for s in study["slices"]] == list(range(n))
        # one 0.9 box on every gated slice (the 0.1 one is below box_conf), on the right slice
        assert len(study["boxes"]) == gate.sum()
        gated_numbers = {s["slice_number"] for s in study["slices"] if s["gated"]}
        assert {b["slice_number"] for b in study["boxes"]} == gated_numbers
        for box in study["boxes"]:
            assert box["score"] == pytest.approx(0.9, abs=1e-5)
            assert set(box["vertebrae"]) == set(VERTEBRAE)
            assert box["x"] >= 0 and box["y"] >= 0 and box["width"] > 0
        # max aggregation: evidence = 0.9 * the highest p (last slice, ratio 1)
        p_top = 1.0 / (1.0 + math.exp(-10.0))
        expected = config.vertebra_floor + (config.ceiling - config.vertebra_floor) * 0.9 * p_top
        rows = submission.set_index("row_id").fractured
        assert rows[f"{uid}_C4"] == pytest.approx(expected, abs=1e-4)
        assert (out / "reports" / uid / "report.html").is_file()
        assert (out / "reports" / uid / "overview.png").is_file()

    assert summary["n_gated"] == sum(expected_gate(json.loads(
        (out / "studies" / f"{u}.json").read_text())["n_slices"]).sum() for u in uids)  # fmt: skip
    assert summary["evaluation"]["n_studies"] == 3 and summary["evaluation"]["n_unlabelled"] == 1
    assert (out / "evaluation.md").is_file() and (out / "index.html").is_file()
    assert set(summary["seconds"]) == {"read", "stage1", "stage2", "report"}

    # a second run with the same settings reuses the finished studies
    again = predict(root, out, stage1=models[0], stage2=models[1], config=config, progress=False)
    assert again["n_reused"] == 3 and again["n_gated"] == summary["n_gated"]

    # without gating stage 2 sees every slice: one box per slice; the CLI exits 1 (a failure);
    # the models are found as the newest runs under --runs
    runs = tmp_path / "runs"
    (runs / "stage1").mkdir(parents=True)
    (runs / "detect" / "weights").mkdir(parents=True)
    shutil.copy(models[0], runs / "stage1" / "model.keras")
    shutil.copy(models[1], runs / "detect" / "weights" / "best.onnx")
    finish_stage1_run(runs / "stage1")
    finish_stage2_run(runs / "detect")
    out2 = tmp_path / "ungated"
    code = main([str(root), "--out", str(out2), "--runs", str(runs), "--no-gating",
                 "--report", "none", "--quiet"])  # fmt: skip
    assert code == 1
    used = json.loads((out2 / "summary.json").read_text())["models"]
    assert used["stage1"]["source"] == str(runs / "stage1" / "model.keras")
    assert used["stage2"]["source"] == str(runs / "detect" / "weights" / "best.onnx")
    for uid in uids:
        study = json.loads((out2 / "studies" / f"{uid}.json").read_text())
        assert all(s["gated"] for s in study["slices"])
        assert len(study["boxes"]) == study["n_slices"]
        # boxes on slices where stage 1 sees no vertebra count for nothing
        unassigned = [b for b in study["boxes"] if not b["vertebrae"]]
        assert len(unassigned) == (~expected_gate(study["n_slices"])).sum()
    assert not (out2 / "reports").exists()


@pytest.mark.slow
def test_benchmark_reports_gated_and_ungated_times(models, tmp_path):
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench"
    result = subprocess.run(
        [sys.executable, str(repo / "benchmarks" / "bench_pipeline.py"), "--out", str(out),
         "--slices", "12", "--size", "64", "--stage1", str(models[0]), "--stage2",
         str(models[1]), "--repeats", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((out / "bench_pipeline.json").read_text())
    gated, ungated = payload["results"]["gated"], payload["results"]["ungated"]
    assert payload["slices"] == 12
    assert gated["gated"] == pytest.approx(expected_gate(12).mean())  # the ratio model's gate
    assert ungated["gated"] == 1.0 and ungated["boxes"] == 12 and gated["boxes"] == expected_gate(12).sum()
    for run in (gated, ungated):
        assert run["total"] == pytest.approx(sum(run[k] for k in ("read", "stage1", "stage2", "report")))
    assert payload["ungated_over_gated"] == pytest.approx(ungated["total"] / gated["total"])
    assert "ungated / gated time" in result.stdout and "stage2" in result.stdout


def test_a_defaulted_rescale_is_a_warning_in_the_study_record(models, synthetic_data, tmp_path):
    import pydicom

    from keras_cspine.pipeline.predict import Stage1Model, predict_study

    uid = sorted(p.name for p in (synthetic_data / "train_images").iterdir())[0]
    folder = tmp_path / uid
    shutil.copytree(synthetic_data / "train_images" / uid, folder)
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path)
        if "RescaleSlope" in ds:
            del ds.RescaleSlope
        ds.save_as(path)
    stage1 = Stage1Model.load(models[0], mode="bone", render_size=32)
    result = predict_study(folder, stage1, None, PredictConfig(report="none"))
    assert any(w.startswith("RescaleSlope missing: taken as 1") for w in result.info["warnings"])
    assert "RescaleSlope missing: taken as 1" in json.dumps(result.to_json())  # studies/<UID>.json

