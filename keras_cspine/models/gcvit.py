"""Deprecated path of :mod:`keras_cspine.stage1.models.gcvit` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.models.gcvit", "keras_cspine.stage1.models.gcvit", globals())
