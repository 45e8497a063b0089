"""Benchmark: studies per hour of `prepare` (1 and 2 workers) and `predict` (1 process, and 2
shard processes side by side), and what that means for the 2,019 RSNA training studies on n
machines.

On synthetic studies (`synth --preset small`: 80-120 slices of 128 x 128 by default):
- prepare: `prepare_dataset(workers=1)` and `workers=2`, each into a new folder, in this process;
- predict: `python -m keras_cspine predict INPUT --report none` as one process, then as two
  processes `--shard 0/2` and `--shard 1/2` started together (the last one merges). Each process
  pays its start (imports, model loading) once: that is counted, as a job array pays it too.
The models are a trained stage 1 run and stage 2 ONNX file when given (`--stage1`, `--stage2`:
e.g. the demo's `OUT/stage1` and `OUT/stage2/weights/best.onnx`), else two tiny stand-ins
(a one-layer Keras classifier and a constant ONNX detector; their figures measure the pipeline's
reading, rendering and bookkeeping, not the networks).

Wall time depends on the share of the cores a run gets on a shared machine; the CPU seconds
(user + system of the whole process tree) are printed beside it.

    python benchmarks/bench_throughput.py [--studies 6] [--size 64] [--mode multiwindow]
        [--stage1 RUN --stage2 MODEL.onnx] [--machines 1 4 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prepare import ProcessTreeMonitor  # noqa: E402

RSNA_STUDIES = 2019


def tiny_models(folder: Path) -> tuple[Path, Path]:
    """A stage 1 run (one Dense layer on the metadata) and a constant ONNX detector."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from test_pipeline import write_box_detector, write_ratio_classifier

    from keras_cspine.stage1 import runs
    from keras_cspine.stage1.dataset import METADATA_SCALE

    run = folder / "stage1"
    run.mkdir(parents=True)
    write_ratio_classifier(run / "model.keras", image_size=32)
    runs.write_preprocessing(run, mode="bone", render_size=32, image_size=32,
                             metadata_columns=("position_mm", "slice_ratio"),
                             metadata_scale=METADATA_SCALE)  # fmt: skip
    (run / "summary.json").write_text("{}")
    return run, write_box_detector(folder / "det.onnx")


def timed(fn) -> tuple[float, float]:
    with ProcessTreeMonitor() as monitor:
        started = time.perf_counter()
        fn()
        wall = time.perf_counter() - started
    return wall, monitor.cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="prepare --size (the demo's: 64)")
    parser.add_argument("--mode", default="multiwindow", help="prepare --mode (the demo's)")
    parser.add_argument("--stage1", help="a trained stage 1 run (default: a tiny stand-in)")
    parser.add_argument("--stage2", help="a stage 2 ONNX file or run (default: a tiny stand-in)")
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()

    from keras_cspine.data.prepare import prepare_dataset
    from keras_cspine.synthetic.dataset import generate_dataset

    work = Path(args.keep or tempfile.mkdtemp(prefix="bench_throughput_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "train.csv").is_file():
        generate_dataset(data, n_studies=args.studies, seed=args.seed, preset=args.preset,
                         n_test=0, workers=2, overwrite=True, progress=False)  # fmt: skip
    n = len(list((data / "train_images").iterdir()))
    slices = sum(len(list(p.glob("*.dcm"))) for p in (data / "train_images").iterdir())
    print(f"data: {n} synthetic '{args.preset}' studies, {slices} slices ({slices / n:.0f} a study), "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")  # fmt: skip

    rows = []
    for workers in (1, 2):
        out = work / f"prep_w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        wall, cpu = timed(lambda out=out, workers=workers: prepare_dataset(
            data, out, size=args.size, mode=args.mode, workers=workers, progress=False))
        rows.append((f"prepare --workers {workers} ({args.mode} {args.size} px)", wall, cpu))

    models = work / "models"
    if args.stage1 and args.stage2:
        stage1, stage2, which = Path(args.stage1), Path(args.stage2), "given models"
    else:
        shutil.rmtree(models, ignore_errors=True)
        stage1, stage2 = tiny_models(models)
        which = "tiny stand-in models (no trained models given)"
    command = [sys.executable, "-m", "keras_cspine", "predict", str(data / "train_images"),
               "--stage1", str(stage1), "--stage2", str(stage2), "--report", "none", "--quiet"]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}

    def predict(out: Path, shards: int) -> None:
        shutil.rmtree(out, ignore_errors=True)
        jobs = [subprocess.Popen([*command, "--out", str(out)] + (["--shard", f"{i}/{shards}"]
                                 if shards > 1 else []), env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for i in range(shards)]  # fmt: skip
        for job in jobs:
            _, err = job.communicate()
            if job.returncode != 0:
                raise SystemExit(f"predict failed ({job.returncode}): {err[-2000:]}")

    wall1, cpu1 = timed(lambda: predict(work / "pred_1", 1))
    rows.append(("predict, 1 process", wall1, cpu1))
    wall2, cpu2 = timed(lambda: predict(work / "pred_2", 2))
    rows.append(("predict, 2 shard processes", wall2, cpu2))
    same = (work / "pred_1" / "submission.csv").read_bytes() == (work / "pred_2" / "submission.csv").read_bytes()
    steady = json.loads((work / "pred_1" / "summary.json").read_text())["seconds"]

    print(f"predict models: {which}; merged submission.csv == single run's: {same}")
    print("predict steady state (1 process, from summary.json): "
          + ", ".join(f"{k} {v / n:.2f} s" for k, v in steady.items()) + " per study")
    print("\n| run | wall s | CPU s | studies/hour (wall) | slices/s (wall) |")
    print("|---|---|---|---|---|")
    for name, wall, cpu in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {n / wall * 3600:,.0f} | {slices / wall:.0f} |")
    print(f"\nThe {RSNA_STUDIES:,} RSNA training studies at these rates (same study size; real "
          "studies are larger: scale by their slices and pixels):")
    print("| run | " + " | ".join(f"{m} machine{'s' * (m > 1)}" for m in args.machines) + " |")
    print("|---|" + "---|" * len(args.machines))
    for name, wall, _ in rows:
        per_hour = n / wall * 3600
        cells = [f"{RSNA_STUDIES / (per_hour * m):.2f} h" for m in args.machines]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"(hours = {RSNA_STUDIES} / (studies per hour x machines); a machine of this kind "
          "runs the faster setting of each pair)")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
