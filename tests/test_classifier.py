"""Tests for the paper's two-input vertebrae classifier (keras_cspine.stage1.models.classifier)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from keras_cspine.stage1.models.classifier import (
    GCVIT_FREEZE_POINTS,
    MultiInputClassifier,
    available_backbones,
    build_image_classifier,
    build_multi_input_classifier,
    freeze_backbone,
    parameter_counts,
    register_backbone,
)

TINY = dict(backbone="gcvit_xxtiny", image_size=64)


def _batch(n=4, size=64, num_metadata=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    metadata = rng.random((n, num_metadata)).astype("float32")
    labels = (rng.random((n, 7)) > 0.5).astype("float32")
    return {"image": images, "metadata": metadata}, labels


def _run(model, inputs):
    """Eager inference: no tf.function tracing, fast for one small batch."""
    inputs = {k: np.asarray(v, dtype="float32") for k, v in inputs.items()}
    return keras.ops.convert_to_numpy(model(inputs, training=False))


@pytest.mark.slow
def test_paper_settings_have_table1_parameter_counts():
    model = build_multi_input_classifier()  # gcvit_tiny, 224 px, frozen up to levels_2
    assert parameter_counts(model) == {"trainable": 13_080_663, "non_trainable": 14_683_998}
    assert model.frozen_layers[-1] == "levels_2"
    assert [t.name for t in model.inputs] == ["image", "metadata"]
    assert model.output.shape == (None, 7)
    assert model.get_layer("vertebrae").activation is keras.activations.sigmoid


def test_predict_shapes_and_probabilities():
    model = build_multi_input_classifier(**TINY, freeze="none")
    inputs, _ = _batch(3)
    probs = _run(model, inputs)
    assert probs.shape == (3, 7)
    assert ((probs > 0) & (probs < 1)).all()
    assert model.layers[-1].name == "vertebrae"
    # the metadata branch matters
    other = dict(inputs, metadata=inputs["metadata"] + 5.0)
    assert np.abs(_run(model, other) - probs).max() > 1e-4


def test_uint8_and_float_pixels_give_the_same_prediction():
    model = build_multi_input_classifier(**TINY, freeze="none")
    inputs, _ = _batch(2)
    as_float = dict(inputs, image=inputs["image"].astype("float32"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(inputs)), _run(model, as_float), atol=1e-6)


def test_head_parameters_match_the_paper_layout():
    model = build_multi_input_classifier(**TINY, freeze="all")
    # GAP(512) -> 64; 2 -> 16 -> 16; 80 -> 256 -> 7
    assert parameter_counts(model)["trainable"] == 55_687
    assert model.get_layer("concat").output.shape == (None, 80)


@pytest.mark.parametrize(
    "freeze,frozen_levels",
    [("none", 0), ("patch_embed", 0), ("levels_0", 1), ("levels_2", 3), ("levels_3", 4)],
)
def test_freeze_points(freeze, frozen_levels):
    model = build_multi_input_classifier(**TINY, freeze=freeze)
    backbone = model.backbone
    levels = [backbone.get_layer(f"levels_{i}").trainable for i in range(4)]
    assert levels == [False] * frozen_levels + [True] * (4 - frozen_levels)
    assert backbone.get_layer("patch_embed").trainable == (freeze == "none")
    assert backbone.get_layer("norm").trainable
    assert set(GCVIT_FREEZE_POINTS) >= {freeze}


@pytest.mark.slow
def test_one_fit_step_lowers_the_loss():
    keras.utils.set_random_seed(0)
    model = build_multi_input_classifier(**TINY, freeze="levels_1")
    # eager steps: tracing a train function costs far more than one step of this tiny model
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy",
                  run_eagerly=True)
    inputs, labels = _batch(4)
    frozen_before = [w.numpy().copy() for w in model.backbone.get_layer("levels_0").weights]
    trainable_before = model.get_layer("vertebrae").kernel.numpy().copy()
    before = model.test_on_batch(inputs, labels)
    model.fit(inputs, labels, epochs=1, batch_size=4, verbose=0)
    after = model.test_on_batch(inputs, labels)
    assert after < before
    for old, var in zip(frozen_before, model.backbone.get_layer("levels_0").weights):
        np.testing.assert_array_equal(old, var.numpy())  # frozen weights did not move
    assert np.abs(model.get_layer("vertebrae").kernel.numpy() - trainable_before).max() > 0


@pytest.mark.slow
def test_config_round_trip():
    model = build_multi_input_classifier(
        **TINY, freeze="levels_1", metadata_units=(8,), head_units=(32, 16), num_metadata=3,
        dropout=0.1, rescaling="unit",
    )
    config = model.get_config()
    clone = MultiInputClassifier.from_config(config)
    assert clone.get_config() == config
    assert parameter_counts(clone) == parameter_counts(model)
    clone.set_weights(model.get_weights())
    inputs, _ = _batch(2, num_metadata=3)
    np.testing.assert_allclose(_run(clone, inputs), _run(model, inputs), atol=1e-6)


@pytest.mark.slow
def test_keras_file_round_trip(tmp_path):
    model = build_multi_input_classifier(**TINY, freeze="levels_2")
    path = tmp_path / "classifier.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MultiInputClassifier)
    assert parameter_counts(loaded) == parameter_counts(model)
    inputs, _ = _batch(2)
    np.testing.assert_array_equal(_run(loaded, inputs), _run(model, inputs))


def test_image_only_classifier():
    model = build_image_classifier(**TINY, freeze="all")
    assert [t.name for t in model.inputs] == ["image"]
    assert parameter_counts(model)["trainable"] == 512 * 64 + 64 + 64 * 256 + 256 + 256 * 7 + 7
    inputs, _ = _batch(2)
    assert _run(model, {"image": inputs["image"]}).shape == (2, 7)


def _small_cnn(image_size=(64, 64), weights=None, width=8):
    inputs = keras.Input((*image_size, 3))
    x = keras.layers.Conv2D(width, 3, strides=2, name="conv_a")(inputs)
    x = keras.layers.Conv2D(width, 3, strides=2, name="conv_b")(x)
    return keras.Model(inputs, x, name="small_cnn")


def test_any_keras_backbone_can_be_plugged_in():
    backbone = _small_cnn()
    model = build_multi_input_classifier(backbone, image_size=64, freeze="conv_a",
                                         rescaling="symmetric")
    assert not backbone.get_layer("conv_a").trainable
    assert backbone.get_layer("conv_b").trainable
    inputs, _ = _batch(2)
    assert _run(model, inputs).shape == (2, 7)
    clone = MultiInputClassifier.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(_run(clone, inputs), _run(model, inputs), atol=1e-6)


def test_registered_backbone_is_stored_by_name():
    register_backbone("test_small_cnn", _small_cnn)
    assert "test_small_cnn" in available_backbones()
    model = build_image_classifier("test_small_cnn", image_size=64, freeze="none",
                                   backbone_kwargs={"width": 4})
    assert model.get_config()["backbone"] == "test_small_cnn"
    assert model.backbone.get_layer("conv_b").output.shape[-1] == 4
    clone = MultiInputClassifier.from_config(model.get_config())
    assert parameter_counts(clone) == parameter_counts(model)


ILLEGAL = [
    (dict(freeze="levels_9"), "levels_9"),
    (dict(freeze="stem"), "stem"),
    (dict(head_units=(0,)), r"\(0,\)"),
    (dict(metadata_units="16"), "'16'"),
    (dict(num_classes=0), "num_classes"),
    (dict(num_metadata=-1), "-1"),
    (dict(image_dense=0), "image_dense"),
    (dict(rescaling="zscore"), "zscore"),
    (dict(dropout=1.0), "dropout"),
    (dict(backbone="resnet999"), "resnet999"),
    (dict(image_size=100), "100"),
    (dict(activation="nope"), "nope"),
]


@pytest.mark.parametrize("kwargs,message", ILLEGAL)
def test_bad_arguments_raise_value_errors_quoting_them(kwargs, message):
    settings = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=message):
        build_multi_input_classifier(**settings)


def test_backbone_of_another_size_is_rejected():
    with pytest.raises(ValueError, match=r"\(64, 64\).*\(32, 32\)"):
        build_multi_input_classifier(_small_cnn(), image_size=32)


def test_freeze_backbone_rejects_unknown_layers():
    backbone = _small_cnn()
    with pytest.raises(ValueError, match="conv_z"):
        freeze_backbone(backbone, "conv_z")
    assert freeze_backbone(backbone, "all")[-1] == "conv_b"
    assert freeze_backbone(backbone, "none") == ()
    assert all(layer.trainable for layer in backbone.layers)
