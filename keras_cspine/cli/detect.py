"""``python -m keras_cspine detect <step>``: stage 2 of the paper (Section 2.6; Table 3, Section 3).

Steps:
  export DATA_DIR OUT     RSNA-layout folder -> YOLO dataset (images, labels, data.yaml, manifest)
  train DATA              train a YOLO model (random init from its .yaml, or --weights local.pt)
  val WEIGHTS DATA        Table 3 metrics, cross-checked mAP, confusion matrix, prediction grid
  onnx WEIGHTS            export to ONNX for the torch-free predictor
  predict MODEL.onnx IMG  boxes with onnxruntime only (no torch in the process)
  table3 DATA --out OUT   train and evaluate YOLOv8s/m, YOLOv5s/m; write Table 3

Ultralytics runs offline and safe (see keras_cspine.stage2.offline): a .pt is loaded only if it
holds nothing but model classes (else "error: FILE: refuses to load ..."), YOLO label caches
(labels/*.cache) are never read and data.yaml download scripts never run. This module imports
torch only in the steps that need it, and never TensorFlow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import data_header, run_command


def _config_options(parser: argparse.ArgumentParser, bundled: str) -> None:
    parser.add_argument("--config", help=f"YAML config file or bundled name (e.g. {bundled})")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value (repeatable)")  # fmt: skip


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``detect`` steps to ``parser``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    steps = parser.add_subparsers(dest="detect_step", metavar="STEP", required=True)

    p = steps.add_parser("export", help="RSNA-layout folder -> YOLO dataset")
    p.add_argument("data_dir", help="RSNA-layout dataset folder (Kaggle input or synth output)")
    p.add_argument("out", help="output folder of the YOLO dataset")
    _config_options(p, "detect_export")
    p.add_argument("--size", type=int, help="image side in pixels (default 512)")
    p.add_argument("--mode", choices=["bone", "multiwindow", "paper"], help="window mode")
    p.add_argument("--roi-mm", type=float, help="render only a square window of this many mm "
                   "around the cervical column (default: the whole slice)")  # fmt: skip
    p.add_argument("--negatives", type=int, help="number of negative slices (default: sized "
                   "by --negative-ratio)")  # fmt: skip
    p.add_argument("--negative-ratio", type=float, help="negatives per boxed slice (0.15)")
    p.add_argument("--val-fraction", type=float)
    p.add_argument("--test-fraction", type=float)
    p.add_argument("--holdout", action="store_true", default=None,
                   help="every study in the val split: an independent test set for `detect val`")
    p.add_argument("--seed", type=int)
    p.add_argument("--on-error", choices=["raise", "skip"],
                   help="skip: record bad boxes / slices in OUT/errors.csv and go on")  # fmt: skip
    p.add_argument("--workers", type=int, help="rendering processes")
    p.add_argument("--decoder", choices=["auto", "pydicom", "dicomsdl"])
    p.add_argument("--overwrite", action="store_true", help="replace an export with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = steps.add_parser("train", help="train a YOLO detector (offline)")
    p.add_argument("data", help="a YOLO export folder or its data.yaml")
    p.add_argument("--out", help="run folder (default runs/detect/<model>)")
    _config_options(p, "detect_train")
    p.add_argument("--model", help="yolov8n|s|m|l|x, yolov5n|s|m|l|x, or a model .yaml")
    p.add_argument("--weights", help="start from this local .pt (never downloaded)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--device", help="cpu, 0, 0,1, mps ...")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="dataloader workers")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX export")
    p.add_argument("--overwrite", action="store_true", help="replace a run with another config")

    p = steps.add_parser("val", help="Table 3 metrics of trained weights, cross-checked")
    p.add_argument("weights", help="a trained .pt")
    p.add_argument("data", help="a YOLO export folder or its data.yaml")
    p.add_argument("--out", help="output folder (default: <weights folder>/../val_<split>)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument("--imgsz", type=int)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--conf", type=float, default=0.001)
    p.add_argument("--iou", type=float, default=0.7)

    p = steps.add_parser("onnx", help="export trained weights to ONNX")
    p.add_argument("weights", help="a trained .pt")
    p.add_argument("--out", help="the .onnx path (default beside the weights)")
    p.add_argument("--imgsz", type=int)

    p = steps.add_parser("predict", help="boxes from an ONNX model with onnxruntime (no torch)")
    p.add_argument("model", help="an .onnx exported by `detect onnx`")
    p.add_argument("images", nargs="+", help="image files (PNG/JPEG, as in the export)")
    p.add_argument("--out", help="write the boxes as JSON here (default: print)")
    p.add_argument("--conf", type=float, default=0.25)
    p.add_argument("--iou", type=float, default=0.7)

    p = steps.add_parser("table3", help="train and evaluate the four models of Table 3")
    p.add_argument("data", help="RSNA-layout folder, or a finished YOLO export")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--models", nargs="+", default=None, help="default: yolov8s yolov8m yolov5s "
                   "yolov5m")  # fmt: skip
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-size", type=int, help="image size of the YOLO export")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="DetectTrainConfig override for every model (repeatable)")  # fmt: skip


def _resolve(cls, args: argparse.Namespace, flags: dict):
    """Config = defaults, then --config file, then --set overrides, then explicit flags."""
    from keras_cspine.config import load_config

    config = load_config(cls, args.config, overrides=args.set)
    given = {k: v for k, v in flags.items() if v is not None}
    return dataclasses.replace(config, **given) if given else config


def _run_export(args) -> int:
    from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset

    config = _resolve(ExportConfig, args, {
        "size": args.size, "mode": args.mode, "roi_mm": args.roi_mm, "negatives": args.negatives,
        "negative_ratio": args.negative_ratio, "val_fraction": args.val_fraction,
        "test_fraction": args.test_fraction, "holdout": args.holdout, "seed": args.seed,
        "on_error": args.on_error,
        "workers": args.workers, "decoder": args.decoder,
    })  # fmt: skip
    summary = export_yolo_dataset(
        args.data_dir, args.out, config, overwrite=args.overwrite, progress=not args.quiet
    )
    counts = summary["counts"]
    parts = ", ".join(
        f"{s}: {c['images']} images ({c['positives']} with {c['instances']} boxes, "
        f"{c['negatives']} negatives)"
        for s, c in counts.items()
        if c["images"]
    )
    print(f"YOLO dataset in {args.out}: {parts}; {summary['errors']} errors")
    if summary["errors"]:
        print(f"see {Path(args.out) / 'errors.csv'}")
    return 0


def _run_train(args) -> int:
    from keras_cspine.stage2.ultralytics_train import DetectTrainConfig, train_detector

    config = _resolve(DetectTrainConfig, args, {
        "model": args.model, "weights": args.weights, "epochs": args.epochs,
        "imgsz": args.imgsz, "batch": args.batch, "device": args.device, "seed": args.seed,
        "workers": args.workers, "onnx": False if args.no_onnx else None,
    })  # fmt: skip
    out = args.out or str(Path("runs") / "detect" / config.display_name)
    summary = train_detector(args.data, out, config, overwrite=args.overwrite)
    _print_metrics(summary)
    print(f"run folder: {out}")
    return 0


def _print_metrics(summary: dict) -> None:
    cross = summary["cross_check"]
    print(
        f"{summary['model']}: {summary['images']} images, {summary['instances']} instances; "
        f"P {summary['precision']:.3f} R {summary['recall']:.3f} "
        f"mAP50 {summary['mAP50']:.3f} mAP50-95 {summary['mAP50-95']:.3f} "
        f"(mAP50 ours {cross['mAP50_ours']:.3f}, pycocotools {cross['mAP50_pycocotools']:.3f})"
    )


def _run_val(args) -> int:
    from keras_cspine.stage2.ultralytics_train import validate_detector

    out = args.out or str(Path(args.weights).resolve().parent.parent / f"val_{args.split}")
    summary = validate_detector(
        args.weights, args.data, out, split=args.split, imgsz=args.imgsz, batch=args.batch,
        device=args.device, conf=args.conf, iou=args.iou,
    )  # fmt: skip
    print(data_header(Path(summary["data"]).parent, _export_studies(summary["data"], args.split),
                      summary["images"], "images"))  # fmt: skip
    _print_metrics(summary)
    print(f"metrics and figures in {out}")
    return 0


def _export_studies(data_yaml: str, split: str) -> int | None:
    """Studies of a split of a YOLO export, from its ``manifest.csv`` (None without one)."""
    import csv

    manifest = Path(data_yaml).parent / "manifest.csv"
    try:
        with open(manifest, newline="", encoding="utf-8") as handle:
            return len({row["StudyInstanceUID"] for row in csv.DictReader(handle)
                        if row.get("split") == split})  # fmt: skip
    except (OSError, KeyError, csv.Error):
        return None


def _run_onnx(args) -> int:
    from keras_cspine.stage2.ultralytics_train import export_onnx

    print(export_onnx(args.weights, args.out, imgsz=args.imgsz))
    return 0


def _run_predict(args) -> int:
    import numpy as np
    from PIL import Image

    from keras_cspine.stage2.onnx_predictor import OnnxDetector
    from keras_cspine.utils import write_json

    detector = OnnxDetector(args.model, conf=args.conf, iou=args.iou)
    results = {}
    for path in args.images:
        with Image.open(path) as handle:
            image = np.asarray(handle.convert("RGB"))
        found = detector.predict(image)
        results[path] = {
            "boxes_xyxy": found.boxes.round(2).tolist(),
            "scores": found.scores.round(4).tolist(),
            "classes": found.classes.tolist(),
        }
    if args.out:
        write_json(args.out, results)
    else:
        print(json.dumps(results, indent=1))
    return 0


def _run_table3(args) -> int:
    from keras_cspine.stage2.table3 import TABLE3_MODELS, reproduce_table3
    from keras_cspine.stage2.yolo_dataset import ExportConfig

    export = ExportConfig(size=args.export_size, seed=args.seed) if args.export_size else None
    rows = reproduce_table3(
        args.data, args.out, models=args.models or TABLE3_MODELS, epochs=args.epochs,
        imgsz=args.imgsz, batch=args.batch, device=args.device, seed=args.seed, export=export,
        train_overrides=args.set,
    )  # fmt: skip
    print((Path(args.out) / "table3.md").read_text())
    return 0 if rows else 1


STEPS = {
    "export": _run_export,
    "train": _run_train,
    "val": _run_val,
    "onnx": _run_onnx,
    "predict": _run_predict,
    "table3": _run_table3,
}


def run(args: argparse.Namespace) -> int:
    """Run the chosen ``detect`` step."""
    return int(STEPS[args.detect_step](args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine detect`` (also ``python -m keras_cspine.cli.detect``)."""
    return run_command("detect", argv)

if __name__ == "__main__":
    raise SystemExit(main())
