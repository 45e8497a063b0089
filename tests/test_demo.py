"""demo.py: the held-out split, the development view, and the whole demo from the command line."""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from helpers_cli import run_cli

from keras_cspine.io.rsna import RsnaLayout, read_submission
from keras_cspine.paper.demo import DemoSettings, choose_holdout, split_dataset, summary_text


def _labels(fractured: int, intact: int) -> pd.DataFrame:
    uids = [f"1.2.826.0.1.3680043.{100 + i}" for i in range(fractured + intact)]
    return pd.DataFrame({"StudyInstanceUID": uids,
                         "patient_overall": [1] * fractured + [0] * intact})  # fmt: skip


@pytest.mark.parametrize("fractured, intact, fraction, n_held, n_fractured", [
    (6, 6, 0.25, 3, 2),   # 3 held out, both kinds
    (4, 12, 0.25, 4, 1),  # stratified: a quarter of the fractured ones
    (3, 1, 0.5, 2, 1),    # two fractured studies always stay for the detector
    (2, 6, 0.25, 2, 0),   # ... so none of only two fractured studies is held out
])  # fmt: skip
def test_choose_holdout_is_stratified(fractured, intact, fraction, n_held, n_fractured):
    labels = _labels(fractured, intact)
    held = choose_holdout(labels, fraction, seed=0, with_segmentation=set())
    assert len(held) == n_held and len(set(held)) == n_held
    positive = set(labels.StudyInstanceUID[labels.patient_overall == 1])
    assert sum(u in positive for u in held) == n_fractured
    assert len(positive - set(held)) >= min(2, len(positive))
    assert held == choose_holdout(labels, fraction, seed=0, with_segmentation=set())


def test_choose_holdout_keeps_segmented_studies_for_training():
    labels = _labels(4, 4)
    segmented = set(labels.StudyInstanceUID[[0, 1, 4, 5]])
    held = choose_holdout(labels, 0.25, seed=3, with_segmentation=segmented)
    assert held and not set(held) & segmented


def test_split_dataset_makes_a_development_view(synthetic_data, tmp_path):
    result = split_dataset(synthetic_data, tmp_path / "split", 0.25, seed=0)
    held = result["holdout_studies"]
    dev = RsnaLayout(result["dev"])
    all_uids = set(RsnaLayout(synthetic_data).list_studies())
    assert set(dev.list_studies()) == all_uids - set(held)
    assert set(dev.train_labels().StudyInstanceUID) == all_uids - set(held)
    assert not set(dev.bounding_boxes().StudyInstanceUID) & set(held)
    assert all(dev.segmentation_path(u) is not None for u in dev.list_studies())
    holdout = tmp_path / "split" / "holdout"
    assert sorted(p.name for p in holdout.iterdir()) == held
    assert all(any(p.glob("*.dcm")) for p in holdout.iterdir())
    # linking is idempotent (a resumed demo)
    assert split_dataset(synthetic_data, tmp_path / "split", 0.25, seed=0)["holdout_studies"] == held


def test_settings_validation_and_paper_preset():
    with pytest.raises(ValueError, match="holdout_fraction"):
        DemoSettings(holdout_fraction=0.95)
    with pytest.raises(ValueError, match="at least 4"):
        DemoSettings(studies=2)
    paper = DemoSettings.paper()
    assert (paper.stage1_config, paper.image_size, paper.detect_model, paper.detect_epochs,
            paper.detect_imgsz, paper.mode) == ("stage1_gcvit_tiny", 224, "yolov8s", 100, 640, "paper")  # fmt: skip
    assert paper.export_roi_mm is None and paper.detect_config is None  # whole slices, as the paper
    assert paper.roi_mm is None and DemoSettings().roi_mm == 100.0  # stage 1 too
    quick = DemoSettings.quick(workers=1)
    assert (quick.studies, quick.stage1_epochs, quick.detect_epochs, quick.workers) == (6, 1, 1, 1)
    assert DemoSettings.quick().studies < DemoSettings().studies


