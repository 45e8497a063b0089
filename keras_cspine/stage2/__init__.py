"""Stage 2 of the paper: cervical spine fracture detection with YOLO (Section 2.6; Table 3).

- :mod:`~keras_cspine.stage2.yolo_dataset`: RSNA boxes -> YOLO dataset (``detect export``).
- :mod:`~keras_cspine.stage2.offline`: Ultralytics with no network access at all.
- :mod:`~keras_cspine.stage2.ultralytics_train`: train / validate / ONNX export (torch).
- :mod:`~keras_cspine.stage2.metrics`: Table 3 metrics, an independent mAP, pycocotools check.
- :mod:`~keras_cspine.stage2.onnx_predictor`: inference with onnxruntime only (no torch), for
  the two-stage pipeline beside TensorFlow.
- :func:`reproduce_table3`: the paper's Table 3 in one call.

Importing this package imports neither torch, Ultralytics nor TensorFlow.
"""

from __future__ import annotations

__all__ = ["OnnxDetector", "ExportConfig", "export_yolo_dataset", "reproduce_table3"]


def reproduce_table3(data_dir, out_dir, models=None, epochs=100, imgsz=640, **kwargs):
    """Train and evaluate YOLOv8s/m and YOLOv5s/m; write ``table3.csv``/``.md`` (see
    :func:`keras_cspine.stage2.table3.reproduce_table3`). Each model trains in a subprocess, so
    this may be called from a process that has imported TensorFlow."""
    from keras_cspine.stage2.table3 import TABLE3_MODELS
    from keras_cspine.stage2.table3 import reproduce_table3 as _reproduce

    return _reproduce(
        data_dir, out_dir, models=models or TABLE3_MODELS, epochs=epochs, imgsz=imgsz, **kwargs
    )


def __getattr__(name):
    if name == "OnnxDetector":
        from keras_cspine.stage2.onnx_predictor import OnnxDetector

        return OnnxDetector
    if name in ("ExportConfig", "export_yolo_dataset"):
        from keras_cspine.stage2 import yolo_dataset
        return getattr(yolo_dataset, name)
    raise AttributeError(f"module 'keras_cspine.stage2' has no attribute {name!r}")
