"""Stage 1 inference throughput by engine (paper Section 2.5, the classifier of Figure 5).

The stage 1 classifier (default: the paper's GCViT-tiny two-input network at 224 px, random
weights: the speed does not depend on them) is run on the CPU by each engine of
``keras_cspine.stage1.fast_inference``, each in its own worker process (so that one engine's
threads or TensorFlow settings never touch another's), one batch per engine in turn, cycle
after cycle: load on a shared machine then slows them alike and the ratios stay fair.

- ``keras``: ``model.predict_on_batch`` (the reference; what ``predict`` did before);
- ``xla``: ``tf.function(jit_compile=True)``;
- ``onnx``: tf2onnx export run by onnxruntime (float32);
- ``onnx_int8``: the same with int8 weights (``quantize_dynamic``);
- ``openvino``: the same ONNX export compiled by OpenVINO for the CPU (float32, a batch split
  across OpenVINO's streams);
- ``openvino_bf16``: the same with bfloat16 inference precision (reduced precision);
- ``keras_bf16``: TensorFlow's oneDNN bfloat16 auto mixed precision (a grappler option that
  acts on the whole process; measured here, not offered by ``predict``).

Printed: images/s, CPU seconds per image, the ratio to ``keras`` and the largest absolute
probability difference to ``keras`` on the same batch.

    python benchmarks/bench_stage1_inference.py                        # gcvit_tiny, 224 px
    python benchmarks/bench_stage1_inference.py --model gcvit_xxtiny --size 64 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("keras", "xla", "onnx", "onnx_int8", "openvino", "openvino_bf16", "keras_bf16")


def worker(args) -> int:
    """One engine in this process: print the probabilities of the probe batch, then time one
    batch per line read from stdin and print ``wall cpu``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    sys.path.insert(0, str(REPO))
    import keras
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if args.worker == "keras_bf16":
        tf.config.optimizer.set_experimental_options({"auto_mixed_precision_onednn_bfloat16": True})
    from keras_cspine.stage1.fast_inference import make_runner
    from keras_cspine.stage1.models.factory import build_model

    keras.utils.set_random_seed(0)
    model = build_model(args.model, image_size=args.size, freeze="none")
    started = time.perf_counter()
    engine = "keras" if args.worker == "keras_bf16" else args.worker
    runner, _ = make_runner(model, engine, threads=args.threads, cache=args.cache, check=False)
    rng = np.random.default_rng(1)
    batch = {"image": rng.integers(0, 256, (args.batch, args.size, args.size, 3)).astype("float32"),
             "metadata": rng.uniform(0, 2, (args.batch, 2)).astype("float32")}  # fmt: skip
    _, probs = runner(batch)
    for _ in range(args.warmup):
        runner(batch)
    print(json.dumps({"probabilities": np.asarray(probs).tolist(),
                      "setup_s": time.perf_counter() - started}), flush=True)  # fmt: skip
    for _line in sys.stdin:
        wall, cpu = time.perf_counter(), time.process_time()
        runner(batch)
        print(f"{time.perf_counter() - wall} {time.process_time() - cpu}", flush=True)
    return 0


class Worker:
    def __init__(self, engine: str, args):
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", args.model,
               "--size", str(args.size), "--batch", str(args.batch), "--threads",
               str(args.threads), "--warmup", str(args.warmup), "--cache", args.cache]  # fmt: skip
        self.engine = engine
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ready(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.engine} worker failed (exit {self.proc.wait()})")
        return json.loads(line)

    def __call__(self) -> tuple[float, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        wall, cpu = self.proc.stdout.readline().split()
        return float(wall), float(cpu)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def run(args) -> dict:
    import numpy as np

    results = {}
    workers = []
    try:
        for engine in args.engines:  # one at a time: setting up (ONNX export) is heavy
            w = Worker(engine, args)
            results[engine] = w.ready()
            workers.append(w)
        samples = {w.engine: [] for w in workers}
        for _ in range(args.iters):
            for w in workers:
                samples[w.engine].append(w())
    finally:
        for w in workers:
            w.close()
    reference = np.asarray(results[args.engines[0]]["probabilities"])
    for engine, found in results.items():
        walls = [s[0] for s in samples[engine]]
        found.update(images_per_s=args.batch / statistics.median(walls),
                     cpu_s_per_image=statistics.median(s[1] for s in samples[engine]) / args.batch,
                     max_abs_diff=float(np.abs(np.asarray(found.pop("probabilities"))
                                               - reference).max()))  # fmt: skip
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--model", default="gcvit_tiny")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--cache", default=str(REPO / "runs" / "bench_stage1_inference"),
                        help="where the ONNX exports are kept")  # fmt: skip
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.engines[0] != "keras":
        args.engines = ["keras", *[e for e in args.engines if e != "keras"]]
    results = run(args)
    base = results["keras"]["images_per_s"]
    print(f"\n{args.model} classifier, {args.size} px, batch {args.batch}, {args.threads} threads, "
          f"{os.cpu_count()} cores, median of {args.iters} interleaved cycles (random weights)")
    print(f"{'engine':<13} {'images/s':>9} {'CPU s/img':>10} {'vs keras':>9} {'max |dp|':>9}")
    for engine, r in results.items():
        print(f"{engine:<13} {r['images_per_s']:9.2f} {r['cpu_s_per_image']:10.3f} "
              f"{r['images_per_s'] / base:8.2f}x {r['max_abs_diff']:9.1e}")
    if args.json:
        sys.path.insert(0, str(REPO))
        from keras_cspine.utils import write_json

        write_json(args.json, {"settings": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
