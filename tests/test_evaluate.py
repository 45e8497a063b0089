"""Stage 1 evaluation: Tables 1-2 from one set of predictions, Figure 6, Markdown, CLI."""

import json
import math

import keras
import numpy as np
import pandas as pd
import pytest
from helpers_stage1 import make_prepared

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1 import evaluate as E
from keras_cspine.stage1.metrics import multilabel_metrics
from keras_cspine.stage1.train import load_stage1_config, train_stage1

VERTEBRAE = ["C1", "C2", "C3", "C4", "C5", "C6", "C7"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    prepared = make_prepared(root / "prep", n_studies=5, n_slices=12, unlabelled=1)
    config = load_stage1_config(
        "stage1_synthetic_small",
        ["model.name=metadata_only", "train.epochs=2", "train.batch_size=8",
         "train.learning_rate=0.01", "data.val_fraction=0.25", "data.test_fraction=0.25",
         "train.evaluate=false", "paper_row=ResNet152V2", "sequence.epochs=5"],
    )  # fmt: skip
    train_stage1(config, prepared, root / "run", verbose=0)
    return root / "run"


def test_evaluate_run_tables_agree_with_predictions(run_dir):
    result = E.evaluate_run(run_dir, split="test")
    preds = pd.read_csv(run_dir / "predictions.csv")
    y_true = preds[VERTEBRAE].to_numpy()
    y_score = preds[[f"p_{v}" for v in VERTEBRAE]].to_numpy()
    again = multilabel_metrics(y_true, y_score)
    for key in ("macro_f1", "exact_match_ratio", "coverage_error"):
        assert result["metrics"][key] == pytest.approx(again[key], abs=1e-5)
    splits = json.loads((run_dir / "splits.json").read_text())
    assert set(preds.StudyInstanceUID) == set(splits["test"])
    row = pd.read_csv(run_dir / "table1_row.csv").iloc[0]
    assert row["row"] == "ResNet152V2" and row["paper_macro_f1"] == 0.96
    assert row["trainable"] == result["parameters"]["trainable"] > 0
    table2 = pd.read_csv(run_dir / "table2.csv", index_col=0)
    assert list(table2.index[:7]) == VERTEBRAE
    assert table2.loc["C1", "support"] == y_true[:, 0].sum()
    for figure in ("loss_curves.png", "study_levels.png"):
        assert (run_dir / "figures" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["metrics"]["macro_f1"] == pytest.approx(result["metrics"]["macro_f1"])


def test_level_decoded_row_is_the_run_decoder_on_the_same_predictions(run_dir):
    from keras_cspine.stage1.level_decoding import LevelDecoder, fit_from_prepared

    result = E.evaluate_run(run_dir, split="test")
    splits = json.loads((run_dir / "splits.json").read_text())
    decoder = LevelDecoder.load(run_dir / "level_decoder.json")  # written by train_stage1
    refit = fit_from_prepared(splits["prepared"], splits["train"])
    np.testing.assert_allclose(decoder.log_transition, refit.log_transition)
    preds = pd.read_csv(run_dir / "predictions.csv")
    scores = preds[[f"p_{v}" for v in VERTEBRAE]].to_numpy()
    from keras_cspine.data.prepare import load_index

    index = load_index(splits["prepared"]).set_index(["StudyInstanceUID", "series_index"])
    positions = index.loc[list(zip(preds.StudyInstanceUID, preds.series_index)), "position_mm"]
    decoded = decoder.decode_studies(scores, preds.StudyInstanceUID, preds.series_index,
                                     positions.to_numpy())  # fmt: skip
    np.testing.assert_allclose(preds[[f"decoded_{v}" for v in VERTEBRAE]], decoded, atol=2e-6)
    again = multilabel_metrics(preds[VERTEBRAE].to_numpy(), decoded)
    rows = pd.read_csv(run_dir / "table1_row.csv")
    assert list(rows["row"])[:2] == ["ResNet152V2", "ResNet152V2 + level decoding"]
    assert math.isnan(rows["paper_macro_f1"].iloc[1])
    for key in ("macro_f1", "exact_match_ratio", "coverage_error"):
        assert rows[key].iloc[1] == pytest.approx(again[key], abs=1e-4)
        assert result["metrics_level_decoded"][key] == pytest.approx(again[key], abs=1e-4)


def test_sequence_model_row_is_the_run_sequence_model_on_the_same_features(run_dir):
    from keras_cspine.stage1.dataset import CSpineSequence
    from keras_cspine.stage1.sequence_model import (
        apply_sequence_model,
        load_sequence_model,
        slice_features,
    )

    result = E.evaluate_run(run_dir, split="test")
    splits = json.loads((run_dir / "splits.json").read_text())
    classifier = keras.saving.load_model(run_dir / "model.keras")
    sequence = CSpineSequence(splits["prepared"], splits["test"], batch_size=8,
                              inputs="metadata")  # the fixture's model: metadata_only
    features, scores = slice_features(classifier, sequence)
    expected = apply_sequence_model(load_sequence_model(run_dir / "sequence_model.keras"),
                                    features, sequence.frame["StudyInstanceUID"],
                                    sequence.frame["series_index"])  # fmt: skip
    preds = pd.read_csv(run_dir / "predictions.csv")
    assert list(preds.StudyInstanceUID) == list(sequence.frame.StudyInstanceUID)
    np.testing.assert_allclose(preds[[f"p_{v}" for v in VERTEBRAE]], scores, atol=2e-6)
    np.testing.assert_allclose(preds[[f"sequence_{v}" for v in VERTEBRAE]], expected, atol=2e-6)
    again = multilabel_metrics(preds[VERTEBRAE].to_numpy(), expected)
    rows = pd.read_csv(run_dir / "table1_row.csv")
    assert list(rows["row"]) == ["ResNet152V2", "ResNet152V2 + level decoding",
                                 "ResNet152V2 + sequence model"]  # fmt: skip
    for key in ("macro_f1", "exact_match_ratio", "coverage_error"):
        assert rows[key].iloc[2] == pytest.approx(again[key], abs=1e-4)
        assert result["metrics_sequence_model"][key] == pytest.approx(again[key], abs=1e-4)


def test_cli_prints_tables(run_dir, capsys):
    from keras_cspine.cli.evaluate import main

    assert main([str(run_dir), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "| row | model | macro_f1 |" in out and "| C7 |" in out
    assert json.loads((run_dir / "metrics.json").read_text())["split"] == "val"


def test_evaluate_refuses_incomplete_runs(tmp_path):
    with pytest.raises(CSpineDataError, match="config.yaml"):
        E.evaluate_run(tmp_path)


def test_table1_row_and_markdown():
    metrics = {"macro_f1": 0.9, "exact_match_ratio": 0.8, "coverage_error": 1.5}
    params = {"trainable": 13_080_663, "non_trainable": 14_683_998}
    ours = E.table1_row("Proposed (GCViT)", "gcvit_tiny", metrics, params, split="test")
    other = E.table1_row(None, "vgg19", metrics, {"trainable": 5, "non_trainable": 0})
    assert ours["paper_coverage_error"] == 1.26 and math.isnan(other["paper_macro_f1"])
    frame = E.table1_frame([ours, other])
    assert list(frame.columns[:4]) == ["row", "model", "macro_f1", "exact_match_ratio"]
    text = E.markdown_table(frame)
    lines = text.strip().splitlines()
    assert lines[0].startswith("| row | model |") and lines[1].startswith("|---|")
    assert "13,080,663" in lines[2] and "| 0.9000 |" in lines[2]
    assert "| vgg19 | vgg19 |" in lines[3] and "|  |" in lines[3]  # NaN -> blank


def test_loss_curves_written_atomically(tmp_path):
    history = {"loss": [0.7, 0.5, 0.4], "val_loss": [0.6, 0.5, 0.45],
               "f1_score": [0.2, 0.5, 0.7], "val_f1_score": [0.3, 0.5, 0.6]}  # fmt: skip
    path = E.plot_loss_curves(history, tmp_path / "fig" / "loss.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["loss.png"]
    with pytest.raises(ValueError, match="loss"):
        E.plot_loss_curves({}, tmp_path / "x.png")


def test_study_levels_figure_shows_the_worst_studies(tmp_path):
    rows = []
    for uid, wrong in (("good", 0), ("bad", 3), ("worse", 5)):
        for i in range(6):
            truth = np.eye(7, dtype=int)[i]
            score = truth if i >= wrong else np.roll(truth, 1)
            rows.append({"StudyInstanceUID": uid, "series_index": i,
                         **{v: truth[k] for k, v in enumerate(VERTEBRAE)},
                         **{f"p_{v}": float(score[k]) for k, v in enumerate(VERTEBRAE)}})  # fmt: skip
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # any row order
    import matplotlib.pyplot as plt

    shown = []
    original = plt.Axes.set_xlabel
    plt.Axes.set_xlabel = lambda ax, text, **kw: shown.append(text) or original(ax, text, **kw)
    try:
        path = E.plot_study_levels(frame, tmp_path / "levels.png", n_studies=2)
    finally:
        plt.Axes.set_xlabel = original
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert shown == ["...worse: 6 slices, head -> feet", "exact match 0.17",
                     "...bad: 6 slices, head -> feet", "exact match 0.50"]  # fmt: skip
    with pytest.raises(ValueError, match="score set"):
        E.plot_study_levels(frame[["StudyInstanceUID", "series_index", *VERTEBRAE]],
                            tmp_path / "x.png")  # fmt: skip


def test_predict_sequence_refuses_shuffled_data(tmp_path):
    from keras_cspine.stage1.dataset import CSpineSequence

    prepared = make_prepared(tmp_path / "p", n_studies=2, unlabelled=0)
    with pytest.raises(ValueError, match="shuffle"):
        E.predict_sequence(None, CSpineSequence(prepared, shuffle=True))
    assert np.isfinite(E.PAPER_TABLE1["Swin"]).all()


@pytest.mark.slow
def test_reproduce_table1_writes_and_reuses_rows(tmp_path, capsys):
    from keras_cspine.cli.reproduce import main as reproduce_main

    prepared = make_prepared(tmp_path / "prep", n_studies=5, n_slices=12, unlabelled=1)
    args = ["table1", "--data", str(prepared), "--out", str(tmp_path / "t1"),
            "--models", "metadata_only", "--set", "train.epochs=1", "--set", "train.batch_size=8",
            "--set", "data.val_fraction=0.25", "--set", "data.test_fraction=0.25"]  # fmt: skip
    assert reproduce_main(args) == 0
    table = pd.read_csv(tmp_path / "t1" / "table1.csv")
    assert table["model"].tolist() == ["metadata_only"]
    command = table["command"][0]
    assert "--config stage1_synthetic_small --set model.name=metadata_only" in command
    assert "--set train.epochs=1" in command
    model_file = tmp_path / "t1" / "stage1_metadata_only" / "model.keras"
    stamp = model_file.stat().st_mtime_ns
    assert reproduce_main(args) == 0  # finished rows are reused, not retrained
    assert model_file.stat().st_mtime_ns == stamp
    assert "| metadata_only |" in capsys.readouterr().out
    assert reproduce_main(["table1", "--data", str(prepared), "--models", "alexnet"]) == 2
    assert "error: unknown model 'alexnet'" in capsys.readouterr().err
