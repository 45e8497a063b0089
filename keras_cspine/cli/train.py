"""``python -m keras_cspine train``: stage 1: train the vertebrae classifier (GCViT or baseline).

The command line of :mod:`keras_cspine.stage1.train` (its docstring is the command's description).
On several machines (``--set train.strategy=multi_worker`` and ``TF_CONFIG``, see
:mod:`keras_cspine.stage1.distribute`) every worker runs the same command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import run_command
from keras_cspine.stage1.config import (
    DEFAULT_CONFIG,
    load_stage1_config,
)
from keras_cspine.stage1.runs import TENSORBOARD_DIR
from keras_cspine.stage1.train import train_stage1


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine train``."""
    parser.add_argument("data", help="a prepare folder (index.csv + cache/) or an RSNA folder")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG,
        help=f"config file or bundled name (default {DEFAULT_CONFIG}; paper rows: stage1_<model>)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    parser.add_argument("--prepared-dir", help="where to prepare a raw RSNA folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a finished run in --run-dir"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-batch progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments."""
    config = load_stage1_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    summary = train_stage1(
        config, args.data, run_dir, prepared_dir=args.prepared_dir,
        overwrite=args.overwrite, verbose=2 if args.quiet else "auto",
    )  # fmt: skip
    if "worker" in summary:  # a non-chief worker of a multi-worker run: the chief has the run
        print(f"[train] {config.name}: {summary['worker']} of {summary['workers']} workers done, "
              f"{summary.get('epochs_run', 0)} epoch(s) trained here, {summary.get('steps_per_epoch', 0)} "
              f"steps each; the chief writes the run directory")  # fmt: skip
        return 0
    line = f"[train] {config.name}: best val F1 {summary['best_val_f1_score']:.4f}"
    if "evaluation" in summary:
        ev = summary["evaluation"]["metrics"]
        line += (
            f"; {summary['evaluation']['split']} macro F1 {ev['macro_f1']:.4f}, "
            f"EMR {ev['exact_match_ratio']:.4f}, coverage {ev['coverage_error']:.3f}"
        )
        for key, what in (("metrics_level_decoded", "level-decoded"),
                          ("metrics_sequence_model", "sequence model")):
            extra = summary["evaluation"].get(key)
            if extra:
                line += (f" ({what}: macro F1 {extra['macro_f1']:.4f}, "
                         f"EMR {extra['exact_match_ratio']:.4f})")  # fmt: skip
    print(f"{line}; run directory {run_dir}")
    if (run_dir / TENSORBOARD_DIR).is_dir():  # written when the tensorboard package is installed
        print(f"[train] tensorboard --logdir {run_dir / TENSORBOARD_DIR}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine train`` (also ``python -m keras_cspine.cli.train``)."""
    return run_command("train", argv)

if __name__ == "__main__":
    raise SystemExit(main())