@pytest.mark.parametrize(("flags", "problem"), [
    (["--roi-mm", "-5"], "roi_mm must be a length from 20.0 to 500.0 mm"),
    (["--holdout-fraction", "0.95"], "holdout_fraction must be in (0, 0.9)"),
    (["--quick", "--data", "somewhere"], "--quick runs on its own tiny synthetic studies"),
])  # fmt: skip
def test_bad_settings_stop_the_demo_before_any_work(flags, problem, tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--out", str(out), *flags)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith("error: demo: ") and problem in line
    assert not out.exists()  # nothing synthesized


def test_summary_text_names_outputs_and_metrics():
    summary = {
        "run_dir": "/r", "data": "/r/data", "prepared": "/r/prepared", "steps": {"synth": 1.0},
        "results": {
            "stage1": {"model": "gcvit_xxtiny", "epochs_run": 2, "split": "test", "run_dir": "/r/s1",
                       "image_size": 64, "mode": "multiwindow", "roi_mm": 100.0,
                       "metrics": {"macro_f1": 0.5, "exact_match_ratio": 0.25,
                                   "coverage_error": 2.0},
                       "metrics_sequence_model": {"macro_f1": 0.75, "exact_match_ratio": 0.625}},
            "predict": {"n_ok": 3, "n_studies": 3, "n_gated": 10, "n_slices": 20,
                        "gated_fraction": 0.5, "seconds_per_study": 1.0,
                        "files": {"submission": "/r/p/submission.csv", "index": "/r/p/index.html"},
                        "evaluation": {"rsna_weighted_log_loss": 0.61234, "mean_vertebra_auc": None,
                                       "patient_auc": 0.75, "n_studies": 3}},
        },
    }  # fmt: skip
    text = summary_text(summary)
    assert "macro F1 0.500" in text and "EMR 0.250" in text
    assert "+ study sequence model (beyond the paper): macro F1 0.750, EMR 0.625" in text
    assert "(paper 0.96 / 0.95 / 1.26)" in text  # the paper's Table 1 row beside ours
    assert "tensorboard --logdir /r/s1/tensorboard" in text
    assert "64 px multiwindow (100 mm spine window), 2 epochs" in text
    assert len(text.strip().splitlines()) <= 24  # one screen
    assert "RSNA weighted log loss 0.6123" in text and "patient AUC 0.750" in text
    assert "mean vertebra AUC n/a" in text
    assert "/r/p/index.html" in text and "/r/p/submission.csv" in text


DEMO_ARGS = ["--quick", "--workers", "1"]  # what `make test` runs: the demo's quick form


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A tiny demo from the command line, under the network guard: ``(out, result, args)``."""
    from helpers_offline import run_guarded

    root = tmp_path_factory.mktemp("demo")
    out = root / "demo"
    args = ["demo", "--out", str(out), *DEMO_ARGS]
    result, violations = run_guarded(*args, workdir=root, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert violations == [], violations  # the demo opened no connection and looked up no name
    return out, result, args


@pytest.mark.slow
@pytest.mark.detect
def test_demo_end_to_end_and_resume(demo, tmp_path):
    out, result, args = demo
    summary = json.loads((out / "summary.json").read_text())
    # stage 2 trains in the background beside stage 1 and is collected after it
    steps = ["synth", "split", "prepare", "look", "detect_export", "stage1", "detect_train",
             "predict"]  # fmt: skip
    assert list(summary["steps"]) == steps
    held = summary["results"]["split"]["holdout_studies"]
    assert len(held) == 2
    submission = read_submission(out / "predict" / "submission.csv")
    assert sorted({r.rsplit("_", 1)[0].replace("_patient", "") for r in submission.row_id}) == held
    evaluation = summary["results"]["predict"]["evaluation"]
    assert evaluation["n_studies"] == 2 and evaluation["rsna_weighted_log_loss"] > 0
    for uid in held:
        assert (out / "predict" / "reports" / uid / "report.html").is_file()
    assert (out / "stage1" / "model.keras").is_file()
    assert (out / "stage2" / "weights" / "best.onnx").is_file()
    # the printed summary says where the report is and gives the metric values
    assert "RSNA weighted log loss" in result.stdout
    assert str(out / "predict" / "index.html") in result.stdout
    assert "[demo] stage1 ..." in result.stdout  # progress of every step
    assert "[demo] detect_train ... in the background" in result.stdout
    assert "Ultralytics" in (out / "logs" / "detect_train.log").read_text()  # its own log
    for noise in ("cuInit", "cuda drivers", "oneDNN", "absl::InitializeLog"):  # quiet on a CPU
        assert noise not in result.stdout + result.stderr, noise

    # stage 2 given as a .pt: exported to ONNX in a subprocess (torch stays out of this process)
    from keras_cspine.pipeline.predict import Stage2Model

    pt = tmp_path / "elsewhere" / "detector.pt"
    pt.parent.mkdir()
    shutil.copy(out / "stage2" / "weights" / "best.pt", pt)
    detector = Stage2Model.load(pt)
    assert detector.source == str(pt.with_suffix(".onnx")) and pt.with_suffix(".onnx").is_file()
    assert detector.size == 64 and detector.mode == "bone"
    assert detector.roi_mm == DemoSettings.export_roi_mm  # the spine window of the export

    again = run_cli(*args, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier") == len(steps)


#: Every command of the package, run on the demo's outputs (DIR: its folder; OUT: a scratch one).
EVERY_COMMAND = [
    ["synth", "OUT/synth", "--studies", "2", "--test-studies", "1", "--preset", "tiny",
     "--workers", "1"],
    ["prepare", "OUT/synth", "OUT/prep", "--size", "32", "--workers", "1"],
    ["look", "OUT/prep", "OUT/look"],
    ["train", "DIR/prepared", "--run-dir", "OUT/stage1", "--quiet", "--set", "train.epochs=1",
     "--set", "data.image_size=32", "--set", "sequence.epochs=1",
     "--set", "model.options={backbone_kwargs: {embed_dim: 8, depths: [1, 1, 1, 1], "
     "num_heads: [1, 1, 1, 1], window_size: [4, 2, 1, 1]}}"],
    ["evaluate", "DIR/stage1"],
    ["detect", "export", "DIR/split/dev", "OUT/yolo", "--size", "64"],
    ["detect", "train", "DIR/yolo", "--out", "OUT/detect", "--model", "yolov8n",
     "--epochs", "1", "--imgsz", "64", "--batch", "4"],
    ["detect", "val", "DIR/stage2/weights/best.pt", "DIR/yolo"],
    ["detect", "onnx", "DIR/stage2/weights/best.pt", "--out", "OUT/best.onnx"],
    ["detect", "predict", "DIR/stage2/weights/best.onnx", "IMAGE", "--out", "OUT/boxes"],
    ["detect", "table3", "DIR/yolo", "--out", "OUT/table3", "--models", "yolov8n",
     "--epochs", "1", "--imgsz", "64", "--batch", "4"],
    ["predict", "DIR/split/holdout", "--out", "OUT/predict", "--stage1", "DIR/stage1", "--stage2",
     "DIR/stage2"],
    ["reproduce", "table1", "--dry-run", "--models", "inceptionv3"],
    ["weights", "list"],
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.detect
def test_every_command_opens_no_connection(demo, tmp_path):
    """Each command as a user runs it, under the network guard (Python sockets and, where strace
    is installed, every connect/sendto of the process tree): no connection, no DNS lookup."""
    from helpers_offline import run_guarded, strace_available

    out, _, _ = demo
    image = next((out / "yolo" / "images" / "val").glob("*.png"))
    failures = []
    for command in EVERY_COMMAND:
        argv = [a.replace("DIR", str(out)).replace("OUT", str(tmp_path)).replace(
            "IMAGE", str(image)) for a in command]  # fmt: skip
        result, violations = run_guarded(*argv, workdir=tmp_path, timeout=900)
        if result.returncode != 0 or violations:
            failures.append((" ".join(command[:2]), result.returncode, violations,
                             result.stderr[-1500:]))  # fmt: skip
    assert failures == [], "\n".join(map(str, failures))
    print(f"{len(EVERY_COMMAND)} commands offline (kernel-level check: {strace_available()})")


@pytest.mark.slow
@pytest.mark.detect
def test_no_phi_reaches_any_output(demo, tmp_path):
    """Names, IDs and dates in the DICOM header, and a study folder named after the patient,
    appear in no file that prepare, look, the YOLO export or predict write."""
    import pydicom

    out, _, _ = demo
    data = tmp_path / "data"
    shutil.copytree(out / "data", data)  # the demo's synthetic studies (some fractured)
    phi = {"PatientName": "DOE^JOHNATHAN", "PatientID": "MRN-99417-PHI",
           "PatientBirthDate": "19450317", "InstitutionName": "ST-PHIBERT-HOSPITAL",
           "ReferringPhysicianName": "SMITH^ANNALISE", "AccessionNumber": "ACC-55821-PHI"}
    for path in data.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for key, value in phi.items():
            setattr(ds, key, value)
        ds.save_as(path)
    test_study = next((data / "test_images").iterdir())
    named = tmp_path / "inbox" / "Doe_Johnathan_19450317"
    shutil.copytree(test_study, named)
    from helpers_cli import run_cli

    for argv in (["prepare", str(data), str(tmp_path / "prep"), "--size", "32", "--workers", "1"],
                 ["look", str(tmp_path / "prep"), str(tmp_path / "look")],
                 ["detect", "export", str(data), str(tmp_path / "yolo"), "--size", "64"],
                 ["predict", str(tmp_path / "inbox"), "--out", str(tmp_path / "predict"),
                  "--stage1", str(out / "stage1"), "--stage2", str(out / "stage2")]):  # fmt: skip
        result = run_cli(*argv, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    needles = [v.encode() for v in phi.values()] + [b"DOE^JOHN", b"Doe_Johnathan", b"Johnathan"]
    outputs = [p for d in ("prep", "look", "yolo", "predict") for p in (tmp_path / d).rglob("*")
               if p.is_file()]  # fmt: skip
    assert outputs
    leaks = [(str(p), n.decode()) for p in outputs for n in needles
             if n.lower() in p.read_bytes().lower() or n.decode().lower() in str(p).lower()]
    assert leaks == []
