"""Stage 2 training, validation and ONNX export with Ultralytics YOLO (paper Section 2.6, Table 3).

The paper trains YOLOv8s/m and YOLOv5s/m for 100 epochs on the fracture boxes. Here:

- :func:`train_detector`: a model built from Ultralytics' architecture ``.yaml`` (random init, no
  download) or from a local ``.pt`` the user supplies; epochs, image size, batch, device and seed
  from :class:`DetectTrainConfig`; the run directory holds the resolved ``config.yaml``,
  Ultralytics' own outputs (``weights/``, ``results.csv``), ``metrics.json``, the figures and
  ``weights/best.onnx``. A killed run resumes from ``weights/last.pt``.
- :func:`validate_detector`: Ultralytics' validation (precision, recall, mAP50, mAP50-95 = one
  Table 3 row) with its predictions saved, then the same predictions scored again by
  ``keras_cspine.stage2.metrics`` (own implementation) and by pycocotools, the detection
  confusion matrix and a grid of predicted against true boxes.
- :func:`export_onnx`: the ONNX file that ``onnx_predictor.OnnxDetector`` runs without torch.

Note: Ultralytics' "YOLOv5" (``yolov5s.yaml``) is its anchor-free YOLOv5u variant (YOLOv5's
backbone and neck with YOLOv8's decoupled, anchor-free head), not the original anchor-based one.

Every ``.pt`` is opened by :func:`load_yolo` (``offline.safe_load_checkpoint``: no arbitrary
unpickling; a file naming any other global is refused); the loads Ultralytics makes by itself
(resume, validation after training) go through the same function, and label caches are never
read (``offline.install_guards``).

This module imports torch (through Ultralytics, always via ``offline.import_ultralytics``): run it
in a process that has not imported TensorFlow, e.g. ``python -m keras_cspine detect ...``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage2 import metrics as dm
from keras_cspine.stage2.offline import (
    import_ultralytics,
    preloaded_checkpoint,
    safe_load_checkpoint,
)
from keras_cspine.stage2.yolo_dataset import (
    EXPORT_METADATA_KEY,
    export_image_settings,
    label_boxes_xyxy,
)
from keras_cspine.utils import atomic_path, write_json

#: Architectures built from Ultralytics' bundled .yaml files (random initialisation).
MODEL_NAMES = tuple(f"yolov{v}{s}" for v in (8, 5) for s in "nsmlx")

#: Ultralytics train arguments that keras_cspine sets itself (not allowed in ``extra``).
RESERVED_ARGS = frozenset(
    {"data", "model", "epochs", "imgsz", "batch", "device", "seed", "workers", "patience",
     "optimizer", "deterministic", "plots", "amp", "project", "name", "exist_ok", "resume"}
)  # fmt: skip


@dataclass(frozen=True)
class DetectTrainConfig:
    """Settings of one detector training (``configs/detect_train*.yaml``; ``--set key=value``).

    Args:
        model: an architecture of :data:`MODEL_NAMES` (built from Ultralytics' .yaml, random
            init) or the path of a local model .yaml.
        weights: a local ``.pt`` to start from (its own architecture); never downloaded.
        epochs, imgsz, batch, device, seed, workers, patience, optimizer, deterministic: as
            Ultralytics' train arguments (paper: 100 epochs).
        plots: let Ultralytics draw its own plots too.
        val_conf, val_iou: confidence and NMS IoU of the final validation (Ultralytics' 0.001 /
            0.7 defaults for mAP).
        onnx: export the best weights to ONNX after training.
        nbs, scale, mosaic, close_mosaic: Ultralytics' nominal batch size (gradients are
            accumulated up to it: with ``batch`` 8 and the default 64, one optimizer step per 8
            batches), zoom augmentation, mosaic probability and mosaic-free final epochs;
            None keeps Ultralytics' defaults (64, 0.5, 1.0, 10).
        cos_lr, warmup_epochs: cosine instead of linear learning-rate decay, and the warm-up
            length in epochs (fractions allowed); None keeps Ultralytics' defaults (False, 3).
        extra: further Ultralytics train arguments (e.g. ``lr0: 0.01``); they win over the
            fields above.
    """

    model: str = "yolov8s"
    weights: str | None = None
    epochs: int = 100
    imgsz: int = 640
    batch: int = 16
    device: str = "cpu"
    seed: int = 0
    workers: int = 2
    patience: int = 100
    optimizer: str = "auto"
    deterministic: bool = True
    plots: bool = True
    val_conf: float = 0.001
    val_iou: float = 0.7
    onnx: bool = True
    nbs: int | None = None
    scale: float | None = None
    mosaic: float | None = None
    close_mosaic: int | None = None
    cos_lr: bool | None = None
    warmup_epochs: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.weights is None and self.model not in MODEL_NAMES and not self.model.endswith(
            (".yaml", ".yml")
        ):
            raise ValueError(
                f"model must be one of {list(MODEL_NAMES)} or a .yaml path, got {self.model!r}"
            )
        if self.weights is not None and not str(self.weights).endswith(".pt"):
            raise ValueError(f"weights must be a local .pt file, got {self.weights!r}")
        for name in ("epochs", "imgsz", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.imgsz % 32:
            raise ValueError(f"imgsz must be a multiple of 32 (the YOLO stride), got {self.imgsz!r}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers!r}")
        ranges = (("nbs", 1, None), ("scale", 0.0, None), ("mosaic", 0.0, 1.0),
                  ("close_mosaic", 0, None), ("warmup_epochs", 0.0, None))  # fmt: skip
        for name, low, high in ranges:
            value = getattr(self, name)
            if value is not None and (value < low or (high is not None and value > high)):
                raise ValueError(f"{name} must be in [{low}, {high or 'inf'}], got {value!r}")
        if self.cos_lr is not None and not isinstance(self.cos_lr, bool):
            raise ValueError(f"cos_lr must be true, false or None, got {self.cos_lr!r}")
        reserved = sorted(set(self.extra) & RESERVED_ARGS)
        if reserved:
            raise ValueError(f"extra may not set {reserved}: they are fields of this config")

    def hyperparameters(self) -> dict[str, Any]:
        """The Ultralytics train arguments set by the optional fields, then ``extra``."""
        fields = ("nbs", "scale", "mosaic", "close_mosaic", "cos_lr", "warmup_epochs")
        chosen = {k: getattr(self, k) for k in fields if getattr(self, k) is not None}
        return {**chosen, **self.extra}

    @property
    def display_name(self) -> str:
        return Path(self.weights).stem if self.weights else Path(self.model).stem


def load_yolo(weights: str | os.PathLike, missing: str = "weights file not found"):
    """An Ultralytics ``YOLO`` of a local ``.pt``, read by ``offline.safe_load_checkpoint``.

    The checkpoint is loaded once, without unpickling anything outside the allow-list, and
    handed to Ultralytics as loaded (it never reads the file itself). Never downloads.

    Raises:
        CSpineDataError: naming the file: ``missing`` (not found), or not a safe checkpoint.
    """
    weights = Path(weights).expanduser()
    if not weights.is_file():  # Ultralytics would try to download a missing .pt: refuse
        raise CSpineDataError(weights, missing)
    import_ultralytics()
    from ultralytics import YOLO

    checkpoint = safe_load_checkpoint(weights)
    with preloaded_checkpoint(weights, checkpoint):
        return YOLO(str(weights))


def resolve_data_yaml(data: str | os.PathLike) -> Path:
    """A ``data.yaml`` path, or an export folder holding one; checked to be a detection dataset."""
    path = Path(data)
    if path.is_dir():
        path = path / "data.yaml"
    if not path.is_file():
        raise CSpineDataError(path, "no YOLO data.yaml (run `detect export` first)")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CSpineDataError(path, f"not valid YAML: {err}") from err
    if not isinstance(spec, dict) or not {"train", "val", "names"} <= set(spec):
        raise CSpineDataError(path, "a YOLO data.yaml needs 'train', 'val' and 'names'")
    return path.resolve()


def _split_images(data_yaml: Path, split: str) -> list[Path]:
    spec = yaml.safe_load(data_yaml.read_text())
    if split not in spec:
        raise CSpineDataError(data_yaml, f"no {split!r} split")
    root = Path(spec.get("path") or data_yaml.parent)
    if not root.is_absolute():
        root = (data_yaml.parent / root).resolve()
    folder = root / spec[split]
    images = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        raise CSpineDataError(folder, f"no images in the {split!r} split")
    return images


def _label_path(image: Path) -> Path:
    parts = list(image.parts)
    index = len(parts) - 1 - parts[::-1].index("images")
    parts[index] = "labels"
    return Path(*parts).with_suffix(".txt")


def ground_truth(data_yaml: Path, split: str = "val") -> tuple[dict[str, np.ndarray], dict]:
    """True boxes of a split, ``{image stem: (N, 4) xyxy pixels}``, and ``{stem: image path}``."""
    from PIL import Image

    truth, paths = {}, {}
    for image in _split_images(data_yaml, split):
        with Image.open(image) as handle:
            columns, rows = handle.size
        label = _label_path(image)
        truth[image.stem] = label_boxes_xyxy(label, rows, columns) if label.is_file() else np.zeros(
            (0, 4)
        )
        paths[image.stem] = image
    return truth, paths


def read_predictions_json(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Ultralytics' ``predictions.json`` (COCO results, bbox x, y, w, h) -> ``{stem: (xyxy, s)}``."""
    grouped: dict[str, list] = {}
    for det in json.loads(Path(path).read_text()):
        stem = Path(det["file_name"]).stem if "file_name" in det else str(det["image_id"])
        x, y, w, h = det["bbox"]
        grouped.setdefault(stem, []).append((x, y, x + w, y + h, det["score"]))
    return {
        k: (np.asarray(v)[:, :4].astype(np.float64), np.asarray(v)[:, 4].astype(np.float64))
        for k, v in grouped.items()
    }


