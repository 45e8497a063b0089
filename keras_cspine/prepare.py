"""Deprecated path of :mod:`keras_cspine.data.prepare` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.prepare", "keras_cspine.data.prepare", globals())

if __name__ == "__main__":  # python -m keras_cspine.prepare keeps working
    from keras_cspine.cli.prepare import main

    raise SystemExit(main())
