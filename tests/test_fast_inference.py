"""stage1/fast_inference.py: every fast engine of the stage 1 classifier against plain Keras, and
the ONNX cache (keyed by the model's SHA-256, written atomically, a stale or foreign file never
used, by onnxruntime or by OpenVINO)."""

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
needs_openvino = pytest.mark.skipif(not fi.openvino_available(),
                                    reason="openvino / tf2onnx missing")  # fmt: skip


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
                pytest.param("onnx_int8", 0.05, marks=needs_onnx, id="onnx_int8"),
                pytest.param("openvino", fi.FLOAT_TOLERANCE, marks=needs_openvino, id="openvino"),
                pytest.param("openvino_bf16", fi.BF16_TOLERANCE, marks=needs_openvino,
                             id="openvino_bf16")]  # fmt: skip


@pytest.mark.parametrize(("engine", "tolerance"), ENGINE_CASES)
def test_engine_agrees_with_keras(saved, study, cache, reference, engine, tolerance):
    model = Stage1Model.load(saved)
    note = model.use_engine(engine, cache=cache)
    assert note["engine"] == engine and note["probe_max_abs_diff"] < tolerance
    probabilities, features = model.predict(*study, batch_size=4, return_features=True)
    assert np.abs(probabilities - reference[0]).max() < tolerance
    if engine in fi.FLOAT_ENGINES:  # the features of the float engines agree too
        assert np.abs(features - reference[1]).max() < 1e-3
    # a batch size that does not divide the study, and no features
    assert np.abs(model.predict(*study, batch_size=3) - reference[0]).max() < tolerance
    # reduced precision changes the results: said in the model's description
    assert ("engine" in model.describe()) == (engine in fi.REDUCED_PRECISION_ENGINES)


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


@needs_openvino
@pytest.mark.parametrize("streams", [1, 2])
def test_openvino_splits_a_batch_across_streams_and_keeps_its_cache(saved, cache, tmp_path,
                                                                    streams):  # fmt: skip
    import keras

    model = keras.saving.load_model(saved)
    runner = fi.openvino_runner(model, saved, threads=2, cache=cache, streams=streams)
    assert runner.streams == streams and runner.name == "openvino"
    assert (cache / "openvino").is_dir()  # OpenVINO's compiled models, beside the export
    keras_runner = fi.KerasRunner(model)
    for n in (1, 2, 5):  # fewer images than streams, and a remainder
        batch = fi.probe_batch(model, n, seed=n)
        features, probabilities = runner(batch, features=True)
        want_features, want = keras_runner(batch, features=True)
        assert probabilities.shape == want.shape and features.shape == want_features.shape
        assert np.abs(probabilities - want).max() < fi.FLOAT_TOLERANCE
        assert np.abs(features - want_features).max() < 1e-3
    # an OpenVINO that keeps no ONNX metadata: read by onnx
    no_metadata = type("NoMetadata", (), {"has_rt_info": lambda self, key: False})()
    assert json.loads(fi._openvino_metadata(no_metadata, runner.path)) == runner.meta
    # an export made from another model is refused, then made again
    from keras_cspine.stage1.models.factory import build_model

    keras.utils.set_random_seed(1)
    foreign = tmp_path / "foreign"
    target, sha = fi.onnx_export_path(model, saved, foreign)
    fi.export_onnx(build_model("gcvit_xxtiny", image_size=32, freeze="none"), target, "0" * 64)
    with pytest.raises(fi.CSpineDataError, match="another model"):
        fi.OpenVinoRunner(target, expect_sha256=sha)
    assert fi.openvino_runner(model, saved, cache=foreign).meta["source_sha256"] == sha


@pytest.mark.parametrize(("field", "value", "match"), [
    ("streams", 0, "streams"), ("precision", "f16", "precision")])  # fmt: skip
def test_openvino_runner_refuses_bad_settings(field, value, match):
    with pytest.raises(ValueError, match=match):
        fi.OpenVinoRunner("unused.onnx", **{field: value})


