"""``python -m keras_cspine prepare``: build the slice index and the model-ready image cache.

The command line of :mod:`keras_cspine.data.prepare` (its docstring is the command's description).
Argument values out of range are refused by argparse before any work (exit code 2); paths that
cannot serve raise ``CSpineDataError``, which the command line prints as ``error: <path>: <problem>``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import run_command
from keras_cspine.cli.merge import SHARD_HELP, shard_arg
from keras_cspine.data.prepare import MAX_ROI_MM, MAX_SIZE, MIN_ROI_MM, MIN_SIZE, prepare_dataset


def _whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _size(text: str) -> int:
    value = _whole_number(text)
    if not MIN_SIZE <= value <= MAX_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be from {MIN_SIZE} to {MAX_SIZE} pixels, got {value}"
        )
    return value


def _roi_mm(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length in mm") from None
    if not MIN_ROI_MM <= value <= MAX_ROI_MM:
        raise argparse.ArgumentTypeError(f"must be from {MIN_ROI_MM:g} to {MAX_ROI_MM:g} mm, "
                                         f"got {text}")  # fmt: skip
    return value


def _workers(text: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"must be >= 1, got {value} (leave --workers out, or give --workers all, to use all "
            f"{os.cpu_count() or 1} cores)"
        )
    return value


def _limit(text: str) -> int:
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (leave --limit out for every study)")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data_dir", help="RSNA-layout dataset folder (Kaggle input or synth output)")
    parser.add_argument("out", help="output folder for index.csv and the image cache")
    parser.add_argument("--size", type=_size, default=224,
                        help=f"model image side in pixels, {MIN_SIZE} to {MAX_SIZE} (default 224)")  # fmt: skip
    parser.add_argument("--mode", default="bone", choices=["paper", "bone", "multiwindow"],
                        help="preprocessing: the paper's Algorithm 1 or HU windows")  # fmt: skip
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--roi-mm", type=_roi_mm, metavar="MM",
                        help="render only the square window of MM around each study's cervical "
                             "column (beyond the paper; default: the whole slice)")  # fmt: skip
    parser.add_argument("--studies", nargs="+", metavar="UID", help="only these StudyInstanceUIDs")
    parser.add_argument("--limit", type=_limit, help="at most this many studies (>= 1)")
    parser.add_argument("--workers", type=_workers, metavar="N|all",
                        help="processes, >= 1 (default: all, one per core); 1 runs in this process")  # fmt: skip
    parser.add_argument("--decoder", default="auto", choices=["auto", "pydicom", "dicomsdl"])
    parser.add_argument("--on-error", default="raise", choices=["raise", "skip"],
                        help="skip: record bad files in OUT/errors.csv and go on")  # fmt: skip
    parser.add_argument("--shard", type=shard_arg, metavar="i/n", help=SHARD_HELP)
    parser.add_argument("--no-merge", action="store_true",
                        help="with --shard: leave the merge to `keras-cspine merge OUT`")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    options = dict(size=args.size, mode=args.mode, split=args.split, roi_mm=args.roi_mm,
                   studies=args.studies,
                   limit=args.limit, workers=args.workers, decoder=args.decoder,
                   on_error=args.on_error)  # fmt: skip
    where = args.out
    if args.shard is None:
        summary = prepare_dataset(args.data_dir, args.out, **options)
    else:
        from keras_cspine.data.prepare_shards import prepare_shard
        from keras_cspine.data.shards import part_dir

        summary = prepare_shard(args.data_dir, args.out, args.shard, merge=not args.no_merge,
                                **options)  # fmt: skip
        where = part_dir(args.out, args.shard)
    print(
        f"prepared {summary['studies']} studies in {where} "
        f"({summary['slices_processed_this_run']} slices this run, "
        f"{summary['seconds_this_run']} s, {summary['errors']} errors)"
    )
    if summary["errors"]:
        print(f"see {Path(where) / 'errors.csv'}")
    if "merged" in summary:
        merged = summary["merged"]
        print(f"merged {merged['shards']['count']} shards into {args.out}: {merged['studies']} "
              f"studies, {merged['errors']} errors")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine prepare`` (also ``python -m keras_cspine.cli.prepare``)."""
    return run_command("prepare", argv)


if __name__ == "__main__":
    raise SystemExit(main())
