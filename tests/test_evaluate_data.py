"""``evaluate RUN --data PREP``: a run scored on any prepared data, never silently on its own
training studies; the synthetic StudyInstanceUIDs that make that check mean something; the one
``data:`` line that ``evaluate``, ``detect val`` and ``predict --labels`` print."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from keras_cspine.errors import CSpineDataError

HEADER = re.compile(r"^data: (?P<path>\S+)  studies: (?P<studies>\d+)  slices: (?P<slices>\d+)$",
                    re.MULTILINE)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Synthetic UIDs: unique across seeds and sizes, the same for the same dataset
# --------------------------------------------------------------------------------------------
def test_synthetic_uids_are_unique_across_datasets_and_stable():
    from pydicom.uid import UID

    from keras_cspine.synthetic.dataset import _plan

    def uids(n, seed, n_test=3, preset="tiny"):
        return [job["uid"] for job in _plan(n, n_test, seed, 1.0, preset)]

    small, large = uids(24, 1), uids(240, 2)
    assert not set(small) & set(large)  # another seed and size: no study in common
    assert not set(uids(24, 1)) & set(uids(240, 1))  # the same seed, another size
    assert not set(uids(24, 1)) & set(uids(24, 1, preset="small"))
    assert uids(24, 1) == small  # the same dataset: the same UIDs
    assert len(set(large)) == len(large) == 243
    for uid in small + large:
        assert UID(uid).is_valid and len(f"{uid}.1.1000") <= 64
        assert uid.startswith("1.2.826.0.1.3680043.") and len(uid.rsplit(".", 1)[1]) <= 16


# --------------------------------------------------------------------------------------------
# evaluate --data
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A metadata-only stage 1 run trained on a tiny synthetic set drawn with seed 11."""
    from keras_cspine.data.prepare import prepare_dataset
    from keras_cspine.stage1.train import load_stage1_config, train_stage1
    from keras_cspine.synthetic.dataset import generate_dataset

    root = tmp_path_factory.mktemp("eval_data")
    generate_dataset(root / "rsna", n_studies=4, seed=11, preset="tiny", progress=False)
    prepare_dataset(root / "rsna", root / "prep", size=32, workers=1, progress=False)
    config = load_stage1_config("stage1_synthetic_small", [
        "model.name=metadata_only", "train.epochs=1", "train.batch_size=16",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "train.evaluate=false",
        "sequence.enabled=false",
    ])  # fmt: skip
    train_stage1(config, root / "prep", root / "run", verbose=0)
    return root / "run", root / "prep"


@pytest.mark.slow  # trains a tiny run (about 25 s)
def test_evaluate_scores_every_labelled_study_of_other_data(trained, prepared, capsys):
    from keras_cspine.cli import main

    run, _ = trained
    assert main(["evaluate", str(run), "--data", str(prepared)]) == 0
    out = capsys.readouterr().out
    header = HEADER.search(out)
    index = pd.read_csv(prepared / "index.csv", dtype={"StudyInstanceUID": str})
    labelled = index[index.labels_known == 1]
    assert out.startswith("data: ") and header is not None
    assert header["path"] == str(prepared)
    assert int(header["studies"]) == labelled.StudyInstanceUID.nunique() == 4
    assert int(header["slices"]) == len(labelled)
    where = run / "evaluations" / prepared.name
    metrics = json.loads((where / "metrics.json").read_text())
    assert metrics["split"] == "data" and metrics["n_slices"] == len(labelled)
    assert metrics["overlap"] == [] and (where / "table1_row.md").is_file()
    scored = pd.read_csv(where / "predictions.csv", dtype={"StudyInstanceUID": str})
    assert set(scored.StudyInstanceUID) == set(labelled.StudyInstanceUID)
    assert json.loads((run / "splits.json").read_text())["test"]  # the run's own files untouched
    assert not (run / "metrics.json").exists()


@pytest.mark.slow  # trains a tiny run (about 25 s)
def test_evaluate_refuses_data_the_run_was_trained_on(trained, tmp_path, capsys):
    from keras_cspine.cli import main
    from keras_cspine.stage1.evaluate import evaluate_run

    run, own = trained
    splits = json.loads((run / "splits.json").read_text())
    with pytest.raises(CSpineDataError, match=r"3 of its 4 labelled studies were seen in training "
                                              r".*2 in its train split, 1 in its val split"):  # fmt: skip
        evaluate_run(run, data=own)
    assert main(["evaluate", str(run), "--data", str(own)]) == 2
    err = capsys.readouterr().err
    assert "--allow-overlap" in err and len(err.strip().splitlines()) == 1
    assert main(["evaluate", str(run), "--data", str(own), "--allow-overlap",
                 "--out", str(tmp_path / "scores")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert HEADER.search(out)["studies"] == "4" and "3 of these studies were seen" in out
    metrics = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert sorted(metrics["overlap"]) == sorted(splits["train"] + splits["val"])


@pytest.mark.slow  # trains a tiny run (about 25 s)
def test_evaluate_refuses_data_of_another_mode(trained, prepared, tmp_path):
    import shutil

    from keras_cspine.stage1.evaluate import evaluate_run

    run, _ = trained
    other = tmp_path / "paper_mode"
    shutil.copytree(prepared, other, symlinks=True)
    settings = json.loads((other / "prepare.json").read_text())
    settings["settings"]["mode"] = "paper"
    (other / "prepare.json").write_text(json.dumps(settings))
    with pytest.raises(CSpineDataError, match="prepared with mode 'paper', but .* trained on 'bone'"):
        evaluate_run(run, data=other)
    # the same mode, but the slices cropped to the spine window: not what the run saw
    settings["settings"].update(mode="bone", roi_mm=100.0)
    (other / "prepare.json").write_text(json.dumps(settings))
    with pytest.raises(CSpineDataError, match="prepared as 100 mm spine windows, but .* trained "
                                              "on whole slices: prepare the data with no --roi-mm"):
        evaluate_run(run, data=other)


def test_the_data_line_is_the_same_for_all_scoring_commands(tmp_path):
    from keras_cspine.cli import data_header
    from keras_cspine.cli.predict import summary_text

    assert data_header("/d", 3, 120, "slices") == "data: /d  studies: 3  slices: 120"
    assert data_header("/d", None, 7, "images") == "data: /d  studies: ?  images: 7"
    (tmp_path / "predictions.csv").write_text("StudyInstanceUID,n_slices\n1.2.3,10\n1.2.4,5\n")
    (tmp_path / "train.csv").write_text("StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
                                        "1.2.3,0,0,0,0,0,0,0,0\n")  # fmt: skip
    summary = {"n_ok": 2, "n_studies": 2, "n_slices": 15, "n_gated": 0, "gated_fraction": 0,
               "seconds": {}, "files": {"submission": "s", "predictions": str(tmp_path /
               "predictions.csv")}, "errors": [], "input": "/in", "labels": str(tmp_path / "train.csv"),
               "evaluation": {"n_studies": 1, "rsna_weighted_log_loss": 0.5, "mean_vertebra_auc": None,
                              "patient_auc": None}}  # fmt: skip
    assert "[predict] data: /in  studies: 1  slices: 10" in summary_text(summary).splitlines()
