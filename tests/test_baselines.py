"""The Table 1 model registry: same head, right inputs, preprocessing, weights, freezing, saving."""

import keras
import numpy as np
import pytest

from keras_cspine.stage1.models import baselines
from keras_cspine.stage1.models import factory as B

TINY_VIT = {"patch_size": 8, "num_layers": 5, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}
TINY_SWIN = {"embed_dim": 8, "depths": (1, 1), "num_heads": (1, 1), "window_size": 2,
             "imagenet_top": 10}


def _inputs(model, size, n=2, seed=0):
    rng = np.random.default_rng(seed)
    names = [t.name for t in keras.tree.flatten(model.inputs)]
    data = {"image": rng.uniform(0, 255, (n, size, size, 3)).astype("float32"),
            "metadata": rng.uniform(0, 1, (n, 2)).astype("float32")}  # fmt: skip
    return {k: v for k, v in data.items() if k in names}


def test_registry_covers_table1_and_text():
    names = B.available_models()
    for name in ("gcvit_tiny", "vit", "convnext_small", "inceptionv3", "resnet152v2", "swin",
                 "vgg19", "densenet121", "convnext_tiny", "metadata_only"):  # fmt: skip
        assert name in names
    rows = {spec.paper for spec in B.REGISTRY.values() if spec.paper}
    assert rows == {"Proposed (GCViT)", "ViT", "ConvNeXt", "InceptionV3", "ResNet152V2", "Swin"}
    assert B.get_spec("gcvit_tiny").inputs == "image+metadata"
    assert B.get_spec("resnet152v2").inputs == "image"
    with pytest.raises(ValueError, match="unknown model 'alexnet'; known: .*gcvit_tiny"):
        B.get_spec("alexnet")


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit", {"backbone_kwargs": TINY_VIT}),
        ("swin", {"backbone_kwargs": TINY_SWIN}),
        ("metadata_only", {}),
        pytest.param("gcvit_xxtiny", {"backbone_kwargs": {"depths": (1, 1, 1, 1)}},
                     marks=pytest.mark.slow),
    ],
)
def test_small_models_share_the_head(name, kwargs):
    model = B.build_model(name, image_size=32, **kwargs)
    inputs = _inputs(model, 32)
    expected = {"image+metadata": {"image", "metadata"}, "image": {"image"},
                "metadata": {"metadata"}}[B.get_spec(name).inputs]  # fmt: skip
    assert set(inputs) == expected
    out = model.predict(inputs, verbose=0)
    assert out.shape == (2, 7) and ((out > 0) & (out < 1)).all()
    assert model.get_layer("vertebrae").activation.__name__ == "sigmoid"
    if name != "metadata_only":  # GCViT has Figure 5's Dense(64); the baselines go to 256
        dense = {layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)}
        assert ("image_dense" in dense) == (B.get_spec(name).inputs == "image+metadata")
        assert model.get_layer("head_dense_0").units == 256


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, size",
    [("resnet152v2", 32), ("vgg19", 32), ("densenet121", 32), ("inceptionv3", 75),
     ("convnext_small", 32)],
)  # fmt: skip
def test_keras_applications_baselines(name, size):
    model = B.build_model(name, image_size=size)
    assert model.output_shape == (None, 7)
    assert model.predict(_inputs(model, size), verbose=0).shape == (2, 7)
    assert model.get_layer("head_dense_0").units == 256
    if name == "vgg19":  # the cheapest one: a frozen backbone leaves only the head trainable
        frozen = B.build_model(name, image_size=size, freeze="backbone")
        head = 256 * (512 + 1) + 7 * (256 + 1)
        assert B.count_parameters(frozen)["trainable"] == head


