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
from collections.abc import Callable, Sequence
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
        roi_mm: stage 1 images show the square window of this many mm around each study's
            cervical column (``prepare --roi-mm``, ``keras_cspine.data.roi``); None: whole
            slices, as the paper. At 64 px a whole 180 mm slice gives a vertebra a few pixels;
            the window gives it a third of the image.
        workers: processes for synth / prepare (None: all cores).
        holdout_fraction: share of the labelled studies held out for the final prediction.
        stage1_config: bundled stage 1 config (``keras_cspine/configs``).
        stage1_epochs: epochs of stage 1 (None: the config's).
        stage1_overrides: further ``key=value`` overrides of the stage 1 config.
        export_size, export_mode: side and window mode of the YOLO export images.
        export_roi_mm: the export's spine window (``keras_cspine.data.roi``); None: whole
            slices, as the paper.
        detect_config: bundled stage 2 config the training starts from (None: the defaults);
            the fields below override it.
        detect_model, detect_epochs, detect_imgsz, detect_batch: stage 2 training.
        detect_extra: further Ultralytics train arguments (``--set extra.<key>=<value>``).
        box_conf: confidence threshold of stage 2 boxes in the pipeline.
    """

    studies: int = 200
    seed: int = 0
    preset: str = "demo"
    image_size: int = 64
    mode: str = "multiwindow"
    roi_mm: float | None = 100.0
    workers: int | None = None
    holdout_fraction: float = 0.125
    stage1_config: str = "stage1_synthetic_small"
    stage1_epochs: int | None = 5
    stage1_overrides: tuple[str, ...] = ("train.warmup_epochs=1",)
    export_size: int = 128
    export_mode: str = "bone"
    export_roi_mm: float | None = 100.0
    # configs/detect_train_synthetic.yaml: an optimizer step per batch (Ultralytics otherwise
    # accumulates up to a nominal batch of 64), mild zoom, no mosaic, cosine learning rate
    detect_config: str | None = "detect_train_synthetic"
    detect_model: str = "yolov8n"
    detect_epochs: int = 25
    detect_imgsz: int = 128
    detect_batch: int = 8
    detect_extra: tuple[str, ...] = ()
    box_conf: float = 0.1

    def __post_init__(self):
        if not 0.0 < self.holdout_fraction < 0.9:
            raise ValueError(f"holdout_fraction must be in (0, 0.9), got {self.holdout_fraction!r}")
        if self.studies < 4:
            raise ValueError(f"the demo needs at least 4 studies, got {self.studies!r}")
        from keras_cspine.data.prepare import PrepareSettings

        PrepareSettings(size=self.image_size, mode=self.mode, roi_mm=self.roi_mm)  # before any work

    @classmethod
    def quick(cls, **changes: Any) -> DemoSettings:
        """``demo --quick``: every step on a handful of tiny studies in 2-3 minutes, a check that
        the pipeline runs end to end; its figures mean nothing."""
        base = cls(studies=6, preset="tiny", image_size=32, holdout_fraction=0.34,
                   stage1_epochs=1, detect_epochs=1, detect_imgsz=64, export_size=64)  # fmt: skip
        return dataclasses.replace(base, **changes)

    @classmethod
    def paper(cls, **changes: Any) -> DemoSettings:
        """The paper's configurations, for the real Kaggle data (``--data``)."""
        base = cls(image_size=224, mode="paper", stage1_config="stage1_gcvit_tiny",
                   roi_mm=None, stage1_epochs=None, stage1_overrides=(), holdout_fraction=0.1,
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
    """Runs named steps in order, records their time and results, and skips finished ones.

    A step may also run as a subprocess in the background (:meth:`start`, :meth:`finish`),
    beside the steps that follow it: stage 2 trains on one core while stage 1 uses the others.
    """

    def __init__(self, out: Path):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "demo_state.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        )
        self.background: dict[str, tuple[float, float, subprocess.Popen, Path]] = {}

    def _record(self, name: str, started: float, cpu: float, result: dict[str, Any]) -> None:
        seconds = round(time.perf_counter() - started, 1)
        self.state[name] = {"seconds": seconds, "cpu_seconds": round(_cpu_seconds() - cpu, 1),
                            "result": result}  # fmt: skip
        write_json(self.state_path, self.state)
        print(f"[demo] {name}: {seconds} s", flush=True)

    def start(self, name: str, command: Sequence[str], log_path: Path) -> None:
        """Start step ``name`` as ``command`` in the background, its output going to
        ``log_path`` (kept: the step's own log); nothing when an earlier run finished it."""
        if name in self.state:
            return
        print(f"[demo] {name} ... in the background beside the next steps (log: {log_path})",
              flush=True)  # fmt: skip
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "wb") as log:
            process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=_child_env())  # fmt: skip
        self.background[name] = (time.perf_counter(), _cpu_seconds(), process, log_path)

    def finish(self, name: str, collect: Callable[[int, Path], dict[str, Any]]) -> dict[str, Any]:
        """Wait for background step ``name``; ``collect(exit_status, log_path)`` gives its result."""
        if name in self.state:
            print(f"[demo] {name}: done earlier, kept ({self.state[name]['seconds']} s then)")
            return self.state[name]["result"]
        started, cpu, process, log_path = self.background.pop(name)
        if process.poll() is None:
            print(f"[demo] {name}: waiting for it to finish (log: {log_path})", flush=True)
        result = collect(process.wait(), log_path)
        self._record(name, started, cpu, result)
        return result

    def stop_background(self) -> None:
        """End every background step still running (the demo failed or was interrupted)."""
        for _, _, process, _ in self.background.values():
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.background.clear()

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run ``fn`` as step ``name`` unless an earlier run finished it; return its result."""
        if name in self.state:
            print(f"[demo] {name}: done earlier, kept ({self.state[name]['seconds']} s then)")
            return self.state[name]["result"]
        print(f"[demo] {name} ...", flush=True)
        started, cpu = time.perf_counter(), _cpu_seconds()
        result = fn()
        self._record(name, started, cpu, result)
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


def detector_command(export_dir: Path, run_dir: Path, settings: DemoSettings) -> list[str]:
    """``python -m keras_cspine detect train`` for a fresh interpreter (torch must not share a
    process with TensorFlow)."""
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
    return command


def detector_result(run_dir: Path, status: int, log_path: Path) -> dict[str, Any]:
    """What the demo keeps of a finished ``detect train``; its log's end when it failed."""
    metrics_path = run_dir / runs.METRICS_FILE
    if status != 0 or not metrics_path.is_file():
        tail = log_path.read_text(errors="replace").splitlines()[-25:] if log_path.is_file() else []
        print("\n".join(tail), file=sys.stderr)
        raise RuntimeError(f"stage 2 training failed (exit {status}); its log: {log_path}")
    metrics = json.loads(metrics_path.read_text())
    keep = ("model", "imgsz", "images", "instances", "precision", "recall", "mAP50", "mAP50-95",
            "onnx", "train_seconds")  # fmt: skip
    return {"run_dir": str(run_dir), "log": str(log_path),
            "epochs": metrics.get("config", {}).get("config", {}).get("epochs"),
            **{k: metrics.get(k) for k in keep}}  # fmt: skip


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
    data = json.loads((run_dir / "data.json").read_text()) if (run_dir / "data.json").is_file() else {}
    return {
        "image_size": settings.image_size, "mode": settings.mode, "roi_mm": settings.roi_mm,
        "splits": {k: {"studies": v.get("num_studies"), "slices": v.get("num_samples")}
                   for k, v in data.items()},
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
                               roi_mm=settings.roi_mm, studies=studies, workers=workers)  # fmt: skip

    demo.step("prepare", prepare)
    # the data figures go with the data: the index of predict finds them through stage 1's run
    demo.step("look", lambda: {"figures": [str(p) for p in look(prepared, prepared / "figures")]})

    export_dir = out / "yolo"

    def detect_export() -> dict[str, Any]:
        from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset

        config = ExportConfig(size=settings.export_size, mode=settings.export_mode,
                              roi_mm=settings.export_roi_mm, seed=settings.seed,
                              workers=workers)  # fmt: skip
        summary = export_yolo_dataset(dev, export_dir, config, overwrite=True)
        return {"export": str(export_dir), "counts": summary["counts"]}

    demo.step("detect_export", detect_export)
    # stage 2 trains in its own process (torch) on about one core, beside stage 1
    stage2_dir = out / "stage2"
    demo.start("detect_train", detector_command(export_dir, stage2_dir, settings),
               out / "logs" / "detect_train.log")  # fmt: skip
    try:
        stage1 = demo.step("stage1", lambda: train_stage1_step(prepared, out / "stage1", settings))
        stage2 = demo.finish("detect_train",
                             lambda status, log: detector_result(stage2_dir, status, log))  # fmt: skip
    finally:
        demo.stop_background()
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


