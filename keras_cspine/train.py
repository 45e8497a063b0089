"""Deprecated path of :mod:`keras_cspine.stage1.train` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.train", "keras_cspine.stage1.train", globals())

if __name__ == "__main__":  # python -m keras_cspine.train keeps working
    from keras_cspine.cli.train import main

    raise SystemExit(main())
