"""Stage 1 models (paper Section 2.5): the Keras 3 GCViT, its timm weight port and the paper's
two-input vertebrae classifier.

Names are imported lazily, so that ``keras_cspine.stage1.models.weights`` (NumPy and safetensors only)
can be used without importing TensorFlow.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "GCViT": "gcvit",
    "GCVIT_VARIANTS": "gcvit",
    "IMAGENET_MEAN": "gcvit",
    "IMAGENET_STD": "gcvit",
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
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
