"""``python -m keras_cspine report OUT``: draw the per-study reports of a ``predict`` output
(e.g. one made with ``--report none``) from its saved study JSON and images
(:func:`keras_cspine.pipeline.report.render_saved_reports`)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from keras_cspine.cli import run_command


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine report``."""
    parser.add_argument("out", help="the output folder of predict")
    parser.add_argument("--format", dest="fmt", choices=["html", "markdown"], default="html",
                        help="report format (default html)")  # fmt: skip
    parser.add_argument("--workers", type=int, default=1,
                        help="processes drawing the reports (0: this one; default 1)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """0 when every report was drawn, 1 otherwise (each failure named by its study)."""
    from pathlib import Path

    from keras_cspine.pipeline.report import render_saved_reports

    if args.workers < 0:
        raise argparse.ArgumentTypeError(f"--workers must be >= 0, got {args.workers}")
    done = render_saved_reports(args.out, fmt=args.fmt, workers=args.workers)
    print(f"[report] {len(done['reports'])} reports drawn in {Path(args.out) / 'reports'}")
    if done["reports"]:
        print(f"[report] index: {Path(args.out) / 'index.html'}")
    for uid, problem in done["failures"].items():
        print(f"[report] FAILED {uid}: {problem}")
    return 0 if not done["failures"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine report`` (also ``python -m keras_cspine.cli.report``)."""
    return run_command("report", argv)


if __name__ == "__main__":
    raise SystemExit(main())
