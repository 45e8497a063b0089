"""Deprecated path of :mod:`keras_cspine.data.splits` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.splits", "keras_cspine.data.splits", globals())
