"""Deprecated path of :mod:`keras_cspine.stage1.models.classifier` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.models.classifier", "keras_cspine.stage1.models.classifier", globals())
