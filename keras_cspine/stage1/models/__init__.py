"""Stage 1 models (Section 2.5, Figures 2 and 5): the Keras 3 GCViT, its timm weight port, the
paper's two-input classifier, the image-only baselines and the one registry they are built by.

=====================  ==================================================================
module                 what it holds
=====================  ==================================================================
``registry``           :class:`ModelSpec`, ``REGISTRY``, ``register_model`` (the bottom)
``gcvit_presets``      GCViT variants' architecture and data settings
``weights``            timm GCViT state dicts -> Keras (NumPy/safetensors, no TensorFlow)
``pretrained``         the ImageNet weights files: where they are, fetch, add, checks
``gcvit``              the Keras 3 GCViT (registers ``gcvit_*``)
``baselines``          Keras Applications, ViT, Swin, metadata-only (registers them)
``classifier``         :class:`MultiInputClassifier`, the paper's head, freezing
``factory``            :func:`build_model` (any registered name), parameter counts
=====================  ==================================================================

Names are imported lazily, so that ``weights`` and ``pretrained`` can be used without importing
TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GCViT": "gcvit",
    "GCVIT_VARIANTS": "gcvit_presets",
    "IMAGENET_MEAN": "gcvit_presets",
    "IMAGENET_STD": "gcvit_presets",
    "PixelNormalization": "gcvit",
    "build_gcvit": "gcvit",
    "gcvit_geometry": "gcvit",
    "gcvit_xxtiny": "gcvit",
    "gcvit_xtiny": "gcvit",
    "gcvit_tiny": "gcvit",
    "gcvit_small": "gcvit",
    "gcvit_base": "gcvit",
    "MultiInputClassifier": "classifier",
    "build_multi_input_classifier": "classifier",
    "build_image_classifier": "classifier",
    "freeze_backbone": "classifier",
    "parameter_counts": "classifier",
    "register_backbone": "classifier",
    "available_backbones": "classifier",
    "GCVIT_FREEZE_POINTS": "classifier",
    "WeightsFileError": "weights",
    "load_gcvit_weights": "weights",
    "read_state_dict": "weights",
    "resolve_weights": "weights",
    "ModelSpec": "registry",
    "REGISTRY": "factory",
    "PAPER_PARAMETERS": "registry",
    "register_model": "registry",
    "get_spec": "factory",
    "available_models": "factory",
    "build_model": "factory",
    "count_parameters": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
