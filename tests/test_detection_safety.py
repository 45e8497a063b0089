"""Stage 2 never runs code it is sent: planted ``.pt`` checkpoints, YOLO label caches and
``data.yaml`` download scripts (``keras_cspine.stage2.offline``: ``safe_load_checkpoint``,
``install_guards``).

Each malicious file, when unpickled or run, writes a marker file; every test asserts that no
marker appears and that the refusal names the file. torch only ever runs in subprocesses (the
test process may have imported TensorFlow). One tiny training (yolov8n, 64 px, 1 epoch) gives a
checkpoint written by Ultralytics itself.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers_cli import REPO, run_cli

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset

pytestmark = pytest.mark.detect  # `make test` runs files whole on one worker (--dist loadfile)


def run_python(code: str, *args: str, env: dict | None = None, timeout: float = 600):
    """Python code in a fresh interpreter (torch lives there, never in the test process)."""
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=REPO,
    )  # fmt: skip


class _System:
    """Unpickled, runs a shell command (``os.system``): the classic malicious pickle."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _touch(marker: Path) -> str:
    return f"touch '{marker}'"


# Writes the planted checkpoints with torch.save (in a subprocess): os.system, a method call
# (Path.write_text), and an allowed model class called with a config whose activation would be
# eval()'d (a REDUCE of DetectionModel instead of its restoration).
MAKE_CHECKPOINTS = textwrap.dedent(
    """
    import os, pathlib, sys
    from keras_cspine.stage2.offline import import_ultralytics
    import_ultralytics()
    import torch
    from ultralytics.nn.tasks import DetectionModel
    folder = pathlib.Path(sys.argv[1])

    class System:
        def __init__(self, command):
            self.command = command
        def __reduce__(self):
            return (os.system, (self.command,))

    class WriteText:
        def __reduce__(self):
            return (pathlib.Path.write_text, (folder / "marker_write_text", "pwned"))

    class BuildModel:
        def __reduce__(self):
            act = f"__import__('pathlib').Path({str(folder / 'marker_model')!r}).write_text('x')"
            cfg = {"nc": 1, "activation": act, "backbone": [[-1, 1, "Conv", [16, 3, 2]]],
                   "head": [[-1, 1, "Detect", ["nc"]]]}
            return (DetectionModel, (cfg,))

    torch.save({"model": System(f"touch '{folder / 'marker_system'}'"), "epoch": -1},
               folder / "system.pt")
    torch.save({"model": WriteText()}, folder / "write_text.pt")
    torch.save({"model": BuildModel()}, folder / "build_model.pt")
    """
)


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("yolo_config")


@pytest.fixture(scope="module")
def env(config_dir) -> dict:
    return {"KERAS_CSPINE_YOLO_DIR": str(config_dir)}


@pytest.fixture(scope="module")
def planted(tmp_path_factory, env) -> dict:
    """Malicious ``.pt`` files; ``markers``: what each would write if it ran."""
    folder = tmp_path_factory.mktemp("planted")
    made = run_python(MAKE_CHECKPOINTS, str(folder), env=env)
    assert made.returncode == 0, made.stderr[-3000:]
    with open(folder / "raw_pickle.pt", "wb") as handle:  # not a torch.save archive at all
        pickle.dump({"model": _System(_touch(folder / "marker_raw"))}, handle)
    files = {name: folder / f"{name}.pt" for name in ("system", "write_text", "build_model",
                                                       "raw_pickle")}  # fmt: skip
    for path in files.values():
        assert path.is_file()
    return {"folder": folder, "files": files}


def _markers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("marker*"))


def test_planted_checkpoint_is_live(planted, tmp_path):
    """The control: the pickle inside ``system.pt`` does run its command when unpickled (plain
    pickle, in a subprocess), so the refusals below are refusals of a real attack."""
    code = textwrap.dedent(
        """
        import pickle, sys, zipfile
        with zipfile.ZipFile(sys.argv[1]) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            pickle.loads(archive.read(name))
        """
    )
    copy = tmp_path / "system.pt"
    shutil.copy(planted["files"]["system"], copy)
    result = run_python(code, str(copy))
    assert result.returncode == 0, result.stderr
    marker = planted["folder"] / "marker_system"
    assert marker.is_file()
    marker.unlink()


