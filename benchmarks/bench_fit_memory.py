"""Does ``model.fit`` on a CSpineSequence lose its time in the kernel? With and without
:class:`keras_cspine.stage1.dataset.KeepFreedMemory`, side by side.

Serves the paper's Section 2.5 training setup (the generator fed through ``tf.data``). TensorFlow's
generator dataset lowers glibc's trim threshold, which turns every large tensor into an
mmap/munmap pair with fresh page faults each step. Each variant runs in its own process (the
malloc setting is process-wide): ``fit`` for a warm-up epoch, then timed epochs; the wall, user
and system CPU seconds and the speed-up are printed.

    python benchmarks/bench_fit_memory.py                      # narrow GCViT, 64 px, batch 32
    python benchmarks/bench_fit_memory.py --steps 24 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NARROW_GCVIT = {"embed_dim": 32, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 4, 8],
                "window_size": [4, 4, 4, 2]}  # fmt: skip  (configs/stage1_synthetic_small.yaml)


def child(prepared: str, keep: bool, size: int, batch: int, steps: int, epochs: int) -> dict:
    """One variant, in this process: wall/user/system seconds of ``epochs`` timed epochs."""
    import keras

    from keras_cspine.stage1.dataset import CSpineSequence, KeepFreedMemory
    from keras_cspine.stage1.models.factory import build_model
    from keras_cspine.stage1.train import build_training_state

    keras.utils.set_random_seed(0)
    sequence = CSpineSequence(prepared, batch_size=batch, image_size=size, shuffle=True, seed=0)
    model = build_model("gcvit_xxtiny", image_size=size, freeze="none",
                        backbone_kwargs=NARROW_GCVIT)  # fmt: skip
    model.compile(keras.optimizers.AdamW(1e-3), "binary_crossentropy", jit_compile=False)
    build_training_state(model, sequence[0])
    callbacks = [KeepFreedMemory()] if keep else []
    model.fit(sequence, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=callbacks)
    before, start = os.times(), time.perf_counter()
    model.fit(sequence, epochs=epochs, steps_per_epoch=steps, verbose=0, callbacks=callbacks)
    after = os.times()
    return {"wall_s": round(time.perf_counter() - start, 2),
            "user_s": round(after.user - before.user, 2),
            "system_s": round(after.system - before.system, 2)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="steps per timed epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", nargs=2, metavar=("PREPARED", "KEEP"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child[0], args.child[1] == "1", args.size, args.batch, args.steps,
                       args.epochs)  # fmt: skip
        print("RESULT " + json.dumps(result))
        return 0

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_generator import make_cache

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepared = make_cache(Path(tmp), args.size, slices=max(64, args.batch * args.steps // 4))
        for name, keep in (("tf_default", "0"), ("keep_freed_memory", "1")):
            out = subprocess.run(
                [sys.executable, __file__, "--child", str(prepared), keep, "--size",
                 str(args.size), "--batch", str(args.batch), "--steps", str(args.steps),
                 "--epochs", str(args.epochs)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
            results[name] = json.loads(line[len("RESULT "):])
    results["speedup_wall"] = round(results["tf_default"]["wall_s"]
                                    / results["keep_freed_memory"]["wall_s"], 2)  # fmt: skip
    for name in ("tf_default", "keep_freed_memory"):
        r = results[name]
        print(f"{name:<18} wall {r['wall_s']:7.2f} s  user {r['user_s']:7.2f} s  "
              f"system {r['system_s']:7.2f} s")  # fmt: skip
    print(f"speed-up (wall): {results['speedup_wall']}x")
    if args.json:
        from keras_cspine.utils import write_json

        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
