"""Deprecated path of :mod:`keras_cspine.stage2.yolo_dataset` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.yolo_dataset", "keras_cspine.stage2.yolo_dataset", globals())