def _validator_class():
    from ultralytics.models.yolo.detect import DetectionValidator

    class PredictionsValidator(DetectionValidator):
        """Ultralytics' detection validator; its predictions.json is scored by keras_cspine."""

        def eval_json(self, stats):  # no faster-coco-eval (it would try a pip install)
            return stats

    return PredictionsValidator


def validate_detector(
    weights: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    split: str = "val",
    imgsz: int | None = None,
    batch: int = 16,
    device: str = "cpu",
    conf: float = 0.001,
    iou: float = 0.7,
    max_det: int = 300,
    plots: bool = True,
    name: str | None = None,
    grid: int = 12,
) -> dict[str, Any]:
    """Validate ``weights`` on a split: Table 3 metrics, cross-checked mAP, confusion matrix and
    prediction grid figures.

    Writes ``out_dir/metrics.json``, ``out_dir/predictions.json`` and ``out_dir/figures/``.
    Returns the metrics dict.
    """
    weights = Path(weights)
    if not weights.is_file():
        raise CSpineDataError(weights, "weights file not found")
    data_yaml = resolve_data_yaml(data)
    out = Path(out_dir).resolve()
    model = load_yolo(weights)
    imgsz = imgsz or int(model.overrides.get("imgsz") or 640)
    result = model.val(
        validator=_validator_class(), data=str(data_yaml), split=split, imgsz=imgsz, batch=batch,
        device=device, conf=conf, iou=iou, max_det=max_det, save_json=True, plots=plots,
        project=str(out.parent), name=out.name, exist_ok=True, workers=0, verbose=False,
    )  # fmt: skip
    truth, paths = ground_truth(data_yaml, split)
    predictions_path = out / "predictions.json"
    predictions = read_predictions_json(predictions_path) if predictions_path.is_file() else {}
    predictions = {k: v for k, v in predictions.items() if k in truth}
    ours = dm.evaluate_detections(truth, predictions, max_dets=max_det)
    coco = dm.pycocotools_map(truth, predictions, max_dets=max_det)
    confusion = dm.confusion_counts(truth, predictions, conf=0.25, iou=0.45)
    box = result.box
    ultralytics_map50 = float(box.map50)
    summary = {
        "model": name or weights.stem,
        "weights": str(weights),
        "data": str(data_yaml),
        "split": split,
        "imgsz": imgsz,
        "images": ours.n_images,
        "instances": ours.n_instances,
        "precision": float(box.mp),
        "recall": float(box.mr),
        "mAP50": ultralytics_map50,
        "mAP50-95": float(box.map),
        "cross_check": {
            "predictions": ours.n_predictions,
            "mAP50_ours": ours.map50,
            "mAP50_pycocotools": coco["mAP50"],
            "mAP50-95_ours": ours.map50_95,
            "mAP50-95_pycocotools": coco["mAP50-95"],
            "mAP50_ours_minus_pycocotools": _diff(ours.map50, coco["mAP50"]),
            "mAP50_ultralytics_minus_ours": _diff(ultralytics_map50, ours.map50),
        },
        "confusion": confusion.as_dict(),
        "ultralytics_confusion_matrix": np.asarray(result.confusion_matrix.matrix).tolist(),
        "settings": {"conf": conf, "iou": iou, "max_det": max_det, "batch": batch,
                     "device": device},  # fmt: skip
    }
    figures = out / "figures"
    from keras_cspine.stage2 import figures as fig
    title = summary["model"]
    fig.plot_confusion(confusion, figures / "fig9_confusion_matrix.png", title=title)
    samples = _grid_samples(truth, predictions, paths, grid)
    if samples:
        fig.plot_prediction_grid(samples, figures / "fig10_predictions.png", title=title)
    write_json(out / "metrics.json", summary)
    return summary


