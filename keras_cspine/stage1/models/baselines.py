"""The image-only baselines of Table 1 (Section 2.5), registered in
:mod:`~keras_cspine.stage1.models.registry` when this module is imported.

=================  =============================================  =======  ==========================
name               backbone                                       preproc  head (after the backbone)
=================  =============================================  =======  ==========================
resnet152v2        keras.applications.ResNet152V2, last 15 tuned  tf       GAP, Dense 256, Dense 7
inceptionv3        keras.applications.InceptionV3, last 6 tuned   tf       GAP, Dense 256, Dense 7
convnext_small     keras.applications.ConvNeXtSmall, last 13      built in GAP, Dense 256, Dense 7
vgg19              keras.applications.VGG19, block 5 tuned        caffe    GAP, Dense 256, Dense 7
densenet121        keras.applications.DenseNet121, last 16       torch    GAP, Dense 256, Dense 7
convnext_tiny      keras.applications.ConvNeXtTiny, last 13       built in GAP, Dense 256, Dense 7
vit                ViT-B/32 at 256 px (keras-hub layers), 4 of    tf       class token, BN-Dense 256,
                   12 blocks frozen                                        BN-Dense 128, BN-Dense 7
swin               keras-hub Swin-S + 1,000-logit ImageNet top    torch    BN-Dense 256, BN-Dense 128,
                                                                           BN-Dense 7
metadata_only      none: position and slice ratio only            -        Dense 16, 16, 256, 7
=================  =============================================  =======  ==========================

The Table 1 rows are built exactly as the paper counts them (README, "The paper's networks, to
the parameter"). Images enter as float 0-255 RGB; each backbone normalises them itself (an
:class:`ImagePreprocessing` layer in the mode its ImageNet weights expect). ``metadata_only`` is
not a paper model: it measures how much of the task position alone solves.

Weights (never downloaded here): ``None`` (random); ``"imagenet"`` from the local caches of
:mod:`~keras_cspine.stage1.models.pretrained` (``keras-cspine weights fetch NAME`` gets them);
a path (a Keras Applications notop ``.h5``, checked layer by layer; a keras-hub preset folder for
``vit`` / ``swin``). keras-hub (``vit``, ``swin``) is the optional extra ``baselines``, imported
lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_cspine.errors import MissingDependencyError
from keras_cspine.stage1.models.pretrained import check_keras_h5, require
from keras_cspine.stage1.models.registry import PAPER_PARAMETERS, ModelSpec, register_model

__all__ = [
    "ClassToken",
    "ImagePreprocessing",
    "WeightsNotFoundError",
    "build_metadata_only",
    "resize_position_embedding",
]


class WeightsNotFoundError(FileNotFoundError):
    """Requested weights are not available locally (nothing is downloaded)."""


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="keras_cspine")
class ImagePreprocessing(keras.layers.Layer):
    """Map 0-255 RGB images to what a backbone's ImageNet weights expect.

    Args:
        mode: ``"tf"`` (scale to [-1, 1]), ``"torch"`` (0-1 then ImageNet mean/std),
            ``"caffe"`` (RGB -> BGR, minus the ImageNet BGR means), ``"unit"`` (0-1) or
            ``"none"``. These are the modes of ``keras.applications.imagenet_utils``.
    """

    MODES = ("tf", "torch", "caffe", "unit", "none")

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean = keras.ops.convert_to_tensor(_IMAGENET_MEAN, self.compute_dtype)
            std = keras.ops.convert_to_tensor(_IMAGENET_STD, self.compute_dtype)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            mean = keras.ops.convert_to_tensor(_CAFFE_MEAN_BGR, self.compute_dtype)
            return keras.ops.flip(x, axis=-1) - mean
        if self.mode == "unit":
            return x / 255.0
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "mode": self.mode}


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
def _keras_cache_file(file_name: str) -> Path | None:
    base = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))
    candidate = base / "models" / file_name
    return candidate if candidate.is_file() else None


def _resolve_application_weights(weights, notop_file: str, name: str) -> str | None:
    """None, a local .h5 path, or a cached ImageNet notop file (never a download)."""
    if weights is None:
        return None
    if weights == "imagenet":
        cached = _keras_cache_file(notop_file)
        if cached is None:
            where = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "models"
            raise WeightsNotFoundError(
                f"{where / notop_file}: the ImageNet weights of {name} are not in the local Keras "
                f"cache; nothing is downloaded on its own. Get them with `keras-cspine weights "
                f"fetch {name}` (or bring the file and run `keras-cspine weights add FILE`)"
            )
        return str(cached)
    path = Path(weights)
    if not path.is_file():
        raise WeightsNotFoundError(f"{path}: weights file not found")
    return str(path)


def _application_backbone(
    name: str, app_name: str, preprocess: str | None, notop_file: str
) -> Callable[..., keras.Model]:
    """A backbone builder for ``classifier.register_backbone``: 0-255 images -> feature map.

    The application is built on the preprocessing layer's output (``input_tensor``), so the
    backbone is one flat model whose last layers are the application's: a freeze spec such as
    ``"all_but_last:15"`` counts the application's own layers, as the paper's fine-tuning did.
    """

    def build(image_size, weights=None, **kwargs) -> keras.Model:
        if kwargs:
            raise TypeError(f"{name}: {app_name} takes no backbone_kwargs, got {sorted(kwargs)}")
        h, w = image_size
        resolved = _resolve_application_weights(weights, notop_file, name)
        app_kwargs: dict[str, Any] = {}
        if app_name.startswith("ConvNeXt"):
            app_kwargs["include_preprocessing"] = True  # ConvNeXt normalises 0-255 itself
        inputs = keras.Input((h, w, 3), name="pixels")
        x = ImagePreprocessing(preprocess, name="preprocess")(inputs) if preprocess else inputs
        app = getattr(keras.applications, app_name)(
            include_top=False, weights=None, input_tensor=x, **app_kwargs
        )
        backbone = keras.Model(inputs, app.output, name=f"{name}_backbone")
        if resolved is not None:
            check_keras_h5(resolved, backbone)  # names the first layer that does not fit
            backbone.load_weights(resolved)
        return backbone

    return build


def _keras_hub():
    try:
        import keras_hub
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise MissingDependencyError("keras-hub", "baselines", "The ViT and Swin baselines") from err
    return keras_hub


#: ViT-B/32 (vit-keras' ``vit_b32``, keras-hub's ``vit_base_patch32_*``): Table 1's ViT row is
#: this network at 256 px (8 x 8 patches and a class token).
VIT_B32 = {"patch_size": 32, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}
#: Swin-S, patch 4, window 7 (keras-hub's ``swin_small_patch4_window7_224``).
SWIN_S = {"embed_dim": 96, "depths": (2, 2, 18, 2), "num_heads": (3, 6, 12, 24), "window_size": 7}


@keras.saving.register_keras_serializable(package="keras_cspine")
class ClassToken(keras.layers.Layer):
    """The class token of a ViT's output sequence: ``(B, 1 + patches, C) -> (B, C)``."""

    def call(self, inputs):
        return inputs[:, 0]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])


