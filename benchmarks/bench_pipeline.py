"""End-to-end speed of the two-stage pipeline on CPU: time by step, gated against ungated.

Serves the paper's two-stage system (Sections 2.5-2.6) as a deployable pipeline: one synthetic
study of ``--slices`` axial slices (default 300, 512 x 512, written once into ``--out``) goes
``--repeats`` times through ``keras_cspine.pipeline.predict.predict_study``, its report drawn by
``keras_cspine.pipeline.report.ReportPool`` (a spawned worker process, as ``predict`` does) in
three modes: ``ungated`` (stage 2 on every slice), ``gated`` (where stage 1 sees C1-C7) and
``gated_s2`` (gated, coarse to fine with ``gate_stride=2``: every other gated slice, then the
neighbours of each slice with a box). Printed per mode: seconds per study and by step (read,
stage 1, stage 2, report on the critical path: submitting plus the final wait), the report's
share of the wall time, the time the worker spent drawing, the share of slices stage 2 saw,
studies per hour, and the ungated / gated ratios. Results go to ``OUT/bench_pipeline.json``.

Models: ``--stage1`` / ``--stage2`` (run directories or files), by default the newest runs under
``--runs`` (e.g. those of ``make demo``); without any, random models of the demo's sizes are
built (GCViT-xxtiny at 64 px; a YOLOv8n exported to ONNX at 256 px in a subprocess), and
``--paper`` builds the paper's sizes instead (GCViT-tiny at 224 px, YOLOv8s at 640 px). With
random stage 1 weights the gate passes an arbitrary share of slices and a random detector finds
arbitrary boxes: the gated times are then only indicative; trained models give the real share.
``--stage1-engine`` picks the stage 1 engine (``keras_cspine.stage1.fast_inference``). The
machine may be shared: compare the modes of one run, not runs of different times.

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
    folder = folder.absolute()  # the export runs in that folder: a relative path would not do
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


def time_study(folder: Path, stage1, stage2, config, pool, report_dir: Path) -> dict[str, float]:
    """One study through both stages; its report handed to ``pool`` (time to hand it over)."""
    from keras_cspine.pipeline.predict import predict_study

    result = predict_study(folder, stage1, stage2, config)
    started = time.perf_counter()
    pool.submit(result, report_dir)
    timings = {k: result.timings.get(k, 0.0) for k in STEPS[:3]}
    timings["report"] = time.perf_counter() - started
    timings["gated"] = float(result.gated.mean())
    timings["boxes"] = float(len(result.boxes))
    return timings


MODES = {"ungated": {"gating": False}, "gated": {"gating": True, "gate_stride": 1},
         "gated_s2": {"gating": True, "gate_stride": 2}}  # fmt: skip


def time_mode(folder, stage1, stage2, config, repeats: int, tmp: Path) -> dict[str, float]:
    """Medians over ``repeats`` studies; the report's critical-path time includes the wait for
    the last reports at the end, shared over the studies."""
    from keras_cspine.pipeline.report import ReportPool

    pool = ReportPool(config.report_workers, "html", config.presence_threshold)
    started = time.perf_counter()
    runs = [time_study(folder, stage1, stage2, config, pool, tmp / f"r{r}") for r in range(repeats)]
    waited = time.perf_counter()
    pool.close()
    wall = time.perf_counter() - started
    median = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    median["report"] += (time.perf_counter() - waited) / repeats
    median["total"] = sum(median[k] for k in STEPS)
    median["wall_per_study"] = wall / repeats
    median["report_worker_s"] = pool.render_seconds / repeats
    if pool.failures:
        raise RuntimeError(f"reports failed: {pool.failures}")
    return median


def gate_analysis(n_studies: int, seed: int, preset: str) -> dict:
    """On labelled synthetic studies (drawn with ``seed``, in memory): the share of slices with
    a cervical vertebra (what a perfect stage 1 gate passes), the share with a fracture box, and
    per ``gate_stride`` the share of slices stage 2 would look at with the coarse-to-fine gate
    (:func:`refine_slices`, a perfect detector: a box exactly where the labels have one) and
    the fractured vertebrae it finds (recall)."""
    import numpy as np

    from keras_cspine.pipeline.results import refine_slices
    from keras_cspine.synthetic.dataset import generate_study

    totals = {"slices": 0, "cervical": 0, "box_slices": 0, "fractured_vertebrae": 0,
              "runs": [], "looked": {1: 0, 2: 0, 3: 0}, "found": {1: 0, 2: 0, 3: 0}}  # fmt: skip
    for index in range(n_studies):
        study = generate_study(None, seed=seed, index=index, preset=preset, split="train",
                               keep_volumes=False, head_first=True)  # fmt: skip
        seg = study.seg
        present = np.stack([(seg == k).any(axis=(1, 2)) for k in range(1, 8)], axis=1)
        cervical = present.any(axis=1)
        box_slices = {int(b["slice_number"]) - 1 for b in study.boxes}
        totals["slices"] += len(seg)
        totals["cervical"] += int(cervical.sum())
        totals["box_slices"] += len(box_slices)
        ordered = sorted(box_slices)
        run = 1
        for a, b in zip(ordered, ordered[1:] + [None]):
            if b == a + 1:
                run += 1
            else:
                totals["runs"].append(run)
                run = 1
        fractured = {k for k in range(7) if study.labels[f"C{k + 1}"]}
        totals["fractured_vertebrae"] += len(fractured)
        for stride in totals["looked"]:
            seen = refine_slices(cervical, stride, box_slices.__contains__)
            totals["looked"][stride] += int(seen.sum())
            found = {k for i in box_slices if seen[i] for k in range(7) if present[i, k]}
            totals["found"][stride] += len(fractured & found)
    runs = np.asarray(totals["runs"])
    return {"preset": preset, "seed": seed, "studies": n_studies, "slices": totals["slices"],
            "cervical_share": totals["cervical"] / totals["slices"],
            "box_slice_share": totals["box_slices"] / totals["slices"],
            "box_runs": len(runs), "box_run_min": int(runs.min()) if len(runs) else None,
            "box_run_median": float(np.median(runs)) if len(runs) else None,
            "looked_share": {s: v / totals["slices"] for s, v in totals["looked"].items()},
            "recall": {s: v / max(totals["fractured_vertebrae"], 1)
                       for s, v in totals["found"].items()}}  # fmt: skip


def main(argv=None) -> int:
    import keras_cspine.quiet

    keras_cspine.quiet.install()  # TensorFlow's start-up notices, as the command line drops them
    from keras_cspine.pipeline.config import STAGE1_ENGINES

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
    parser.add_argument("--stage1-engine", default="auto", choices=STAGE1_ENGINES,
                        help="as predict's (default auto, predict's default)")  # fmt: skip
    parser.add_argument("--report-workers", type=int, default=1)
    parser.add_argument("--gate-analysis", type=int, metavar="N",
                        help="only: the gate on N labelled synthetic studies (seed 1000)")  # fmt: skip
    parser.add_argument("--preset", default="small", help="synthetic preset of --gate-analysis")
    args = parser.parse_args(argv)
    if args.gate_analysis:
        print(json.dumps(gate_analysis(args.gate_analysis, 1000, args.preset), indent=1))
        return 0

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
    engine = stage1.use_engine(args.stage1_engine)
    stage2 = Stage2Model.load(stage2_path, conf=args.box_conf)
    print(f"[bench] models ({source}): stage 1 {stage1.describe()} engine {engine}\n"
          f"[bench]                  stage 2 {stage2.describe()}")  # fmt: skip
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm = PredictConfig(box_conf=args.box_conf, gating=False)
        hu, positions, z, numbers, spacing = _first_slices(folder, warm.batch_size)
        stage1.predict(hu, positions, z, batch_size=warm.batch_size,
                       roi=stage1.study_roi(hu, numbers, spacing))  # fmt: skip
        for mode, settings in MODES.items():
            config = PredictConfig(box_conf=args.box_conf, report_workers=args.report_workers,
                                   **settings)  # fmt: skip
            results[mode] = time_mode(folder, stage1, stage2, config, args.repeats,
                                      Path(tmp) / mode)  # fmt: skip

    ratio = results["ungated"]["total"] / results["gated"]["total"]
    ratio_s2 = results["ungated"]["total"] / results["gated_s2"]["total"]
    stage2_s2 = results["ungated"]["stage2"] / max(results["gated_s2"]["stage2"], 1e-9)
    print(f"\n{args.slices} slices of {args.size} px, CPU ({os.cpu_count()} cores, possibly "
          f"shared), stage 1 engine {engine['engine']}, median of {args.repeats}:")
    print(f"{'mode':9s} {'s/study':>8s} {'studies/h':>9s} {'stage 2 on':>10s} "
          + " ".join(f"{k:>8s}" for k in STEPS) + f" {'report %':>8s} {'drawing s':>9s}")  # fmt: skip
    for mode, r in results.items():
        steps = " ".join(f"{r[k]:8.2f}" for k in STEPS)
        print(f"{mode:9s} {r['total']:8.2f} {3600 / r['total']:9.1f} {r['gated']:10.0%} {steps} "
              f"{100 * r['report'] / r['total']:7.1f}% {r['report_worker_s']:9.2f}")  # fmt: skip
    print(f"ungated / gated time: {ratio:.2f}x; ungated / gated_s2 time: {ratio_s2:.2f}x "
          f"(stage 2 alone: {stage2_s2:.2f}x)")
    payload = {"slices": args.slices, "size": args.size, "cpu_count": os.cpu_count(),
               "models": {"source": source, "stage1": stage1.describe(), "engine": engine,
                          "stage2": stage2.describe()},
               "repeats": args.repeats, "results": results, "ungated_over_gated": ratio,
               "ungated_over_gated_s2": ratio_s2, "stage2_ungated_over_gated_s2": stage2_s2}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_pipeline.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"[bench] wrote {out / 'bench_pipeline.json'}")
    return 0


def _first_slices(folder: Path, n: int):
    """HU, positions, z, slice numbers and pixel spacing of the first ``n`` slices (to warm the
    stage 1 graph up)."""
    import numpy as np

    from keras_cspine.io.dicom import read_series_meta, read_slice

    meta = read_series_meta(folder)
    hu = np.stack([read_slice(s.path)[0] for s in meta.slices[:n]])
    positions = np.asarray(meta.positions_mm[:n])
    z = np.array([s.image_position[2] for s in meta.slices[:n]])
    return hu, positions, z, meta.slice_numbers[:n], meta.slices[0].pixel_spacing


if __name__ == "__main__":
    raise SystemExit(main())