def test_vit_preset_loads_with_resized_position_table(tmp_path):
    import keras_hub

    hub = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), **TINY_VIT)  # a 4 x 4 grid
    hub.save_to_preset(str(tmp_path / "preset"))
    model = B.build_model("vit", image_size=48, weights=tmp_path / "preset",
                          backbone_kwargs=TINY_VIT)  # a 6 x 6 grid  # fmt: skip
    backbone = model.get_layer("vit_backbone")
    for i, block in enumerate(hub.get_layer("vit_encoder").encoder_layers):
        for ours, theirs in zip(backbone.get_layer(f"transformer_block_{i + 1}").weights,
                                block.weights):  # fmt: skip
            np.testing.assert_array_equal(ours.numpy(), theirs.numpy())
    embed = backbone.get_layer("patching_and_embedding")
    table = embed.position_embedding.embeddings.numpy()
    source = hub.get_layer("vit_patching_and_embedding").position_embedding.embeddings.numpy()
    assert table.shape == (1 + 36, 16)
    np.testing.assert_array_equal(table[0], source[0])  # the class token's row is kept
    np.testing.assert_allclose(table, baselines.resize_position_embedding(source, 37))
    # a preset of another depth names the folder
    with pytest.raises(ValueError, match="preset.*5 blocks of 16 does not fit 2 blocks"):
        B.build_model("vit", image_size=32, weights=tmp_path / "preset", freeze="none",
                      backbone_kwargs={**TINY_VIT, "num_layers": 2})  # fmt: skip


def test_resize_position_embedding():
    table = np.random.default_rng(0).normal(size=(1 + 16, 3)).astype("float32")
    np.testing.assert_allclose(baselines.resize_position_embedding(table, 17), table, atol=1e-6)
    bigger = baselines.resize_position_embedding(table, 1 + 64)
    assert bigger.shape == (65, 3) and bigger.dtype == np.float32
    np.testing.assert_array_equal(bigger[0], table[0])
    with pytest.raises(ValueError, match="square"):
        baselines.resize_position_embedding(table, 20)


