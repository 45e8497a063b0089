"""Deprecated path of :mod:`keras_cspine.stage2.onnx_predictor` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.onnx_predictor", "keras_cspine.stage2.onnx_predictor", globals())
