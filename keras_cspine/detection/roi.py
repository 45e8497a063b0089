"""Deprecated path of :mod:`keras_cspine.stage2.roi` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.roi", "keras_cspine.stage2.roi", globals())
