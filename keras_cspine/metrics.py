"""Deprecated path of :mod:`keras_cspine.stage1.metrics` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.metrics", "keras_cspine.stage1.metrics", globals())