def _vit_backbone(image_size, weights=None, patch_size=32, num_layers=12, num_heads=12,
                  hidden_dim=768, mlp_dim=3072, layer_norm_epsilon=1e-6) -> keras.Model:
    """ViT as one flat functional model: embedding, one layer per encoder block, norm, class token.

    Made of keras-hub's own ViT layers (``ViTPatchingAndEmbedding``, ``ViTEncoderBlock``), laid
    out as vit-keras laid them out, so that freezing counts blocks as the paper's fine-tuning did
    (``transformer_block_4``: the embeddings and the first four blocks). ``weights``: a local
    keras-hub ViT preset folder; its position embeddings are resized to this image size.
    """
    _keras_hub()
    from keras_hub.src.models.vit.vit_layers import ViTEncoderBlock, ViTPatchingAndEmbedding

    h, w = image_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"vit: image_size {h}x{w} is not a multiple of patch_size {patch_size}")
    inputs = keras.Input((h, w, 3), name="pixels")
    x = ImagePreprocessing("tf", name="preprocess")(inputs)
    x = ViTPatchingAndEmbedding(image_size=(h, w), patch_size=(patch_size, patch_size),
                                hidden_dim=hidden_dim, num_channels=3,
                                name="patching_and_embedding")(x)  # fmt: skip
    for i in range(num_layers):
        x = ViTEncoderBlock(num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                            layer_norm_epsilon=layer_norm_epsilon,
                            name=f"transformer_block_{i + 1}")(x)  # fmt: skip
    x = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, name="encoder_norm")(x)
    backbone = keras.Model(inputs, ClassToken(name="class_token")(x), name="vit_backbone")
    if weights is not None:
        _load_vit_preset(backbone, _preset_folder(weights, "vit"), num_layers)
    return backbone


