"""Shards for job arrays: ``prepare/predict --shard i/n`` and ``merge``.

What the tests hold the shards to: each study goes to exactly one shard, chosen by its UID alone
(the same on every rerun and in any order); the parts of ``n`` shards, merged, are what one
unsharded run writes (``index.csv``, caches and study files, ``submission.csv``,
``predictions.csv``, ``errors.csv``, ``index.html``, the evaluation: byte for byte); a missing
or unfinished shard is named and never left out; shards run with different settings are refused,
naming the setting.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
from test_pipeline import write_box_detector, write_ratio_classifier

from keras_cspine.data.prepare import prepare_dataset
from keras_cspine.data.prepare_shards import merge_prepared_shards, prepare_shard
from keras_cspine.data.shards import Shard, shard_of
from keras_cspine.errors import CSpineDataError

PREP = {"size": 32, "mode": "bone", "workers": 1, "progress": False}


def _files(root: Path, *folders: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for folder in folders
            for p in sorted((root / folder).rglob("*")) if p.is_file()}  # fmt: skip


def _main(argv, capsys) -> tuple[int, str, str]:
    from keras_cspine.cli import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------------------------
# Which study goes where
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, fragment", [
    ("3/2", "out of range for 2 shards"),
    ("2/2", "out of range for 2 shards"),
    ("0/0", "number of shards must be >= 1"),
    ("-1/2", "out of range"),
    ("a/b", "is not i/n"),
    ("1/2/3", "is not i/n"),
    ("1", "is not i/n"),
    ("", "is not i/n"),
])  # fmt: skip
def test_bad_shard_specs_are_refused(text, fragment):
    with pytest.raises(ValueError, match=fragment):
        Shard.parse(text)


def test_a_bad_shard_spec_is_one_line_on_the_command_line(tmp_path, capsys):
    code, _, err = _main(["prepare", tmp_path, tmp_path / "out", "--shard", "3/2"], capsys)
    lines = [line for line in err.splitlines() if "error: " in line]
    assert code == 2 and len(lines) == 1 and "--shard" in lines[0] and "0 <= i < n" in lines[0]


def test_shards_are_a_stable_partition_by_uid():
    uids = [f"1.2.826.0.1.3680043.{10000 + 37 * i}" for i in range(200)]
    # pinned: a change of the hash would move studies between shards of running job arrays
    assert [shard_of("1.2.826.0.1.3680043.10001", n) for n in (2, 3, 4, 7)] == [1, 0, 3, 6]
    for n in (1, 2, 3, 5):
        shards = [Shard(i, n) for i in range(n)]
        parts = [shard.select(uids) for shard in shards]
        assert sorted(u for part in parts for u in part) == sorted(uids)  # each exactly once
        shuffled = random.Random(n).sample(uids, len(uids))
        assert [sorted(s.select(shuffled)) for s in shards] == [sorted(p) for p in parts]
        if n > 1:
            assert all(len(part) > 0 for part in parts)
    assert Shard.parse(" 1 / 3 ") == Shard(1, 3) and Shard(1, 3).name == "1-of-3"


# --------------------------------------------------------------------------------------------
# prepare
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single_prepare(synthetic_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "prep"
    prepare_dataset(synthetic_data, out, **PREP)
    return out


def test_three_prepare_shards_merge_into_one_run(synthetic_data, single_prepare, tmp_path):
    out = tmp_path / "sharded"
    summaries = [prepare_shard(synthetic_data, out, f"{i}/3", **PREP) for i in range(3)]
    assert "merged" in summaries[-1] and all("merged" not in s for s in summaries[:-1])
    assert sum(s["studies"] for s in summaries) == summaries[-1]["merged"]["studies"] == 4
    assert (out / "index.csv").read_bytes() == (single_prepare / "index.csv").read_bytes()
    assert _files(out, "cache", "studies") == _files(single_prepare, "cache", "studies")
    assert not (out / "errors.csv").exists()
    merged = json.loads((out / "prepare.json").read_text())
    single = json.loads((single_prepare / "prepare.json").read_text())
    for key in ("settings", "settings_digest", "studies", "index_digest", "errors"):
        assert merged[key] == single[key], key
    assert [p["shard"] for p in merged["shards"]["parts"]] == ["0-of-3", "1-of-3", "2-of-3"]
    # the same shard again takes the same studies; an unsharded prepare finds every study done
    before = json.loads((out / "shards" / "1-of-3" / "shard.json").read_text())["studies"]
    prepare_shard(synthetic_data, out, "1/3", merge=False, **PREP)
    assert json.loads((out / "shards" / "1-of-3" / "shard.json").read_text())["studies"] == before
    again = prepare_dataset(synthetic_data, out, **PREP)
    assert again["studies_processed_this_run"] == 0 and again["studies_reused"] == 4
    assert (out / "index.csv").read_bytes() == (single_prepare / "index.csv").read_bytes()


def test_merge_command_names_missing_and_unfinished_shards(synthetic_data, single_prepare,
                                                           tmp_path, capsys):  # fmt: skip
    out = tmp_path / "out"
    for i in (0, 2):
        code, stdout, _ = _main(["prepare", synthetic_data, out, "--size", "32", "--workers", "1",
                                 "--shard", f"{i}/3", "--no-merge"], capsys)  # fmt: skip
        assert code == 0 and "merged" not in stdout
    assert not (out / "index.csv").exists()
    code, _, err = _main(["merge", out], capsys)
    assert code == 2 and "1-of-3 (never run)" in err and len(err.strip().splitlines()) == 1
    (out / "shards" / "1-of-3").mkdir()  # a shard that started and died
    code, _, err = _main(["merge", out], capsys)
    assert code == 2 and "1-of-3 (unfinished: failed or killed" in err
    with pytest.raises(CSpineDataError, match=r"missing 1: 1-of-3"):
        merge_prepared_shards(out)
    assert not (out / "index.csv").exists()  # nothing merged from an incomplete set
    code, _, _ = _main(["prepare", synthetic_data, out, "--size", "32", "--workers", "1",
                        "--shard", "1/3", "--no-merge"], capsys)  # fmt: skip
    code, stdout, _ = _main(["merge", out], capsys)
    assert code == 0 and "merged 3 prepare shards" in stdout
    assert (out / "index.csv").read_bytes() == (single_prepare / "index.csv").read_bytes()


def test_prepare_shards_with_other_settings_are_not_merged(synthetic_data, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_shard(synthetic_data, out, "0/2", **PREP)
    with pytest.raises(CSpineDataError, match=r"settings\.size is 48 in shard 1-of-2 but 32 in "
                                              r"shard 0-of-2"):  # fmt: skip
        prepare_shard(synthetic_data, out, "1/2", **{**PREP, "size": 48})
    code, _, err = _main(["merge", out], capsys)
    assert code == 2 and "settings.size" in err and "1-of-2" in err
    assert not (out / "index.csv").exists()
    other = tmp_path / "other"  # the same settings, another selection of studies
    prepare_shard(synthetic_data, other, "0/2", merge=False, **PREP)
    prepare_shard(synthetic_data, other, "1/2", limit=3, merge=False, **PREP)
    with pytest.raises(CSpineDataError, match=r"study_selection\.(digest|studies)"):
        merge_prepared_shards(other)


def test_shards_of_two_counts_need_shards_n(synthetic_data, tmp_path):
    out = tmp_path / "out"
    prepare_shard(synthetic_data, out, "0/1", **PREP)  # one shard: merged at once
    prepare_shard(synthetic_data, out, "0/2", merge=False, **PREP)
    with pytest.raises(CSpineDataError, match="different shard counts"):
        merge_prepared_shards(out)
    assert merge_prepared_shards(out, count=1)["studies"] == 4


# --------------------------------------------------------------------------------------------
# predict
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shard_models")
    return write_ratio_classifier(folder / "stage1.keras"), write_box_detector(folder / "det.onnx")


@pytest.fixture(scope="module")
def study_input(synthetic_data, tmp_path_factory) -> Path:
    """Four readable studies, one whose first slice is corrupt (named by its folder) and one
    that cannot be named at all (an error row without a UID)."""
    root = tmp_path_factory.mktemp("shard_input") / "test_images"
    root.mkdir()
    uids = sorted(p.name for p in (synthetic_data / "train_images").iterdir())
    for uid in uids:
        os.symlink(synthetic_data / "train_images" / uid, root / uid)
    for name in ("1.2.826.0.1.3680043.99999", "patient_folder"):
        shutil.copytree(synthetic_data / "train_images" / uids[0], root / name)
        (root / name / "1.dcm").write_bytes(b"not a DICOM file at all")
    return root


def _predict_options(models, **config):
    from keras_cspine.pipeline.config import PredictConfig

    return {"stage1": models[0], "stage2": models[1], "progress": False,
            "config": PredictConfig(**{"report": "html", **config})}  # fmt: skip


@pytest.mark.slow  # a predict run and three shards with reports: about 25 s
def test_three_predict_shards_merge_into_one_run(models, study_input, synthetic_data, tmp_path):
    from keras_cspine.pipeline.predict import predict
    from keras_cspine.pipeline.shards import predict_shard

    labels = synthetic_data / "train.csv"
    figure = Path(models[0]).parent / "figures" / "loss_curves.png"  # stage 1's "run" has one
    figure.parent.mkdir(exist_ok=True)
    figure.write_bytes(b"\x89PNG\r\n\x1a\n")
    single = tmp_path / "single"
    expected = predict(study_input, single, labels=labels, **_predict_options(models))
    out = tmp_path / "sharded"
    parts = [predict_shard(study_input, out, f"{i}/3", labels=labels, **_predict_options(models))
             for i in range(3)]  # fmt: skip
    merged = parts[-1]["merged"]
    assert sum(p["n_studies"] for p in parts) == expected["n_studies"] == 6
    for name in ("submission.csv", "predictions.csv", "errors.csv", "index.html",
                 "evaluation.json", "evaluation.md", "predict_config.yaml"):  # fmt: skip
        assert (out / name).read_bytes() == (single / name).read_bytes(), name
    assert "figures/loss_curves.png" in (out / "index.html").read_text()  # the training figures
    for key in ("n_studies", "n_ok", "n_failed", "n_slices", "n_gated", "errors", "warnings",
                "evaluation", "config", "models"):  # fmt: skip
        assert merged[key] == expected[key], key
    assert json.loads((out / "summary.json").read_text())["shards"]["count"] == 3
    names = sorted(p.name for p in (single / "studies").iterdir())
    assert sorted(p.name for p in (out / "studies").iterdir()) == names
    for name in names:  # the same study results (their timings aside)
        a, b = (json.loads((root / "studies" / name).read_text()) for root in (single, out))
        assert {**a, "timings_s": None} == {**b, "timings_s": None}
    assert _files(out, "reports").keys() == _files(single, "reports").keys()


def test_predict_shards_with_other_settings_are_not_merged(models, study_input, tmp_path,
                                                           capsys):  # fmt: skip
    from keras_cspine.pipeline.shards import merge_predicted_shards, predict_shard

    out = tmp_path / "out"
    predict_shard(study_input, out, "0/2", **_predict_options(models, report="none"))
    with pytest.raises(CSpineDataError, match="missing 1: 1-of-2 .never run."):
        merge_predicted_shards(out)
    with pytest.raises(CSpineDataError, match=r"settings\.config\.presence_threshold is 0\.6 in "
                                              r"shard 1-of-2 but 0\.5 in shard 0-of-2"):  # fmt: skip
        predict_shard(study_input, out, "1/2",
                      **_predict_options(models, report="none", presence_threshold=0.6))
    code, _, err = _main(["merge", out], capsys)
    assert code == 2 and "presence_threshold" in err and not (out / "submission.csv").exists()


def test_predict_shard_on_the_command_line(models, study_input, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["predict", study_input, "--out", out, "--stage1", models[0], "--stage2", models[1],
            "--report", "none", "--quiet", "--shard"]  # fmt: skip
    code, stdout, _ = _main([*argv, "0/2"], capsys)
    assert "shard 0-of-2" in stdout and not (out / "submission.csv").exists()
    code, stdout, _ = _main([*argv, "1/2"], capsys)
    assert "[predict] submission:" in stdout and (out / "submission.csv").is_file()
    code, _, err = _main([*argv, "a/b"], capsys)
    assert code == 2 and "--shard" in err and "is not i/n" in err
