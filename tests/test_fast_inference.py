"""stage1/fast_inference.py: every fast engine of the stage 1 classifier against plain Keras, and
the ONNX cache (keyed by the model's SHA-256, written atomically, a stale or foreign file never
used)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from keras_cspine.pipeline.config import PredictConfig  # noqa: E402
from keras_cspine.stage1 import fast_inference as fi  # noqa: E402
from keras_cspine.stage1.inference import Stage1Model  # noqa: E402

needs_onnx = pytest.mark.skipif(not fi.onnx_available(), reason="tf2onnx / onnxruntime missing")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny two-input GCViT classifier saved as .keras (exact GELU: the Erfc case)."""
    import keras

    from keras_cspine.stage1.models.factory import build_model

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("fast")
    path = folder / "model.keras"
    build_model("gcvit_xxtiny", image_size=32, freeze="none").save(path)
    return path


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(3)
    hu = rng.normal(0, 600, (11, 40, 40)).astype(np.float32)
    positions = np.arange(11) * 2.5
    return hu, positions, 100.0 - positions


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(saved, study):
    model = Stage1Model.load(saved)
    return model.predict(*study, batch_size=4, return_features=True)


ENGINE_CASES = [pytest.param("xla", fi.FLOAT_TOLERANCE, id="xla"),
                pytest.param("onnx", fi.FLOAT_TOLERANCE, marks=needs_onnx, id="onnx"),
                pytest.param("onnx_int8", 0.05, marks=needs_onnx, id="onnx_int8")]  # fmt: skip


@pytest.mark.parametrize(("engine", "tolerance"), ENGINE_CASES)
def test_engine_agrees_with_keras(saved, study, cache, reference, engine, tolerance):
    model = Stage1Model.load(saved)
    note = model.use_engine(engine, cache=cache)
    assert note["engine"] == engine and note["probe_max_abs_diff"] < tolerance
    probabilities, features = model.predict(*study, batch_size=4, return_features=True)
    assert np.abs(probabilities - reference[0]).max() < tolerance
    if engine != "onnx_int8":  # the features of the float engines agree too
        assert np.abs(features - reference[1]).max() < 1e-3
    # a batch size that does not divide the study, and no features
    assert np.abs(model.predict(*study, batch_size=3) - reference[0]).max() < tolerance
    assert ("engine" in model.describe()) == (engine == "onnx_int8")  # int8 changes results


@needs_onnx
def test_onnx_cache_is_keyed_by_the_model_file_and_atomic(saved, cache, tmp_path):
    import keras

    model = keras.saving.load_model(saved)
    path, sha = fi.onnx_export_path(model, saved, cache)
    assert sha == fi.sha256_file(saved) and path.name == f"{sha[:32]}.onnx"
    runner = fi.onnx_runner(model, saved, cache=cache)
    assert runner.path == path and runner.meta["source_sha256"] == sha
    assert not [p for p in os.listdir(cache) if ".tmp" in p]  # no temporary left behind
    # another model file: another cache entry, never the first one's export
    other = tmp_path / "other.keras"
    keras.utils.set_random_seed(1)
    from keras_cspine.stage1.models.factory import build_model

    changed = build_model("gcvit_xxtiny", image_size=32, freeze="none")
    changed.save(other)
    assert fi.onnx_export_path(changed, other, cache)[0] != path
    # a file in the cache made from another model is refused, then made again
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    target, _ = fi.onnx_export_path(model, saved, foreign)
    fi.export_onnx(changed, target, "0" * 64)
    with pytest.raises(fi.CSpineDataError, match="another model"):
        fi.OnnxRunner(target, expect_sha256=sha)
    again = fi.onnx_runner(model, saved, cache=foreign)
    assert again.meta["source_sha256"] == sha
    meta = json.loads(dict(again.session.get_modelmeta().custom_metadata_map)[fi.METADATA_KEY])
    assert meta["outputs"] == ["features", "probabilities"]


def test_auto_falls_back_to_keras_without_onnx(saved, monkeypatch):
    monkeypatch.setattr(fi, "AUTO_ENGINE", "onnx")
    monkeypatch.setattr(fi, "onnx_available", lambda: False)
    model = Stage1Model.load(saved)
    assert model.use_engine("auto")["engine"] == "keras"
    with pytest.raises(fi.MissingDependencyError):
        model.use_engine("onnx")


def test_auto_falls_back_when_a_float_engine_disagrees(saved, monkeypatch, cache):
    monkeypatch.setattr(fi, "AUTO_ENGINE", "onnx")
    monkeypatch.setattr(fi, "onnx_available", lambda: True)
    monkeypatch.setattr(fi, "max_difference", lambda *a: 0.5)
    monkeypatch.setattr(fi, "onnx_runner", lambda *a, **k: fi.KerasRunner(None))
    model = Stage1Model.load(saved)
    with pytest.warns(RuntimeWarning, match="differs from Keras"):
        assert model.use_engine("auto", cache=cache)["engine"] == "keras"
    with pytest.raises(ValueError, match="differs from Keras"):
        model.use_engine("xla")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("stage1_engine", "tensorrt", "stage1_engine"), ("report_workers", -1, "report_workers"),
    ("gate_stride", 0, "gate_stride")])  # fmt: skip
def test_config_refuses_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        PredictConfig(**{field: value})


def test_auto_is_plain_keras(saved):
    assert Stage1Model.load(saved).use_engine("auto")["engine"] == fi.AUTO_ENGINE == "keras"


def test_engine_and_report_workers_do_not_change_the_digest():
    base = PredictConfig().digest()
    assert PredictConfig(stage1_engine="keras", report_workers=0).digest() == base
    assert PredictConfig(gate_stride=1).digest() != base
