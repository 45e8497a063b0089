"""Deprecated path of :mod:`keras_cspine.stage1.models.factory` (build_model) and baselines (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.models.baselines", "keras_cspine.stage1.models.factory", globals())
