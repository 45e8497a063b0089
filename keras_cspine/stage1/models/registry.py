"""The model registry (Section 2.5, Table 1), as timm's ``register_model``: every network the
package builds by name, the paper's GCViT and every baseline alike, is a :class:`ModelSpec` here.

The model files register their own entries when imported (:mod:`~keras_cspine.stage1.models.gcvit`
its variants, :mod:`~keras_cspine.stage1.models.baselines` the Keras Applications, ViT, Swin and
the metadata-only control); :func:`keras_cspine.stage1.models.factory.build_model` builds any of
them. This module imports none of them: it is the bottom of ``stage1/models``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import keras

from keras_cspine.config import ConfigError

NUM_CLASSES = 7
IMAGE_MODES = ("image+metadata", "image", "metadata")

#: Table 1's parameter counts (trainable, non-trainable) of each row.
PAPER_PARAMETERS = {
    "Proposed (GCViT)": (13_080_663, 14_683_998),
    "ViT": (56_937_479, 30_764_544),
    "ConvNeXt": (9_686_535, 39_966_816),
    "InceptionV3": (526_535, 21_802_592),
    "ResNet152V2": (6_045_703, 52_812_288),
    "Swin": (49_899_081, 2_768),
}


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
        backbone: the image backbone's builder,
            ``builder(image_size=(h, w), weights=None, **backbone_kwargs) -> keras.Model`` mapping
            0-255 RGB images to a feature map or vector (None for ``metadata_only``).
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


#: Every registered model by name, in registration order.
REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to :data:`REGISTRY` (a name registered again is replaced); returns it."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"register_model takes a ModelSpec, got {spec!r}")
    if spec.inputs not in IMAGE_MODES:
        raise ValueError(f"{spec.name}: inputs must be one of {IMAGE_MODES}, got {spec.inputs!r}")
    REGISTRY[spec.name] = spec
    return spec


def available_models() -> list[str]:
    """Names accepted by :func:`keras_cspine.stage1.models.factory.build_model`."""
    return list(REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(REGISTRY)}") from None
