"""``predict`` against careless and hostile use (issue "Trust").

- stale results: a study's saved result is reused only with the same settings *and the same model
  content* (SHA-256 of model.keras, preprocessing.json, the level decoder, the sequence model and
  the ONNX file), and ``predict`` says once why it redoes studies;
- the default models are the newest *finished* runs, and ``predict`` says which;
- errors, not crashes: an unusable output path, a stage 1 model that is not a classifier, a study
  folder that is not named by its StudyInstanceUID (which must not leak: it may be a patient's
  name), ``--limit 0``, relative paths;
- no network: onnxruntime's telemetry is switched off, and a study is predicted without a socket.

The models are the known-behaviour models of ``test_pipeline.py``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_pipeline import (
    finish_stage1_run,
    finish_stage2_run,
    write_box_detector,
    write_ratio_classifier,
)

from keras_cspine.errors import CSpineDataError
from keras_cspine.pipeline.config import PredictConfig
from keras_cspine.pipeline.studies import (
    WITHHELD,
    file_sha256,
    find_latest_stage1,
    find_latest_stage2,
    name_study,
    stage1_runs,
    stage2_runs,
)

QUICK = PredictConfig(report="none")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("robust_models")
    return write_ratio_classifier(folder / "stage1.keras"), write_box_detector(folder / "det.onnx")


def _train_uids(synthetic_data, n=2):
    return sorted(p.name for p in (synthetic_data / "train_images").iterdir())[:n]


def _stage1_run(folder: Path, model: Path) -> Path:
    """A finished stage 1 run folder around ``model`` (with its preprocessing.json)."""
    from keras_cspine.stage1 import runs
    from keras_cspine.stage1.dataset import METADATA_SCALE

    folder.mkdir(parents=True)
    shutil.copy(model, folder / "model.keras")
    runs.write_preprocessing(folder, mode="bone", render_size=32, image_size=32,
                             metadata_columns=("position_mm", "slice_ratio"),
                             metadata_scale=METADATA_SCALE)  # fmt: skip
    finish_stage1_run(folder)
    return folder


def _stage2_run(folder: Path, onnx: Path) -> Path:
    (folder / "weights").mkdir(parents=True)
    shutil.copy(onnx, folder / "weights" / "best.onnx")
    finish_stage2_run(folder)
    return folder


def _studies(synthetic_data, root: Path, n=2) -> Path:
    root.mkdir(parents=True)
    for uid in _train_uids(synthetic_data, n):
        os.symlink(synthetic_data / "train_images" / uid, root / uid)
    return root


# --------------------------------------------------------------------------------------------
# 1. Stale results: the models' content is part of a study's fingerprint
# --------------------------------------------------------------------------------------------
def test_file_sha256_is_cached_per_path_size_and_mtime(tmp_path, monkeypatch):
    import builtins
    import hashlib

    path = tmp_path / "model.bin"
    path.write_bytes(b"one")
    opened = []
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    assert len(opened) == 1  # the second time from the cache
    replacement = tmp_path / "new.bin"
    replacement.write_bytes(b"two")  # same size, replaced at the same path
    os.replace(replacement, path)
    assert file_sha256(path) == hashlib.sha256(b"two").hexdigest()
    with pytest.raises(CSpineDataError, match="cannot read"):
        file_sha256(tmp_path / "missing.bin")


def _replace_model(run1, run2):
    import keras

    model = keras.saving.load_model(run1 / "model.keras")
    layer = model.get_layer("metadata_logits")
    kernel, _ = layer.get_weights()
    layer.set_weights([kernel, np.full(7, -5.0, np.float32)])  # a different gate
    model.save(run1 / "model.keras")
    return "model files changed (model)"


def _replace_preprocessing(run1, run2):
    from keras_cspine.stage1 import runs

    runs.write_preprocessing(run1, mode="multiwindow", render_size=32, image_size=32,
                             metadata_columns=("position_mm", "slice_ratio"),
                             metadata_scale={"position_mm": 0.01, "slice_ratio": 1.0})  # fmt: skip
    return "model files changed (preprocessing)"


def _add_level_decoder(run1, run2):
    from keras_cspine.stage1.level_decoding import LevelDecoder

    spine = np.repeat(np.eye(7, dtype=np.int8), 2, axis=0)
    LevelDecoder.fit([spine]).save(run1 / "level_decoder.json")
    return "model files changed (level_decoder)"


def _replace_onnx(run1, run2):
    write_box_detector(run2 / "weights" / "best.onnx", size=32)
    return "stage 2 model files changed (onnx)"


def _rewrite_same_bytes(run1, run2):
    data = (run1 / "model.keras").read_bytes()
    (run1 / "model.keras").unlink()
    (run1 / "model.keras").write_bytes(data)
    return None


@pytest.mark.parametrize("change", [
    _replace_model,
    _replace_preprocessing,
    _add_level_decoder,
    _replace_onnx,
    _rewrite_same_bytes,  # a new mtime and inode, the same content: reused
], ids=lambda f: f.__name__.strip("_"))  # fmt: skip
def test_a_changed_model_redoes_the_studies(change, models, synthetic_data, tmp_path, capsys):
    from keras_cspine.pipeline.predict import predict

    root = _studies(synthetic_data, tmp_path / "in")
    run1 = _stage1_run(tmp_path / "runs" / "s1", models[0])
    run2 = _stage2_run(tmp_path / "runs" / "s2", models[1])
    out = tmp_path / "out"
    first = predict(root, out, stage1=run1, stage2=run2, config=QUICK, progress=False)
    assert first["n_ok"] == 2 and first["n_redone"] == 0
    assert set(first["models"]["stage1"]["sha256"]) == {"model", "preprocessing"}
    before = {p.name: json.loads(p.read_text()) for p in (out / "studies").iterdir()}
    capsys.readouterr()

    why = change(run1, run2)
    again = predict(root, out, stage1=run1, stage2=run2, config=QUICK, progress=False)
    err = capsys.readouterr().err
    if why is None:
        assert again["n_reused"] == 2 and again["n_redone"] == 0 and "redone" not in err
        return
    assert again["n_reused"] == 0 and again["n_redone"] == 2
    assert err.count("are redone") == 1 and why in err, err  # said once, with the reason
    after = {p.name: json.loads(p.read_text()) for p in (out / "studies").iterdir()}
    assert all(after[k]["settings_digest"] != before[k]["settings_digest"] for k in before)
    third = predict(root, out, stage1=run1, stage2=run2, config=QUICK, progress=False)
    assert third["n_reused"] == 2


def test_a_moved_run_keeps_its_results(models, synthetic_data, tmp_path):
    """Content, not paths: the same run copied elsewhere reuses the studies."""
    from keras_cspine.pipeline.predict import predict

    root = _studies(synthetic_data, tmp_path / "in", n=1)
    run1 = _stage1_run(tmp_path / "runs" / "s1", models[0])
    run2 = _stage2_run(tmp_path / "runs" / "s2", models[1])
    out = tmp_path / "out"
    predict(root, out, stage1=run1, stage2=run2, config=QUICK, progress=False)
    shutil.copytree(run1, tmp_path / "moved")
    again = predict(root, out, stage1=tmp_path / "moved", stage2=run2, config=QUICK,
                    progress=False)  # fmt: skip
    assert again["n_reused"] == 1 and again["models"]["stage1"]["source"].startswith(
        str(tmp_path / "moved"))


# --------------------------------------------------------------------------------------------
# 2. The default models: the newest finished runs
# --------------------------------------------------------------------------------------------
def _stage1_files(run, files):
    run.mkdir(parents=True)
    for name in files:
        if name.endswith("/"):
            (run / name).mkdir()
        else:
            (run / name).write_text("{}")


STAGE1_RUNS = [  # (files of a newer run, finished?)
    (["model.keras", "summary.json"], True),
    (["model.keras", "fit_done.json"], False),  # killed after the fit, before the evaluation
    (["model.keras"], False),  # killed during the fit
    (["model.keras", "summary.json", "backup/"], False),  # a resumed run, training again
]


@pytest.mark.parametrize("files, finished", STAGE1_RUNS)
def test_stage1_default_is_the_newest_finished_run(files, finished, tmp_path):
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    _stage1_files(old, ["model.keras", "summary.json"])
    _stage1_files(new, files)
    for folder, stamp in ((old, 1_000_000), (new, 2_000_000)):
        for path in folder.iterdir():
            os.utime(path, (stamp, stamp))
    assert find_latest_stage1(tmp_path / "runs") == (new if finished else old)
    found = {r.path.name: r for r in stage1_runs(tmp_path / "runs")}
    assert found["new"].finished is finished and (found["new"].problem is None) is finished
    shutil.rmtree(old)
    assert find_latest_stage1(tmp_path / "runs") == (new if finished else None)


STAGE2_RUNS = [  # (run.json, metrics.json?, weights, finished?)
    ({"trained": True}, True, "best.onnx", True),
    ({"trained": True}, True, "best.pt", True),
    ({"trained": True}, False, "best.onnx", False),  # killed during validation / export
    ({"trained": False}, False, "best.pt", False),  # killed during training
    (None, False, "best.onnx", False),  # weights dropped in by hand: no run record
    ("{not json", True, "best.onnx", False),
]


@pytest.mark.parametrize("record, metrics, weights, finished", STAGE2_RUNS)
def test_stage2_default_is_the_newest_finished_run(record, metrics, weights, finished, tmp_path):
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    for folder in (old, new):
        (folder / "weights").mkdir(parents=True)
    finish_stage2_run(old)
    (old / "weights" / "best.onnx").write_bytes(b"x")
    (new / "weights" / weights).write_bytes(b"x")
    if record is not None:
        (new / "run.json").write_text(record if isinstance(record, str) else json.dumps(record))
    if metrics:
        (new / "metrics.json").write_text("{}")
    for folder, stamp in ((old, 1_000_000), (new, 2_000_000)):
        for path in [*folder.iterdir(), *(folder / "weights").iterdir()]:
            os.utime(path, (stamp, stamp))
    expected = new / "weights" / weights if finished else old / "weights" / "best.onnx"
    assert find_latest_stage2(tmp_path / "runs") == expected
    assert [r.finished for r in stage2_runs(tmp_path / "runs")] == [finished, True]


def test_predict_says_which_run_it_chose(models, synthetic_data, tmp_path, capsys):
    from keras_cspine.pipeline.predict import predict

    root = _studies(synthetic_data, tmp_path / "in", n=1)
    runs = tmp_path / "runs"
    done = _stage1_run(runs / "done", models[0])
    killed = runs / "killed"  # newer, but killed after its fit
    killed.mkdir()
    (killed / "model.keras").write_bytes(b"a half-trained model")
    (killed / "fit_done.json").write_text("{}")
    _stage2_run(runs / "detect", models[1])
    os.utime(done / "summary.json", (1_000_000, 1_000_000))
    summary = predict(root, tmp_path / "out", runs=runs, config=QUICK, progress=False)
    err = capsys.readouterr().err
    assert f"stage 1: {done} (the newest finished run" in err
    assert f"skipped: {killed} (no summary.json" in err
    assert summary["model_choice"]["stage1"]["skipped_unfinished"] == [str(killed)]
    assert summary["models"]["stage1"]["source"] == str(done / "model.keras")
    assert f"stage 2: {runs / 'detect' / 'weights' / 'best.onnx'}" in err

    shutil.rmtree(done)  # only the killed run is left: an error naming it, no guess
    with pytest.raises(CSpineDataError, match=r"no finished stage 1 run found \(1 unfinished: "
                       r".*killed \(no summary.json"):  # fmt: skip
        predict(root, tmp_path / "out2", runs=runs, config=QUICK, progress=False)
    # ... unless it is asked for: then predict uses it, and says it is unfinished
    with pytest.raises(CSpineDataError, match="not a loadable Keras model"):
        predict(root, tmp_path / "out2", stage1=killed, runs=runs, config=QUICK, progress=False)
    assert "is unfinished (no summary.json" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 3. Errors, not crashes
# --------------------------------------------------------------------------------------------
def _a_file(tmp):
    (tmp / "out").write_text("an existing file")
    return tmp / "out"


def _a_foreign_folder(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "summary.json").write_text("{}")  # e.g. a training run folder
    return tmp / "out"


def _below_a_file(tmp):
    (tmp / "file").write_text("x")
    return tmp / "file" / "out"


@pytest.mark.parametrize("make_out, fragment", [
    (_a_file, "out: exists and is not a folder"),
    (_a_foreign_folder, "out: is a folder that predict did not write"),
    (_below_a_file, "file: is a file, so the output folder"),
])  # fmt: skip
def test_unusable_output_paths_are_refused_first(make_out, fragment, synthetic_data, tmp_path):
    from keras_cspine.pipeline.predict import predict

    root = _studies(synthetic_data, tmp_path / "in", n=1)
    out = make_out(tmp_path)
    # refused before anything else: the (missing) models are not even looked at
    with pytest.raises(CSpineDataError, match=fragment):
        predict(root, out, stage1=tmp_path / "no_model", config=QUICK, progress=False)


def _keras_model(kind):
    import keras

    image = keras.Input((16, 16, 3), name="image")
    metadata = keras.Input((2,), name="metadata")
    pooled = keras.layers.GlobalAveragePooling2D()(image)
    if kind == "features":  # a sequence model's inputs
        f, m = keras.Input((None, 4), name="features"), keras.Input((None,), name="mask")
        return keras.Model({"features": f, "mask": m}, keras.layers.Dense(7, "sigmoid")(f))
    if kind == "unnamed inputs":
        a, b = keras.Input((16, 16, 3), name="a"), keras.Input((2,), name="b")
        x = keras.layers.GlobalAveragePooling2D()(a)
        return keras.Model({"a": a, "b": b}, keras.layers.Dense(7, "sigmoid")(
            keras.layers.Concatenate()([x, b])))  # fmt: skip
    if kind == "flat image":
        flat = keras.Input((48,), name="image")
        return keras.Model(flat, keras.layers.Dense(7, "sigmoid")(flat))
    joined = keras.layers.Concatenate()([pooled, metadata])
    outputs = {
        "3 outputs": keras.layers.Dense(3, "sigmoid")(joined),
        "softmax": keras.layers.Dense(7, "softmax")(joined),
        "logits": keras.layers.Dense(7)(joined),
        "two heads": [keras.layers.Dense(7, "sigmoid")(joined),
                      keras.layers.Dense(7, "sigmoid")(joined)],
    }[kind]  # fmt: skip
    return keras.Model({"image": image, "metadata": metadata}, outputs)


@pytest.mark.parametrize("kind, fragment", [
    ("features", "has unknown inputs ['features', 'mask']"),
    ("unnamed inputs", "has unknown inputs ['a', 'b']"),
    ("flat image", "its 'image' input has shape (None, 48)"),
    ("3 outputs", "its output has shape (None, 3)"),
    ("softmax", "has activation softmax"),
    ("logits", "has activation linear"),
    ("two heads", "has 2 outputs"),
    ("not a zip", "not a loadable Keras model"),
])  # fmt: skip
def test_a_model_that_is_not_a_stage1_classifier_is_refused_when_loaded(kind, fragment, tmp_path):
    from keras_cspine.stage1.inference import EXPECTED, Stage1Model

    path = tmp_path / "model.keras"
    if kind == "not a zip":
        path.write_bytes(b"PK\x03\x04 but not really a zip")
    else:
        _keras_model(kind).save(path)
    with pytest.raises(CSpineDataError) as caught:
        Stage1Model.load(path)
    assert caught.value.path == str(path) and fragment in caught.value.problem
    if kind != "not a zip":
        assert EXPECTED in caught.value.problem  # what was expected: image/metadata, 7 sigmoids
        assert "inputs 'image' (N, S, S, 3) and/or 'metadata'" in EXPECTED
        with pytest.raises(ValueError, match="expected a stage 1 classifier"):
            Stage1Model(_keras_model(kind))


@pytest.mark.parametrize("folder, dicom, uid, source, warns", [
    ("1.2.826.0.1.3680043.5", "1.2.826.0.1.3680043.5", "1.2.826.0.1.3680043.5", "dicom", False),
    ("Doe_John_1970", "1.2.826.0.1.3680043.5", "1.2.826.0.1.3680043.5", "dicom", False),
    ("1.2.826.0.1.3680043.6", "1.2.826.0.1.3680043.5", "1.2.826.0.1.3680043.5", "dicom", True),
    ("1.2.826.0.1.3680043.6", None, "1.2.826.0.1.3680043.6", "folder", False),
    ("1.2.826.0.1.3680043.6", "Doe^John", "1.2.826.0.1.3680043.6", "folder", True),
    ("1.2.826.0.1.3680043.6", "1." + "2" * 70, "1.2.826.0.1.3680043.6", "folder", True),
    ("Doe_John_1970", None, None, "none", False),
    ("Doe_John_1970", "../../etc/passwd", None, "none", False),
    ("study-1", "1.2.3.", None, "none", False),
])  # fmt: skip
def test_studies_are_named_by_their_dicom_uid(folder, dicom, uid, source, warns, tmp_path):
    named = name_study(tmp_path / folder, dicom)
    assert (named.uid, named.source, named.warning is not None) == (uid, source, warns)
    if uid == folder:
        assert named.folder == str(tmp_path / folder)
    else:  # the folder's name is never shown: it may be the patient's
        assert named.folder == str(tmp_path / WITHHELD) and "Doe" not in named.folder
        assert named.redact(f"{tmp_path / folder}/1.dcm: broken", tmp_path / folder) == (
            f"{tmp_path / WITHHELD}/1.dcm: broken")


def _drop_study_uid(dcm: Path) -> None:
    import pydicom

    ds = pydicom.dcmread(dcm)
    del ds.StudyInstanceUID
    ds.save_as(dcm)


@pytest.mark.parametrize("single", [False, True], ids=["folder of studies", "one study"])
def test_study_folders_named_after_the_patient_never_reach_the_outputs(
        single, models, synthetic_data, tmp_path, monkeypatch):  # fmt: skip
    """Folders named after a patient, one named by another UID, one without any UID and a second
    copy of a study: every output names studies by their DICOM UID, and no name leaks."""
    import importlib

    from keras_cspine.io.rsna import read_submission

    predict_module = importlib.import_module("keras_cspine.pipeline.predict")  # not the function

    u0, u1, u2 = _train_uids(synthetic_data, 3)
    train = synthetic_data / "train_images"
    root = tmp_path / "in"
    root.mkdir()
    os.symlink(train / u0, root / "Doe_John_1970")
    if not single:
        os.symlink(train / u1, root / "1.2.826.0.1.3680043.424242")  # a UID, not its own
        shutil.copytree(train / u2, root / "Roe_Jane_1980")  # no UID in its DICOM
        _drop_study_uid(root / "Roe_Jane_1980" / "1.dcm")
        os.symlink(train / u0, root / "Zed_Doe_copy")  # the first study again
    studied = []
    real = predict_module.predict_study
    monkeypatch.setattr(predict_module, "predict_study",
                        lambda folder, *a, **k: studied.append(k["uid"]) or real(folder, *a, **k))  # fmt: skip
    out = tmp_path / "out"
    source = root / "Doe_John_1970" if single else root
    summary = predict_module.predict(source, out, stage1=models[0], stage2=models[1],
                                     config=PredictConfig(report="html"), progress=False)  # fmt: skip

    named = [u0] if single else [u0, u1]
    assert sorted(studied) == sorted(named)  # nothing computed for a study without a name
    submission = read_submission(out / "submission.csv")
    assert sorted({r.rsplit("_", 1)[0].removesuffix("_patient") for r in submission.row_id}) == (
        sorted(named))
    assert sorted(p.name for p in (out / "studies").iterdir()) == sorted(f"{u}.json" for u in named)
    assert sorted(p.name for p in (out / "reports").iterdir()) == sorted(named)
    study = json.loads((out / "studies" / f"{u0}.json").read_text())
    assert study["info"]["study_uid_source"] == "dicom" and study["folder"].endswith(WITHHELD)
    if single:
        assert summary["n_failed"] == 0 and summary["input"].endswith(WITHHELD)
    else:
        other = json.loads((out / "studies" / f"{u1}.json").read_text())
        assert "named by the DICOM" in other["info"]["warnings"][0]
        assert summary["warnings"][0]["StudyInstanceUID"] == u1
        errors = {e["StudyInstanceUID"]: e["problem"] for e in summary["errors"]}
        assert "cannot be named in the submission" in errors[""]
        assert f"StudyInstanceUID {u0} is also that of" in errors[u0]
        assert summary["n_ok"] == 2 and summary["n_failed"] == 2 and summary["n_studies"] == 4
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for name in (b"Doe", b"John", b"Roe", b"Jane", b"Zed"):
                assert name not in data, f"{name!r} in {path}"


@pytest.mark.parametrize("argv_limit, fragment", [
    ("0", "must be >= 1, got 0"),
    ("-2", "must be >= 1, got -2"),
    ("two", "expected an integer >= 1"),
])  # fmt: skip
def test_limit_must_be_at_least_one(argv_limit, fragment, tmp_path, capsys):
    from keras_cspine.cli import main
    from keras_cspine.pipeline.predict import predict

    with pytest.raises(SystemExit) as caught:
        main(["predict", str(tmp_path), "--out", str(tmp_path / "out"), "--limit", argv_limit])
    assert caught.value.code == 2 and fragment in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit must be an integer >= 1"):
        predict(tmp_path, tmp_path / "out", limit=0)
    assert not (tmp_path / "out").exists()


def test_a_relative_training_data_path_is_never_resolved_from_here(models, tmp_path, monkeypatch):
    """A run of an older version recorded its prepared data as typed ("prep"); from a working
    directory that happens to hold a "prep", it must not be read."""
    from keras_cspine.config import save_config
    from keras_cspine.stage1.config import Stage1Config
    from keras_cspine.stage1.inference import Stage1Model

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(models[0], run / "model.keras")
    save_config(Stage1Config(), run / "config.yaml")
    (run / "splits.json").write_text(json.dumps({"train": [], "prepared": "prep"}))
    (tmp_path / "prep").mkdir()
    (tmp_path / "prep" / "prepare.json").write_text(json.dumps({"settings": {"mode": "paper"}}))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CSpineDataError, match="relative path 'prep'"):
        Stage1Model.load(run)


def test_outputs_record_absolute_paths(models, synthetic_data, tmp_path, monkeypatch):
    from keras_cspine.pipeline.predict import predict

    _studies(synthetic_data, tmp_path / "in", n=1)
    shutil.copy(models[0], tmp_path / "s1.keras")
    monkeypatch.chdir(tmp_path)
    summary = predict("in", "out", stage1="s1.keras", stage2=models[1], config=QUICK,
                      progress=False)  # fmt: skip
    assert summary["out"] == str(tmp_path / "out") and summary["input"] == str(tmp_path / "in")
    assert all(Path(p).is_absolute() for p in summary["files"].values())
    assert summary["models"]["stage1"]["source"] == str(tmp_path / "s1.keras")
    (study,) = (tmp_path / "out" / "studies").iterdir()
    assert json.loads(study.read_text())["folder"].startswith(str(tmp_path / "in"))


def test_the_output_folder_inside_the_input_is_not_a_study(synthetic_data, tmp_path):
    from keras_cspine.pipeline.studies import find_studies

    root = _studies(synthetic_data, tmp_path / "in", n=2)
    (root / "predictions" / "studies").mkdir(parents=True)
    found = find_studies(root, exclude=root / "predictions")
    assert [p.name for p in found] == _train_uids(synthetic_data, 2)


# --------------------------------------------------------------------------------------------
# 5. No network
# --------------------------------------------------------------------------------------------
def test_onnxruntime_telemetry_is_off_before_any_session(models, monkeypatch):
    import onnxruntime as ort

    from keras_cspine.stage2.onnx_predictor import OnnxDetector

    calls = []
    real_session = ort.InferenceSession

    def session(*args, **kwargs):
        assert calls, "an InferenceSession was made before telemetry was switched off"
        return real_session(*args, **kwargs)

    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"))
    monkeypatch.setattr(ort, "InferenceSession", session)
    OnnxDetector(models[1])
    assert calls == ["off"]


def test_a_study_is_predicted_without_opening_a_socket(models, synthetic_data, monkeypatch):
    import socket

    from keras_cspine.pipeline.predict import Stage1Model, Stage2Model, predict_study

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access during predict")

    for owner, name in ((socket.socket, "connect"), (socket.socket, "connect_ex"),
                        (socket, "getaddrinfo"), (socket, "create_connection"),
                        (socket, "gethostbyname")):  # fmt: skip
        monkeypatch.setattr(owner, name, refuse)
    stage1, stage2 = Stage1Model.load(models[0]), Stage2Model.load(models[1])
    folder = synthetic_data / "train_images" / _train_uids(synthetic_data, 1)[0]
    result = predict_study(folder, stage1, stage2, QUICK)
    assert len(result.boxes) == result.gated.sum() > 0 and attempts == []
