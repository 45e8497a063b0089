"""Stage 2 inference speed: the torch-free ONNX predictor against Ultralytics' torch predictor.

Both run in this one process, on the same images, on CPU, with the same thread count, one image
at a time (as the two-stage pipeline calls them), after a warm-up; the best of ``--repeats``
timings is kept. Prints images/s of each and the ratio (ONNX / torch).

    python benchmarks/bench_detect.py                         # random-init yolov8n, 640 px
    python benchmarks/bench_detect.py --weights runs/detect/yolov8s/weights/best.pt \\
        --data runs/yolo_data --imgsz 640 --images 50

Speed does not depend on the weights' values, so without ``--weights`` a yolov8n is built from
Ultralytics' .yaml (no download). Without ``--data``, synthetic RSNA-like slices are rendered.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _images(data: str | None, n: int, size: int, seed: int) -> list[np.ndarray]:
    """RGB uint8 images: the val split of a YOLO export, or rendered synthetic slices."""
    from PIL import Image

    if data:
        folder = Path(data) / "images" / "val"
        paths = sorted(folder.glob("*.png"))[:n]
        if not paths:
            raise SystemExit(f"{folder}: no images")
        return [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    from keras_cspine.data.preprocess import to_model_image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    images = []
    for _ in range(n):
        hu = -1000 + 1040 * (((xx - 0.5) ** 2 + (yy - 0.5) ** 2) < 0.16)  # a neck-like disc
        cx, cy = rng.uniform(0.4, 0.6, 2)
        hu = hu + 1200 * (((xx - cx) ** 2 + (yy - cy) ** 2) < 0.004) + rng.normal(0, 20, hu.shape)
        images.append(to_model_image(hu.astype(np.float32), "bone", size=size))
    return images


def _rate(predict, images: list[np.ndarray], repeats: int) -> float:
    for image in images[:3]:  # warm-up
        predict(image)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for image in images:
            predict(image)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", help="trained .pt (default: random-init yolov8n)")
    parser.add_argument("--data", help="a YOLO export folder; its val images are used")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--images", type=int, default=30)
    parser.add_argument("--size", type=int, default=512, help="synthetic image side")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--conf", type=float, default=0.25)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)

    from keras_cspine.stage2.offline import import_ultralytics

    import_ultralytics()
    import torch
    from ultralytics import YOLO

    from keras_cspine.stage2.onnx_predictor import OnnxDetector
    from keras_cspine.stage2.ultralytics_train import export_onnx

    torch.set_num_threads(args.threads)
    images = _images(args.data, args.images, args.size, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(args.weights) if args.weights else Path(tmp) / "yolov8n_random.pt"
        if not args.weights:
            YOLO("yolov8n.yaml").save(weights)
        onnx = export_onnx(weights, Path(tmp) / "model.onnx", imgsz=args.imgsz)
        model = YOLO(str(weights))
        detector = OnnxDetector(onnx, conf=args.conf, threads=args.threads)

        def torch_predict(image):  # Ultralytics takes BGR arrays, as cv2.imread gives
            return model.predict(image[..., ::-1], imgsz=args.imgsz, conf=args.conf,
                                 device="cpu", verbose=False)  # fmt: skip

        torch_rate = _rate(torch_predict, images, args.repeats)
        onnx_rate = _rate(detector.predict, images, args.repeats)
    result = {
        "images": len(images), "image_shape": list(images[0].shape), "imgsz": args.imgsz,
        "threads": args.threads, "weights": str(args.weights or "random-init yolov8n"),
        "ultralytics_torch_images_per_s": round(torch_rate, 2),
        "onnxruntime_images_per_s": round(onnx_rate, 2),
        "ratio_onnx_over_torch": round(onnx_rate / torch_rate, 3),
    }  # fmt: skip
    print(f"{len(images)} images {images[0].shape[1]}x{images[0].shape[0]} -> {args.imgsz} px, "
          f"{args.threads} threads, CPU")  # fmt: skip
    print(f"Ultralytics (torch) predictor: {torch_rate:8.2f} images/s")
    print(f"ONNX predictor (onnxruntime):  {onnx_rate:8.2f} images/s")
    print(f"ratio ONNX / torch:            {onnx_rate / torch_rate:8.3f}")
    if args.out:
        from keras_cspine.utils import write_json

        write_json(args.out, result)
    else:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
