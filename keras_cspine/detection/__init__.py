"""Deprecated path of :mod:`keras_cspine.stage2` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection", "keras_cspine.stage2", globals())
