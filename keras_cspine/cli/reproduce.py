"""``python -m keras_cspine reproduce``: reproduce a paper table (table1, table3).

The command line of :mod:`keras_cspine.paper.reproduce` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keras_cspine.cli import run_command
from keras_cspine.paper.reproduce import TABLE1_MODELS, format_plan, reproduce_table1, table1_plan


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine reproduce``."""
    parser.add_argument("table", choices=("table1", "table3"), help="the paper table to rebuild")
    parser.add_argument("--data", help="RSNA-layout folder (or prepare/YOLO one)")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="table1: print each row's network, parameter counts (paper vs built), weights and "
        "recipe, and train nothing",
    )  # fmt: skip
    parser.add_argument("--out", help="output folder (default runs/<table>)")
    parser.add_argument(
        "--models", nargs="+",
        help=f"models to run (table1 default: {' '.join(TABLE1_MODELS)}; table3: "
        f"yolov8s yolov8m yolov5s yolov5m)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="config override for every row (table1: Stage1Config keys; table3: detect train keys)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, help="table3: epochs (paper 100)")
    parser.add_argument("--imgsz", type=int, help="table3: image size (default 640)")
    parser.add_argument("--batch", type=int, help="table3: batch size")
    parser.add_argument("--device", help="table3: device (cpu, 0, ...)")


def run(args: argparse.Namespace) -> int:
    """Run ``reproduce`` from parsed arguments."""
    out = Path(args.out or Path("runs") / args.table)
    if args.table == "table1" and args.dry_run:
        plan = table1_plan(args.models or TABLE1_MODELS, args.overrides)
        print(format_plan(plan))
        if args.data:
            print(f"[reproduce] data: {args.data} (not read by --dry-run)")
        return 0
    if args.dry_run:
        raise SystemExit("error: --dry-run: only table1 has a dry run")
    if not args.data:
        raise SystemExit(f"error: reproduce {args.table}: --data is required")
    if args.table == "table1":
        rows = reproduce_table1(args.data, out, args.models or TABLE1_MODELS, args.overrides)
        print((out / "table1.md").read_text(encoding="utf-8"))
        print(f"[reproduce] {len(rows)} rows -> {out / 'table1.csv'}")
        return 0
    from keras_cspine.stage2 import reproduce_table3

    kwargs: dict[str, Any] = {"train_overrides": tuple(args.overrides)}
    for key in ("epochs", "imgsz", "batch", "device"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    reproduce_table3(args.data, out, models=args.models, **kwargs)
    table = out / "table3.md"
    if table.is_file():
        print(table.read_text(encoding="utf-8"))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine reproduce`` (also ``python -m keras_cspine.cli.reproduce``)."""
    return run_command("reproduce", argv)

if __name__ == "__main__":
    raise SystemExit(main())
