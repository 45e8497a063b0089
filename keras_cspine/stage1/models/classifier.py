"""The paper's two-input vertebrae classifier (paper Section 2.5, Figure 5 and Table 1, stage 1).

For every axial CT slice the network predicts which of the vertebrae C1..C7 it shows (7 sigmoid
outputs, multi-label). It has two inputs:

- ``image``: the slice as RGB pixels in [0, 255] (uint8 or float), normalised inside the model
  (ImageNet mean/std after /255 for GCViT, as timm's data config);
- ``metadata``: per-slice numbers (by default 2: image position and slice ratio).

```
image -> rescaling -> GCViT-tiny (patch_embed, levels_0..2 frozen) -> norm -> GAP -> Dense 64 --+
metadata -> Dense 16 -> Dense 16 ----------------------------------------------------------------+
   concat (80) -> Dense 256 -> Dense 7 sigmoid ("vertebrae")
```

With the paper's settings at 224 x 224 the model has exactly 13,080,663 trainable and
14,683,998 non-trainable parameters, as in Table 1 (tests/test_classifier.py proves it).

Backbones: a GCViT variant name (``gcvit_xxtiny`` ... ``gcvit_base``), a name registered with
:func:`register_backbone` (the image-only baselines use this hook), or any ``keras.Model`` that
maps an image to a feature map or vector.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras

import keras_cspine.stage1.models.baselines  # noqa: F401 - registers the baselines
from keras_cspine.stage1.models.gcvit import PixelNormalization, _pair
from keras_cspine.stage1.models.gcvit_presets import GCVIT_VARIANTS, IMAGENET_MEAN, IMAGENET_STD
from keras_cspine.stage1.models.registry import REGISTRY, ModelSpec, register_model

#: Pixel normalisations applied inside the model to [0, 255] inputs.
RESCALING = {
    "imagenet": dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=1.0 / 255.0),
    "unit": dict(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), scale=1.0 / 255.0),
    "symmetric": dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), scale=1.0 / 255.0),
    "none": None,
}

#: Freeze points of a GCViT backbone, shallow to deep ("levels_2" is the paper's).
GCVIT_FREEZE_POINTS = ("none", "patch_embed", "levels_0", "levels_1", "levels_2", "levels_3")

#: Prefix of the freeze spec "all_but_last:N" (fine-tune the backbone's last N layers).
ALL_BUT_LAST = "all_but_last:"

def register_backbone(name: str, builder: Callable[..., keras.Model]) -> None:
    """Make ``backbone=name`` build an image-only backbone with
    ``builder(image_size=(h, w), weights=weights, **backbone_kwargs) -> keras.Model``: a shortcut
    for registering a ``ModelSpec(name, "image", ...)`` in the one model registry.

    The model must map ``(h, w, 3)`` images (already rescaled, see ``rescaling``) to a feature map
    ``(B, h', w', C)`` or a vector ``(B, C)``. Registered names are stored in configs as strings,
    so saved classifiers rebuild without serialising the backbone.
    """
    if not isinstance(name, str) or not name or name in GCVIT_VARIANTS:
        raise ValueError(f"backbone name {name!r} must be a new, non-empty string")
    if not callable(builder):
        raise ValueError(f"builder for backbone {name!r} must be callable, got {builder!r}")
    register_model(ModelSpec(name, "image", f"registered backbone {name}", backbone=builder,
                             default_freeze="none"))  # fmt: skip


def available_backbones() -> tuple[str, ...]:
    """Backbone names accepted as strings: every registered model with an image backbone."""
    return tuple(name for name, spec in REGISTRY.items() if spec.backbone is not None)


def _build_backbone(backbone, image_size, weights, drop_path_rate, backbone_kwargs):
    if isinstance(backbone, keras.Model):
        if weights is not None:
            raise ValueError("weights= applies to named backbones; load them into the model given")
        return backbone
    spec = REGISTRY.get(backbone) if isinstance(backbone, str) else None
    if spec is None or spec.backbone is None:
        raise ValueError(
            f"unknown backbone {backbone!r}; choose one of {available_backbones()} or pass a "
            f"keras.Model"
        )
    kwargs = dict(backbone_kwargs)
    if drop_path_rate:
        kwargs["drop_path_rate"] = drop_path_rate
    return spec.backbone(image_size=image_size, weights=weights, **kwargs)


def freeze_backbone(backbone: keras.Model, freeze: str | None) -> tuple[str, ...]:
    """Freeze ``backbone``'s layers up to and including the layer named ``freeze``.

    ``"none"`` (or None) trains everything, ``"all"`` freezes the whole backbone and
    ``"all_but_last:N"`` freezes all but its last N layers (the usual Keras fine-tuning,
    ``for layer in base.layers[:-N]: layer.trainable = False``; the cut of the paper's Keras
    Applications baselines). For GCViT the points are ``"patch_embed"``, ``"levels_0"`` ..
    ``"levels_3"``; the paper freezes up to ``"levels_2"`` (its downsample included). Returns the
    names of the frozen layers.
    """
    names = [layer.name for layer in backbone.layers]
    if freeze is None or freeze == "none":
        cut = -1
    elif freeze == "all":
        cut = len(names) - 1
    elif isinstance(freeze, str) and freeze.startswith(ALL_BUT_LAST):
        count = freeze[len(ALL_BUT_LAST):]
        if not count.isdigit() or not 0 < int(count) <= len(names):
            raise ValueError(
                f"freeze {freeze!r}: N in 'all_but_last:N' must be an integer from 1 to the "
                f"{len(names)} layers of backbone {backbone.name!r}"
            )
        cut = len(names) - int(count) - 1
    elif isinstance(freeze, str) and freeze in names:
        cut = names.index(freeze)
    else:
        weighted = [layer.name for layer in backbone.layers if layer.weights]
        raise ValueError(
            f"freeze {freeze!r} is not a layer of backbone {backbone.name!r}; choose 'none', "
            f"'all', 'all_but_last:N' or one of {weighted}"
        )
    backbone.trainable = True
    for i, layer in enumerate(backbone.layers):
        layer.trainable = i > cut
    return tuple(names[: cut + 1])


def parameter_counts(model: keras.Model) -> dict[str, int]:
    """``{"trainable": n, "non_trainable": m}`` as Keras' summary counts them."""

    def count(weights):
        return int(sum(int(keras.ops.size(w)) for w in weights))

    return {"trainable": count(model.trainable_weights),
            "non_trainable": count(model.non_trainable_weights)}


