"""``python -m keras_cspine look``: figures of prepared slices with their labels and boxes, and Figure 3.

The command line of :mod:`keras_cspine.viz` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from keras_cspine.cli import run_command
from keras_cspine.viz import look


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prepared", help="a prepare output folder")
    parser.add_argument("out", help="folder for the figures")
    parser.add_argument("--slices", type=int, default=12, help="slices in the grid")
    parser.add_argument("--studies", type=int, default=3, help="sagittal overviews to draw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-csv",
        default=None,
        help="train.csv for Figure 3 (default: data_dir/train.csv of prepare.json)",
    )


def run(args: argparse.Namespace) -> int:
    train_csv = getattr(args, "train_csv", None)
    for path in look(args.prepared, args.out, args.slices, args.studies, args.seed, train_csv):
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine look`` (also ``python -m keras_cspine.cli.look``)."""
    return run_command("look", argv)

if __name__ == "__main__":
    raise SystemExit(main())
