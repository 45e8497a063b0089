"""Figures (keras_cspine.viz): the paper's Figure 3 from train.csv, and `look` writing it."""

import json

import matplotlib.image as mpimg
import pandas as pd
import pytest

from keras_cspine.cli import main as cli
from keras_cspine.errors import CsvSchemaError
from keras_cspine.viz import (
    FIGURE3_TITLE,
    figure_fracture_counts,
    find_train_csv,
    fracture_counts,
    look,
    write_fracture_counts,
)

# four studies, by hand: C1 fractured in 1, C2 in 2, C5 in 1, C7 in 3; C3, C4, C6 never
TRAIN_CSV = """StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7
1.2.826.0.1.3680043.1,1,1,1,0,0,0,0,1
1.2.826.0.1.3680043.2,1,0,1,0,0,1,0,1
1.2.826.0.1.3680043.3,0,0,0,0,0,0,0,0
1.2.826.0.1.3680043.4,1,0,0,0,0,0,0,1
"""
EXPECTED = {"C1": 1, "C2": 2, "C3": 0, "C4": 0, "C5": 1, "C6": 0, "C7": 3}


@pytest.fixture
def train_csv(tmp_path):
    path = tmp_path / "data" / "train.csv"
    path.parent.mkdir()
    path.write_text(TRAIN_CSV)
    return path


def _check_counts(counts):
    assert list(counts.columns) == ["vertebra", "fractured", "not_fractured"]
    assert list(counts.vertebra) == list(EXPECTED)
    assert dict(zip(counts.vertebra, counts.fractured)) == EXPECTED
    assert (counts.fractured + counts.not_fractured == 4).all()


def test_counts_match_a_hand_made_train_csv(train_csv):
    _check_counts(fracture_counts(train_csv))
    frame = pd.read_csv(train_csv, dtype=str)  # a frame is validated against the same schema
    _check_counts(fracture_counts(frame))


@pytest.mark.parametrize(
    "text, match",
    [
        (TRAIN_CSV.replace("1,0,0,0,0,0,0,1\n", "1,0,0,0,0,0,0,2\n", 1), "C7"),  # not 0/1
        (TRAIN_CSV.replace(",C7\n", "\n", 1), "missing column"),
        (TRAIN_CSV.replace(".3,0,0", ".3,1,0", 1), "patient_overall"),  # != max(C1..C7)
    ],
)
def test_a_bad_train_csv_is_refused_by_the_reader(tmp_path, text, match):
    path = tmp_path / "train.csv"
    path.write_text(text)
    with pytest.raises(CsvSchemaError, match=match):
        fracture_counts(path)


def test_figure3_png_and_csv(train_csv, tmp_path):
    fig, counts = figure_fracture_counts(train_csv)
    assert fig.axes[0].get_title() == FIGURE3_TITLE
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == list(EXPECTED)
    texts = {t.get_text() for t in fig.axes[0].texts}  # numbers on the bars
    assert {"3", "1", "4", "2"} <= texts
    _check_counts(counts)
    fig.clf()
    png, csv = write_fracture_counts(train_csv, tmp_path / "out")
    image = mpimg.imread(png)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image.shape[2] in (3, 4)
    _check_counts(pd.read_csv(csv))
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_find_train_csv(tmp_path, train_csv):
    prep = tmp_path / "prep"
    prep.mkdir()
    path, why = find_train_csv(prep)
    assert path is None and "prepare.json" in why
    (prep / "prepare.json").write_text(json.dumps({"settings": {}}))
    assert "no data_dir" in find_train_csv(prep)[1]
    (prep / "prepare.json").write_text(json.dumps({"data_dir": str(tmp_path / "gone")}))
    assert "does not exist" in find_train_csv(prep)[1]
    (prep / "prepare.json").write_text(json.dumps({"data_dir": str(train_csv.parent)}))
    assert find_train_csv(prep) == (train_csv, "")
    assert find_train_csv(prep, tmp_path / "other.csv")[0] is None  # an explicit path must exist
    assert find_train_csv(tmp_path / "nowhere", train_csv) == (train_csv, "")


def test_look_writes_figure3_from_the_recorded_data_dir(prepared, synthetic_data, tmp_path):
    out = tmp_path / "figures"
    written = look(prepared, out, n_slices=2, n_studies=1)
    png = out / "figure3_fracture_counts.png"
    assert png in written and (out / "figure3_fracture_counts.csv") in written
    assert mpimg.imread(png).ndim == 3
    counts = pd.read_csv(out / "figure3_fracture_counts.csv")
    truth = pd.read_csv(synthetic_data / "train.csv")
    assert list(counts.fractured) == [int(truth[v].sum()) for v in EXPECTED]
    assert (counts.fractured + counts.not_fractured == len(truth)).all()


def test_look_skips_figure3_with_one_line_when_train_csv_is_unknown(prepared, tmp_path, capsys,
                                                                    train_csv):  # fmt: skip
    # a copy of the prepare folder whose prepare.json has lost its data_dir
    prep = tmp_path / "prep"
    prep.mkdir()
    (prep / "index.csv").write_bytes((prepared / "index.csv").read_bytes())
    (prep / "cache").symlink_to(prepared / "cache")
    settings = json.loads((prepared / "prepare.json").read_text())
    settings.pop("data_dir")
    (prep / "prepare.json").write_text(json.dumps(settings))
    flags = ["--slices", "2", "--studies", "0"]
    assert cli(["look", str(prep), str(tmp_path / "a"), *flags]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "Figure 3" in line]
    assert len(skipped) == 1 and "skipped" in skipped[0] and "--train-csv" in skipped[0]
    assert not (tmp_path / "a" / "figure3_fracture_counts.png").exists()
    assert (tmp_path / "a" / "slices.png").is_file()

    # --train-csv names it
    assert cli(["look", str(prep), str(tmp_path / "b"), *flags, "--train-csv", str(train_csv)]) == 0
    assert "skipped" not in capsys.readouterr().out
    _check_counts(pd.read_csv(tmp_path / "b" / "figure3_fracture_counts.csv"))
