"""Deprecated path of :mod:`keras_cspine.stage1.level_decoding` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.level_decoding", "keras_cspine.stage1.level_decoding", globals())