def _duration(seconds: float) -> str:
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def summary_text(summary: dict[str, Any]) -> str:
    """The closing summary, one screen: what was trained on what, the figures beside the
    paper's, and where the report is."""
    from keras_cspine.stage1.evaluate import PAPER_TABLE1
    from keras_cspine.stage2.metrics import PAPER_TABLE3

    results, settings = summary["results"], summary.get("settings", {})
    wall = summary.get("seconds_this_run")
    lines = ["", f"== keras_cspine demo: done{f' in {_duration(wall)}' if wall else ''} ==",
             f"run folder : {summary['run_dir']}"]  # fmt: skip
    split = results.get("split", {})
    source = (f"{settings.get('studies')} synthetic studies (preset {settings.get('preset')}, "
              f"seed {settings.get('seed')})" if "synth" in results else "the given RSNA folder")  # fmt: skip
    lines.append(f"data       : {source} in {summary['data']}")
    if split:
        lines.append(f"             {len(split['holdout_studies'])} held out "
                     f"({split['n_holdout_fractured']} fractured) for the end; {split['n_dev']} "
                     "for development")  # fmt: skip
    s1 = results.get("stage1")
    if s1:
        sp = s1.get("splits", {})
        train, test = sp.get("train", {}), sp.get("test", {})
        m, seq = s1.get("metrics", {}), s1.get("metrics_sequence_model") or {}
        paper = PAPER_TABLE1["Proposed (GCViT)"]
        params = s1.get("parameters") or {}
        total = (params.get("trainable") or 0) + (params.get("non_trainable") or 0)
        window = f" ({s1['roi_mm']:g} mm spine window)" if s1.get("roi_mm") else ""
        lines += [
            f"stage 1    : {s1['model']} ({total / 1e6:.1f} M parameters), "
            f"{s1.get('image_size', '?')} px {s1.get('mode', '')}{window}, {s1['epochs_run']} "
            f"epochs on "
            f"{train.get('slices', '?')} slices of {train.get('studies', '?')} studies",
            f"             {s1.get('split')} split ({test.get('studies', '?')} studies, "
            f"{test.get('slices', '?')} slices), per slice as the paper: macro F1 "
            f"{_fmt(m.get('macro_f1'))}, EMR {_fmt(m.get('exact_match_ratio'))}, coverage error "
            f"{_fmt(m.get('coverage_error'))}  (paper {paper[0]} / {paper[1]} / {paper[2]})",
        ]  # fmt: skip
        if seq:
            lines.append(f"             + study sequence model (beyond the paper): macro F1 "
                         f"{_fmt(seq.get('macro_f1'))}, EMR {_fmt(seq.get('exact_match_ratio'))}")  # fmt: skip
    s2 = results.get("detect_train")
    if s2:
        paper = PAPER_TABLE3["yolov8s"]
        lines.append(f"stage 2    : {s2.get('model')}, {s2.get('epochs', '?')} epochs at "
                     f"{s2.get('imgsz', '?')} px; val ({s2.get('images')} images): P "
                     f"{_fmt(s2.get('precision'))}, R {_fmt(s2.get('recall'))}, mAP50 "
                     f"{_fmt(s2.get('mAP50'))}  (paper, YOLOv8s: {paper[0]} / {paper[1]} / "
                     f"{paper[2]})")  # fmt: skip
    pred = results.get("predict")
    if pred:
        ev = pred.get("evaluation")
        lines.append(f"held out   : {pred['n_ok']}/{pred['n_studies']} studies through both "
                     f"stages, {_fmt(pred.get('seconds_per_study'), 1)} s a study")  # fmt: skip
        if ev:
            lines.append(f"             RSNA weighted log loss {_fmt(ev['rsna_weighted_log_loss'], 4)}"
                         f", patient AUC {_fmt(ev['patient_auc'])}, mean vertebra AUC "
                         f"{_fmt(ev['mean_vertebra_auc'])} ({ev['n_studies']} studies)")  # fmt: skip
    if "synth" in results:
        crop = (f" of a {settings['roi_mm']:g} mm spine window" if settings.get("roi_mm")
                else "")  # fmt: skip
        lines.append("vs paper   : synthetic anatomy, not CT of patients; "
                     f"{settings.get('image_size')} px{crop} and a narrow GCViT from scratch "
                     "against whole 224 px slices and GCViT-tiny from ImageNet; "
                     f"{settings.get('studies')} studies against 2,019")  # fmt: skip
    if pred:
        files = pred.get("files", {})
        lines.append(f"report     : {files.get('index')}")
        lines.append(f"submission : {files.get('submission')}")
    if s1:
        lines.append(f"tensorboard: tensorboard --logdir {Path(s1['run_dir']) / 'tensorboard'}")
    lines.append("time (s)   : " + ", ".join(f"{k} {v}" for k, v in summary["steps"].items()))
    return "\n".join(lines)
