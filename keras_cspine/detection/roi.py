"""Deprecated path of :mod:`keras_cspine.data.roi` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.roi", "keras_cspine.data.roi", globals())
