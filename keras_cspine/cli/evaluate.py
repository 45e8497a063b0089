"""``python -m keras_cspine evaluate``: stage 1: Tables 1-2 metrics and Figure 6 for a run.

The command line of :mod:`keras_cspine.stage1.evaluate` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import run_command
from keras_cspine.stage1.evaluate import evaluate_run


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine evaluate``."""
    parser.add_argument("run_dir", help="a training run directory (with model.keras)")
    parser.add_argument("--split", default="test", choices=("test", "val", "train"))
    parser.add_argument("--data", help="prepare folder holding the split's studies")
    parser.add_argument("--batch-size", type=int, help="prediction batch size")


def run(args: argparse.Namespace) -> int:
    """Run ``evaluate`` from parsed arguments; prints Tables 1 and 2."""
    result = evaluate_run(args.run_dir, args.split, args.data, args.batch_size)
    run_dir = Path(args.run_dir)
    print((run_dir / "table1_row.md").read_text(encoding="utf-8"))
    print((run_dir / "table2.md").read_text(encoding="utf-8"))
    print(f"[evaluate] wrote {', '.join(sorted(result['files'].values()))}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine evaluate`` (also ``python -m keras_cspine.cli.evaluate``)."""
    return run_command("evaluate", argv)

if __name__ == "__main__":
    raise SystemExit(main())