def _preset_folder(weights, name: str) -> Path:
    if weights == "imagenet":
        return require(name)
    if not Path(weights).is_dir():
        raise WeightsNotFoundError(f"{weights}: not a local keras-hub preset folder")
    return Path(weights)


def _load_vit_preset(backbone: keras.Model, folder: Path, num_layers: int) -> None:
    """Copy a keras-hub ViT preset into the flat ViT, resizing the position embeddings."""
    from keras_cspine.stage1.models.weights import WeightsFileError

    keras_hub = _keras_hub()
    hub = keras_hub.models.ViTBackbone.from_preset(str(folder))
    if hub.num_layers != num_layers or hub.hidden_dim != backbone.output_shape[-1]:
        raise WeightsFileError(
            folder, f"a ViT with {hub.num_layers} blocks of {hub.hidden_dim} does not fit "
            f"{num_layers} blocks of {backbone.output_shape[-1]}",
        )  # fmt: skip
    source = hub.get_layer("vit_patching_and_embedding")
    target = backbone.get_layer("patching_and_embedding")
    values = [keras.ops.convert_to_numpy(v) for v in source.weights]
    for i, (variable, value) in enumerate(zip(target.weights, values)):
        if "position" in variable.path and tuple(value.shape) != tuple(variable.shape):
            values[i] = resize_position_embedding(value, int(variable.shape[0]))
    target.set_weights(values)
    for i, block in enumerate(hub.get_layer("vit_encoder").encoder_layers):
        backbone.get_layer(f"transformer_block_{i + 1}").set_weights(block.get_weights())
    backbone.get_layer("encoder_norm").set_weights(
        hub.get_layer("vit_encoder").layer_norm.get_weights())


def resize_position_embedding(table: np.ndarray, rows: int) -> np.ndarray:
    """A ViT position table ``(1 + g*g, C)`` resized to ``rows = 1 + n*n`` (bilinear on the grid,
    class token kept), as vit-keras and timm do when weights meet another image size."""
    from scipy.ndimage import zoom

    old, new = round((table.shape[0] - 1) ** 0.5), round((rows - 1) ** 0.5)
    if old * old + 1 != table.shape[0] or new * new + 1 != rows:
        raise ValueError(f"position tables {table.shape[0]} -> {rows} are not 1 + square grids")
    grid = table[1:].reshape(old, old, -1)
    grid = zoom(grid, (new / old, new / old, 1), order=1)
    return np.concatenate([table[:1], grid.reshape(new * new, -1)]).astype(table.dtype)


def _swin_backbone(image_size, weights=None, imagenet_top: int = 1000, **kwargs) -> keras.Model:
    """keras-hub's Swin Transformer with its ImageNet classification top kept.

    Table 1's Swin row is Swin-S with the 1,000-logit ImageNet layer still on top (a hub
    classification model, as TF-Hub served Swin in 2023), all of it trainable.
    ``imagenet_top=0`` drops that layer. ``weights``: a local keras-hub preset folder.
    """
    keras_hub = _keras_hub()
    h, w = image_size
    if weights is not None:
        hub = keras_hub.models.SwinTransformerBackbone.from_preset(
            str(_preset_folder(weights, "swin")), image_shape=(h, w, 3))  # fmt: skip
    else:
        config = {**SWIN_S, **kwargs}
        for key in ("depths", "num_heads"):
            config[key] = tuple(config[key])
        hub = keras_hub.models.SwinTransformerBackbone(image_shape=(h, w, 3), **config)
    inputs = keras.Input((h, w, 3), name="pixels")
    x = hub(ImagePreprocessing("torch", name="preprocess")(inputs))
    x = keras.layers.GlobalAveragePooling1D(name="token_pool")(keras.layers.Reshape(
        (-1, x.shape[-1]), name="tokens")(x))  # fmt: skip
    if imagenet_top:
        x = keras.layers.Dense(imagenet_top, name="imagenet_top")(x)
    return keras.Model(inputs, x, name="swin_backbone")


