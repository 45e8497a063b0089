"""Deprecated path of :mod:`keras_cspine.stage1.models.weights` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.models.weights", "keras_cspine.stage1.models.weights", globals())
