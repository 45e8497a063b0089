"""Deprecated path of :mod:`keras_cspine.stage1.sequence_model` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.sequence_model", "keras_cspine.stage1.sequence_model", globals())
