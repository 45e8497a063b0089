"""Deprecated path of :mod:`keras_cspine.stage2.table3` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.table3", "keras_cspine.stage2.table3", globals())
