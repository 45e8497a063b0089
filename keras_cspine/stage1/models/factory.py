"""Build any registered model by name (timm's ``create_model``): :func:`build_model`, and the
parameter counts of Table 1 (Section 2.5).

Every model is a :class:`~keras_cspine.stage1.models.classifier.MultiInputClassifier` (the
GCViT ones with their metadata branch, the image-only baselines without it) except the
``metadata_only`` control, so all share one head and one saved format.
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
import numpy as np

from keras_cspine.stage1.models.baselines import (  # noqa: F401 - re-exported
    ImagePreprocessing,
    WeightsNotFoundError,
    build_metadata_only,
)
from keras_cspine.stage1.models.classifier import (
    build_image_classifier,
    build_multi_input_classifier,
)
from keras_cspine.stage1.models.registry import (  # noqa: F401 - re-exported
    NUM_CLASSES,
    PAPER_PARAMETERS,
    REGISTRY,
    ModelSpec,
    available_models,
    get_spec,
    register_model,
)

__all__ = [
    "REGISTRY",
    "ModelSpec",
    "available_models",
    "build_model",
    "count_parameters",
    "frozen_random_problem",
    "get_spec",
]


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
        model = build_metadata_only(image_size, num_classes, **kwargs)
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
