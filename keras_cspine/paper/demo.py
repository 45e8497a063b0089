"""``python -m keras_cspine demo`` (``make demo``): the paper's whole system in one run folder.

On a bare machine after install, with nothing downloaded, this runs every part of the paper on a
small synthetic dataset in the RSNA 2022 layout (or, with ``--data``, on the Kaggle dataset with
the paper's configurations), in this order:

1. ``synth``: a synthetic dataset (``keras_cspine.synthetic.dataset``; skipped with ``--data``);
2. ``split``: held-out studies set aside for the end (stratified by ``patient_overall``), and a
   development view of the dataset without them (links, nothing copied) that both stages train on;
3. ``prepare``: the slice index and image cache of the development studies with segmentations
   (the paper's Algorithm 1, Section 2.4, or HU window modes);
4. ``look``: figures of slices with their labels and boxes (the paper's Figure 4 style), sagittal
   overviews;
5. ``detect_export``: the YOLO dataset of the fracture boxes plus negatives (Section 2.6);
6. ``detect_train``: stage 2, a YOLO detector, trained in a subprocess (torch must not share a
   process with TensorFlow), validated (the metrics of Table 3, Section 3) and exported to ONNX;
7. ``stage1``: stage 1, the two-input GCViT vertebrae classifier (Section 2.5; Tables 1-2 and
   Figure 6 of Section 3);
8. ``predict``: the two-stage pipeline (``keras_cspine.pipeline.predict``) on the held-out studies, with
   the per-study reports, the submission and the study-level evaluation (competition metric,
   AUCs) against ``train.csv``.

Each step prints its progress; a finished step is not redone when the demo is run again on the
same folder (its results are kept in ``OUT/demo_state.json``). A summary of where everything is and
the figures measured is printed at the end and written to ``OUT/summary.json``.

Synthetic default: 40 studies of the ``small`` preset, 64 px stage 1 images, the narrow GCViT of
``stage1_synthetic_small`` and a YOLOv8n detector on 100 mm spine windows at 128 px
(``detect_train_synthetic``) with short schedules, sized to finish within
15 minutes on 2 CPU cores. ``--data KAGGLE_DIR`` switches to :meth:`DemoSettings.paper` (224 px GCViT-tiny,
YOLOv8s at 640 px for 100 epochs): hours, and a GPU is advised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.stage1 import runs
from keras_cspine.utils import write_json


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of a demo run; the defaults fit 2 CPU cores (see :meth:`paper` for the real data).

    Args:
        studies, seed, preset: the synthetic dataset (``keras_cspine.synthetic.dataset``).
        image_size, mode: stage 1 images (prepare size and window mode: ``multiwindow`` gives
            the small GCViT the soft-tissue landmarks of each level besides the bone).
        workers: processes for synth / prepare (None: all cores).
        holdout_fraction: share of the labelled studies held out for the final prediction.
        stage1_config: bundled stage 1 config (``keras_cspine/configs``).
        stage1_epochs: epochs of stage 1 (None: the config's).
        stage1_overrides: further ``key=value`` overrides of the stage 1 config.
        export_size, export_mode: side and window mode of the YOLO export images.
        export_roi_mm: the export's spine window (``keras_cspine.stage2.roi``); None: whole
            slices, as the paper.
        detect_config: bundled stage 2 config the training starts from (None: the defaults);
            the fields below override it.
        detect_model, detect_epochs, detect_imgsz, detect_batch: stage 2 training.
        detect_extra: further Ultralytics train arguments (``--set extra.<key>=<value>``).
        box_conf: confidence threshold of stage 2 boxes in the pipeline.
    """

    studies: int = 40
    seed: int = 0
    preset: str = "small"
    image_size: int = 64
    mode: str = "multiwindow"
    workers: int | None = None
    holdout_fraction: float = 0.25
    stage1_config: str = "stage1_synthetic_small"
    stage1_epochs: int | None = 10
    stage1_overrides: tuple[str, ...] = ("train.warmup_epochs=1",)
    export_size: int = 128
    export_mode: str = "bone"
    export_roi_mm: float | None = 100.0
    # configs/detect_train_synthetic.yaml: an optimizer step per batch (Ultralytics otherwise
    # accumulates up to a nominal batch of 64), mild zoom, no mosaic, cosine learning rate
    detect_config: str | None = "detect_train_synthetic"
    detect_model: str = "yolov8n"
    detect_epochs: int = 30
    detect_imgsz: int = 128
    detect_batch: int = 8
    detect_extra: tuple[str, ...] = ()
    box_conf: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ValueError(f"holdout_fraction must be in (0, 0.9), got {self.holdout_fraction!r}")
        if self.studies < 4:
            raise ValueError(f"the demo needs at least 4 studies, got {self.studies!r}")

    @classmethod
    def paper(cls, **changes: Any) -> DemoSettings:
        """The paper's configurations, for the real Kaggle data (``--data``)."""
        base = cls(image_size=224, mode="paper", stage1_config="stage1_gcvit_tiny",
                   stage1_epochs=None, stage1_overrides=(), holdout_fraction=0.1,
                   export_size=512, export_roi_mm=None, detect_config=None,
                   detect_model="yolov8s", detect_epochs=100, detect_imgsz=640, detect_batch=16,
                   detect_extra=(), box_conf=0.25)  # fmt: skip
        return dataclasses.replace(base, **changes)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (0 where unknown)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)  # fmt: skip
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Demo:
    """Runs named steps in order, records their time and results, and skips finished ones."""

    def __init__(self, out: Path):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "demo_state.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        )

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` as step ``name`` unless an earlier run finished it; return its result."""
        if name in self.state:
            print(f"[demo] {name}: done earlier, kept ({self.state[name]['seconds']} s then)")
            return self.state[name]["result"]
        print(f"[demo] {name} ...", flush=True)
        started, cpu = time.perf_counter(), _cpu_seconds()
        result = fn()
        seconds = round(time.perf_counter() - started, 1)
        self.state[name] = {"seconds": seconds, "cpu_seconds": round(_cpu_seconds() - cpu, 1),
                            "result": result}  # fmt: skip
        write_json(self.state_path, self.state)
        print(f"[demo] {name}: {seconds} s", flush=True)
        return result


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def choose_holdout(labels, fraction: float, seed: int, with_segmentation: set[str]) -> list[str]:
    """Held-out study UIDs: ``fraction`` of the labelled studies, fractured and intact alike.

    Studies without a segmentation are taken first (stage 1 can only learn from segmented ones);
    at least one fractured and one intact study are held out when both exist, and at least two
    fractured studies stay for training the detector.
    """
    rng = np.random.default_rng([seed, 5])
    n = max(2, int(round(fraction * len(labels))))
    chosen: list[str] = []
    groups = [sorted(labels.StudyInstanceUID[labels.patient_overall == v]) for v in (1, 0)]
    quotas = [max(1, round(n * len(groups[0]) / len(labels))) if groups[0] else 0, 0]
    quotas[0] = min(quotas[0], max(0, len(groups[0]) - 2))
    quotas[1] = min(n - quotas[0], len(groups[1]))
    for group, quota in zip(groups, quotas):
        plain = [u for u in group if u not in with_segmentation]
        segmented = [u for u in group if u in with_segmentation]
        ordered = list(rng.permutation(plain)) + list(rng.permutation(segmented))
        chosen += [str(u) for u in ordered[:quota]]
    return sorted(chosen)


def _link(source: Path, target: Path) -> None:
    """``target`` -> ``source`` as a symbolic link, or a copy where links are not allowed."""
    if target.exists() or target.is_symlink():
        return
    try:
        os.symlink(source.resolve(), target, target_is_directory=source.is_dir())
    except OSError:
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)


def split_dataset(data_dir: Path, out: Path, fraction: float, seed: int) -> dict[str, Any]:
    """Write ``out/dev`` (an RSNA view without the held-out studies) and ``out/holdout``."""
    import pandas as pd

    from keras_cspine.io.rsna import RsnaLayout

    layout = RsnaLayout(data_dir)
    labels = layout.train_labels()
    listed = set(layout.list_studies("train"))
    labels = labels[labels.StudyInstanceUID.isin(listed)].reset_index(drop=True)
    segmented = {u for u in labels.StudyInstanceUID if layout.segmentation_path(u) is not None}
    holdout = choose_holdout(labels, fraction, seed, segmented)
    dev_uids = sorted(set(labels.StudyInstanceUID) - set(holdout))

    dev, held = out / "dev", out / "holdout"
    for folder in (dev / "train_images", dev / "segmentations", held):
        folder.mkdir(parents=True, exist_ok=True)
    for uid in dev_uids:
        _link(layout.series_dir(uid), dev / "train_images" / uid)
        seg = layout.segmentation_path(uid)
        if seg is not None:
            _link(seg, dev / "segmentations" / seg.name)
    for uid in holdout:
        _link(layout.series_dir(uid), held / uid)
    raw = pd.read_csv(data_dir / "train.csv", dtype=str)
    raw[raw.StudyInstanceUID.isin(dev_uids)].to_csv(dev / "train.csv", index=False)
    boxes_csv = data_dir / "train_bounding_boxes.csv"
    if boxes_csv.is_file():
        boxes = pd.read_csv(boxes_csv, dtype=str)
        boxes[boxes.StudyInstanceUID.isin(dev_uids)].to_csv(dev / "train_bounding_boxes.csv",
                                                            index=False)  # fmt: skip
    return {
        "dev": str(dev), "holdout": str(held), "holdout_studies": holdout,
        "n_dev": len(dev_uids), "n_dev_segmented": len(segmented & set(dev_uids)),
        "n_holdout_fractured": int(labels[labels.StudyInstanceUID.isin(holdout)]
                                   .patient_overall.sum()),
    }  # fmt: skip


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)  # the child imports this keras_cspine
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def train_detector_subprocess(export_dir: Path, run_dir: Path, settings: DemoSettings) -> dict:
    """``python -m keras_cspine detect train`` in a fresh interpreter (its output streams here)."""
    command = [
        sys.executable, "-m", "keras_cspine", "detect", "train", str(export_dir),
        "--out", str(run_dir), "--model", settings.detect_model,
        "--epochs", str(settings.detect_epochs), "--imgsz", str(settings.detect_imgsz),
        "--batch", str(settings.detect_batch), "--seed", str(settings.seed), "--workers", "0",
    ]  # fmt: skip
    if settings.detect_config:
        command += ["--config", settings.detect_config]
    for item in settings.detect_extra:
        command += ["--set", f"extra.{item}"]
    result = subprocess.run(command, env=_child_env())
    metrics_path = run_dir / runs.METRICS_FILE
    if result.returncode != 0 or not metrics_path.is_file():
        raise RuntimeError(f"stage 2 training failed (exit {result.returncode}): "
                           f"{' '.join(command)}")  # fmt: skip
    metrics = json.loads(metrics_path.read_text())
    keep = ("model", "images", "instances", "precision", "recall", "mAP50", "mAP50-95", "onnx")
    return {"run_dir": str(run_dir), **{k: metrics.get(k) for k in keep}}


def train_stage1_step(prepared: Path, run_dir: Path, settings: DemoSettings) -> dict[str, Any]:
    """Stage 1 with the demo's config (in this process: TensorFlow)."""
    from keras_cspine.stage1.train import load_stage1_config, train_stage1

    overrides = [f"data.image_size={settings.image_size}", f"train.seed={settings.seed}",
                 *settings.stage1_overrides]  # fmt: skip
    if settings.stage1_epochs:
        overrides.append(f"train.epochs={settings.stage1_epochs}")
    config = load_stage1_config(settings.stage1_config, overrides)
    summary = train_stage1(config, prepared, run_dir, overwrite=True,
                           verbose=1 if sys.stdout.isatty() else 2)  # a live bar in a terminal
    evaluation = summary.get("evaluation", {})
    return {
        "run_dir": str(run_dir), "model": config.model.name,
        "epochs_run": summary["epochs_run"], "best_val_f1_score": summary["best_val_f1_score"],
        "split": evaluation.get("split"), "metrics": evaluation.get("metrics", {}),
        "metrics_sequence_model": evaluation.get("metrics_sequence_model"),
        "parameters": summary.get("parameters"),
    }  # fmt: skip


def predict_step(holdout: Path, out: Path, stage1: Path, stage2: Path, labels: Path,
                 settings: DemoSettings) -> dict[str, Any]:  # fmt: skip
    """The two-stage pipeline on the held-out studies, evaluated against ``labels``."""
    from keras_cspine.pipeline.predict import PredictConfig, predict

    summary = predict(holdout, out, stage1=stage1, stage2=stage2, labels=labels,
                      config=PredictConfig(box_conf=settings.box_conf))  # fmt: skip
    keep = ("n_studies", "n_ok", "n_failed", "n_slices", "n_gated", "gated_fraction", "seconds",
            "seconds_per_study", "files", "evaluation")  # fmt: skip
    return {k: summary.get(k) for k in keep}


def run_demo(out: str | os.PathLike, settings: DemoSettings = DemoSettings(),
             data: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the demo into ``out`` and return the summary (also ``out/summary.json``)."""
    from keras_cspine.data.prepare import prepare_dataset
    from keras_cspine.viz import look

    out = Path(out)
    demo = Demo(out)
    started = time.perf_counter()
    data_dir = Path(data) if data else out / "data"
    workers = settings.workers or min(4, os.cpu_count() or 1)
    if data is None:
        from keras_cspine.synthetic.dataset import generate_dataset

        demo.step("synth", lambda: {"data": str(generate_dataset(
            data_dir, n_studies=settings.studies, seed=settings.seed, preset=settings.preset,
            workers=workers, overwrite=True))})  # fmt: skip
    split = demo.step("split", lambda: split_dataset(data_dir, out / "split",
                                                     settings.holdout_fraction, settings.seed))  # fmt: skip
    dev = Path(split["dev"])
    prepared = out / "prepared"

    def prepare() -> dict[str, Any]:
        from keras_cspine.io.rsna import RsnaLayout

        layout = RsnaLayout(dev)
        studies = [u for u in layout.list_studies() if layout.segmentation_path(u) is not None]
        return prepare_dataset(dev, prepared, size=settings.image_size, mode=settings.mode,
                               studies=studies, workers=workers)  # fmt: skip

    demo.step("prepare", prepare)
    demo.step("look", lambda: {"figures": [str(p) for p in look(prepared, out / "figures")]})

    export_dir = out / "yolo"

    def detect_export() -> dict[str, Any]:
        from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset

        config = ExportConfig(size=settings.export_size, mode=settings.export_mode,
                              roi_mm=settings.export_roi_mm, seed=settings.seed,
                              workers=workers)  # fmt: skip
        summary = export_yolo_dataset(dev, export_dir, config, overwrite=True)
        return {"export": str(export_dir), "counts": summary["counts"]}

    demo.step("detect_export", detect_export)
    stage2 = demo.step("detect_train", lambda: train_detector_subprocess(
        export_dir, out / "stage2", settings))  # fmt: skip
    stage1 = demo.step("stage1", lambda: train_stage1_step(prepared, out / "stage1", settings))
    demo.step("predict", lambda: predict_step(
        Path(split["holdout"]), out / "predict", Path(stage1["run_dir"]),
        Path(stage2["run_dir"]), data_dir / "train.csv", settings))  # fmt: skip

    summary = {
        "run_dir": str(out.resolve()),
        "data": str(data_dir),
        "prepared": str(prepared),
        "settings": dataclasses.asdict(settings),
        "steps": {name: entry["seconds"] for name, entry in demo.state.items()},
        "seconds_this_run": round(time.perf_counter() - started, 1),
        "results": {name: entry["result"] for name, entry in demo.state.items()},
    }
    write_json(out / "summary.json", summary)
    print(summary_text(summary))
    return summary


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def summary_text(summary: dict[str, Any]) -> str:
    """The closing summary: where the outputs are and the figures measured."""
    results = summary["results"]
    lines = ["", "== keras_cspine demo: summary ==",
             f"run folder   : {summary['run_dir']}", f"data         : {summary['data']}"]  # fmt: skip
    split = results.get("split", {})
    if split:
        lines.append(f"held out     : {len(split['holdout_studies'])} studies "
                     f"({split['n_holdout_fractured']} fractured); development: {split['n_dev']}")  # fmt: skip
    prep = results.get("prepare", {})
    if prep:
        lines.append(f"prepared     : {summary['prepared']} ({prep.get('studies')} studies, "
                     f"{prep.get('settings', {}).get('mode')} {prep.get('settings', {}).get('size')} "
                     "px)")  # fmt: skip
    figures = results.get("look", {}).get("figures", [])
    if figures:
        lines.append(f"figures      : {Path(figures[0]).parent} ({len(figures)} files)")
    s1 = results.get("stage1")
    if s1:
        m = s1.get("metrics", {})
        lines.append(f"stage 1      : {s1['model']}, {s1['epochs_run']} epochs; {s1.get('split')} "
                     f"macro F1 {_fmt(m.get('macro_f1'))}, EMR {_fmt(m.get('exact_match_ratio'))}, "
                     f"coverage error {_fmt(m.get('coverage_error'))} (Table 1; run "
                     f"{s1['run_dir']})")  # fmt: skip
        seq = s1.get("metrics_sequence_model")
        if seq:
            lines.append(f"               + sequence model: macro F1 {_fmt(seq.get('macro_f1'))}, "
                         f"EMR {_fmt(seq.get('exact_match_ratio'))}")  # fmt: skip
    s2 = results.get("detect_train")
    if s2:
        lines.append(f"stage 2      : {s2.get('model')}; P {_fmt(s2.get('precision'))}, R "
                     f"{_fmt(s2.get('recall'))}, mAP50 {_fmt(s2.get('mAP50'))}, mAP50-95 "
                     f"{_fmt(s2.get('mAP50-95'))} on {s2.get('images')} val images (Table 3; run "
                     f"{s2['run_dir']})")  # fmt: skip
    pred = results.get("predict")
    if pred:
        files = pred.get("files", {})
        lines.append(f"pipeline     : {pred['n_ok']}/{pred['n_studies']} held-out studies, stage 2 "
                     f"on {pred['n_gated']}/{pred['n_slices']} slices "
                     f"({(pred.get('gated_fraction') or 0):.0%}), "
                     f"{_fmt(pred.get('seconds_per_study'), 1)} s per study")  # fmt: skip
        ev = pred.get("evaluation")
        if ev:
            lines.append(f"evaluation   : RSNA weighted log loss {_fmt(ev['rsna_weighted_log_loss'], 4)}"
                         f", mean vertebra AUC {_fmt(ev['mean_vertebra_auc'])}, patient AUC "
                         f"{_fmt(ev['patient_auc'])} ({ev['n_studies']} studies)")  # fmt: skip
        lines.append(f"submission   : {files.get('submission')}")
        if files.get("index"):
            lines.append(f"report       : {files['index']}")
    lines.append("time (s)     : " + ", ".join(f"{k} {v}" for k, v in summary["steps"].items())
                 + f"; total {round(sum(summary['steps'].values()), 1)}")  # fmt: skip
    return "\n".join(lines)
