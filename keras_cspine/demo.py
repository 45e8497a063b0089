"""Deprecated path of :mod:`keras_cspine.paper.demo` (kept for one release)."""

from keras_cspine._deprecated import moved

moved("keras_cspine.demo", "keras_cspine.paper.demo", globals())

if __name__ == "__main__":  # python -m keras_cspine.demo keeps working
    from keras_cspine.cli.demo import main

    raise SystemExit(main())
