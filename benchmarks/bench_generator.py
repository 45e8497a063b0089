"""Is the stage 1 input pipeline fast enough? CSpineSequence images/s vs model training images/s.

Serves the paper's Section 2.5 training setup at its 224 px input: the generator reads the prepare
cache (memory-mapped) and augments on the fly; this prints its throughput beside the training
throughput of a registry model and their ratio (> 1: the generator keeps up).

    python benchmarks/bench_generator.py                       # builds a throwaway 224 px cache
    python benchmarks/bench_generator.py --prepared PREP --model gcvit_tiny --batches 20
    python benchmarks/bench_generator.py --json out.json

Without ``--prepared`` a cache of random slices is written to a temporary folder in the prepare
layout (index.csv + cache/), so only the reading and augmentation costs are measured.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")


def make_cache(root: Path, size: int, studies: int = 4, slices: int = 64, seed: int = 0) -> Path:
    """A prepare-layout folder with random uint8 slices and labels."""
    rng = np.random.default_rng(seed)
    (root / "cache").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(studies):
        uid = f"1.2.826.0.1.3680043.{7000 + s}"
        np.save(root / "cache" / f"{uid}.npy",
                rng.integers(0, 256, (slices, size, size, 3), dtype=np.uint8))  # fmt: skip
        for z in range(slices):
            labels = rng.integers(0, 2, 7)
            rows.append({
                "StudyInstanceUID": uid, "slice_number": z + 1, "series_index": z,
                "n_slices": slices, "z_mm": -float(z), "position_mm": float(z),
                "slice_ratio": z / (slices - 1), **dict(zip(VERTEBRAE, labels.tolist())),
                "labels_known": 1, "has_fracture_box": 0, "boxes": "[]", "rows": 512,
                "columns": 512, "cache_file": f"cache/{uid}.npy",
            })  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "index.csv", index=False)
    return root


def generator_rate(prepared: Path, size: int, batch: int, batches: int, augment: bool) -> float:
    """Images per second of ``CSpineSequence.__getitem__`` (one process)."""
    from keras_cspine.stage1.dataset import CSpineSequence

    seq = CSpineSequence(prepared, batch_size=batch, image_size=size, shuffle=True,
                         augment=augment, seed=0)  # fmt: skip
    seq[0]  # open the memory maps
    n = min(batches, len(seq))
    start = time.perf_counter()
    images = 0
    for i in range(n):
        images += len(seq[i][1])
    return images / (time.perf_counter() - start)


def model_rate(model_name: str, size: int, batch: int, steps: int) -> float:
    """Training images per second of a registry model (random data, after one warm-up step)."""
    import keras

    from keras_cspine.stage1.models.factory import build_model, get_spec

    model = build_model(model_name, image_size=size)
    model.compile("adam", "binary_crossentropy", jit_compile=False)
    rng = np.random.default_rng(0)
    x = {"image": rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")}
    if get_spec(model_name).inputs == "image+metadata":
        x["metadata"] = rng.uniform(0, 1, (batch, 2)).astype("float32")
    y = rng.integers(0, 2, (batch, 7)).astype("float32")
    model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch(x, y)
    rate = batch * steps / (time.perf_counter() - start)
    keras.backend.clear_session()
    return rate


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", type=Path, help="a prepare folder (default: a random one)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=16, help="generator batches timed")
    parser.add_argument("--model", default="gcvit_tiny", help="registry model for the comparison")
    parser.add_argument("--steps", type=int, default=3, help="training steps timed")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = args.prepared or make_cache(Path(tmp), args.size)
        plain = generator_rate(prepared, args.size, args.batch, args.batches, augment=False)
        augmented = generator_rate(prepared, args.size, args.batch, args.batches, augment=True)
    training = model_rate(args.model, args.size, args.batch, args.steps)
    result = {
        "size": args.size, "batch": args.batch, "model": args.model,
        "generator_images_per_s": round(plain, 1),
        "generator_augmented_images_per_s": round(augmented, 1),
        "training_images_per_s": round(training, 2),
        "ratio_augmented_generator_to_training": round(augmented / training, 2),
    }  # fmt: skip
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    verdict = "keeps up with" if augmented >= training else "is SLOWER than"
    print(f"one generator worker {verdict} {args.model} training "
          f"({result['ratio_augmented_generator_to_training']}x)", file=sys.stderr)  # fmt: skip
    if args.json:
        from keras_cspine.utils import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
