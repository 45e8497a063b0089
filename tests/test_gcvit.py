"""Tests for the Keras 3 GCViT (keras_cspine.stage1.models.gcvit) and its timm weight port (weights.py).

timm runs in a subprocess (TensorFlow and torch never share a process): it builds a GCViT with
random weights, randomises norms, biases and position tables, saves the state dict
(.safetensors and .pth) with its inputs and outputs, and the Keras model must reproduce them.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.models import gcvit as G
from keras_cspine.stage1.models.weights import (
    WeightsFileError,
    load_gcvit_weights,
    read_state_dict,
    resolve_weights,
)

HAVE_TIMM = importlib.util.find_spec("timm") is not None and importlib.util.find_spec("torch")
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="needs timm and torch (dev extra)")

TIMM_REFERENCE = r"""
import sys
import numpy as np
import torch
import timm
from safetensors.torch import save_file

variant, size, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = timm.create_model(variant, pretrained=False, img_size=size).eval()
gen = torch.Generator().manual_seed(1)
with torch.no_grad():  # make norms, biases and position tables matter
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
        elif "norm" in name or name.endswith("gamma"):
            p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        elif "relative_position_bias_table" in name:
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    x = torch.randn(2, 3, size, size, generator=gen)
    features = model.forward_features(x)
    logits = model.forward_head(features)
    single = torch.cat([model(x[i:i + 1]) for i in range(2)])
state = {k: v.contiguous() for k, v in model.state_dict().items()}
save_file(state, out + ".safetensors")
torch.save(state, out + ".pth")
nhwc = (0, 2, 3, 1)
np.savez(out + ".npz", x=x.numpy().transpose(nhwc), features=features.numpy().transpose(nhwc),
         logits=logits.numpy(), single_logits=single.numpy(),
         n_params=sum(p.numel() for p in model.parameters()))
