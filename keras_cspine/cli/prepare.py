"""``python -m keras_cspine prepare``: build the slice index and the model-ready image cache.

The command line of :mod:`keras_cspine.data.prepare` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import run_command
from keras_cspine.data.prepare import prepare_dataset


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", help="RSNA-layout dataset folder (Kaggle input or synth output)")
    parser.add_argument("out", help="output folder for index.csv and the image cache")
    parser.add_argument("--size", type=int, default=224, help="model image side in pixels")
    parser.add_argument("--mode", default="bone", choices=["paper", "bone", "multiwindow"],
                        help="preprocessing: the paper's Algorithm 1 or HU windows")  # fmt: skip
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--studies", nargs="*", help="only these StudyInstanceUIDs")
    parser.add_argument("--limit", type=int, help="at most this many studies")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    parser.add_argument("--decoder", default="auto", choices=["auto", "pydicom", "dicomsdl"])
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="skip: record bad files in OUT/errors.csv and go on")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    summary = prepare_dataset(
        args.data_dir, args.out, size=args.size, mode=args.mode, split=args.split,
        studies=args.studies, limit=args.limit, workers=args.workers, decoder=args.decoder,
        on_error=args.on_error,
    )  # fmt: skip
    print(
        f"prepared {summary['studies']} studies in {args.out} "
        f"({summary['slices_processed_this_run']} slices this run, "
        f"{summary['seconds_this_run']} s, {summary['errors']} errors)"
    )
    if summary["errors"]:
        print(f"see {Path(args.out) / 'errors.csv'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine prepare`` (also ``python -m keras_cspine.cli.prepare``)."""
    return run_command("prepare", argv)

if __name__ == "__main__":
    raise SystemExit(main())
