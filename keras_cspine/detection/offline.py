"""Deprecated path of :mod:`keras_cspine.stage2.offline` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.offline", "keras_cspine.stage2.offline", globals())
