"""End-to-end speed of the two-stage pipeline on CPU: seconds per study, gated against ungated.

Serves the paper's two-stage system (Sections 2.5-2.6) as a deployable pipeline: one synthetic
study of ``--slices`` axial slices (default 300, 512 x 512, written once into ``--out``) goes
through ``keras_cspine.pipeline.predict.predict_study`` and the report of ``keras_cspine.pipeline.report``, with
stage 2 gated by stage 1 (the default) and not gated. Printed: seconds per study for both, their
ratio, the share of the time in each step (read, stage 1, stage 2, report) and the fraction of
slices stage 2 saw. Results go to ``OUT/bench_pipeline.json``.

Models: ``--stage1`` / ``--stage2`` (run directories or files), by default the newest runs under
``--runs`` (e.g. those of ``make demo``); without any, random models of the demo's sizes are
built (GCViT-xxtiny at 64 px; a YOLOv8n exported to ONNX at 256 px in a subprocess), and
``--paper`` builds the paper's sizes instead (GCViT-tiny at 224 px, YOLOv8s at 640 px). With
random stage 1 weights the gate passes an arbitrary share of slices: the gated time is then only
indicative; trained models give the real share.

    python benchmarks/bench_pipeline.py                      # models of runs/ (e.g. make demo)
    python benchmarks/bench_pipeline.py --paper --repeats 1  # paper-sized random models
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

STEPS = ("read", "stage1", "stage2", "report")


def ensure_study(folder: Path, slices: int, size: int, seed: int = 0) -> Path:
    """One synthetic study of exactly ``slices`` slices of ``size`` px (written once)."""
    from keras_cspine.synthetic.dataset import Preset, generate_study

    images = folder / "test_images"
    done = [p for p in images.glob("*") if p.is_dir()] if images.is_dir() else []
    if done and len(list(done[0].glob("*.dcm"))) == slices:
        return done[0]
    preset = Preset(f"bench{slices}", (size,), (180.0, 180.0), (0.4, 0.4), (slices, slices),
                    (20.0, 20.0), 0.0, 24)  # fmt: skip
    print(f"[bench] writing a {slices}-slice {size} px study into {folder} ...", flush=True)
    study = generate_study(folder, seed=seed, preset=preset, split="test", keep_volumes=False,
                           head_first=True, compressed=False, tilted=False)  # fmt: skip
    return Path(study.folder)


def random_stage2(folder: Path, paper: bool) -> Path:
    """A random YOLO exported to ONNX in a subprocess (before TensorFlow is imported here)."""
    folder.mkdir(parents=True, exist_ok=True)
    yolo, imgsz = ("yolov8s", 640) if paper else ("yolov8n", 256)
    onnx = folder / f"{yolo}_{imgsz}.onnx"
    if not onnx.is_file():
        code = (
            "import sys; from keras_cspine.stage2.offline import import_ultralytics; "
            "import_ultralytics(); from ultralytics import YOLO; import shutil; "
            f"p = YOLO('{yolo}.yaml').export(format='onnx', imgsz={imgsz}, simplify=False, "
            "dynamic=False, device='cpu'); shutil.move(p, sys.argv[1])"
        )
        subprocess.run([sys.executable, "-c", code, str(onnx)], check=True, cwd=folder,
                       env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    return onnx


def random_stage1(folder: Path, paper: bool) -> Path:
    """A random stage 1 classifier saved as .keras."""
    folder.mkdir(parents=True, exist_ok=True)
    name, size = ("gcvit_tiny", 224) if paper else ("gcvit_xxtiny", 64)
    keras_path = folder / f"{name}_{size}.keras"
    if not keras_path.is_file():
        from keras_cspine.stage1.models.factory import build_model

        build_model(name, image_size=size, freeze="none").save(keras_path)
    return keras_path


def time_study(folder: Path, stage1, stage2, config, report_dir: Path) -> dict[str, float]:
    from keras_cspine.pipeline.predict import predict_study
    from keras_cspine.pipeline.report import write_study_report

    result = predict_study(folder, stage1, stage2, config)
    started = time.perf_counter()
    write_study_report(result, report_dir / folder.name, threshold=config.presence_threshold)
    timings = {k: result.timings.get(k, 0.0) for k in STEPS[:3]}
    timings["report"] = time.perf_counter() - started
    timings["gated"] = float(result.gated.mean())
    timings["boxes"] = float(len(result.boxes))
    return timings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", default="runs/bench_pipeline", help="study, models and results")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="slice rows and columns")
    parser.add_argument("--stage1", help="stage 1 run directory or .keras")
    parser.add_argument("--stage2", help="stage 2 run directory, .onnx or .pt")
    parser.add_argument("--runs", default="runs", help="where default models are looked for")
    parser.add_argument("--paper", action="store_true", help="random paper-sized models")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (median kept)")
    parser.add_argument("--box-conf", type=float, default=0.25)
    args = parser.parse_args(argv)

    out = Path(args.out)
    folder = ensure_study(out / "data", args.slices, args.size)
    stage1_path, stage2_path, source = args.stage1, args.stage2, "given"
    if not args.paper and stage1_path is None and stage2_path is None:
        from keras_cspine.pipeline.predict import find_latest_stage1, find_latest_stage2

        stage1_path, stage2_path = find_latest_stage1(args.runs), find_latest_stage2(args.runs)
        source = f"latest runs in {args.runs}"
    if args.paper:
        stage1_path, stage2_path = None, None
    if stage2_path is None:  # first: torch only ever runs in the child
        stage2_path = random_stage2(out / "models", args.paper)
        source = "random paper-sized" if args.paper else "random stage 2 (no run found)"
    if stage1_path is None:
        stage1_path = random_stage1(out / "models", args.paper)
        source = "random paper-sized" if args.paper else "random stage 1 (no run found)"

    from keras_cspine.pipeline.predict import PredictConfig, Stage1Model, Stage2Model

    stage1 = Stage1Model.load(stage1_path)
    stage2 = Stage2Model.load(stage2_path, conf=args.box_conf)
    print(f"[bench] models ({source}): stage 1 {stage1.describe()}\n"
          f"[bench]                  stage 2 {stage2.describe()}")  # fmt: skip
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = PredictConfig(box_conf=args.box_conf, gating=False)
        stage1.predict(*_first_slices(folder, warm.batch_size), batch_size=warm.batch_size)
        for mode, gating in (("gated", True), ("ungated", False)):
            config = PredictConfig(box_conf=args.box_conf, gating=gating)
            runs = [time_study(folder, stage1, stage2, config, Path(tmp) / f"{mode}{r}")
                    for r in range(args.repeats)]  # fmt: skip
            median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
            median["total"] = sum(median[k] for k in STEPS)
            results[mode] = median

    ratio = results["ungated"]["total"] / results["gated"]["total"]
    print(f"\n{args.slices} slices of {args.size} px, CPU ({os.cpu_count()} cores), median of "
          f"{args.repeats}:")
    print(f"{'mode':8s} {'s/study':>8s} {'ms/slice':>9s} {'stage 2 on':>10s} "
          + " ".join(f"{k:>8s}" for k in STEPS))  # fmt: skip
    for mode, r in results.items():
        shares = " ".join(f"{100 * r[k] / r['total']:7.1f}%" for k in STEPS)
        print(f"{mode:8s} {r['total']:8.2f} {1000 * r['total'] / args.slices:9.1f} "
              f"{r['gated']:10.0%} {shares}")  # fmt: skip
    print(f"ungated / gated time: {ratio:.2f}x")
    payload = {"slices": args.slices, "size": args.size, "cpu_count": os.cpu_count(),
               "models": {"source": source, "stage1": stage1.describe(),
                          "stage2": stage2.describe()},
               "repeats": args.repeats, "results": results, "ungated_over_gated": ratio}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pipeline.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[bench] wrote {out / 'bench_pipeline.json'}")
    return 0


def _first_slices(folder: Path, n: int):
    """HU, positions and z of the first ``n`` slices (to warm the stage 1 graph up)."""
    import numpy as np

    from keras_cspine.io.dicom import read_series_meta, read_slice

    meta = read_series_meta(folder)
    hu = np.stack([read_slice(s.path)[0] for s in meta.slices[:n]])
    positions = np.asarray(meta.positions_mm[:n])
    z = np.array([s.image_position[2] for s in meta.slices[:n]])
    return hu, positions, z


if __name__ == "__main__":
    raise SystemExit(main())