#: Table 1 of the paper, trainable / non-trainable, every row built with its config's freeze
#: (random weights: the counts do not depend on them), at 224 px; ViT at 256 px (below).
TABLE1_ROWS = [
    ("gcvit_tiny", "Proposed (GCViT)", 13_080_663, 14_683_998),
    ("vit", "ViT", 56_937_479, 30_764_544),
    ("convnext_small", "ConvNeXt", 9_686_535, 39_966_816),
    ("inceptionv3", "InceptionV3", 526_535, 21_802_592),
    ("resnet152v2", "ResNet152V2", 6_045_703, 52_812_288),
    ("swin", "Swin", 49_899_081, 2_768),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, row, trainable, non_trainable", TABLE1_ROWS)
def test_table1_rows_have_the_paper_parameter_counts(name, row, trainable, non_trainable):
    from keras_cspine.stage1.train import load_stage1_config

    spec = B.get_spec(name)
    assert spec.paper == row and spec.paper_parameters == (trainable, non_trainable)
    config = load_stage1_config(f"stage1_{name}")
    assert config.data.image_size == spec.paper_size == (256 if name == "vit" else 224)
    model = B.build_model(name, image_size=spec.paper_size, freeze=config.model.freeze,
                          **dict(config.model.options))  # fmt: skip
    counts = B.count_parameters(model)
    assert (counts["trainable"], counts["non_trainable"]) == (trainable, non_trainable)
    if name == "vit":  # at 224 px the table has 7 x 7 + 1 position rows instead of 8 x 8 + 1
        at_224 = B.count_parameters(B.build_model(name, image_size=224))
        assert at_224["trainable"] == trainable
        assert at_224["non_trainable"] == non_trainable - 15 * 768


@pytest.mark.parametrize("freeze, frozen", [("all_but_last:1", 3), ("all_but_last:3", 1),
                                            ("all_but_last:4", 0)])  # fmt: skip
def test_all_but_last_n_fine_tunes_the_top_layers(freeze, frozen):
    from keras_cspine.stage1.models.classifier import freeze_backbone

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(2, 3, name="a")(inputs)
    x = keras.layers.Conv2D(2, 3, name="b")(x)
    x = keras.layers.Conv2D(2, 3, name="c")(x)
    backbone = keras.Model(inputs, x)  # layers: input, a, b, c
    names = freeze_backbone(backbone, freeze)
    assert len(names) == frozen
    assert [layer.trainable for layer in backbone.layers] == [i >= frozen for i in range(4)]


@pytest.mark.parametrize("freeze", ["all_but_last:0", "all_but_last:5", "all_but_last:x",
                                    "all_but_last:-1"])  # fmt: skip
def test_all_but_last_n_rejects_bad_counts(freeze):
    from keras_cspine.stage1.models.classifier import freeze_backbone

    inputs = keras.Input((8, 8, 3))
    backbone = keras.Model(inputs, keras.layers.Conv2D(2, 3)(inputs))
    with pytest.raises(ValueError, match="all_but_last:N"):
        freeze_backbone(backbone, freeze)


def test_minimum_size_and_bad_arguments():
    with pytest.raises(ValueError, match="image_size >= 75"):
        B.build_model("inceptionv3", image_size=64)
    with pytest.raises(ValueError, match="num_classes"):
        B.build_model("vit", image_size=32, num_classes=0)
    with pytest.raises(TypeError, match="weights"):
        B.build_model("vit", image_size=32, weights=3)


@pytest.mark.parametrize(
    "mode, reference",
    [("tf", "tf"), ("torch", "torch"), ("caffe", "caffe")],
)
def test_preprocessing_matches_keras_applications(mode, reference):
    from keras.src.applications.imagenet_utils import preprocess_input

    x = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    ours = keras.ops.convert_to_numpy(B.ImagePreprocessing(mode)(x))
    np.testing.assert_allclose(ours, preprocess_input(x.copy(), mode=reference), atol=1e-4)
    with pytest.raises(ValueError, match="mode"):
        B.ImagePreprocessing("zscore")


def test_imagenet_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(B.WeightsNotFoundError,
                       match="resnet152v2_weights.*keras-cspine weights fetch resnet152v2"):
        B.build_model("resnet152v2", image_size=32, weights="imagenet")
    monkeypatch.setenv("KERAS_CSPINE_WEIGHTS", str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="keras-cspine weights fetch vit"):
        B.build_model("vit", image_size=32, weights="imagenet", backbone_kwargs=TINY_VIT)
    with pytest.raises(B.WeightsNotFoundError, match="not found"):
        B.build_model("vgg19", image_size=32, weights=tmp_path / "missing.weights.h5")


def test_local_imagenet_cache_and_weight_files(tmp_path, monkeypatch):
    # a notop file in the local Keras cache is used for "imagenet" (no network involved)
    reference = keras.applications.VGG19(include_top=False, weights=None, input_shape=(32, 32, 3))
    (tmp_path / "models").mkdir()
    notop = tmp_path / "models" / "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(notop, "w") as handle:  # the legacy layout of the published notop files
        legacy_h5_format.save_weights_to_hdf5_group(handle, reference)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    loaded = B.build_model("vgg19", image_size=32, weights="imagenet")
    for layer in ("block1_conv1", "block5_conv4"):
        kernel = loaded.get_layer("vgg19_backbone").get_layer(layer).kernel
        np.testing.assert_array_equal(kernel.numpy(), reference.get_layer(layer).kernel.numpy())
    # whole-model .weights.h5 files load into the rebuilt model
    path = tmp_path / "vit.weights.h5"
    vit = B.build_model("vit", image_size=32, backbone_kwargs=TINY_VIT)
    vit.save_weights(path)
    again = B.build_model("vit", image_size=32, backbone_kwargs=TINY_VIT, weights=path)
    x = _inputs(vit, 32)
    np.testing.assert_allclose(again.predict(x, verbose=0), vit.predict(x, verbose=0), atol=1e-6)


def test_saved_baseline_round_trips(tmp_path):
    model = B.build_model("swin", image_size=32, backbone_kwargs=TINY_SWIN)
    path = tmp_path / "swin.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    x = _inputs(model, 32)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0),
                               atol=1e-5)  # fmt: skip
    assert B.count_parameters(loaded) == B.count_parameters(model)


def test_freeze_backbone_leaves_the_head():
    model = B.build_model("vit", image_size=32, freeze="backbone", backbone_kwargs=TINY_VIT)
    counts = B.count_parameters(model)
    # class token -> BN -> Dense(256) -> BN -> Dense(128) -> BN -> Dense(7)
    norms = 2 * (16 + 256 + 128)  # scale and offset (trainable); as many statistics (not)
    head = norms + 256 * (16 + 1) + 128 * (256 + 1) + 7 * (128 + 1)
    assert counts["trainable"] == head and counts["non_trainable"] > norms
