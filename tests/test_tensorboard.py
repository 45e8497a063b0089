"""Stage 1 TensorBoard logs: every run writes ``RUN/tensorboard`` (train and validation scalars per
epoch, the learning rate included), continued across a resume; the CLI names the command. Without
the tensorboard package a run trains as before, without the logs."""

from collections import defaultdict
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from helpers_stage1 import make_prepared

from keras_cspine.cli.train import main
from keras_cspine.stage1.train import load_stage1_config, train_stage1

FAST = ["model.name=metadata_only", "train.batch_size=4", "data.image_size=32",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "train.early_stopping_patience=0",
        "train.evaluate=false", "sequence.enabled=false"]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n_studies=5, n_slices=12, unlabelled=1)


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """tag -> step -> value over every event file in ``folder``."""
    found: dict[str, dict[int, float]] = defaultdict(dict)
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                number = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                          else value.simple_value)  # fmt: skip
                found[value.tag][event.step] = number
    return dict(found)


def test_cli_run_writes_tensorboard_logs(prepared, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    run_dir = tmp_path / "run"
    overrides = [*FAST, "train.epochs=2", "train.learning_rate=0.002", "train.warmup_epochs=0"]
    code = main([str(prepared), "--run-dir", str(run_dir), "--quiet", "--config",
                 "stage1_synthetic_small", *[a for o in overrides for a in ("--set", o)]])  # fmt: skip
    assert code == 0
    assert f"[train] tensorboard --logdir {run_dir / 'tensorboard'}" in capsys.readouterr().out
    train = scalars(run_dir / "tensorboard" / "train")
    validation = scalars(run_dir / "tensorboard" / "validation")
    assert {"epoch_loss", "epoch_f1_score", "epoch_learning_rate"} <= set(train)
    assert {"epoch_loss", "epoch_f1_score"} <= set(validation)
    assert set(train["epoch_loss"]) == set(validation["epoch_f1_score"]) == {0, 1}
    assert train["epoch_learning_rate"][0] == pytest.approx(0.002)
    assert not list(run_dir.glob("tensorboard/**/*.trace.json.gz"))  # no profile


class _Kill(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt("killed after epoch 1")


def test_resumed_run_continues_its_logs_and_a_fresh_one_starts_anew(prepared, tmp_path):
    pytest.importorskip("tensorboard")
    config = load_stage1_config("stage1_synthetic_small", [*FAST, "train.epochs=3"])
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_stage1(config, prepared, run_dir, extra_callbacks=[_Kill()], verbose=0)
    summary = train_stage1(config, prepared, run_dir, verbose=0)
    assert summary["resumed"] and summary["epochs_run"] == 3
    assert set(scalars(run_dir / "tensorboard" / "validation")["epoch_loss"]) == {0, 1, 2}
    config = load_stage1_config("stage1_synthetic_small", [*FAST, "train.epochs=1"])
    train_stage1(config, prepared, run_dir, overwrite=True, verbose=0)
    assert set(scalars(run_dir / "tensorboard" / "train")["epoch_loss"]) == {0}


def test_without_the_tensorboard_package_the_run_trains_without_logs(prepared, tmp_path, capsys,
                                                                      monkeypatch):  # fmt: skip
    import keras_cspine.stage1.train

    monkeypatch.setattr(keras_cspine.stage1.train, "tensorboard_installed", lambda: False)
    run_dir = tmp_path / "run"
    code = main([str(prepared), "--run-dir", str(run_dir), "--quiet", "--config",
                 "stage1_synthetic_small", *[a for o in [*FAST, "train.epochs=1"]
                                             for a in ("--set", o)]])  # fmt: skip
    assert code == 0 and (run_dir / "model.keras").is_file()
    assert not (run_dir / "tensorboard").exists()
    captured = capsys.readouterr()
    assert "pip install tensorboard" in captured.err and "--logdir" not in captured.out