"""


def _timm_reference(tmp_path_factory, variant: str, size: int):
    out = tmp_path_factory.mktemp(f"timm_{variant}_{size}") / variant
    proc = subprocess.run(
        [sys.executable, "-c", TIMM_REFERENCE, variant, str(size), str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(f"{out}.npz") as data:
        ref = {k: data[k] for k in data.files}
    return out, ref


@pytest.fixture(scope="module")
def xxtiny64(tmp_path_factory):
    """timm gcvit_xxtiny at 64 px with random weights: (file stem, reference arrays)."""
    return _timm_reference(tmp_path_factory, "gcvit_xxtiny", 64)


def _features_model(model):
    return keras.Model(model.input, model.get_layer("norm").output)


def _run(model, x):
    """Eager forward pass (much faster than ``predict`` for one small batch: no tracing)."""
    return keras.ops.convert_to_numpy(model(np.asarray(x, dtype="float32"), training=False))


# ---------------------------------------------------------------------------------------------
# geometry and construction
# ---------------------------------------------------------------------------------------------

GEOMETRY_CASES = [
    # image size, windows, global-query pools
    (224, [(7, 7), (7, 7), (14, 14), (7, 7)], [3, 2, 0, 0]),
    (64, [(2, 2), (2, 2), (4, 4), (2, 2)], [3, 2, 0, 0]),
    (32, [(1, 1), (1, 1), (2, 2), (1, 1)], [3, 2, 0, 0]),
    ((64, 128), [(2, 4), (2, 4), (4, 8), (2, 4)], [3, 2, 0, 0]),
]


@pytest.mark.parametrize("size,windows,pools", GEOMETRY_CASES)
def test_geometry_follows_timm_window_ratio(size, windows, pools):
    levels = G.gcvit_geometry(size)
    assert [lv["window_size"] for lv in levels] == windows
    assert [lv["global_pools"] for lv in levels] == pools


ILLEGAL_GEOMETRY = [
    (dict(image_size=100), "multiple of 32"),
    (dict(image_size=112), "multiple of 32"),  # timm would make 28 px features, 3 px windows
    (dict(image_size=256, window_size=(8, 8, 8, 3)), "not divisible by window"),
    (dict(image_size=96, window_size=5), "not divisible by window"),
    (dict(image_size=192, window_size=(16, 12, 6, 6)), "power of two"),  # 48 px / 16 = 3
    (dict(image_size=224, window_ratio=(32, 32)), "one entry per level"),
    (dict(image_size=(224, 224, 3)), "image_size"),
]


@pytest.mark.parametrize("kwargs,message", ILLEGAL_GEOMETRY)
def test_geometry_rejects_sizes_that_windows_do_not_divide(kwargs, message):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=message):
        G.gcvit_geometry(
            kwargs.pop("image_size"), 4, kwargs.pop("window_ratio", (32, 32, 16, 32)),
            kwargs.pop("window_size", None),
        )


def test_a_given_window_larger_than_its_map_covers_the_whole_map():
    # configs/stage1_synthetic_small.yaml's windows, written for 64 px, at the tests' 32 px
    levels = G.gcvit_geometry(32, 4, window_size=(4, 4, 4, 2))
    assert [lv["feature_size"] for lv in levels] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    assert [lv["window_size"] for lv in levels] == [(4, 4), (4, 4), (2, 2), (1, 1)]
    assert [lv["num_windows"] for lv in levels] == [4, 1, 1, 1]
    model = G.gcvit_xxtiny(image_size=32, window_size=(4, 4, 4, 2), include_top=False,
                           pooling="avg")
    assert model(np.zeros((1, 32, 32, 3), np.float32)).shape[0] == 1


def test_geometry_error_quotes_the_sizes():
    with pytest.raises(ValueError, match=r"\(32, 32\).*\(128, 128\).*\(3, 3\)"):
        G.gcvit_xxtiny(image_size=128, window_size=3)


@pytest.mark.parametrize(
    "kwargs",
    [dict(pooling="mean"), dict(num_classes=0), dict(depths=(2, 2), num_heads=(2, 4, 8)),
     dict(drop_path_rate=1.5)],
)
def test_bad_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        G.gcvit_xxtiny(image_size=64, **kwargs)


def test_unknown_variant():
    with pytest.raises(ValueError, match="gcvit_huge"):
        G.build_gcvit("gcvit_huge")


def test_layer_layout_and_parameter_count_match_nvlabs_and_timm():
    model = G.gcvit_xxtiny(image_size=64)
    names = [layer.name for layer in model.layers]
    assert names == ["image", "patch_embed", "levels_0", "levels_1", "levels_2", "levels_3",
                     "norm", "pool", "head"]
    # each level but the last ends with its own downsample (NVlabs layout)
    assert [model.get_layer(n).reduce is not None for n in model.level_names] == [
        True, True, True, False]
    assert model.get_layer("levels_0").output.shape == (None, 8, 8, 128)
    # timm.create_model("gcvit_xxtiny").num_params: independent of the image size
    assert model.count_params() == 11_955_748


@pytest.mark.parametrize(
    "kwargs,shape",
    [(dict(include_top=False), (2, 2, 2, 512)), (dict(include_top=False, pooling="avg"), (2, 512)),
     (dict(include_top=False, pooling="max"), (2, 512)), (dict(num_classes=5), (2, 5))],
)
def test_output_shapes(kwargs, shape):
    model = G.gcvit_xxtiny(image_size=64, **kwargs)
    out = _run(model, np.random.default_rng(0).normal(size=(2, 64, 64, 3)))
    assert out.shape == shape
    assert np.isfinite(out).all()


def test_small_variant_has_layer_scale():
    model = G.build_gcvit("gcvit_small", image_size=64, depths=(1, 1, 1, 1))
    block = model.get_layer("levels_0").blocks[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block.gamma1), 1e-5)
    assert model.get_layer("levels_3").output.shape[-1] == 96 * 8


def test_drop_path_only_while_training():
    model = G.gcvit_xxtiny(image_size=64, drop_path_rate=0.5, include_top=False, pooling="avg")
    x = np.random.default_rng(1).normal(size=(4, 64, 64, 3)).astype("float32")
    infer1 = keras.ops.convert_to_numpy(model(x, training=False))
    infer2 = keras.ops.convert_to_numpy(model(x, training=True))
    np.testing.assert_array_equal(infer1, keras.ops.convert_to_numpy(model(x, training=False)))
    assert np.abs(infer1 - infer2).max() > 1e-3


def test_config_round_trip_gives_same_model():
    model = G.gcvit_xxtiny(image_size=(32, 64), num_classes=3, classifier_activation="softmax")
    config = model.get_config()
    clone = G.GCViT.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(model.get_weights())
    x = np.random.default_rng(2).normal(size=(1, 32, 64, 3)).astype("float32")
    np.testing.assert_allclose(_run(clone, x), _run(model, x), atol=1e-6)


@pytest.mark.slow
def test_keras_file_round_trip(tmp_path):
    model = G.gcvit_xxtiny(image_size=64, num_classes=4)
    path = tmp_path / "gcvit.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, G.GCViT)
    x = np.random.default_rng(3).normal(size=(2, 64, 64, 3)).astype("float32")
    np.testing.assert_array_equal(_run(loaded, x), _run(model, x))


def test_pixel_normalization_matches_timm_data_config():
    layer = G.PixelNormalization()
    pixels = np.array([[[[0, 128, 255]]]], dtype="uint8")
    out = keras.ops.convert_to_numpy(layer(pixels))
    expected = (np.array([0, 128, 255]) / 255.0 - np.array(G.IMAGENET_MEAN)) / np.array(
        G.IMAGENET_STD)
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


def test_window_partition_inverts():
    x = np.arange(2 * 8 * 12 * 3, dtype="float32").reshape(2, 8, 12, 3)
    win = G.window_partition(x, (4, 3))
    assert tuple(win.shape) == (2, 8, 12, 3)  # 2 x 4 windows of 12 tokens
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(win)[0, 1, :3, 0], [9, 12, 15])
    back = keras.ops.convert_to_numpy(G.window_reverse(win, (4, 3), (8, 12)))
    np.testing.assert_array_equal(back, x)


# ---------------------------------------------------------------------------------------------
# equivalence with timm and weight loading
# ---------------------------------------------------------------------------------------------


@needs_timm
@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 2])
def test_matches_timm_xxtiny(xxtiny64, batch):
    stem, ref = xxtiny64
    model = G.gcvit_xxtiny(image_size=64, weights=f"{stem}.safetensors")
    x = ref["x"][:batch]
    features = _run(_features_model(model), x)
    logits = _run(model, x)
    assert np.abs(ref["features"]).max() > 1.0  # not a trivial comparison
    np.testing.assert_allclose(features, ref["features"][:batch], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ref["logits"][:batch], atol=1e-4, rtol=0)
    # each image uses its own global query: batch 2 equals the images one by one
    np.testing.assert_allclose(logits, ref["single_logits"][:batch], atol=1e-4, rtol=0)
    assert model.count_params() == int(ref["n_params"])


@needs_timm
@pytest.mark.slow
def test_matches_timm_tiny_224(tmp_path_factory):
    stem, ref = _timm_reference(tmp_path_factory, "gcvit_tiny", 224)
    model = G.gcvit_tiny(weights=f"{stem}.safetensors")
    assert model.count_params() == int(ref["n_params"])
    features = _run(_features_model(model), ref["x"])
    logits = _run(model, ref["x"])
    np.testing.assert_allclose(features, ref["features"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits, ref["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        _run(model, ref["x"][1:]), ref["single_logits"][1:], atol=1e-4, rtol=0)


@needs_timm
@pytest.mark.slow
def test_pth_file_loads_through_a_subprocess(xxtiny64):
    stem, ref = xxtiny64
    state_pth = read_state_dict(f"{stem}.pth")
    state_st = read_state_dict(f"{stem}.safetensors")
    assert state_pth.keys() == state_st.keys()
    for key in state_st:
        np.testing.assert_array_equal(state_pth[key], state_st[key])
    model = G.gcvit_xxtiny(image_size=64, weights=f"{stem}.pth")
    np.testing.assert_allclose(_run(model, ref["x"]), ref["logits"], atol=1e-4)


@needs_timm
@pytest.mark.slow
def test_imagenet_weights_come_from_the_local_cache_only(xxtiny64, tmp_path, monkeypatch, caplog):
    stem, ref = xxtiny64
    monkeypatch.setenv("KERAS_CSPINE_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsFileError, match="nothing is downloaded") as err:
        G.gcvit_xxtiny(image_size=64, weights="imagenet")
    assert str(tmp_path) in str(err.value)
    assert isinstance(err.value, CSpineDataError)
    (tmp_path / "gcvit_xxtiny.in1k.safetensors").write_bytes(
        (stem.parent / f"{stem.name}.safetensors").read_bytes())
    with caplog.at_level(logging.WARNING, logger="keras_cspine.stage1.models.weights"):
        model = G.gcvit_xxtiny(image_size=64, weights="imagenet")
    assert "CC-BY-NC-SA-4.0" in caplog.text
    np.testing.assert_allclose(_run(model, ref["x"]), ref["logits"], atol=1e-4)


@needs_timm
@pytest.mark.slow
def test_head_of_another_size_is_skipped_and_backbone_loaded(xxtiny64):
    stem, ref = xxtiny64
    model = G.gcvit_xxtiny(image_size=64, num_classes=7)
    report = load_gcvit_weights(model, f"{stem}.safetensors")
    assert report["skipped"] == ["head.fc.bias", "head.fc.weight"]
    features = _run(_features_model(model), ref["x"])
    np.testing.assert_allclose(features, ref["features"], atol=1e-4)


@needs_timm
@pytest.mark.slow
@pytest.mark.parametrize(
    "builder,message",
    [(lambda: G.gcvit_xxtiny(image_size=96), "relative_position_bias_table"),
     (lambda: G.gcvit_xtiny(image_size=64), "missing")],
)
def test_weights_that_do_not_fit_raise_naming_the_file(xxtiny64, builder, message):
    stem, _ = xxtiny64
    model = builder()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(WeightsFileError, match=message) as err:
        load_gcvit_weights(model, f"{stem}.safetensors")
    assert f"{stem.name}.safetensors" in str(err.value)
    for old, new in zip(before, model.get_weights()):  # nothing half-loaded
        np.testing.assert_array_equal(old, new)


def test_missing_and_unreadable_weight_files(tmp_path):
    with pytest.raises(WeightsFileError, match="not found"):
        resolve_weights(tmp_path / "nope.safetensors", "gcvit_tiny")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsFileError, match="bad.safetensors"):
        read_state_dict(bad)
    odd = tmp_path / "weights.h5"
    odd.write_bytes(b"")
    with pytest.raises(WeightsFileError, match="unknown weights format"):
        read_state_dict(odd)
