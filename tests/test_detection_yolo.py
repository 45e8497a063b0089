"""Stage 2 with Ultralytics: offline training through the real entry point, validation with
cross-checked mAP, figures, ONNX export and the torch-free predictor, Table 3.

Everything that imports torch runs in a subprocess (torch after TensorFlow crashes, and the test
process may have imported TensorFlow for other tests). One tiny training (yolov8n, 64 px, 2
epochs) is shared by the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_cli import REPO, run_cli
from PIL import Image

from keras_cspine.stage2 import metrics as dm
from keras_cspine.stage2.onnx_predictor import Detections, OnnxDetector, letterbox, nms
from keras_cspine.stage2.ultralytics_train import (
    DetectTrainConfig,
    ground_truth,
    read_predictions_json,
)
from keras_cspine.stage2.yolo_dataset import (
    EXPORT_METADATA_KEY,
    ExportConfig,
    export_yolo_dataset,
    load_manifest,
)

pytestmark = pytest.mark.detect  # `make test` runs files whole on one worker (--dist loadfile)

NETWORK_EVENTS = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname",
                  "socket.gethostbyaddr", "socket.sendto", "socket.sendmsg", "urllib.Request")  # fmt: skip

# Installed with PYTHONPATH in the child: records every attempt to reach the network, and which
# heavy modules the process imported, for `python -m keras_cspine detect train` run unmodified.
SITECUSTOMIZE = textwrap.dedent(
    f"""
    import atexit, json, os, sys
    _events = []
    def _hook(event, args):
        if event in {NETWORK_EVENTS!r}:
            _events.append([event, repr(args)[:300]])
    sys.addaudithook(_hook)
    def _dump():
        report = {{"events": _events, "argv": sys.argv,
                   "modules": sorted(m for m in ("torch", "ultralytics", "tensorflow")
                                     if m in sys.modules)}}
        path = os.path.join(os.environ["KERAS_CSPINE_AUDIT_DIR"], f"audit-{{os.getpid()}}.json")
        with open(path, "w") as handle:
            json.dump(report, handle)
    atexit.register(_dump)
    """
)


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 600):
    """Run Python code in a fresh interpreter (torch lives there, never in the test process)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=REPO,
    )  # fmt: skip


