"""``python -m keras_cspine evaluate``: stage 1: Tables 1-2 metrics and Figure 6 for a run.

The command line of :mod:`keras_cspine.stage1.evaluate` (its docstring is the command's description).
``evaluate RUN`` scores the run's test split; ``evaluate RUN --data PREP`` scores every labelled
study of the prepare folder PREP instead (refused when PREP holds studies of the run's train or
val split, unless ``--allow-overlap``), into ``RUN/evaluations/<PREP name>/`` (or ``--out``).
The first line printed is ``data: <path>  studies: N  slices: M``, as ``detect val`` and
``predict --labels`` print theirs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import data_header, run_command


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine evaluate``."""
    parser.add_argument("run_dir", help="a training run directory (with model.keras)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"),
                        help="the run's split to score (default test; not with --data)")  # fmt: skip
    parser.add_argument("--data", metavar="PREP",
                        help="a prepare folder: score every labelled study of it instead of a "
                        "split (any data, e.g. drawn with another seed)")  # fmt: skip
    parser.add_argument("--allow-overlap", action="store_true",
                        help="with --data: score it even when it holds studies the run was "
                        "trained or validated on")  # fmt: skip
    parser.add_argument("--out", help="with --data: where its tables go (default "
                        "RUN/evaluations/<PREP name>)")  # fmt: skip
    parser.add_argument("--prepared", metavar="PREP",
                        help="a prepare folder holding the split's studies (default: the "
                        "training one)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, help="prediction batch size")


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; prints the data line, then Tables 1 and 2."""
    from keras_cspine.stage1.evaluate import evaluate_run

    result = evaluate_run(args.run_dir, args.split, args.prepared, args.batch_size,
                          data=args.data, allow_overlap=args.allow_overlap, out_dir=args.out)  # fmt: skip
    print(data_header(result["data"], result["n_studies"], result["n_slices"], "slices"))
    if result["overlap"]:
        print(f"warning: {len(result['overlap'])} of these studies were seen in training "
              "(--allow-overlap)")  # fmt: skip
    where = Path(result["files"]["table1_row"]).parent
    print((where / "table1_row.md").read_text(encoding="utf-8"))
    print((where / "table2.md").read_text(encoding="utf-8"))
    print(f"[evaluate] wrote {', '.join(sorted(result['files'].values()))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine evaluate`` (also ``python -m keras_cspine.cli.evaluate``)."""
    return run_command("evaluate", argv)


if __name__ == "__main__":
    raise SystemExit(main())