# Ultralytics' own entry points, after import_ultralytics(): each planted file is refused by
# every one of them; checkpoints Ultralytics writes still load; label caches are not read and
# data.yaml download scripts are not run; a model .yaml is never eval()'d.
GUARDED_ENTRY_POINTS = textwrap.dedent(
    """
    import json, sys, pathlib
    from keras_cspine.errors import CSpineDataError
    from keras_cspine.stage2 import offline
    from keras_cspine.stage2.offline import import_ultralytics, safe_load_checkpoint
    import_ultralytics()
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.tasks import load_checkpoint
    import ultralytics.utils.torch_utils as torch_utils
    from ultralytics.utils.torch_utils import strip_optimizer
    import ultralytics.engine.trainer as trainer_module  # imported after the guards
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.data import dataset as dataset_module
    from keras_cspine.stage2.ultralytics_train import load_yolo
    folder, files = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2])
    report = {"refused": {}, "loaded": {}}
    for name, path in files.items():
        for how, call in (("safe_load_checkpoint", safe_load_checkpoint), ("load_yolo", load_yolo),
                          ("YOLO", YOLO), ("load_checkpoint", load_checkpoint),
                          ("torch_utils.torch_load", torch_utils.torch_load)):
            try:
                call(path)
                report["refused"][f"{name} {how}"] = None
            except CSpineDataError as err:
                report["refused"][f"{name} {how}"] = str(err)
        report["refused"][f"{name} strip_optimizer"] = strip_optimizer(path)  # {}: skipped
    for arch in ("yolov8n", "yolov5n"):
        path = folder / f"{arch}_saved.pt"
        YOLO(f"{arch}.yaml").save(path)
        model = load_yolo(path)
        report["loaded"][arch] = [type(model.model).__name__, model.task,
                                  sorted(torch.serialization.get_unsafe_globals_in_checkpoint(
                                      str(path)))]
    try:
        dataset_module.load_dataset_cache_file(folder / "any.cache")
        report["cache"] = "read"
    except FileNotFoundError as err:
        report["cache"] = str(err)
    missing = folder / "download" / "data.yaml"
    missing.parent.mkdir()
    script = f"import pathlib; pathlib.Path({str(folder / 'marker_download')!r}).write_text('x')"
    missing.write_text(json.dumps({"path": str(missing.parent), "train": "images/train",
                                   "val": "images/val", "names": {0: "fracture"},
                                   "download": script}))
    try:
        check_det_dataset(str(missing))
        report["download"] = "checked"
    except FileNotFoundError as err:
        report["download"] = str(err)
    model_yaml = folder / "eval.yaml"
    act = f"__import__('pathlib').Path({str(folder / 'marker_yaml')!r}).write_text('x')"
    model_yaml.write_text(json.dumps({"nc": 1, "activation": act,
        "backbone": [[-1, 1, "Conv", [16, 3, 2]]], "head": [[-1, 1, "Detect", ["nc"]]]}))
    try:
        YOLO(str(model_yaml))
        report["model_yaml"] = "built"
    except TypeError as err:
        report["model_yaml"] = str(err)
    import ultralytics.nn.tasks as tasks
    report["guarded"] = [tasks.torch_load is offline._torch_load,
                         torch_utils.torch_load is offline._torch_load,
                         tasks.torch_safe_load is offline._ultralytics_checkpoint,
                         getattr(trainer_module.check_det_dataset, "keras_cspine_guard", False)]
    print(json.dumps(report))
    """
)