def _diff(a: float, b: float) -> float | None:
    return None if (a is None or b is None or np.isnan(a) or np.isnan(b)) else float(a - b)


def _grid_samples(truth, predictions, paths, n: int):
    """Up to ``n`` images, fractures first, each with its true and predicted boxes."""
    from PIL import Image

    positives = [k for k in sorted(truth) if len(truth[k])]
    negatives = [k for k in sorted(truth) if not len(truth[k])]
    chosen = positives[: max(n - min(len(negatives), n // 4), 0)]
    chosen += negatives[: n - len(chosen)]
    samples = []
    for key in chosen:
        with Image.open(paths[key]) as handle:
            image = np.asarray(handle.convert("RGB"))
        boxes, scores = predictions.get(key, (np.zeros((0, 4)), np.zeros(0)))
        samples.append((key, image, truth[key], boxes, scores))
    return samples


def export_onnx(
    weights: str | os.PathLike, out: str | os.PathLike | None = None, imgsz: int | None = None,
    opset: int | None = None,
) -> Path:  # fmt: skip
    """Export ``weights`` (.pt) to ONNX (static batch 1, no NMS inside); return the .onnx path.

    The ONNX metadata gets ``keras_cspine_export`` (JSON: ``mode``, ``size``, ``roi_mm`` of the
    YOLO export the weights were trained on, found through the checkpoint's ``train_args``), so
    that the file alone tells ``pipeline.Stage2Model`` how to render slices for it, wherever it
    is copied.
    """
    import shutil
    import tempfile

    weights = Path(weights)
    target = Path(out) if out is not None else weights.with_suffix(".onnx")
    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {"format": "onnx", "simplify": False, "dynamic": False, "device": "cpu"}
    if imgsz:
        kwargs["imgsz"] = imgsz
    if opset:
        kwargs["opset"] = opset
    # Ultralytics writes <weights>.onnx beside the weights it is given: export a copy in a
    # temporary folder beside the target, so that an existing <weights>.onnx is never touched
    # when another --out is asked for, and the target appears whole or not at all.
    with tempfile.TemporaryDirectory(prefix=".onnx_export_", dir=target.parent) as tmp:
        copy = Path(tmp) / weights.name
        shutil.copy2(weights, copy)
        try:
            model = load_yolo(copy)
        except CSpineDataError as err:  # name the user's file, not the temporary copy
            raise CSpineDataError(weights, err.problem) from err
        produced = Path(model.export(**kwargs))
        settings = export_image_settings((model.ckpt or {}).get("train_args", {}).get("data"))
        if settings:
            _add_onnx_metadata(produced, {EXPORT_METADATA_KEY: json.dumps(settings)})
        os.replace(produced, target)
    return target


def _add_onnx_metadata(path: Path, props: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    for key, value in props.items():
        entry = next((p for p in model.metadata_props if p.key == key), None)
        if entry is None:
            entry = model.metadata_props.add()
            entry.key = key
        entry.value = value
    with atomic_path(path) as tmp:
        onnx.save(model, str(tmp))


def _build_model(config: DetectTrainConfig):
    from ultralytics import YOLO

    if config.weights:
        return load_yolo(config.weights, "weights file not found (nothing is downloaded)")
    if config.model in MODEL_NAMES:
        return YOLO(f"{config.model}.yaml")
    path = Path(config.model).expanduser()
    if not path.is_file():
        raise CSpineDataError(path, "model .yaml not found")
    return YOLO(str(path))


def train_detector(
    data: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: DetectTrainConfig | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train one detector into ``out_dir`` and validate it; return its ``metrics.json`` dict.

    A finished run with the same config returns its metrics without work; an interrupted one
    resumes from ``weights/last.pt``; a run folder with another config raises unless
    ``overwrite``.
    """
    from keras_cspine.config import dump_config, save_config

    config = config or DetectTrainConfig()
    data_yaml = resolve_data_yaml(data)
    export = data_yaml.parent / "export.json"
    if export.is_file() and json.loads(export.read_text()).get("config", {}).get("holdout"):
        raise CSpineDataError(export, "a held-out export (holdout: true) has no train split; "
                              "it is for `detect val` only")  # fmt: skip
    out = Path(out_dir).resolve()
    resolved = {"config": dump_config(config), "data": str(data_yaml)}
    run_file = out / "run.json"
    trained = False
    if run_file.is_file():
        previous = json.loads(run_file.read_text())
        if {k: previous.get(k) for k in resolved} != resolved:
            if not overwrite:
                raise CSpineDataError(
                    out, "holds a training run with another config or dataset; choose another "
                    "--out or pass --overwrite"
                )  # fmt: skip
            shutil.rmtree(out)
        elif (out / "metrics.json").is_file():
            return json.loads((out / "metrics.json").read_text())
        else:
            trained = bool(previous.get("trained"))
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CSpineDataError(out, "exists and is not a detection run folder")
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")  # loadable again with --config
    write_json(run_file, {**resolved, "trained": trained})

    import_ultralytics()
    started = time.time()
    last = out / "weights" / "last.pt"
    if trained:
        pass  # training finished earlier; only the evaluation below was interrupted
    elif last.is_file():
        load_yolo(last).train(resume=True, data=str(data_yaml))
    else:
        model = _build_model(config)
        model.train(
            data=str(data_yaml), epochs=config.epochs, imgsz=config.imgsz, batch=config.batch,
            device=config.device, seed=config.seed, workers=config.workers,
            patience=config.patience, optimizer=config.optimizer,
            deterministic=config.deterministic, plots=config.plots, amp=False,
            project=str(out.parent), name=out.name, exist_ok=True, verbose=False,
            **config.hyperparameters(),
        )  # fmt: skip
    write_json(run_file, {**resolved, "trained": True})
    best = out / "weights" / "best.pt"
    if not best.is_file():
        best = last
    summary = validate_detector(
        best, data_yaml, out / "val", imgsz=config.imgsz, batch=config.batch,
        device=config.device, conf=config.val_conf, iou=config.val_iou, plots=config.plots,
        name=config.display_name,
    )  # fmt: skip
    from keras_cspine.stage2.figures import plot_training_curves

    if (out / "results.csv").is_file():
        plot_training_curves(
            out / "results.csv", out / "figures" / "fig7-8_training_curves.png",
            title=config.display_name,
        )  # fmt: skip
    if config.onnx:
        summary["onnx"] = str(export_onnx(best, out / "weights" / "best.onnx", imgsz=config.imgsz))
    summary["train_seconds"] = round(time.time() - started, 1)
    summary["config"] = resolved
    write_json(out / "metrics.json", summary)
    return summary


def slugify_model(name: str) -> str:
    """A folder-safe name for a model (``yolov8s`` stays ``yolov8s``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
