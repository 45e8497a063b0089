"""Deprecated path of :mod:`keras_cspine.stage2.metrics` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.metrics", "keras_cspine.stage2.metrics", globals())
