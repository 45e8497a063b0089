"""Deprecated path of :mod:`keras_cspine.stage1.evaluate` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.evaluate", "keras_cspine.stage1.evaluate", globals())

if __name__ == "__main__":  # python -m keras_cspine.evaluate keeps working
    from keras_cspine.cli.evaluate import main

    raise SystemExit(main())
