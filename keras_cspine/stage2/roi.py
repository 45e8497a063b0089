"""Deprecated path of :mod:`keras_cspine.data.roi` (kept for one release): both stages crop to
the spine window, so it lives with the rest of the slice preprocessing."""

from keras_cspine._deprecated import moved

moved("keras_cspine.stage2.roi", "keras_cspine.data.roi", globals())
