"""Stage 1 training throughput: float32 against mixed precision (and XLA) for stage1_gcvit_tiny.

Measures training images/s (``model.train_on_batch``: forward, backward, optimizer update, the
run's metrics) of the paper's model, the two-input GCViT-tiny of ``configs/stage1_gcvit_tiny.yaml``
(224 px, patch embedding and levels 0-2 frozen, Adam), built through the package's own path
(``keras_cspine.stage1.train.build_and_compile`` inside ``_dtype_policy``, as ``_fit_classifier`` does)
with random weights (speed does not depend on them). Each precision policy gets its own model; the
models run interleaved, one step each per round, so that other load on the machine slows them
alike, and the median step time is reported with the ratio mixed / float32.

The mixed policy defaults to ``mixed_float16`` on a GPU (loss scaling: Keras wraps the optimizer
in a LossScaleOptimizer) and ``mixed_bfloat16`` on a CPU (float16 has no fast CPU kernels).
``--jit`` also measures each policy with ``jit_compile=True`` (XLA); without it every model uses
``jit_compile=False``. Usage:

    python benchmarks/bench_train.py                       # batch 32, 224 px: a GPU check
    python benchmarks/bench_train.py --jit --json bench_train.json
    python benchmarks/bench_train.py --batch 4 --steps 2   # a small CPU run (a few minutes)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG = "stage1_gcvit_tiny"


def _device(tf) -> tuple[str, bool]:
    """A description of the device TensorFlow trains on, and whether it is a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({os.cpu_count()} cores)", False
    names = []
    for gpu in gpus:
        try:
            names.append(
                tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
            )
        except (RuntimeError, ValueError):
            names.append(gpu.name)
    return f"GPU x{len(gpus)}: {', '.join(names)} (the first one is used)", True


