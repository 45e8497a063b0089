"""Deprecated path of :mod:`keras_cspine.pipeline.report` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.report", "keras_cspine.pipeline.report", globals())
