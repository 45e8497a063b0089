"""Deprecated path of :mod:`keras_cspine.stage2.figures` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.figures", "keras_cspine.stage2.figures", globals())