def _batch(batch: int, size: int):
    """A fixed random training batch, already a tensor on the device (no input pipeline cost)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = {"image": rng.uniform(0, 255, (batch, size, size, 3)).astype("float32"),
         "metadata": rng.uniform(0, 1, (batch, 2)).astype("float32")}  # fmt: skip
    y = (rng.uniform(0, 1, (batch, 7)) > 0.7).astype("float32")
    return {k: tf.constant(v) for k, v in x.items()}, tf.constant(y)


class _Mode:
    """One model (policy, jit) and its timed steps."""

    def __init__(self, policy: str, jit: bool, args, batch):

        from keras_cspine.stage1.models.factory import count_parameters
        from keras_cspine.stage1.train import (
            _dtype_policy,
            build_and_compile,
            build_training_state,
            load_stage1_config,
        )

        self.policy, self.jit = policy, jit
        self.name = policy + (" +XLA" if jit else "")
        overrides = [
            "model.weights=null",  # random weights: nothing to load or download
            f"data.image_size={args.image_size}",
            f"train.batch_size={args.batch}",
            f"train.jit_compile={'true' if jit else 'false'}",
            f"train.mixed_precision={'null' if policy == 'float32' else policy}",
        ]
        if args.freeze:
            overrides.append(f"model.freeze={args.freeze}")
        self.config = load_stage1_config(CONFIG, overrides)
        self._policy = _dtype_policy
        self.batch = batch
        with _dtype_policy(self.config.train.mixed_precision):
            started = time.perf_counter()
            self.model = build_and_compile(self.config, args.image_size)
            build_training_state(self.model, batch)
            self.build_s = time.perf_counter() - started
            started = time.perf_counter()
            self.step()  # traces (and XLA-compiles) the train step
            self.first_step_s = time.perf_counter() - started
        self.parameters = count_parameters(self.model)
        self.optimizer = type(self.model.optimizer).__name__
        self.times: list[float] = []
        self.losses: list[float] = []

    def step(self) -> float:
        logs = self.model.train_on_batch(*self.batch, return_dict=True)  # returns host values
        return float(logs["loss"])

    def timed_step(self, record: bool = True) -> None:
        with self._policy(self.config.train.mixed_precision):
            started = time.perf_counter()
            loss = self.step()
            elapsed = time.perf_counter() - started
        if record:
            self.times.append(elapsed)
            self.losses.append(loss)

    def result(self, batch: int) -> dict:
        median = statistics.median(self.times)
        return {"name": self.name, "policy": self.policy, "jit_compile": self.jit,
                "images_per_s": batch / median, "median_step_s": median,
                "best_step_s": min(self.times), "first_step_s": self.first_step_s,
                "build_s": self.build_s, "step_s": self.times, "optimizer": self.optimizer,
                "last_loss": self.losses[-1], "parameters": self.parameters}  # fmt: skip


def run_benchmark(args) -> tuple[dict, list[dict]]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import tensorflow as tf

    if args.threads:
        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(max(1, min(2, args.threads)))
    import keras

    device, on_gpu = _device(tf)
    mixed = args.policy or ("mixed_float16" if on_gpu else "mixed_bfloat16")
    policies = ["float32", mixed]
    jits = [False, True] if args.jit else [False]
    batch = _batch(args.batch, args.image_size)
    # Seed once: tf.random.set_seed (keras.utils.set_random_seed) between two models' steps makes
    # every train function traced before it trace again on its next call (seconds to minutes).
    keras.utils.set_random_seed(0)
    modes = []
    for jit in jits:
        for policy in policies:
            print(f"building {policy}{' +XLA' if jit else ''} ...", file=sys.stderr, flush=True)
            modes.append(_Mode(policy, jit, args, batch))  # builds and traces: warm-up step 1
    for _ in range(args.warmup - 1):
        for mode in modes:
            mode.timed_step(record=False)
    for _ in range(args.steps):
        for mode in modes:
            mode.timed_step()
    info = {"device": device, "gpu": on_gpu, "mixed_policy": mixed, "tensorflow": tf.__version__,
            "keras": keras.__version__, "backend": keras.backend.backend(),
            "config": CONFIG, "model": modes[0].config.model.name,
            "freeze": modes[0].config.model.freeze}  # fmt: skip
    return info, [mode.result(args.batch) for mode in modes]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first traces)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--policy", choices=["mixed_float16", "mixed_bfloat16"], default=None,
                        help="the mixed policy (default: mixed_float16 on a GPU, "
                             "mixed_bfloat16 on a CPU)")  # fmt: skip
    parser.add_argument("--jit", action="store_true",
                        help="also measure jit_compile=True (XLA) for each policy")  # fmt: skip
    parser.add_argument("--freeze", default=None,
                        help=f"override the config's freeze spec (default: {CONFIG}'s)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None,
                        help="TensorFlow intra-op threads (default: TensorFlow's choice)")  # fmt: skip
    parser.add_argument("--json", help="also write the results here (atomically)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.steps < 1 or args.warmup < 1 or args.image_size < 32:
        parser.error("--batch, --steps and --warmup must be >= 1 and --image-size >= 32")

    info, results = run_benchmark(args)
    params = results[0]["parameters"]
    print(
        f"{CONFIG} ({info['model']}, freeze {info['freeze']}, random weights): "
        f"{params['trainable']:,} trainable / {params['non_trainable']:,} non-trainable"
    )
    print(f"batch {args.batch}, {args.image_size} px, median of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up")  # fmt: skip
    print(f"device: {info['device']}; TensorFlow {info['tensorflow']}, Keras {info['keras']}")
    for r in results:
        print(f"  {r['name']:<22} {r['images_per_s']:8.2f} images/s  (step {r['median_step_s']:.3f} s,"
              f" first step {r['first_step_s']:.1f} s, {r['optimizer']}, loss {r['last_loss']:.4f})")  # fmt: skip
    by_name = {r["name"]: r for r in results}
    for suffix in ("", " +XLA"):
        base, mixed = by_name.get("float32" + suffix), by_name.get(info["mixed_policy"] + suffix)
        if base and mixed:
            ratio = mixed["images_per_s"] / base["images_per_s"]
            print(f"  {info['mixed_policy']}/float32{suffix}: x{ratio:.2f}")
    if args.jit:
        for policy in ("float32", info["mixed_policy"]):
            ratio = by_name[policy + " +XLA"]["images_per_s"] / by_name[policy]["images_per_s"]
            print(f"  {policy} XLA/no XLA: x{ratio:.2f}")
    if args.json:
        from keras_cspine.utils import write_json

        write_json(args.json, {"settings": vars(args), **info, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