def _units(value, what: str, allow_empty: bool = True) -> tuple[int, ...]:
    if isinstance(value, int):
        value = (value,)
    if not isinstance(value, Sequence) or any(
        not isinstance(u, int) or isinstance(u, bool) or u < 1 for u in value
    ) or (not allow_empty and not value):
        raise ValueError(f"{what} must be a sequence of positive ints, got {value!r}")
    return tuple(value)


@keras.saving.register_keras_serializable(package="keras_cspine")
class MultiInputClassifier(keras.Model):
    """The paper's slice classifier: image backbone + metadata MLP -> multi-label head.

    Args:
        backbone: GCViT variant name (default ``"gcvit_tiny"``), a name registered with
            :func:`register_backbone`, or a ``keras.Model`` mapping images to features.
        image_size: input height and width (int or pair).
        num_metadata: metadata features; 0 builds an image-only classifier (no ``metadata``
            input), as for the paper's baselines.
        num_classes: outputs (7: C1..C7).
        freeze: last frozen backbone layer (see :func:`freeze_backbone`); ``"levels_2"`` is the
            paper's cut, ``"none"`` trains everything.
        image_dense: units of the Dense after pooling the image features (None: no layer).
        metadata_units: Dense layers of the metadata branch.
        head_units: Dense layers after the concatenation.
        head_norm: ``"batch"`` puts a BatchNormalization before each head Dense layer and the
            output (the head of the paper's ViT and Swin rows); None (the default): none.
        activation: activation of the hidden Dense layers.
        dropout: dropout rate before each head Dense layer (0: none, as the paper).
        rescaling: pixel normalisation inside the model: ``"imagenet"`` (mean/std after /255),
            ``"unit"`` ([0, 1]), ``"symmetric"`` ([-1, 1]) or ``"none"``.
        drop_path_rate: stochastic depth of a GCViT backbone.
        backbone_kwargs: extra arguments of a named backbone's builder.
        output_activation: ``"sigmoid"`` for multi-label probabilities.
        output_name: name of the output layer (``"vertebrae"``).
        weights: backbone weights: None, ``"imagenet"`` (local file only) or a timm weights path
            for GCViT; not stored in the config (a saved model carries its weights).
        name: model name.

    Example:
    ```python
    model = build_multi_input_classifier("gcvit_xxtiny", image_size=64, freeze="none")
    probs = model.predict({"image": images_uint8, "metadata": meta})   # (B, 7)
    ```

    Reference: "Intelligent Cervical Spine Fracture Detection Using Deep Learning Methods"
    (arXiv 2311.05708, 2023), Section 2.5, Figure 5 and Table 1.
    """

    def __init__(
        self,
        backbone: str | keras.Model = "gcvit_tiny",
        image_size=224,
        num_metadata: int = 2,
        num_classes: int = 7,
        freeze: str | None = "levels_2",
        image_dense: int | None = 64,
        metadata_units: Sequence[int] = (16, 16),
        head_units: Sequence[int] = (256,),
        head_norm: str | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
        rescaling: str = "imagenet",
        drop_path_rate: float = 0.0,
        backbone_kwargs: dict | None = None,
        output_activation: str = "sigmoid",
        output_name: str = "vertebrae",
        weights: str | None = None,
        name: str = "cspine_classifier",
        **kwargs,
    ):
        # === validation ===
        image_size = _pair(image_size, "image_size")
        if not isinstance(num_metadata, int) or isinstance(num_metadata, bool) or num_metadata < 0:
            raise ValueError(f"num_metadata must be an int >= 0, got {num_metadata!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if image_dense is not None and (not isinstance(image_dense, int) or image_dense < 1):
            raise ValueError(f"image_dense must be a positive int or None, got {image_dense!r}")
        metadata_units = _units(metadata_units, "metadata_units")
        head_units = _units(head_units, "head_units")
        if head_norm not in (None, "batch"):
            raise ValueError(f"head_norm must be None or 'batch', got {head_norm!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        if rescaling not in RESCALING:
            raise ValueError(f"rescaling must be one of {sorted(RESCALING)}, got {rescaling!r}")
        if isinstance(backbone, str) and backbone in GCVIT_VARIANTS and freeze is not None and (
            freeze not in GCVIT_FREEZE_POINTS + ("all",)
        ):
            raise ValueError(
                f"freeze {freeze!r} is not a GCViT freeze point; choose one of "
                f"{GCVIT_FREEZE_POINTS + ('all',)}"
            )
        backbone_kwargs = dict(backbone_kwargs or {})
        keras.activations.get(activation)  # raises on an unknown activation name

        # === layers ===
        backbone_model = _build_backbone(
            backbone, image_size, weights, drop_path_rate, backbone_kwargs
        )
        expected = backbone_model.input_shape[1:3]
        if None not in expected and tuple(expected) != image_size:
            raise ValueError(
                f"backbone {backbone_model.name!r} takes images of {tuple(expected)}, "
                f"not image_size {image_size}"
            )
        frozen = freeze_backbone(backbone_model, freeze)

        # === functional model ===
        image = keras.Input(shape=(*image_size, 3), name="image")
        x = image
        if RESCALING[rescaling] is not None:
            x = PixelNormalization(**RESCALING[rescaling], name="rescaling")(x)
        x = backbone_model(x)
        if len(x.shape) == 4:
            x = keras.layers.GlobalAveragePooling2D(name="image_pool")(x)
        elif len(x.shape) != 2:
            raise ValueError(
                f"backbone {backbone_model.name!r} outputs shape {x.shape}; expected a feature "
                f"map (B, h, w, C) or a vector (B, C)"
            )
        if image_dense is not None:
            x = keras.layers.Dense(image_dense, activation=activation, name="image_dense")(x)
        inputs = {"image": image}
        if num_metadata:
            metadata = keras.Input(shape=(num_metadata,), name="metadata")
            inputs["metadata"] = metadata
            m = metadata
            for i, units in enumerate(metadata_units):
                m = keras.layers.Dense(units, activation=activation, name=f"metadata_dense_{i}")(m)
            x = keras.layers.Concatenate(name="concat")([x, m])
        for i, units in enumerate(head_units):
            if head_norm:
                x = keras.layers.BatchNormalization(name=f"head_norm_{i}")(x)
            if dropout:
                x = keras.layers.Dropout(dropout, name=f"head_dropout_{i}")(x)
            x = keras.layers.Dense(units, activation=activation, name=f"head_dense_{i}")(x)
        if head_norm:
            x = keras.layers.BatchNormalization(name="output_norm")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name="output_dropout")(x)
        outputs = keras.layers.Dense(
            num_classes, activation=output_activation, name=output_name, dtype="float32"
        )(x)
        super().__init__(inputs=inputs, outputs=outputs, name=name, **kwargs)

        # === config ===
        self.backbone = backbone_model
        self.backbone_spec = backbone
        self.image_size = image_size
        self.num_metadata = num_metadata
        self.num_classes = num_classes
        self.freeze = freeze
        self.frozen_layers = frozen
        self.image_dense = image_dense
        self.metadata_units = metadata_units
        self.head_units = head_units
        self.head_norm = head_norm
        self.activation = activation
        self.dropout = float(dropout)
        self.rescaling = rescaling
        self.drop_path_rate = float(drop_path_rate)
        self.backbone_kwargs = backbone_kwargs
        self.output_activation = output_activation
        self.output_name = output_name

    def get_config(self):
        backbone = self.backbone_spec
        if isinstance(backbone, keras.Model):
            backbone = keras.saving.serialize_keras_object(backbone)
        return {
            "backbone": backbone,
            "image_size": list(self.image_size),
            "num_metadata": self.num_metadata,
            "num_classes": self.num_classes,
            "freeze": self.freeze,
            "image_dense": self.image_dense,
            "metadata_units": list(self.metadata_units),
            "head_units": list(self.head_units),
            "head_norm": self.head_norm,
            "activation": self.activation,
            "dropout": self.dropout,
            "rescaling": self.rescaling,
            "drop_path_rate": self.drop_path_rate,
            "backbone_kwargs": self.backbone_kwargs,
            "output_activation": self.output_activation,
            "output_name": self.output_name,
            "name": self.name,
            # the mixed-precision policy it was built under (mixed_float16 runs reload mixed,
            # with their loss-scale state), as Keras' own functional models keep it per layer
            "dtype_policy": self.dtype_policy.name,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if isinstance(config.get("backbone"), dict):
            config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        policy = config.pop("dtype_policy", None)
        if policy is None or policy == keras.config.dtype_policy().name:
            return cls(**config)
        previous = keras.config.dtype_policy()
        keras.config.set_dtype_policy(policy)
        try:
            return cls(**config)
        finally:
            keras.config.set_dtype_policy(previous)


def build_multi_input_classifier(
    backbone: str | keras.Model = "gcvit_tiny",
    image_size=224,
    num_metadata: int = 2,
    num_classes: int = 7,
    freeze: str | None = "levels_2",
    image_dense: int | None = 64,
    metadata_units: Sequence[int] = (16, 16),
    head_units: Sequence[int] = (256,),
    weights: str | None = None,
    **kwargs,
) -> MultiInputClassifier:
    """Build the paper's two-input classifier (inputs ``image`` and ``metadata``, output
    ``vertebrae``); defaults are the paper's (13,080,663 trainable / 14,683,998 non-trainable
    parameters at 224 px). See :class:`MultiInputClassifier` for every argument.

    Example:
    ```python
    model = build_multi_input_classifier(weights="imagenet")   # local timm file, never downloaded
    model.compile("adam", "binary_crossentropy")
    ```
    """
    return MultiInputClassifier(
        backbone=backbone, image_size=image_size, num_metadata=num_metadata,
        num_classes=num_classes, freeze=freeze, image_dense=image_dense,
        metadata_units=metadata_units, head_units=head_units, weights=weights, **kwargs,
    )


def build_image_classifier(
    backbone: str | keras.Model = "gcvit_tiny",
    image_size=224,
    num_classes: int = 7,
    freeze: str | None = "levels_2",
    image_dense: int | None = 64,
    head_units: Sequence[int] = (256,),
    weights: str | None = None,
    **kwargs,
) -> MultiInputClassifier:
    """Image-only classifier with the same head minus the metadata branch (paper's baselines).

    Example:
    ```python
    model = build_image_classifier("gcvit_xxtiny", image_size=64, freeze="none")
    probs = model.predict({"image": images_uint8})   # (B, 7)
    ```
    """
    kwargs.setdefault("name", "cspine_image_classifier")
    return MultiInputClassifier(
        backbone=backbone, image_size=image_size, num_metadata=0, num_classes=num_classes,
        freeze=freeze, image_dense=image_dense, metadata_units=(), head_units=head_units,
        weights=weights, **kwargs,
    )