def test_auto_falls_back_to_keras_without_openvino(saved, monkeypatch):
    importable = fi._importable
    monkeypatch.setattr(fi, "_importable", lambda *m: "openvino" not in m and importable(*m))
    assert not fi.cpu_has_bf16() and fi.auto_engine() == "keras"
    model = Stage1Model.load(saved)
    assert model.use_engine("auto")["engine"] == "keras"
    with pytest.raises(fi.MissingDependencyError, match="openvino"):
        model.use_engine("openvino")


def test_auto_falls_back_to_keras_without_onnx(saved, monkeypatch):
    monkeypatch.setattr(fi, "auto_engine", lambda: "onnx")
    monkeypatch.setattr(fi, "onnx_available", lambda: False)
    model = Stage1Model.load(saved)
    assert model.use_engine("auto")["engine"] == "keras"
    with pytest.raises(fi.MissingDependencyError):
        model.use_engine("onnx")


def test_auto_falls_back_when_a_float_engine_disagrees(saved, monkeypatch, cache):
    monkeypatch.setattr(fi, "auto_engine", lambda: "onnx")
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


def test_auto_is_bfloat16_openvino_only_where_the_cpu_computes_bfloat16(saved, monkeypatch, cache):
    """``auto`` is the fastest measured engine, ``openvino_bf16``, where it pays (native bfloat16:
    elsewhere it is emulated), and plain Keras elsewhere; ``keras`` by name is always Keras."""
    monkeypatch.setattr(fi, "cpu_has_bf16", lambda: False)
    assert fi.auto_engine() == "keras"
    assert Stage1Model.load(saved).use_engine("auto")["engine"] == "keras"
    monkeypatch.setattr(fi, "cpu_has_bf16", lambda: True)
    assert fi.auto_engine() == fi.AUTO_ENGINE == "openvino_bf16"
    model = Stage1Model.load(saved)
    note = model.use_engine("auto", cache=cache)
    if not fi.openvino_available():
        assert note["engine"] == "keras" and "fallback" in note
        return
    assert note["engine"] == "openvino_bf16" and note["asked"] == "auto"
    assert note["probe_max_abs_diff"] < fi.BF16_TOLERANCE
    assert model.describe()["engine"] == "openvino_bf16"  # reduced precision: in the digest
    assert Stage1Model.load(saved).use_engine("keras")["engine"] == "keras"


def test_engine_and_report_workers_do_not_change_the_digest():
    base = PredictConfig().digest()
    assert PredictConfig(stage1_engine="keras", report_workers=0).digest() == base
    assert PredictConfig(gate_stride=1).digest() != base


@pytest.mark.skipif(not fi.openvino_available(), reason="OpenVINO is not installed")
def test_openvino_sends_no_telemetry(saved, tmp_path):
    """OpenVINO's model converter starts ``openvino_telemetry`` on ``import openvino``, which posts
    to Google Analytics unless told not to: the engine imports it with that module switched off.
    Run in a fresh interpreter under the network guard of the command-line tests."""
    import subprocess
    import sys
    import textwrap

    from helpers_offline import SITECUSTOMIZE

    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    log = tmp_path / "net.log"
    code = textwrap.dedent(f"""
        import sys, time
        import keras
        import keras_cspine.stage1.models.factory  # registers the models, for loading
        from keras_cspine.stage1 import fast_inference as fi
        ov = fi.import_openvino()
        assert sys.modules["openvino_telemetry"] is None
        from openvino.tools.ovc import telemetry_utils
        assert telemetry_utils.tm.__name__.endswith("telemetry_stub"), telemetry_utils.tm
        runner = fi.openvino_runner(keras.saving.load_model({str(saved)!r}),
                                    {str(saved)!r}, cache={str(tmp_path / "cache")!r})
        time.sleep(1)  # the telemetry sender runs in a thread
        print(runner.name)
    """)
    env = {**os.environ, "KERAS_CSPINE_NET_LOG": str(log), "CI": "",
           "PYTHONPATH": os.pathsep.join([str(guard), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "openvino"
    assert not log.exists() or log.read_text() == ""
