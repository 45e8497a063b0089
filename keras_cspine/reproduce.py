"""Deprecated path of :mod:`keras_cspine.paper.reproduce` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.reproduce", "keras_cspine.paper.reproduce", globals())

if __name__ == "__main__":  # python -m keras_cspine.reproduce keeps working
    from keras_cspine.cli.reproduce import main

    raise SystemExit(main())
