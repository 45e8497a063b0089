"""``python -m keras_cspine synth``: write a synthetic dataset in the RSNA 2022 layout.

The command line of :mod:`keras_cspine.synthetic.dataset` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from keras_cspine.cli import run_command
from keras_cspine.errors import CSpineDataError
from keras_cspine.synthetic.dataset import generate_dataset, load_manifest
from keras_cspine.synthetic.study import PRESETS


# -- command line ------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Arguments of ``python -m keras_cspine synth``."""
    parser.add_argument("out", help="output folder (RSNA layout)")
    parser.add_argument("--studies", type=int, default=8, help="training studies (default 8)")
    parser.add_argument("--test-studies", type=int, default=None,
                        help="unlabelled test studies (default studies//4, 1..3)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small",
                        help="tiny (tests), small (demo, default) or full (512 px, realistic)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")
    parser.add_argument("--segmentation-fraction", type=float, default=1.0,
                        help="share of training studies with a segmentation (default 1)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier synthetic dataset in OUT")  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``synth`` from parsed arguments; 0 on success, 2 on bad input."""
    start = time.perf_counter()
    try:
        out = generate_dataset(
            args.out, n_studies=args.studies, seed=args.seed, preset=args.preset,
            n_test=args.test_studies, workers=args.workers, overwrite=args.overwrite,
            progress=not args.quiet, segmentation_fraction=args.segmentation_fraction,
        )  # fmt: skip
    except (CSpineDataError, ValueError) as exc:
        print(f"synth: error: {exc}", file=sys.stderr)
        return 2
    manifest = load_manifest(out)
    fractured = sum(s["labels"]["patient_overall"] for s in manifest["studies"]
                    if s["split"] == "train")  # fmt: skip
    print(f"wrote {manifest['n_train']} train ({fractured} fractured) and {manifest['n_test']} "
          f"test studies ({args.preset}) to {out} in {time.perf_counter() - start:.1f} s")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine synth`` (also ``python -m keras_cspine.cli.synth``)."""
    return run_command("synth", argv)

if __name__ == "__main__":
    raise SystemExit(main())