@pytest.fixture(scope="session")
def exported(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("detect") / "yolo64"
    export_yolo_dataset(synthetic_data, out, ExportConfig(size=64), progress=False)
    return out


@pytest.fixture(scope="session")
def trained(exported, tmp_path_factory) -> dict:
    """``python -m keras_cspine detect train`` with a network audit hook and a fresh config dir."""
    root = tmp_path_factory.mktemp("train")
    hook_dir, audit_dir, config_dir = root / "hook", root / "audit", root / "yolo_config"
    for folder in (hook_dir, audit_dir):
        folder.mkdir()
    (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run_dir = root / "run"
    env = {
        "PYTHONPATH": os.pathsep.join([str(hook_dir), str(REPO)]),
        "KERAS_CSPINE_AUDIT_DIR": str(audit_dir),
        "KERAS_CSPINE_YOLO_DIR": str(config_dir),
    }
    result = run_cli("detect", "train", str(exported), "--out", str(run_dir),
                     "--config", "detect_train_tiny", env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    audits = [json.loads(p.read_text()) for p in sorted(audit_dir.glob("audit-*.json"))]
    return {"run": run_dir, "audits": audits, "config_dir": config_dir, "stdout": result.stdout,
            "export": exported, "env": env}  # fmt: skip


# -- offline -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_makes_no_network_connection(trained):
    main = [a for a in trained["audits"] if "keras_cspine" in " ".join(a["argv"])]
    assert main, "the audit hook did not report from the training process"
    for audit in trained["audits"]:
        assert audit["events"] == [], audit["events"]
    assert main[0]["modules"] == ["torch", "ultralytics"]  # and never TensorFlow
    # fonts and settings came from the package, in its own config folder
    import matplotlib

    dejavu = (Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf").read_bytes()
    folder = trained["config_dir"] / "Ultralytics"
    for font in ("Arial.ttf", "Arial.Unicode.ttf"):
        assert (folder / font).read_bytes() == dejavu
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["sync"] is False and settings["mlflow"] is False


@pytest.mark.slow
def test_setup_offline_refuses_after_ultralytics_import(tmp_path):
    code = textwrap.dedent(
        """
        import sys, ultralytics
        from keras_cspine.stage2.offline import setup_offline
        try:
            setup_offline(sys.argv[1])
        except RuntimeError as err:
            print("refused:", err)
        """
    )
    result = run_python(code, str(tmp_path))
    assert "refused: ultralytics was imported before" in result.stdout, result.stderr


def test_detection_modules_import_neither_torch_nor_tensorflow():
    code = textwrap.dedent(
        """
        import sys
        import keras_cspine.stage2, keras_cspine.cli.detect, keras_cspine.stage2.table3
        import keras_cspine.stage2.ultralytics_train, keras_cspine.stage2.offline
        import keras_cspine.stage2.onnx_predictor, keras_cspine.stage2.figures
        print(sorted(m for m in ("torch", "ultralytics", "tensorflow") if m in sys.modules))
        """
    )
    result = run_python(code)
    assert result.stdout.strip() == "[]", result.stderr


# -- training and validation -------------------------------------------------------------------
@pytest.mark.slow
def test_run_directory(trained):
    from keras_cspine.config import load_config

    run = trained["run"]
    config = load_config(DetectTrainConfig, run / "config.yaml")
    assert config == load_config(DetectTrainConfig, "detect_train_tiny")
    assert (config.model, config.epochs, config.imgsz) == ("yolov8n", 2, 64)
    assert json.loads((run / "run.json").read_text())["data"] == str(trained["export"] / "data.yaml")
    results = (run / "results.csv").read_text().splitlines()
    assert len(results) == 1 + config.epochs
    for name in ("weights/best.pt", "weights/best.onnx", "metrics.json", "val/predictions.json"):
        assert (run / name).is_file(), name
    for figure in ("figures/fig7-8_training_curves.png", "val/figures/fig9_confusion_matrix.png",
                   "val/figures/fig10_predictions.png"):  # fmt: skip
        with Image.open(run / figure) as image:
            assert image.format == "PNG" and min(image.size) > 200, figure


@pytest.mark.slow
def test_metrics_are_cross_checked_on_the_same_predictions(trained):
    run, export = trained["run"], trained["export"]
    metrics = json.loads((run / "metrics.json").read_text())
    manifest = load_manifest(export)
    val = manifest[manifest.split == "val"]
    assert metrics["images"] == len(val) and metrics["instances"] == val.n_boxes.sum()
    for key in ("precision", "recall", "mAP50", "mAP50-95"):
        assert 0.0 <= metrics[key] <= 1.0
    # recompute from Ultralytics' own predictions.json, in this process
    truth, _ = ground_truth(export / "data.yaml", "val")
    predictions = read_predictions_json(run / "val" / "predictions.json")
    assert sum(len(s) for _, s in predictions.values()) > 0
    ours = dm.evaluate_detections(truth, predictions, max_dets=300)
    coco = dm.pycocotools_map(truth, predictions, max_dets=300)
    cross = metrics["cross_check"]
    assert cross["mAP50_ours"] == pytest.approx(ours.map50)
    assert cross["mAP50_pycocotools"] == pytest.approx(coco["mAP50"])
    assert ours.map50 == pytest.approx(coco["mAP50"], abs=1e-9)
    assert ours.map50_95 == pytest.approx(coco["mAP50-95"], abs=1e-9)
    assert abs(metrics["mAP50"] - ours.map50) <= 0.05
    confusion = dm.confusion_counts(truth, predictions)
    assert metrics["confusion"] == json.loads(json.dumps(confusion.as_dict()))
    assert confusion.tp + confusion.fn == metrics["instances"]


@pytest.mark.slow
def test_val_command_reproduces_the_training_validation(trained, tmp_path):
    run = trained["run"]
    result = run_cli("detect", "val", str(run / "weights" / "best.pt"), str(trained["export"]),
                     "--out", str(tmp_path / "val"), "--imgsz", "64", "--batch", "8",
                     env={"KERAS_CSPINE_YOLO_DIR": str(trained["config_dir"])})  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((tmp_path / "val" / "metrics.json").read_text())
    first = json.loads((run / "val" / "metrics.json").read_text())
    for key in ("images", "instances", "precision", "recall", "mAP50", "mAP50-95"):
        assert again[key] == pytest.approx(first[key]), key
    assert "mAP50 ours" in result.stdout


def test_train_config_validation():
    for kwargs, match in (
        ({"model": "yolov9z"}, "model must be one of"),
        ({"weights": "model.onnx"}, "local .pt"),
        ({"imgsz": 100}, "multiple of 32"),
        ({"epochs": 0}, "epochs"),
        ({"extra": {"amp": True}}, "extra may not set"),
        ({"nbs": 0}, "nbs"),
        ({"mosaic": 1.5}, "mosaic"),
        ({"scale": -0.1}, "scale"),
        ({"close_mosaic": -1}, "close_mosaic"),
        ({"warmup_epochs": -0.5}, "warmup_epochs"),
        ({"cos_lr": "yes"}, "cos_lr"),
    ):
        with pytest.raises(ValueError, match=match):
            DetectTrainConfig(**kwargs)
    assert DetectTrainConfig(model="yolov5m").display_name == "yolov5m"


def test_train_hyperparameters_fields_then_extra():
    assert DetectTrainConfig().hyperparameters() == {}  # Ultralytics' own defaults
    config = DetectTrainConfig(nbs=8, mosaic=0.0, extra={"mosaic": 0.5, "lr0": 0.02})
    assert config.hyperparameters() == {"nbs": 8, "mosaic": 0.5, "lr0": 0.02}
    config = DetectTrainConfig(cos_lr=True, warmup_epochs=2, extra={"lrf": 0.05})
    assert config.hyperparameters() == {"cos_lr": True, "warmup_epochs": 2, "lrf": 0.05}
    assert DetectTrainConfig(cos_lr=False, warmup_epochs=0).hyperparameters() == {
        "cos_lr": False, "warmup_epochs": 0}  # fmt: skip


@pytest.mark.parametrize(
    "path", sorted((REPO / "keras_cspine" / "configs").glob("detect_*.yaml")), ids=lambda p: p.stem
)
def test_bundled_detect_configs_load(path):
    from keras_cspine.config import load_config

    cls = ExportConfig if path.stem.startswith("detect_export") else DetectTrainConfig
    config = load_config(cls, path.stem)
    assert config == load_config(cls, path)  # by bundled name or by path
    if cls is DetectTrainConfig:
        assert config.onnx and not config.extra


@pytest.mark.slow
def test_missing_weights_are_never_downloaded(exported, tmp_path):
    result = run_cli("detect", "train", str(exported), "--out", str(tmp_path / "run"),
                     "--weights", str(tmp_path / "yolov8n.pt"), "--epochs", "1",
                     env={"KERAS_CSPINE_YOLO_DIR": str(tmp_path / "cfg")})  # fmt: skip
    assert result.returncode != 0
    assert "weights file not found (nothing is downloaded)" in result.stderr


# -- ONNX --------------------------------------------------------------------------------------
# A yolov8n whose predictions vary with the image: batch-norm statistics measured on the images
# and a head that spreads scores and box sizes. Any weights must give the same boxes through
# Ultralytics and through the ONNX predictor; untrained or barely trained ones give degenerate,
# identical boxes that would test little. The script then records Ultralytics' predictions of
# this model (conf 0.25) and of the trained one (conf 0.001), in one torch process.
MAKE_MODEL_AND_PREDICT = textwrap.dedent(
    """
    import json, sys, numpy as np
    from keras_cspine.stage2.offline import import_ultralytics
    import_ultralytics()
    import torch
    from PIL import Image
    from ultralytics import YOLO
    from keras_cspine.stage2.onnx_predictor import letterbox
    out, varied_pt, trained_pt, images = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    torch.manual_seed(0)
    model = YOLO("yolov8n.yaml")
    net, head = model.model, model.model.model[-1]
    batch = [letterbox(np.asarray(Image.open(p).convert("RGB")), (64, 64))[0] for p in images]
    batch = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = 1.0
        net.train(); net(batch); net.eval()
        for seq in head.cv2:  # box distances: favour small bins
            n = seq[-1].bias.numel()
            seq[-1].bias.copy_(-0.7 * (torch.arange(n) % (n // 4)).float())
            seq[-1].weight.mul_(2.0)
        for seq in head.cv3:  # class scores spread over (0, 1), none saturated
            seq[-1].bias.fill_(-1.5)
            seq[-1].weight.mul_(0.5)
    model.save(varied_pt)
    result = {}
    for name, weights, conf in (("varied", varied_pt, 0.25), ("trained", trained_pt, 0.001)):
        predictor = YOLO(weights)
        result[name] = {}
        for path in images:
            r = predictor.predict(path, imgsz=64, conf=conf, iou=0.7, device="cpu", verbose=False)[0]
            result[name][path] = {"boxes": r.boxes.xyxy.numpy().tolist(),
                                  "scores": r.boxes.conf.numpy().tolist()}
    json.dump(result, open(out, "w"))
    """
)


def _match_boxes(reference: dict, found: Detections) -> list[float]:
    """Per reference box, the IoU of the ONNX box of the same rank (both sorted by score)."""
    ref = np.asarray(reference["boxes"]).reshape(-1, 4)
    assert len(found) == len(ref)
    if not len(ref):
        return []
    ious = dm.box_iou(ref, found.boxes)
    np.testing.assert_allclose(found.scores, reference["scores"], atol=1e-4)
    return [float(ious[i].max()) for i in range(len(ref))]


@pytest.mark.slow
def test_onnx_predictor_matches_ultralytics(trained, tmp_path):
    env = {"KERAS_CSPINE_YOLO_DIR": str(trained["config_dir"])}
    val_images = sorted((trained["export"] / "images" / "val").glob("*.png"))[:4]
    # a non-square image of another size exercises the letterbox and the way back
    first = np.asarray(Image.open(val_images[0]).convert("RGB"))
    odd = tmp_path / "odd.png"
    Image.fromarray(np.ascontiguousarray(np.concatenate([first, first[:, :32]], 1)[:50])).save(odd)
    images = [str(p) for p in val_images] + [str(odd)]

    model_pt, predictions = tmp_path / "varied.pt", tmp_path / "ultralytics.json"
    trained_pt = trained["run"] / "weights" / "best.pt"
    made = run_python(MAKE_MODEL_AND_PREDICT, str(predictions), str(model_pt), str(trained_pt),
                      *images, env=env)  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    exported = run_cli("detect", "onnx", str(model_pt), "--out", str(tmp_path / "varied.onnx"),
                       "--imgsz", "64", env=env)  # fmt: skip
    assert exported.returncode == 0, exported.stderr[-3000:]
    reference = json.loads(predictions.read_text())

    n_boxes = 0
    for name, onnx, conf in (("varied", tmp_path / "varied.onnx", 0.25),
                             ("trained", trained["run"] / "weights" / "best.onnx", 0.001)):
        detector = OnnxDetector(onnx, conf=conf, iou=0.7)
        for path in images:
            found = detector.predict(np.asarray(Image.open(path).convert("RGB")))
            ious = _match_boxes(reference[name][path], found)
            assert all(iou >= 0.99 for iou in ious), (name, path, min(ious))
            n_boxes += len(ious)
    assert n_boxes > 50  # the comparison is not vacuous


@pytest.mark.slow
def test_onnx_predictor_beside_tensorflow_without_torch(trained, synthetic_data):
    code = textwrap.dedent(
        """
        import json, sys
        import tensorflow  # stage 1 is already loaded in the two-stage pipeline
        from keras_cspine.stage2.onnx_predictor import OnnxDetector
        from keras_cspine.io.dicom import read_slice
        detector = OnnxDetector(sys.argv[1], conf=0.001)
        hu, meta = read_slice(sys.argv[2])
        found = detector.predict_slice(hu, mode="bone")
        print(json.dumps({"modules": sorted(m for m in ("torch", "ultralytics", "tensorflow")
                                            if m in sys.modules),
                          "shape": [meta.rows, meta.columns], "image_shape": found.image_shape,
                          "boxes": found.boxes.tolist()}))
        """
    )
    dicom = sorted((synthetic_data / "train_images").glob("*/*.dcm"))[0]
    result = run_python(code, str(trained["run"] / "weights" / "best.onnx"), str(dicom))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["modules"] == ["tensorflow"]
    rows, columns = report["shape"]
    assert report["image_shape"] == [rows, columns]
    boxes = np.asarray(report["boxes"]).reshape(-1, 4)
    assert ((boxes[:, [0, 2]] >= 0) & (boxes[:, [0, 2]] <= columns)).all()
    assert ((boxes[:, [1, 3]] >= 0) & (boxes[:, [1, 3]] <= rows)).all()


@pytest.mark.slow
def test_onnx_predictor_on_spine_windows_matches_the_export(trained, synthetic_data, tmp_path):
    """``predict_slice(hu, roi=...)`` on a DICOM slice finds the boxes the detector finds on the
    exported window image of that slice, mapped back with the manifest's window."""
    from keras_cspine.data.roi import SpineRoi
    from keras_cspine.io.dicom import read_slice

    out = tmp_path / "roi_export"
    export_yolo_dataset(synthetic_data, out, ExportConfig(size=64, roi_mm=100.0), progress=False)
    detector = OnnxDetector(trained["run"] / "weights" / "best.onnx", conf=0.001)
    n_boxes = 0
    for row in load_manifest(out).head(6).itertuples():
        roi = SpineRoi.from_json(row.roi)
        hu, _ = read_slice(row.source)
        found = detector.predict_slice(hu, mode="bone", size=64, roi=roi)
        on_png = detector.predict(np.asarray(Image.open(out / row.image).convert("RGB")))
        np.testing.assert_allclose(found.boxes, roi.to_slice(on_png.boxes, 64, *hu.shape),
                                   atol=1e-3)  # fmt: skip
        np.testing.assert_allclose(found.scores, on_png.scores, atol=1e-6)
        assert found.image_shape == hu.shape
        n_boxes += len(found)
    assert n_boxes > 0


@pytest.mark.slow
def test_onnx_file_carries_the_export_settings(trained, tmp_path):
    """The ONNX says how its training images were rendered, so a copy far from its run and its
    export still gets slices rendered the same way by the pipeline."""
    import shutil

    from keras_cspine.pipeline.predict import Stage2Model
    from keras_cspine.stage2.yolo_dataset import EXPORT_METADATA_KEY

    onnx = trained["run"] / "weights" / "best.onnx"
    expected = {"mode": "bone", "size": 64, "roi_mm": None}
    assert json.loads(OnnxDetector(onnx).metadata[EXPORT_METADATA_KEY]) == expected
    copy = tmp_path / "alone" / "detector.onnx"
    copy.parent.mkdir()
    shutil.copy(onnx, copy)
    described = Stage2Model.load(copy).describe()
    assert {k: described[k] for k in expected} == expected


@pytest.mark.slow
def test_onnx_to_another_path_leaves_the_runs_onnx_alone(trained, tmp_path):
    """`detect onnx W/best.pt --out other.onnx` writes other.onnx and keeps W/best.onnx as it was
    (Ultralytics itself writes beside the weights it is given)."""
    onnx = trained["run"] / "weights" / "best.onnx"
    before = onnx.read_bytes()
    result = run_cli("detect", "onnx", str(trained["run"] / "weights" / "best.pt"), "--out",
                     str(tmp_path / "other.onnx"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert onnx.read_bytes() == before
    assert OnnxDetector(tmp_path / "other.onnx").metadata[EXPORT_METADATA_KEY]
    assert not list(tmp_path.glob(".onnx_export_*"))  # the temporary folder is gone


@pytest.mark.slow
def test_predict_command(trained, tmp_path):
    onnx = trained["run"] / "weights" / "best.onnx"
    image = sorted((trained["export"] / "images" / "val").glob("*.png"))[0]
    result = run_cli("detect", "predict", str(onnx), str(image), "--conf", "0.001",
                     "--out", str(tmp_path / "boxes.json"))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((tmp_path / "boxes.json").read_text())[str(image)]
    found = OnnxDetector(onnx, conf=0.001).predict(np.asarray(Image.open(image).convert("RGB")))
    np.testing.assert_allclose(written["boxes_xyxy"], found.boxes.reshape(-1, 4), atol=0.01)
    assert written["classes"] == found.classes.tolist()


def test_boxes_go_back_to_the_native_slice():
    from keras_cspine.data.preprocess import square_transform

    rows, columns, size = 80, 120, 64  # a wide slice, padded top and bottom
    native = np.array([[30.0, 10.0, 50.0, 40.0]])
    scale, ox, oy = square_transform(rows, columns, size)
    model_box = native * scale + np.array([ox, oy, ox, oy])
    found = Detections(model_box.astype(np.float32), np.array([0.9], np.float32),
                       np.array([0]), (size, size))  # fmt: skip
    back = found.to_slice(rows, columns)
    np.testing.assert_allclose(back.boxes, native, atol=1e-4)
    assert back.image_shape == (rows, columns)
    np.testing.assert_allclose(back.xywh(), [[30, 10, 20, 30]], atol=1e-4)


@pytest.mark.parametrize(
    "shape, resized, pads",
    [((48, 64), (48, 64), (0, 8)), ((128, 96), (64, 48), (8, 0)), ((64, 64), (64, 64), (0, 0))],
)
def test_letterbox(shape, resized, pads):
    image = np.full((*shape, 3), 200, dtype=np.uint8)
    out, gain, pad = letterbox(image, (64, 64))
    assert out.shape == (64, 64, 3) and pad == pads
    assert gain == (resized[0] / shape[0], resized[1] / shape[1])
    left, top = pads
    assert (out[top : top + resized[0], left : left + resized[1]] == 200).all()
    assert (out == 114).sum() == 3 * (64 * 64 - resized[0] * resized[1])


def test_nms_suppresses_only_above_the_threshold():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 8], [0, 0, 10, 6], [20, 20, 30, 30]], float)
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    # IoUs with the first: 0.8, 0.6; the far box always stays
    assert nms(boxes, scores, 0.7).tolist() == [0, 2, 3]
    assert nms(boxes, scores, 0.5).tolist() == [0, 3]
    assert nms(boxes[::-1].copy(), scores[::-1].copy(), 0.7).tolist() == [3, 1, 0]


def test_onnx_detector_rejects_bad_input(tmp_path):
    from keras_cspine.errors import CSpineDataError

    with pytest.raises(CSpineDataError, match="not found"):
        OnnxDetector(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(CSpineDataError, match="not a loadable ONNX model"):
        OnnxDetector(tmp_path / "junk.onnx")
    with pytest.raises(ValueError, match="conf"):
        OnnxDetector(tmp_path / "junk.onnx", conf=1.5)


# -- Table 3 -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_reproduce_table3(trained, tmp_path):
    from keras_cspine.stage2 import reproduce_table3

    rows = reproduce_table3(
        trained["export"], tmp_path / "table3", models=("yolov5n",), epochs=1, imgsz=64, batch=8,
        workers=0, train_overrides=("plots=false", "onnx=false"), progress=False,
    )  # fmt: skip
    assert [r["model"] for r in rows] == ["yolov5n"]
    row = rows[0]
    assert row["paper_mAP50"] is None and 0.0 <= row["mAP50"] <= 1.0
    assert row["mAP50_ours"] == pytest.approx(row["mAP50_pycocotools"], abs=1e-9)
    text = (tmp_path / "table3" / "table3.md").read_text()
    assert "| yolov5n |" in text
    args = yaml.safe_load((tmp_path / "table3" / "models" / "yolov5n" / "args.yaml").read_text())
    assert Path(args["model"]).name == "yolov5n.yaml" and args["epochs"] == 1
