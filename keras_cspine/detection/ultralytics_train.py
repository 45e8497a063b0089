"""Deprecated path of :mod:`keras_cspine.stage2.ultralytics_train` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.ultralytics_train", "keras_cspine.stage2.ultralytics_train", globals())
