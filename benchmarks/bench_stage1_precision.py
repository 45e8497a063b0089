"""What each stage 1 engine costs in accuracy, on the held-out studies of a trained run.

The speed of the engines is ``bench_stage1_inference.py`` (random weights suffice there); their
accuracy needs trained weights and studies the model never saw: this runs the run's
``model.keras`` through every engine of ``keras_cspine.stage1.fast_inference`` on the run's
``test`` split (the prepared cache, as ``evaluate`` reads it) and prints, per engine, the
paper's per-slice metrics (macro F1, exact match ratio, coverage error), the largest absolute
probability difference to Keras, how many slice-vertebra decisions (p >= 0.5) differ from
Keras', and the seconds it took to start (export, compile, probe check).

    python benchmarks/bench_stage1_precision.py runs/demo/stage1
    python benchmarks/bench_stage1_precision.py RUN --engines keras openvino openvino_bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a stage 1 training run (model.keras, splits.json)")
    parser.add_argument("--split", default="test", choices=["val", "test"])
    parser.add_argument("--engines", nargs="+",
                        default=["keras", "onnx", "onnx_int8", "openvino", "openvino_bf16"])  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    import keras_cspine.quiet

    keras_cspine.quiet.install()
    import keras
    import numpy as np

    import keras_cspine.stage1.models.factory  # noqa: F401 - registers every model, for loading
    from keras_cspine.config import load_config
    from keras_cspine.stage1 import runs
    from keras_cspine.stage1.config import Stage1Config
    from keras_cspine.stage1.dataset import CSpineSequence
    from keras_cspine.stage1.fast_inference import make_runner
    from keras_cspine.stage1.metrics import multilabel_metrics
    from keras_cspine.stage1.models.factory import get_spec

    run = Path(args.run)
    config = load_config(Stage1Config, run / runs.CONFIG_FILE)
    splits = json.loads((run / runs.SPLITS_FILE).read_text())
    model = keras.saving.load_model(run / runs.MODEL_FILE)
    sequence = CSpineSequence(splits["prepared"], splits[args.split], batch_size=32,
                              inputs=get_spec(config.model.name).inputs,
                              metadata_columns=config.data.metadata_columns,
                              image_size=config.data.image_size)  # fmt: skip
    batches = [sequence[i][0] for i in range(len(sequence))]
    y_true = sequence.labels.astype(np.int64)
    print(f"{run}: {args.split} split, {len(splits[args.split])} studies, {len(y_true)} slices")
    print(f"{'engine':14s} {'start s':>8s} {'macro F1':>9s} {'EMR':>7s} {'coverage':>9s} "
          f"{'max |dp|':>9s} {'flipped':>8s}")
    reference = None
    with tempfile.TemporaryDirectory() as cache:
        for engine in args.engines:
            started = time.perf_counter()
            runner, note = make_runner(model, engine, run / runs.MODEL_FILE, threads=args.threads,
                                       cache=cache)  # fmt: skip
            start = time.perf_counter() - started
            if note["engine"] != engine:
                print(f"{engine:14s} unavailable: {note.get('fallback')}")
                continue
            scores = np.concatenate([runner(batch)[1] for batch in batches])[: len(y_true)]
            if reference is None:
                reference = scores
            m = multilabel_metrics(y_true, scores)
            flipped = int(((scores >= 0.5) != (reference >= 0.5)).sum())
            print(f"{engine:14s} {start:8.1f} {m['macro_f1']:9.4f} {m['exact_match_ratio']:7.4f} "
                  f"{m['coverage_error']:9.4f} {float(np.abs(scores - reference).max()):9.1e} "
                  f"{flipped:5d}/{reference.size}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
