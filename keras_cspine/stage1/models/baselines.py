"""The model registry of Table 1: the paper's two-input GCViT and the image-only baselines.

Paper Section 3 (Table 1) compares the proposed GCViT model (image + metadata) with image-only
baselines: ViT, ConvNeXt, InceptionV3, ResNet152V2 and Swin (VGG19 and DenseNet are named in the
text). Every model here ends in the same 7-sigmoid head (C1..C7 presence), built by name with
:func:`build_model`:

=================  ==========================================  =================  =========
name               backbone                                    inputs             preprocess
=================  ==========================================  =================  =========
gcvit_tiny         GCViT-tiny (paper), models/classifier.py    image + metadata   (model's)
gcvit_xtiny        GCViT-xtiny                                 image + metadata   (model's)
gcvit_xxtiny       GCViT-xxtiny (small, for CPU runs)          image + metadata   (model's)
resnet152v2        keras.applications.ResNet152V2              image              tf
vgg19              keras.applications.VGG19                    image              caffe
densenet121        keras.applications.DenseNet121              image              torch
inceptionv3        keras.applications.InceptionV3              image              tf
convnext_tiny      keras.applications.ConvNeXtTiny             image              (built in)
vit                keras_hub ViTBackbone (ViT-B/16 shape)      image              tf
swin               keras_hub SwinTransformerBackbone (Swin-T)  image              torch
metadata_only      none: position and slice ratio only         metadata           -
=================  ==========================================  =================  =========

Every image model is a ``keras_cspine.stage1.models.classifier.MultiInputClassifier``: the GCViT ones
with their metadata branch, the baselines through ``build_image_classifier`` (the paper's head
without the metadata branch: global average pooling -> Dense(64) -> Dense(256) -> Dense(7,
sigmoid) named ``vertebrae``). The baselines' backbones are registered by name with
``classifier.register_backbone`` when this module is imported, so a saved baseline reloads after
``import keras_cspine.stage1.models.baselines``. Images enter as float 0-255 RGB under the input name
``image``; each backbone normalises them itself (an :class:`ImagePreprocessing` layer in the mode
its ImageNet weights expect).

``metadata_only`` is not a paper model: it measures how much of the task position alone solves
(a control for leakage through the metadata input).

Weights (nothing is ever downloaded): ``None`` (random, the default); a path (``.weights.h5``:
weights of the whole model saved by Keras; another ``.h5``: ImageNet "notop" backbone weights of a
keras.applications model; a folder: a local keras-hub preset for ``vit``/``swin``; a timm file for
GCViT); ``"imagenet"`` only when the notop file is already in the local Keras cache
(``$KERAS_HOME/models``, default ``~/.keras/models``), otherwise :class:`WeightsNotFoundError`.

keras-hub (``vit``, ``swin``) is the optional extra ``baselines`` and is imported lazily.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from keras_cspine.errors import MissingDependencyError

NUM_CLASSES = 7
IMAGE_MODES = ("image+metadata", "image", "metadata")

__all__ = [
    "REGISTRY",
    "ImagePreprocessing",
    "ModelSpec",
    "WeightsNotFoundError",
    "available_models",
    "build_model",
    "count_parameters",
    "get_spec",
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
@dataclass(frozen=True)
class ModelSpec:
    """One model of the registry.

    Args:
        name: registry key (also the backbone name registered with the classifier).
        inputs: what the model reads: ``"image+metadata"``, ``"image"`` or ``"metadata"`` (the
            matching ``CSpineSequence(inputs=...)``).
        description: one line for listings.
        paper: the Table 1 row name, or None for models outside the table.
        min_size: smallest accepted image side.
        backbone: for image-only baselines, the builder registered with
            ``keras_cspine.stage1.models.classifier.register_backbone``.
        default_freeze: the freeze spec used when ``build_model(freeze=None)``: the paper's cut
            for the Table 1 rows (see :func:`keras_cspine.stage1.models.classifier.freeze_backbone`).
        image_dense: the Dense layer after pooling the image features (None: none). The GCViT
            model has one (64 units, Figure 5); the baselines' counts in Table 1 say they go
            straight from pooling to Dense(256).
        paper_parameters: ``(trainable, non_trainable)`` as Table 1 prints them, for the rows
            of the table (built at ``paper_size`` with the default freeze).
        weights: the :mod:`keras_cspine.stage1.models.pretrained` entry holding its ImageNet weights.
        head: other head defaults of the classifier (``head_units``, ``head_norm``).
        paper_size: the image side at which the paper's counts hold (ViT: 256).
    """

    name: str
    inputs: str
    description: str
    paper: str | None = None
    min_size: int = 32
    backbone: Callable[..., keras.Model] | None = field(default=None, repr=False)
    default_freeze: str | None = None
    image_dense: int | None = 64
    paper_parameters: tuple[int, int] | None = None
    weights: str | None = None
    head: Mapping[str, Any] = field(default_factory=dict)
    paper_size: int = 224


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
            from keras_cspine.stage1.models.pretrained import check_keras_h5

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
        from keras_cspine.stage1.models.pretrained import require

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


def _build_metadata_only(
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


#: Table 1's parameter counts (trainable, non-trainable) of each row.
PAPER_PARAMETERS = {
    "Proposed (GCViT)": (13_080_663, 14_683_998),
    "ViT": (56_937_479, 30_764_544),
    "ConvNeXt": (9_686_535, 39_966_816),
    "InceptionV3": (526_535, 21_802_592),
    "ResNet152V2": (6_045_703, 52_812_288),
    "Swin": (49_899_081, 2_768),
}

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
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("gcvit_tiny", "image+metadata", "GCViT-tiny + metadata, the paper's model",
                  paper="Proposed (GCViT)", default_freeze="levels_2",
                  paper_parameters=PAPER_PARAMETERS["Proposed (GCViT)"], weights="gcvit_tiny"),
        ModelSpec("gcvit_xtiny", "image+metadata", "GCViT-xtiny + metadata",
                  default_freeze="none"),
        ModelSpec("gcvit_xxtiny", "image+metadata",
                  "GCViT-xxtiny + metadata (small, for CPU runs)", default_freeze="none"),
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
    )
}  # fmt: skip


def _register_backbones() -> None:
    from keras_cspine.stage1.models.classifier import available_backbones, register_backbone

    known = available_backbones()
    for spec in REGISTRY.values():
        if spec.backbone is not None and spec.name not in known:
            register_backbone(spec.name, spec.backbone)


_register_backbones()


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return list(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None


def build_model(
    name: str,
    *,
    image_size: int = 224,
    num_classes: int = NUM_CLASSES,
    weights: str | os.PathLike | None = None,
    freeze: str | None = None,
    **kwargs,
) -> keras.Model:
    """Build a registry model by name (random weights unless ``weights`` says otherwise).

    GCViT models are ``build_multi_input_classifier(backbone=name)``; image-only baselines are
    ``build_image_classifier(backbone=name)`` (the same head minus the metadata branch), both
    from :mod:`keras_cspine.stage1.models.classifier`, so every model shares one head and one saved
    format.

    Args:
        name: a key of :data:`REGISTRY` (see :func:`available_models`).
        image_size: input side in pixels (images are 0-255 RGB floats).
        num_classes: sigmoid outputs (7: C1..C7).
        weights: None; "imagenet" (local cache only); a ``.weights.h5`` file of the whole model;
            another path: backbone weights (keras.applications notop ``.h5``, a keras-hub preset
            folder, or a timm GCViT file).
        freeze: the classifier's freeze spec: ``"none"``, ``"all"`` (alias ``"backbone"``), a
            backbone layer name (GCViT: ``"levels_2"`` is the paper's) or ``"all_but_last:N"``
            (fine-tune the backbone's last N layers); None: the model's default, which for a
            Table 1 row is the paper's cut (:data:`ModelSpec.paper_parameters` at 224 px).
        **kwargs: passed to the classifier (``image_dense``, ``head_units``, ``dropout``,
            ``backbone_kwargs`` such as ``{"num_layers": 1}`` for a tiny ViT...).

    Returns:
        A ``keras.Model`` with output ``vertebrae`` and the inputs of ``get_spec(name).inputs``.

    Example:
        >>> model = build_model("resnet152v2", image_size=64)
        >>> model.output_shape
        (None, 7)
    """
    from keras_cspine.stage1.models.classifier import (
        build_image_classifier,
        build_multi_input_classifier,
    )

    spec = get_spec(name)
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < spec.min_size:
        raise ValueError(f"{name} needs an integer image_size >= {spec.min_size}, got {image_size!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise TypeError(f"weights must be None, 'imagenet' or a path, got {weights!r}")
    model_weights = None
    if weights is not None:
        weights = os.fspath(weights)
        if weights.endswith(".weights.h5"):
            if not Path(weights).is_file():
                raise WeightsNotFoundError(f"{weights}: weights file not found")
            model_weights, weights = weights, None
    freeze = spec.default_freeze if freeze is None else freeze
    if freeze == "backbone":
        freeze = "all"

    if spec.inputs == "image+metadata":
        model = build_multi_input_classifier(
            backbone=name, image_size=image_size, num_classes=num_classes, freeze=freeze,
            weights=weights, **kwargs,
        )  # fmt: skip
    elif spec.inputs == "image":
        kwargs.setdefault("name", name)
        kwargs.setdefault("image_dense", spec.image_dense)
        for key, value in spec.head.items():
            kwargs.setdefault(key, value)
        kwargs.setdefault("rescaling", "none")  # each baseline backbone preprocesses itself
        model = build_image_classifier(
            backbone=name, image_size=image_size, num_classes=num_classes, freeze=freeze,
            weights=weights, **kwargs,
        )  # fmt: skip
    else:
        if weights is not None or freeze not in (None, "none"):
            raise ValueError(f"{name}: only whole-model .weights.h5 files apply, got {weights!r}")
        # no image backbone: a config's backbone settings (e.g. stage1_synthetic_small's
        # narrow GCViT, kept when only model.name is overridden) do not apply to it
        kwargs.pop("backbone_kwargs", None)
        model = _build_metadata_only(image_size, num_classes, **kwargs)
    if model_weights is not None:
        model.load_weights(model_weights)
    return model


def frozen_random_problem(name: str, weights, freeze: str | None) -> str | None:
    """Why training ``name`` with these ``weights`` and ``freeze`` would be pointless, or None.

    Frozen layers keep their weights: frozen at their random initialisation they never learn
    anything, so a run that freezes a backbone must load weights into it.
    """
    spec = get_spec(name)
    freeze = spec.default_freeze if freeze is None else freeze
    if spec.inputs == "metadata" or freeze in (None, "none") or weights is not None:
        return None
    if spec.weights:
        how = (f"get its ImageNet weights with `keras-cspine weights fetch {spec.weights}` (or "
               f"`keras-cspine weights add FILE`) and set model.weights=imagenet")  # fmt: skip
    else:
        how = "set model.weights to a weights file"
    return (
        f"model {name} freezes its backbone (freeze {freeze!r}) but model.weights is null: the "
        f"frozen layers would keep their random initialisation and never learn. Either {how}, "
        f"or train every layer with --set model.freeze=none"
    )


def count_parameters(model: keras.Model) -> dict[str, int]:
    """Trainable and non-trainable parameter counts (as in Table 1 and ``model.summary()``)."""
    trainable = int(sum(np.prod(w.shape) for w in model.trainable_weights))
    frozen = int(sum(np.prod(w.shape) for w in model.non_trainable_weights))
    return {"trainable": trainable, "non_trainable": frozen, "total": trainable + frozen}
