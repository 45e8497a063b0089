"""``python -m keras_cspine <command>``: see :mod:`keras_cspine.cli`."""

from keras_cspine.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
