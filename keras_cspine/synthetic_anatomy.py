"""Deprecated path of :mod:`keras_cspine.synthetic.anatomy` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.synthetic_anatomy", "keras_cspine.synthetic.anatomy", globals())
