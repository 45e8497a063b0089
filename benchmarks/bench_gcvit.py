"""GCViT forward throughput: our Keras 3 GCViT against timm's (paper Section 2.5 backbone).

Measures images/s of a GCViT (default gcvit_tiny, batch 8, 224 px, random weights, inference) on
the CPU for:

- ``keras``: ours, ``model.predict_on_batch`` compiled with ``jit_compile=False``;
- ``keras_xla``: ours, the same with ``jit_compile=True`` (XLA);
- ``timm``: timm's model under ``torch.inference_mode()``, in a worker subprocess, because
  TensorFlow and torch must never share a process.

Both sides use the same number of CPU threads. The modes run interleaved, one batch each per
round, so that other load on the machine slows them alike; besides images/s (median wall time)
the CPU seconds per image of each process (all threads) are reported, steadier on a shared machine.
Usage:

    python benchmarks/bench_gcvit.py                       # gcvit_tiny, batch 8, 224 px
    python benchmarks/bench_gcvit.py --iters 20 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(name: str, samples: list[tuple[float, float]], batch: int, **extra) -> dict:
    walls = [w for w, _ in samples]
    cpus = [c for _, c in samples]
    return {"name": name, "images_per_s": batch / statistics.median(walls),
            "median_s": statistics.median(walls), "best_s": min(walls),
            "cpu_s_per_image": statistics.median(cpus) / batch, "iters": len(samples), **extra}


def timm_worker(args) -> int:
    """timm side, in its own process (torch only, never TensorFlow): after warm-up, print READY,
    then time one forward pass per line read from stdin and print ``wall cpu``."""
    import numpy as np
    import timm
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.variant, pretrained=False, img_size=args.size).eval()
    x = torch.from_numpy(
        np.random.default_rng(0).normal(size=(args.batch, 3, args.size, args.size)).astype(
            "float32"))

    def step():
        with torch.inference_mode():
            model(x)

    for _ in range(args.warmup):
        step()
    print(json.dumps({"torch": torch.__version__, "timm": timm.__version__}), flush=True)
    for _line in sys.stdin:
        wall, cpu = _timed(step)
        print(f"{wall} {cpu}", flush=True)
    return 0


class _TimmRunner:
    """Drives :func:`timm_worker` in a subprocess, one timed batch per request."""

    def __init__(self, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--timm-worker",
               "--variant", args.variant, "--batch", str(args.batch), "--size", str(args.size),
               "--warmup", str(args.warmup), "--threads", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"timm worker failed (exit {self.proc.wait()})")
        self.versions = json.loads(line)

    def __call__(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run_benchmark(args) -> list[dict]:
    """Interleave the modes round by round, so that a busy machine slows them alike."""
    runners: dict = {}
    versions: dict = {}
    if "timm" in args.modes:  # start it first: torch and TF live in different processes
        timm_runner = _TimmRunner(args)
        runners["timm"] = timm_runner
        versions["timm"] = timm_runner.versions
    if {"keras", "keras_xla"} & set(args.modes):
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import numpy as np
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, args.threads)))
        import keras

        from keras_cspine.stage1.models.gcvit import build_gcvit

        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3))
        x = x.astype("float32")
        for name, jit in (("keras", False), ("keras_xla", True)):
            if name not in args.modes:
                continue
            model = build_gcvit(args.variant, image_size=args.size)
            model.compile(jit_compile=jit)
            start = time.perf_counter()
            model.predict_on_batch(x)  # trace (and XLA-compile) once
            for _ in range(args.warmup):
                model.predict_on_batch(x)
            versions[name] = {"first_call_s": time.perf_counter() - start,
                              "keras": keras.__version__, "tensorflow": tf.__version__,
                              "backend": keras.backend.backend()}
            runners[name] = (lambda m: lambda: _timed(lambda: m.predict_on_batch(x)))(model)
    samples: dict[str, list] = {name: [] for name in runners}
    try:
        for _ in range(args.iters):
            for name, runner in runners.items():
                samples[name].append(runner())
    finally:
        if "timm" in runners:
            runners["timm"].close()
    return [_summary(name, samples[name], args.batch, **versions[name]) for name in runners]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="gcvit_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--modes", nargs="+", default=["keras", "keras_xla", "timm"],
                        choices=["keras", "keras_xla", "timm"])
    parser.add_argument("--json", help="also write the results here (atomically)")
    parser.add_argument("--timm-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.timm_worker:
        return timm_worker(args)
    results = run_benchmark(args)

    print(f"{args.variant}, batch {args.batch}, {args.size} px, {args.threads} CPU threads, "
          f"median of {args.iters} interleaved rounds")
    timm_ips = next((r["images_per_s"] for r in results if r["name"] == "timm"), None)
    for r in results:
        ratio = f"  x{r['images_per_s'] / timm_ips:.2f} vs timm" if timm_ips else ""
        print(f"  {r['name']:<10} {r['images_per_s']:8.2f} images/s "
              f"({r['cpu_s_per_image']:.3f} CPU s/image){ratio}")
    if args.json:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from keras_cspine.utils import write_json

        write_json(args.json, {"settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
