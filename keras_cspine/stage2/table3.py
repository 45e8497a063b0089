"""Reproduce the paper's Table 3: YOLOv8s/m and YOLOv5s/m fracture detection (Section 3).

:func:`reproduce_table3` exports the YOLO dataset of an RSNA-layout folder (unless given an
export), trains and validates each model in its own ``python -m keras_cspine detect train``
process (torch never shares a process with TensorFlow, and memory is returned between models), and
writes ``table3.csv`` / ``table3.md`` beside the paper's numbers. Finished models are not retrained
when the command is run again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage2.metrics import table3_row, write_table3
from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset
from keras_cspine.utils import write_json

TABLE3_MODELS = ("yolov8s", "yolov8m", "yolov5s", "yolov5m")


def reproduce_table3(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    models: Sequence[str] = TABLE3_MODELS,
    epochs: int = 100,
    imgsz: int = 640,
    batch: int = 16,
    device: str = "cpu",
    seed: int = 0,
    workers: int = 2,
    export: ExportConfig | None = None,
    train_overrides: Sequence[str] = (),
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train and evaluate each model of Table 3; write ``OUT/table3.{csv,md,json}``; return rows.

    Args:
        data_dir: an RSNA-layout folder (exported to ``OUT/yolo_data`` first) or a finished YOLO
            export (a folder with ``data.yaml``).
        out_dir: output folder; each model trains in ``OUT/models/<model>``.
        models: architectures (``yolov8s``, ``yolov8m``, ``yolov5s``, ``yolov5m``, ...).
        epochs, imgsz, batch, device, seed, workers: training settings (paper: 100 epochs).
        export: settings of the YOLO export when ``data_dir`` is an RSNA folder.
        train_overrides: extra ``key=value`` settings of ``DetectTrainConfig`` for every model.
        progress: show progress bars and training logs.
    """
    data_dir, out = Path(data_dir).resolve(), Path(out_dir).resolve()
    if not models:
        raise ValueError("models must name at least one architecture")
    out.mkdir(parents=True, exist_ok=True)
    if (data_dir / "data.yaml").is_file():
        dataset = data_dir
    else:
        dataset = out / "yolo_data"
        export_yolo_dataset(data_dir, dataset, export or ExportConfig(seed=seed), progress=progress)
    rows = []
    for model in models:
        run_dir = out / "models" / model
        command = [
            sys.executable, "-m", "keras_cspine", "detect", "train", str(dataset),
            "--out", str(run_dir), "--model", model, "--epochs", str(epochs),
            "--imgsz", str(imgsz), "--batch", str(batch), "--device", device,
            "--seed", str(seed), "--workers", str(workers),
        ]  # fmt: skip
        for item in train_overrides:
            command += ["--set", item]
        result = subprocess.run(
            command, capture_output=not progress, text=True, check=False, env=_child_env()
        )
        if result.returncode != 0:
            tail = (result.stdout or "")[-2000:] + (result.stderr or "")[-2000:]
            raise RuntimeError(f"training {model} failed (exit {result.returncode}): {tail}")
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.is_file():
            raise CSpineDataError(metrics_path, f"training {model} wrote no metrics")
        rows.append(table3_row(model, json.loads(metrics_path.read_text())))
    write_table3(rows, out)
    write_json(out / "table3.json", {
        "rows": rows, "dataset": str(dataset),
        "settings": {"models": list(models), "epochs": epochs, "imgsz": imgsz, "batch": batch,
                     "device": device, "seed": seed, "train_overrides": list(train_overrides),
                     "export": dataclasses.asdict(export) if export else None},
    })  # fmt: skip
    return rows


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the child must import this keras_cspine
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env
