"""Deprecated path of :mod:`keras_cspine.stage1.models` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.models", "keras_cspine.stage1.models", globals())
