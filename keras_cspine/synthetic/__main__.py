"""``python -m keras_cspine.synthetic OUT``: the same as ``python -m keras_cspine synth OUT``."""

from keras_cspine.cli.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
