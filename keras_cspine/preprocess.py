"""Deprecated path of :mod:`keras_cspine.data.preprocess` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.preprocess", "keras_cspine.data.preprocess", globals())
