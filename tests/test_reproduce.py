"""``reproduce table1``: the dry run (networks, counts, weights, recipe) and its refusals."""

import re

import h5py
import pytest

from keras_cspine.cli.reproduce import main
from keras_cspine.paper.reproduce import format_plan, table1_plan


@pytest.fixture
def caches(tmp_path, monkeypatch):
    """Empty weights caches: nothing of the user's is read or written."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("KERAS_CSPINE_WEIGHTS", str(tmp_path / "cspine"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path


@pytest.mark.slow
def test_dry_run_prints_counts_weights_and_recipe(caches, capsys):
    notop = caches / "keras" / "models" / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    notop.parent.mkdir(parents=True)
    with h5py.File(notop, "w") as handle:  # present (checked by hash only with `weights list`)
        handle.attrs["layer_names"] = []
    assert main(["table1", "--dry-run", "--models", "inceptionv3", "gcvit_tiny"]) == 0
    out = capsys.readouterr().out
    inception, gcvit = out.split("Proposed (GCViT)")
    assert "InceptionV3 (stage1_inceptionv3)" in inception
    assert "paper 526,535 / 21,802,592; built 526,535 / 21,802,592  exact" in inception
    assert f"{notop} [present]" in inception and "get weights" not in inception
    assert "prepare --mode paper, 25 epochs, augmentation off, early stopping off" in inception
    assert "paper 13,080,663 / 14,683,998; built 13,080,663 / 14,683,998  exact" in gcvit
    assert "[MISSING]" in gcvit and "get weights : keras-cspine weights fetch gcvit_tiny" in gcvit


def test_plan_shows_the_residual_of_a_row_built_otherwise(caches):
    plan = table1_plan(["inceptionv3"], ["data.image_size=75", "model.freeze=none"])
    text = format_plan(plan)
    assert plan[0]["paper_trainable"] == 526_535 and plan[0]["freeze"] == "none"
    assert "residual +" in text and "exact" not in text


def test_missing_weights_are_refused_before_any_work(caches, capsys):
    code = main(["table1", "--data", str(caches / "nowhere"), "--out", str(caches / "out"),
                 "--models", "gcvit_xxtiny", "resnet152v2"])  # fmt: skip
    assert code == 2
    assert re.search(r"^error: stage1_resnet152v2: the imagenet weights of resnet152v2 are not "
                     r"here .*keras-cspine weights fetch resnet152v2", capsys.readouterr().err)
    assert not (caches / "out" / "prepared").exists()


def test_data_is_required_without_dry_run(caches):
    with pytest.raises(SystemExit, match="--data is required"):
        main(["table1", "--models", "inceptionv3"])