def build_metadata_only(
    image_size: int,
    num_classes: int,
    num_metadata: int = 2,
    metadata_units: Sequence[int] = (16, 16),
    head_units: Sequence[int] = (256,),
    name: str = "metadata_only",
) -> keras.Model:
    """Position-only control: the paper's metadata branch and head without any image."""
    inputs = keras.Input((num_metadata,), name="metadata")
    x = inputs
    for i, units in enumerate(metadata_units):
        x = keras.layers.Dense(units, activation="relu", name=f"metadata_dense_{i}")(x)
    for i, units in enumerate(head_units):
        x = keras.layers.Dense(units, activation="relu", name=f"head_dense_{i}")(x)
    outputs = keras.layers.Dense(num_classes, activation="sigmoid", dtype="float32",
                                 name="vertebrae")(x)  # fmt: skip
    return keras.Model({"metadata": inputs}, outputs, name=name)


def _app(name, cls, preprocess, notop, *, paper=None, freeze="none", counts=None, min_size=32):
    """A Keras Applications baseline: image only, GAP -> Dense(256) -> Dense(7) head."""
    return ModelSpec(
        name, "image", f"keras.applications.{cls}, image only", paper=paper, min_size=min_size,
        backbone=_application_backbone(name, cls, preprocess, notop), default_freeze=freeze,
        image_dense=None, paper_parameters=counts, weights=name,
    )  # fmt: skip


# ViT and Swin end in the head their counts show: BatchNorm -> Dense(256) -> BatchNorm ->
# Dense(128) -> BatchNorm -> Dense(7) (the BatchNorm statistics are Swin's 2,768 non-trainable).
_BN_HEAD = {"head_units": (256, 128), "head_norm": "batch"}

VIT_SPEC = ModelSpec(
    "vit", "image", "ViT-B/32 (keras-hub layers), class token, image only", paper="ViT",
    backbone=_vit_backbone, default_freeze="transformer_block_4", image_dense=None,
    paper_parameters=PAPER_PARAMETERS["ViT"], weights="vit", head=_BN_HEAD, paper_size=256,
)
SWIN_SPEC = ModelSpec(
    "swin", "image", "keras-hub Swin-S (patch 4, window 7) + ImageNet top, image only",
    paper="Swin", backbone=_swin_backbone, default_freeze="none", image_dense=None,
    paper_parameters=PAPER_PARAMETERS["Swin"], weights="swin", head=_BN_HEAD,
)

# The cuts below are the ones that give Table 1's counts exactly at 224 px: the backbone's
# bottom layers frozen, its last N layers fine-tuned (``all_but_last:N``), the head trainable.
# ResNet152V2: conv5_block2_3_conv onwards (15 layers); InceptionV3: only the last
# batch normalisation (its 192 betas) onwards (6 layers); ConvNeXtSmall: from
# stage_3_block_1_pointwise_conv_1 on (13 layers). VGG19 and DenseNet121 (named in Section 2.5
# without counts) fine-tune their last block the same way.
for _spec in (
        _app("resnet152v2", "ResNet152V2", "tf",
             "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5", paper="ResNet152V2",
             freeze="all_but_last:15", counts=PAPER_PARAMETERS["ResNet152V2"]),
        _app("inceptionv3", "InceptionV3", "tf",
             "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", paper="InceptionV3",
             freeze="all_but_last:6", counts=PAPER_PARAMETERS["InceptionV3"], min_size=75),
        _app("convnext_small", "ConvNeXtSmall", None, "convnext_small_notop.h5",
             paper="ConvNeXt", freeze="all_but_last:13", counts=PAPER_PARAMETERS["ConvNeXt"]),
        _app("vgg19", "VGG19", "caffe", "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
             freeze="all_but_last:5"),  # block5: four convolutions and the pooling
        _app("densenet121", "DenseNet121", "torch",
             "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
             freeze="all_but_last:16"),  # the last two conv blocks of dense block 5, bn, relu
        _app("convnext_tiny", "ConvNeXtTiny", None, "convnext_tiny_notop.h5",
             freeze="all_but_last:13"),  # the ConvNeXtSmall cut on the smaller variant
        VIT_SPEC,
        SWIN_SPEC,
        ModelSpec("metadata_only", "metadata",
                  "position and slice ratio only (leakage control, not in the paper)",
                  min_size=1),
):
    register_model(_spec)  # fmt: skip