@pytest.mark.slow
def test_ultralytics_entry_points_refuse_planted_checkpoints(planted, env, tmp_path):
    files = {k: str(v) for k, v in planted["files"].items()}
    result = run_python(GUARDED_ENTRY_POINTS, str(tmp_path), json.dumps(files), env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert _markers(planted["folder"]) == [] and _markers(tmp_path) == []
    expected = {"system": "refuses to load posix.system (a checkpoint may hold only model classes)",
                "write_text": "refuses to load builtins.getattr, pathlib.Path",
                "build_model": "refuses to load it: a checkpoint may not build a model",
                "raw_pickle": "not a checkpoint written by torch.save"}  # fmt: skip
    for key, error in report["refused"].items():
        name, how = key.split()
        if how == "strip_optimizer":
            assert error == {}, key  # Ultralytics skips a checkpoint it cannot load
            continue
        assert error is not None, f"{key} was loaded"
        assert error.startswith(f"{files[name]}: {expected[name]}"), (key, error)
    assert report["guarded"] == [True] * 4
    for arch, (model_class, task, named) in report["loaded"].items():
        assert (model_class, task) == ("DetectionModel", "detect"), arch
        assert "ultralytics.nn.tasks.DetectionModel" in named
    assert "label caches are not read" in report["cache"]
    assert "images not found" in report["download"]
    assert "unsupported activation" in report["model_yaml"]


# -- the package's commands ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo_export(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "yolo64"
    export_yolo_dataset(synthetic_data, out, ExportConfig(size=64), progress=False)
    return out


@pytest.fixture(scope="module")
def trained_run(yolo_export, env, tmp_path_factory) -> Path:
    """A 1-epoch yolov8n (64 px) by ``detect train``: Ultralytics writes, our loader reads back."""
    run = tmp_path_factory.mktemp("safety_run") / "run"
    result = run_cli("detect", "train", str(yolo_export), "--out", str(run), "--model", "yolov8n",
                     "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0",
                     "--set", "plots=false", env=env)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run


@pytest.mark.slow
def test_trained_checkpoint_loads_validates_and_exports(trained_run, yolo_export):
    for name in ("weights/best.pt", "weights/last.pt", "weights/best.onnx", "metrics.json"):
        assert (trained_run / name).is_file(), name
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["images"] == len(list((yolo_export / "images" / "val").glob("*.png")))
    assert Path(metrics["onnx"]) == trained_run / "weights" / "best.onnx"
    assert not list(yolo_export.rglob("*.cache"))  # no label cache written into the dataset


def _plant_cache(path: Path, marker: Path) -> None:
    """A YOLO label cache (``np.save`` of an object) that runs a command when unpickled."""
    with open(path, "wb") as handle:
        np.save(handle, np.array(_System(_touch(marker)), dtype=object), allow_pickle=True)


@pytest.mark.slow
def test_detect_val_never_reads_a_planted_label_cache(trained_run, yolo_export, env, tmp_path):
    data = tmp_path / "sent"
    shutil.copytree(yolo_export, data)
    spec = yaml.safe_load((data / "data.yaml").read_text())
    (data / "data.yaml").write_text(yaml.safe_dump({**spec, "path": str(data)}))
    marker = tmp_path / "marker_cache"
    for split in ("train", "val"):
        _plant_cache(data / "labels" / f"{split}.cache", marker)
    # the control: Ultralytics' own way of reading a cache runs the command
    control = run_python("import numpy, sys; numpy.load(sys.argv[1], allow_pickle=True)",
                         str(data / "labels" / "val.cache"))  # fmt: skip
    assert control.returncode == 0, control.stderr
    assert marker.is_file()
    marker.unlink()
    planted = (data / "labels" / "val.cache").read_bytes()

    out = tmp_path / "val"
    result = run_cli("detect", "val", str(trained_run / "weights" / "best.pt"), str(data),
                     "--out", str(out), "--imgsz", "64", "--batch", "8", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert not marker.exists()
    assert (data / "labels" / "val.cache").read_bytes() == planted  # neither read nor rewritten
    again = json.loads((out / "metrics.json").read_text())
    first = json.loads((trained_run / "val" / "metrics.json").read_text())
    for key in ("images", "instances", "precision", "recall", "mAP50", "mAP50-95"):
        assert again[key] == pytest.approx(first[key]), key


@pytest.mark.parametrize("command", ["val", "onnx", "train --weights"])
def test_detect_commands_refuse_a_planted_checkpoint(command, planted, yolo_export, env, tmp_path):
    weights = tmp_path / "best.pt"
    shutil.copy(planted["files"]["system"], weights)
    args = {
        "val": ["val", str(weights), str(yolo_export), "--out", str(tmp_path / "val")],
        "onnx": ["onnx", str(weights)],
        "train --weights": ["train", str(yolo_export), "--weights", str(weights), "--out",
                            str(tmp_path / "run"), "--epochs", "1", "--imgsz", "64"],
    }[command]  # fmt: skip
    result = run_cli("detect", *args, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (f"error: {weights}: refuses to load posix.system (a checkpoint may hold only model "
            "classes)") in result.stderr  # fmt: skip
    assert _markers(planted["folder"]) == [] and _markers(tmp_path) == []
    assert not weights.with_suffix(".onnx").exists()


def test_resume_refuses_a_planted_last_checkpoint(planted, yolo_export, env, tmp_path):
    """A run folder whose ``weights/last.pt`` would be resumed."""
    from keras_cspine.config import dump_config
    from keras_cspine.stage2.ultralytics_train import DetectTrainConfig

    run = tmp_path / "run"
    (run / "weights").mkdir(parents=True)
    last = run / "weights" / "last.pt"
    shutil.copy(planted["files"]["system"], last)
    config = DetectTrainConfig(model="yolov8n", epochs=1, imgsz=64, batch=8, workers=0)
    (run / "run.json").write_text(json.dumps({
        "config": dump_config(config), "data": str((yolo_export / "data.yaml").resolve()),
        "trained": False}))  # fmt: skip
    result = run_cli("detect", "train", str(yolo_export), "--out", str(run), "--model", "yolov8n",
                     "--epochs", "1", "--imgsz", "64", "--batch", "8", "--workers", "0",
                     env=env)  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: {last}: refuses to load posix.system" in result.stderr
    assert _markers(planted["folder"]) == [] and _markers(tmp_path) == []


def test_predict_and_stage2_model_refuse_a_planted_checkpoint(planted, env, tmp_path,
                                                              monkeypatch):  # fmt: skip
    """``predict`` takes the newest finished detection run under ``runs/`` by itself: a planted
    ``runs/**/weights/best.pt`` goes to ``Stage2Model.load`` -> ``pt_to_onnx``."""
    from keras_cspine.pipeline.config import PredictConfig
    from keras_cspine.pipeline.predict import Stage1Model, _load_models
    from keras_cspine.pipeline.studies import find_latest_stage2
    from keras_cspine.stage2.inference import Stage2Model, pt_to_onnx

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    run = tmp_path / "runs" / "detect" / "sent"
    (run / "weights").mkdir(parents=True)
    best = run / "weights" / "best.pt"
    shutil.copy(planted["files"]["system"], best)
    (run / "run.json").write_text(json.dumps({"data": "data.yaml", "trained": True}))
    (run / "metrics.json").write_text("{}")
    assert find_latest_stage2(tmp_path / "runs") == best
    refused = f"{best}: ONNX export failed: refuses to load posix.system"
    with pytest.raises(CSpineDataError, match="refuses to load posix.system") as err:
        pt_to_onnx(best)
    assert str(err.value).startswith(refused)
    with pytest.raises(CSpineDataError) as err:
        Stage2Model.load(run)
    assert str(err.value).startswith(refused)
    stage1 = object.__new__(Stage1Model)  # stage 1 is loaded first; only its type matters here
    stage1.runner, stage1.engine = "given", {"engine": "keras"}  # a given model keeps its engine
    with pytest.raises(CSpineDataError) as err:
        _load_models(stage1, None, tmp_path / "runs", PredictConfig())
    assert str(err.value).startswith(refused)
    assert _markers(planted["folder"]) == [] and _markers(tmp_path) == []
    assert not best.with_suffix(".onnx").exists()
