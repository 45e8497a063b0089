"""Stage 2 inference without torch: a YOLO fracture detector exported to ONNX, run by onnxruntime.

Serves the paper's two-stage system (stage 1, Section 2.5; stage 2, Section 2.6): stage 1 runs in
TensorFlow, and stage 2 must run beside it in the same process, where importing torch after
TensorFlow crashes. This module imports neither torch nor Ultralytics; it re-implements the few
steps of Ultralytics' detection predictor that surround the network, so that its boxes match
Ultralytics' own:

1. letterbox to the model's square input (``cv2.INTER_LINEAR`` resize, centred grey-114 padding,
   with Ultralytics' rounding), RGB, CHW, ``/ 255``;
2. the network (ONNX, exported by ``keras_cspine.stage2.ultralytics_train.export_onnx``);
3. confidence filter, class-offset greedy NMS (``IoU > iou`` suppresses), ``max_det``;
4. boxes back to the input image, then, with :meth:`OnnxDetector.predict_slice`, to the native
   slice pixel grid of the DICOM (``x, y, width, height`` as in ``train_bounding_boxes.csv``).

onnxruntime's telemetry is switched off (:func:`disable_telemetry`) before any session is made.

Example:
    >>> detector = OnnxDetector("runs/detect/yolov8s/weights/best.onnx", conf=0.25)
    >>> found = detector.predict(rgb_uint8_image)        # boxes in image pixels
    >>> found = detector.predict_slice(hu, mode="bone")  # boxes in native slice pixels
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keras_cspine.errors import CSpineDataError, MissingDependencyError

PAD_VALUE = 114
MAX_WH = 7680  # class offset of Ultralytics' batched NMS
MAX_NMS = 30000  # candidates kept before NMS, as Ultralytics


@dataclass(frozen=True)
class Detections:
    """Boxes found in one image.

    Attributes:
        boxes: ``(N, 4)`` float32 ``x1, y1, x2, y2`` pixels of the image they refer to.
        scores: ``(N,)`` float32 confidences, descending.
        classes: ``(N,)`` int64 class indices (0 = fracture).
        image_shape: ``(rows, columns)`` of the image the boxes refer to.
    """

    boxes: np.ndarray
    scores: np.ndarray
    classes: np.ndarray
    image_shape: tuple[int, int]

    def __len__(self) -> int:
        return len(self.scores)

    def xywh(self) -> np.ndarray:
        """Boxes as ``x, y, width, height`` (top-left corner), the RSNA CSV convention."""
        out = self.boxes.copy()
        out[:, 2:] -= out[:, :2]
        return out

    def to_slice(self, rows: int, columns: int) -> Detections:
        """Boxes of a ``to_model_image`` square image mapped back to its native ``rows x columns``
        slice (inverse of ``keras_cspine.data.preprocess.square_transform``), clipped to the slice."""
        from keras_cspine.data.preprocess import square_transform

        if self.image_shape[0] != self.image_shape[1]:
            raise ValueError(f"expected boxes of a square model image, got {self.image_shape}")
        scale, offset_x, offset_y = square_transform(rows, columns, self.image_shape[0])
        boxes = self.boxes.astype(np.float64)
        boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - offset_x) / scale).clip(0, columns)
        boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - offset_y) / scale).clip(0, rows)
        return Detections(boxes.astype(np.float32), self.scores, self.classes, (rows, columns))

    def rescaled(self, shape: tuple[int, int]) -> Detections:
        """The same boxes on a grid of ``shape`` (rows, columns) covering the same field of view."""
        rows, columns = self.image_shape
        sx, sy = shape[1] / columns, shape[0] / rows
        boxes = self.boxes * np.array([sx, sy, sx, sy], dtype=np.float32)
        return Detections(boxes.astype(np.float32), self.scores, self.classes, tuple(shape))


def letterbox(
    image: np.ndarray, new_shape: tuple[int, int], pad_value: int = PAD_VALUE
) -> tuple[np.ndarray, tuple[float, float], tuple[int, int]]:
    """Resize keeping the aspect ratio and pad to ``new_shape`` (rows, columns), as Ultralytics.

    Returns the padded image, the gains ``(gain_y, gain_x)`` and the padding ``(left, top)``.
    """
    rows, columns = image.shape[:2]
    r = min(new_shape[0] / rows, new_shape[1] / columns)
    new_w, new_h = max(round(columns * r), 1), max(round(rows * r), 1)
    dw, dh = (new_shape[1] - new_w) / 2, (new_shape[0] - new_h) / 2
    if (columns, rows) != (new_w, new_h):
        image = _resize_linear(image, new_w, new_h)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    if top or bottom or left or right:
        image = np.pad(
            image, ((top, bottom), (left, right), (0, 0)), mode="constant", constant_values=pad_value
        )
    return image, (new_h / rows, new_w / columns), (left, top)


def _resize_linear(image: np.ndarray, width: int, height: int) -> np.ndarray:
    try:
        import cv2
    except ImportError:  # pragma: no cover - cv2 comes with the detect extra
        from PIL import Image

        # PIL's bilinear antialiases when shrinking, so boxes may differ slightly from Ultralytics'.
        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression; indices kept, by descending score (torchvision semantics)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = (boxes[:, i].astype(np.float64) for i in range(4))
    areas = (x2 - x1) * (y2 - y1)
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        iou = inter / np.maximum(areas[i] + areas[rest] - inter, np.finfo(np.float64).tiny)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def disable_telemetry(ort=None) -> None:
    """Turn off onnxruntime's telemetry events; called before every ``InferenceSession``.

    The API switch alone is not enough: onnxruntime 1.32's Linux build carries 1DS telemetry
    that looks up ``mobile.events.data.microsoft.com`` from its own thread unless
    ``ORT_DISABLE_TELEMETRY=1`` is set before it starts (seen under strace); the detector sets it
    before importing onnxruntime and ``keras_cspine.cli`` sets it for every command."""
    if ort is None:
        import onnxruntime as ort
    switch_off = getattr(ort, "disable_telemetry_events", None)
    if switch_off is not None:  # onnxruntime >= 1.5; older builds had no telemetry switch
        switch_off()


class OnnxDetector:
    """A YOLO detector exported to ONNX, run with onnxruntime on CPU (or any provider given).

    Args:
        model_path: the ``.onnx`` file written by ``detect onnx`` / ``export_onnx``.
        conf: minimum confidence of a kept box (Ultralytics' predict default 0.25).
        iou: NMS IoU threshold (Ultralytics' default 0.7).
        max_det: at most this many boxes per image.
        providers: onnxruntime execution providers; default CPU.
        threads: intra-op threads (default: onnxruntime's choice).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        conf: float = 0.25,
        iou: float = 0.7,
        max_det: int = 300,
        providers: list[str] | None = None,
        threads: int | None = None,
    ):
        if not 0.0 <= conf <= 1.0:
            raise ValueError(f"conf must be in [0, 1], got {conf!r}")
        if not 0.0 <= iou <= 1.0:
            raise ValueError(f"iou must be in [0, 1], got {iou!r}")
        if max_det < 1:
            raise ValueError(f"max_det must be >= 1, got {max_det!r}")
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read when onnxruntime starts
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise MissingDependencyError("onnxruntime", "detect", "The ONNX predictor") from exc
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise CSpineDataError(self.model_path, "ONNX model file not found")
        disable_telemetry(ort)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        # No busy-waiting between operators: the predictor shares the CPU with TensorFlow (stage 1)
        # and with data loading, where spinning threads steal the cores they wait for.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(
                str(self.model_path), sess_options=options,
                providers=providers or ["CPUExecutionProvider"],
            )  # fmt: skip
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CSpineDataError(self.model_path, f"not a loadable ONNX model: {exc}") from exc
        self.conf, self.iou, self.max_det = float(conf), float(iou), int(max_det)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        model_input = self.session.get_inputs()[0]
        self.input_name = model_input.name
        self.imgsz = self._input_size(model_input.shape, meta)
        self.names = self._literal(meta.get("names"), {0: "fracture"})
        self.end2end = str(meta.get("end2end", "False")).lower() == "true"

    def _input_size(self, shape, meta) -> tuple[int, int]:
        if len(shape) == 4 and all(isinstance(s, int) for s in shape[2:]):
            return int(shape[2]), int(shape[3])
        size = self._literal(meta.get("imgsz"), None)
        if size is None:
            raise CSpineDataError(self.model_path, "input size unknown: no static shape, no imgsz")
        return (int(size[0]), int(size[1])) if isinstance(size, list | tuple) else (size, size)

    @staticmethod
    def _literal(text, default):
        if text is None:
            return default
        try:
            return ast.literal_eval(text)  # metadata holds Python literals; never eval()
        except (ValueError, SyntaxError):
            return default

    # -- steps -------------------------------------------------------------------------------
    def preprocess(self, image: np.ndarray) -> tuple[np.ndarray, tuple, tuple]:
        """RGB uint8 ``(H, W, 3)`` (or grey ``(H, W)``) -> ``(1, 3, h, w)`` float32, gains, pads."""
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB or (H, W) image, got shape {image.shape}")
        if image.dtype != np.uint8:
            raise ValueError(f"expected a uint8 image, got {image.dtype}")
        padded, gain, pad = letterbox(image, self.imgsz)
        tensor = np.ascontiguousarray(padded.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
        return tensor, gain, pad

    def postprocess(self, output: np.ndarray, image_shape, gain, pad) -> Detections:
        """Raw network output of one image -> NMS-filtered boxes on the input image."""
        if self.end2end or output.shape[-1] == 6:
            rows = output[0]
            rows = rows[rows[:, 4] > self.conf][: self.max_det]
            boxes, scores, classes = rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64)
        else:
            pred = output[0].T  # (anchors, 4 + nc)
            class_scores = pred[:, 4:]
            classes = class_scores.argmax(1)
            scores = class_scores[np.arange(len(pred)), classes]
            keep = scores > self.conf
            xywh, scores, classes = pred[keep, :4], scores[keep], classes[keep]
            if len(scores) > MAX_NMS:
                top = np.argsort(-scores, kind="stable")[:MAX_NMS]
                xywh, scores, classes = xywh[top], scores[top], classes[top]
            boxes = np.empty_like(xywh)
            boxes[:, :2] = xywh[:, :2] - xywh[:, 2:] / 2
            boxes[:, 2:] = xywh[:, :2] + xywh[:, 2:] / 2
            kept = nms(boxes + classes[:, None] * MAX_WH, scores, self.iou)[: self.max_det]
            boxes, scores, classes = boxes[kept], scores[kept], classes[kept].astype(np.int64)
        boxes = boxes.astype(np.float32).copy()
        boxes[:, [0, 2]] = (boxes[:, [0, 2]] - pad[0]) / gain[1]
        boxes[:, [1, 3]] = (boxes[:, [1, 3]] - pad[1]) / gain[0]
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, image_shape[1])
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, image_shape[0])
        return Detections(boxes, scores.astype(np.float32), classes, tuple(image_shape[:2]))

    def predict(self, image: np.ndarray) -> Detections:
        """Fracture boxes in one RGB uint8 image, in that image's pixel coordinates."""
        tensor, gain, pad = self.preprocess(image)
        (output,) = self.session.run(None, {self.input_name: tensor})
        return self.postprocess(output, np.asarray(image).shape[:2], gain, pad)

    def predict_batch(self, images) -> list[Detections]:
        """:meth:`predict` for each image."""
        return [self.predict(image) for image in images]

    def predict_slice(self, hu: np.ndarray, mode: str = "bone", size: int | None = None,
                      roi=None) -> Detections:  # fmt: skip
        """Boxes on a CT slice given in HU, in the slice's own pixel grid (rows, columns).

        Use :meth:`Detections.xywh` for the ``train_bounding_boxes.csv`` convention. The slice
        is rendered with ``keras_cspine.data.preprocess.to_model_image`` (``mode``, ``size``;
        use the export's settings, by default the model's input size), as at training time;
        with ``roi`` (a ``keras_cspine.data.roi.SpineRoi``, for a detector trained on an
        export with ``roi_mm``) only that window of the slice is rendered.
        """
        from keras_cspine.data.preprocess import to_model_image

        hu = np.asarray(hu)
        if hu.ndim != 2:
            raise ValueError(f"expected a 2-D HU slice, got shape {hu.shape}")
        size = size or self.imgsz[0]
        if roi is None:
            return self.predict(to_model_image(hu, mode=mode, size=size)).to_slice(*hu.shape)
        found = self.predict(to_model_image(roi.crop(hu), mode=mode, size=size))
        boxes = roi.to_slice(found.boxes, size, *hu.shape).astype(np.float32)
        return Detections(boxes, found.scores, found.classes, tuple(hu.shape))
