"""Deprecated path of :mod:`keras_cspine.cli.detect` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.detection.cli", "keras_cspine.cli.detect", globals())

if __name__ == "__main__":  # python -m keras_cspine.detection.cli keeps working
    from keras_cspine.cli.detect import main

    raise SystemExit(main())
