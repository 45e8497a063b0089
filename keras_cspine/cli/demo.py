"""``python -m keras_cspine demo``: the whole pipeline on a small synthetic dataset.

The command line of :mod:`keras_cspine.paper.demo` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from keras_cspine.cli import run_command
from keras_cspine.config import ConfigError
from keras_cspine.paper.demo import DemoSettings, run_demo
from keras_cspine.synthetic.study import PRESETS


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine demo``."""
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help="every step on 6 tiny studies in 2-3 minutes: checks that the "
                        "pipeline runs, no quality claim")  # fmt: skip
    parser.add_argument("--data", help="an RSNA-layout folder (the Kaggle data) instead of the "
                        "synthetic one; uses the paper's configurations")  # fmt: skip
    parser.add_argument("--studies", type=int, help=f"synthetic studies ({DemoSettings.studies})")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, help="stage 1 image size")
    parser.add_argument("--workers", type=int, help="processes for synth / prepare / export")
    parser.add_argument("--stage1-epochs", type=int)
    parser.add_argument("--detect-epochs", type=int)
    parser.add_argument("--detect-imgsz", type=int)
    parser.add_argument("--export-size", type=int)
    parser.add_argument("--export-roi-mm", type=float, help="spine window of the YOLO export, mm "
                        f"({DemoSettings.export_roi_mm:g}; 0: whole slices)")  # fmt: skip
    parser.add_argument("--roi-mm", type=float, help="spine window of the stage 1 images, mm "
                        f"({DemoSettings.roi_mm:g}; 0: whole slices, as the paper)")  # fmt: skip
    parser.add_argument("--holdout-fraction", type=float)


def run(args: argparse.Namespace) -> int:
    """Run ``demo`` from parsed arguments."""
    changes = {
        "studies": args.studies, "seed": args.seed, "preset": args.preset,
        "image_size": args.image_size, "workers": args.workers,
        "stage1_epochs": args.stage1_epochs, "detect_epochs": args.detect_epochs,
        "detect_imgsz": args.detect_imgsz, "export_size": args.export_size,
        "holdout_fraction": args.holdout_fraction,
    }  # fmt: skip
    changes = {k: v for k, v in changes.items() if v is not None}
    if args.export_roi_mm is not None:
        changes["export_roi_mm"] = args.export_roi_mm or None  # 0: whole slices
    if args.roi_mm is not None:
        changes["roi_mm"] = args.roi_mm or None
    if args.data and args.quick:
        raise ConfigError("demo: --quick runs on its own tiny synthetic studies; drop --data or --quick")
    try:  # values out of range stop the demo before any work, in one line
        if args.data:
            settings = DemoSettings.paper(**changes)
        else:
            settings = DemoSettings.quick(**changes) if args.quick else DemoSettings(**changes)
    except ValueError as err:
        raise ConfigError(f"demo: {err}") from None
    run_demo(args.out, settings, data=args.data)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine demo`` (also ``python -m keras_cspine.cli.demo``)."""
    return run_command("demo", argv)

if __name__ == "__main__":
    raise SystemExit(main())
