"""``python -m keras_cspine predict INPUT --out OUT``: two-stage inference from the command line
(:func:`keras_cspine.pipeline.predict.predict`)."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from keras_cspine.cli import data_header, run_command
from keras_cspine.cli.merge import SHARD_HELP, shard_arg
from keras_cspine.pipeline.config import PredictConfig
from keras_cspine.pipeline.predict import predict


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--limit 0`` would mean "no limit" by accident)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine predict``."""
    parser.add_argument("input", help="a study folder of .dcm slices, a folder of studies "
                        "(RSNA test_images) or an RSNA dataset root")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--stage1", help="stage 1 run directory or .keras (default: the newest "
                        "finished run in --runs)")  # fmt: skip
    parser.add_argument("--stage2", help="stage 2 run directory, .onnx or .pt (default: the "
                        "newest finished run in --runs)")  # fmt: skip
    parser.add_argument("--runs", default="runs", help="where default models are looked for")
    parser.add_argument("--config", help="a PredictConfig YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a setting (repeatable)")  # fmt: skip
    parser.add_argument("--no-gating", action="store_true",
                        help="run stage 2 on every slice, not only where stage 1 sees C1-C7")  # fmt: skip
    parser.add_argument("--no-sequence-model", action="store_true",
                        help="do not use the stage 1 run's sequence model (then its level "
                        "decoder, if any, reads the study)")  # fmt: skip
    parser.add_argument("--no-level-decoding", action="store_true",
                        help="do not use the stage 1 run's level decoder; with "
                        "--no-sequence-model: the per-slice probabilities (the paper)")  # fmt: skip
    parser.add_argument("--report", choices=["html", "markdown", "none"],
                        help="per-study report format (default html)")  # fmt: skip
    parser.add_argument("--stage1-engine", choices=["auto", "keras", "xla", "onnx", "onnx_int8",
                                                    "openvino", "openvino_bf16"],
                        help="how stage 1 runs (default auto: openvino_bf16 where the CPU has "
                        "bfloat16 units, else keras; xla, onnx, openvino: float32 within 1e-4 of "
                        "keras; onnx_int8: int8 weights; openvino_bf16: bfloat16)")  # fmt: skip
    parser.add_argument("--labels", help="a train.csv to evaluate the predictions against")
    parser.add_argument("--limit", type=positive_int, help="at most this many studies (>= 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--shard", type=shard_arg, metavar="i/n", help=SHARD_HELP)
    parser.add_argument("--no-merge", action="store_true",
                        help="with --shard: leave the merge to `keras-cspine merge OUT`")  # fmt: skip


def config_from_args(args: argparse.Namespace) -> PredictConfig:
    """The :class:`PredictConfig` of parsed ``predict`` arguments: ``--config`` and ``--set``,
    then the switches (``--no-gating``, ``--no-sequence-model``...)."""
    from keras_cspine.config import load_config

    config = load_config(PredictConfig, args.config, args.overrides)
    changes: dict[str, Any] = {}
    if args.no_gating:
        changes["gating"] = False
    if args.no_sequence_model:
        changes["sequence_model"] = False
    if args.no_level_decoding:
        changes["level_decoding"] = False
    if args.report:
        changes["report"] = args.report
    if getattr(args, "stage1_engine", None):
        changes["stage1_engine"] = args.stage1_engine
    return dataclasses.replace(config, **changes) if changes else config


def run(args: argparse.Namespace) -> int:
    """Run ``predict`` from parsed arguments; 0 when every study was read, 1 otherwise."""
    config = config_from_args(args)
    if args.shard is not None:
        from keras_cspine.pipeline.shards import predict_shard

        part = predict_shard(args.input, args.out, args.shard, stage1=args.stage1,
                             stage2=args.stage2, runs=args.runs, config=config, labels=args.labels,
                             limit=args.limit, merge=not args.no_merge, progress=not args.quiet)  # fmt: skip
        print(f"[predict] shard {args.shard.name}: {part['n_ok']}/{part['n_studies']} studies in "
              f"{Path(part['out'])}")  # fmt: skip
        if "merged" not in part:
            return 0 if part["n_failed"] == 0 else 1
        summary = part["merged"]
    else:
        summary = predict(args.input, args.out, stage1=args.stage1, stage2=args.stage2,
                          runs=args.runs, config=config, labels=args.labels, limit=args.limit,
                          progress=not args.quiet)  # fmt: skip
    if args.labels is not None:
        summary = {**summary, "labels": args.labels}
    print(summary_text(summary))
    return 0 if summary["n_failed"] == 0 else 1


def scored_slices(summary: Mapping[str, Any]) -> int | None:
    """The slices of the studies the evaluation scored (those of ``predictions.csv`` found in
    the labels), for the ``data:`` line; None when the files are not there to say."""
    import pandas as pd

    from keras_cspine.errors import CSpineDataError

    try:
        table = pd.read_csv(summary["files"]["predictions"], dtype={"StudyInstanceUID": str})
        from keras_cspine.io.rsna import read_train_csv

        labels = set(read_train_csv(summary["labels"]).StudyInstanceUID.astype(str))
    except (KeyError, OSError, ValueError, TypeError, CSpineDataError):
        return None
    return int(table.loc[table.StudyInstanceUID.isin(labels), "n_slices"].sum())


def summary_text(summary: Mapping[str, Any]) -> str:
    """A few lines saying what :func:`predict` did and where its outputs are."""
    seconds = summary["seconds"]
    lines = [
        f"[predict] {summary['n_ok']}/{summary['n_studies']} studies, {summary['n_slices']} "
        f"slices, stage 2 on {summary['n_gated']} ({(summary['gated_fraction'] or 0):.0%})",
        "[predict] seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()),
        f"[predict] submission: {summary['files']['submission']}",
    ]
    if "index" in summary["files"]:
        lines.append(f"[predict] reports: {summary['files']['index']}")
    if summary.get("n_reused") or summary.get("n_redone"):
        lines.append(f"[predict] {summary.get('n_reused', 0)} studies reused from earlier runs, "
                     f"{summary.get('n_redone', 0)} redone (other models or settings)")  # fmt: skip
    for warning in summary.get("warnings", []):
        lines.append(f"[predict] warning {warning['StudyInstanceUID']}: {warning['warning']}")
    for error in summary["errors"]:
        lines.append(f"[predict] FAILED {error['StudyInstanceUID'] or error['path']}: "
                     f"{error['problem']}")  # fmt: skip
    if "evaluation" in summary:
        ev = summary["evaluation"]
        auc = ev["mean_vertebra_auc"]
        lines.append(f"[predict] {data_header(summary['input'], ev['n_studies'], scored_slices(summary), 'slices')}")
        lines.append(
            f"[predict] RSNA weighted log loss {ev['rsna_weighted_log_loss']:.4f}, mean vertebra "
            f"AUC {'n/a' if auc is None else f'{auc:.3f}'}, patient AUC "
            f"{'n/a' if ev['patient_auc'] is None else format(ev['patient_auc'], '.3f')} "
            f"({ev['n_studies']} studies)"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine predict`` (also ``python -m keras_cspine.cli.predict``)."""
    return run_command("predict", argv)

if __name__ == "__main__":
    raise SystemExit(main())
