"""``python -m keras_cspine.pipeline INPUT --out OUT``: the same as ``python -m keras_cspine predict``."""

from keras_cspine.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
