"""Stage 1 training: run directory, config round trip, resume after a kill, flags, CLI."""

import json

import keras
import pytest
import yaml
from helpers_stage1 import make_prepared

from keras_cspine.cli.train import main
from keras_cspine.config import dump_config
from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.train import (
    PlateauAfterWarmup,
    Stage1Config,
    build_training_state,
    history_from_log,
    load_stage1_config,
    train_stage1,
)

TINY_VIT = ("model.options={backbone_kwargs: {patch_size: 8, num_layers: 1, num_heads: 2, "
            "hidden_dim: 16, mlp_dim: 32}}")  # fmt: skip
FAST = ["train.batch_size=4", "data.image_size=32", "data.val_fraction=0.25",
        "data.test_fraction=0.25", "train.early_stopping_patience=0", "sequence.epochs=2"]  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prep"), n_studies=5, n_slices=12, unlabelled=1)


def _config(*overrides):
    return load_stage1_config("stage1_synthetic_small", [*FAST, *overrides])


@pytest.mark.slow
def test_cli_trains_and_writes_the_run_directory(prepared, tmp_path, capsys):
    run_dir = tmp_path / "run"
    # the paper's ViT config, shrunk: random weights are allowed once nothing is frozen
    code = main([str(prepared), "--run-dir", str(run_dir), "--quiet", "--config", "stage1_vit",
                 "--set", "model.weights=null", "--set", "model.freeze=none", "--set", TINY_VIT,
                 "--set", "train.epochs=2", "--set", "sequence.enabled=true",
                 *[a for o in FAST for a in ("--set", o)]])  # fmt: skip
    assert code == 0
    for name in ("config.yaml", "splits.json", "data.json", "model.keras", "training_log.csv",
                 "history.json", "summary.json", "metrics.json", "table1_row.csv", "table2.md",
                 "predictions.csv", "figures/loss_curves.png", "sequence_model.keras"):  # fmt: skip
        assert (run_dir / name).is_file(), name
    assert not (run_dir / "backup").exists()  # removed once training completed
    config = load_stage1_config(run_dir / "config.yaml")
    assert config.model.name == "vit" and config.train.epochs == 2
    assert dump_config(config) == yaml.safe_load((run_dir / "config.yaml").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    assert history["epoch"] == [0.0, 1.0] and len(history["val_f1_score"]) == 2
    splits = json.loads((run_dir / "splits.json").read_text())
    assert not set(splits["train"]) & (set(splits["val"]) | set(splits["test"]))
    model = keras.saving.load_model(run_dir / "model.keras")
    assert model.output_shape == (None, 7)
    out = capsys.readouterr().out
    assert "test macro F1" in out and "(sequence model: macro F1" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sequence_model"]["epochs_run"] >= 1
    assert summary["evaluation"]["metrics_sequence_model"]["macro_f1"] >= 0.0
    with pytest.raises(FileExistsError, match="finished run"):
        train_stage1(config, prepared, run_dir)


class _Kill(keras.callbacks.Callback):
    """Simulates a kill after the first epoch's backup was written."""

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 0:
            raise KeyboardInterrupt("killed after epoch 1")


class _Epochs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


def test_killed_run_resumes_at_the_next_epoch(prepared, tmp_path):
    config = _config("model.name=metadata_only", "train.epochs=3", "train.evaluate=false")
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train_stage1(config, prepared, run_dir, extra_callbacks=[_Kill()], verbose=0)
    assert (run_dir / "backup").is_dir() and (run_dir / "model.keras").is_file()
    assert history_from_log(run_dir / "training_log.csv")["epoch"] == [0.0]
    epochs = _Epochs()
    summary = train_stage1(config, prepared, run_dir, extra_callbacks=[epochs], verbose=0)
    assert epochs.seen == [1, 2]  # continued at epoch 2 (index 1), not from scratch
    assert summary["resumed"] and summary["epochs_run"] == 3
    assert history_from_log(run_dir / "training_log.csv")["epoch"] == [0.0, 1.0, 2.0]
    assert not (run_dir / "backup").exists()


def test_mixed_precision_and_mirrored_strategy(prepared, tmp_path):
    config = _config("model.name=metadata_only", "train.epochs=1", "train.evaluate=false",
                     "train.mixed_precision=mixed_bfloat16", "train.strategy=mirrored")  # fmt: skip
    summary = train_stage1(config, prepared, tmp_path / "run", verbose=0)
    assert summary["epochs_run"] == 1
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    model = keras.saving.load_model(tmp_path / "run" / "model.keras")
    assert model.get_layer("metadata_dense_0").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("vertebrae").dtype_policy.name == "float32"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["train.optimizer=sgd"], "optimizer"),
        (["train.mixed_precision=fp8"], "mixed_precision"),
        (["train.strategy=tpu"], "strategy"),
        (["train.epochs=0"], "epochs"),
        (["model.nme=vit"], "unknown config key"),
    ],
)
def test_bad_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        load_stage1_config("stage1_synthetic_small", overrides)


PAPER_CONFIGS = ("gcvit_tiny", "vit", "convnext_small", "inceptionv3", "resnet152v2", "swin",
                 "vgg19", "densenet121")  # fmt: skip


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_follow_the_paper_recipe(name):
    """Algorithm 1 slices at 224 px, ImageNet weights, 25 epochs, nothing the paper does not name."""
    from keras_cspine.stage1.models.factory import get_spec

    config = load_stage1_config(f"stage1_{name}")
    spec = get_spec(name)
    assert config.model.name == name and config.data.image_size == spec.paper_size
    assert config.paper_row == spec.paper
    assert config.data.prepare_mode == "paper" and config.data.prepare_size == spec.paper_size
    assert config.model.weights == "imagenet"
    assert config.model.freeze == spec.default_freeze  # the cut that gives Table 1's counts
    assert config.train.epochs == 25
    assert config.train.early_stopping_patience == 0 and config.train.warmup_epochs == 0
    assert not config.data.augment.enabled and not config.data.balance
    assert not config.sequence.enabled
    assert isinstance(load_stage1_config(), Stage1Config)


@pytest.mark.parametrize(
    "overrides, refused",
    [
        (["model.weights=null"], True),  # levels_2 frozen at random: refused
        (["model.weights=null", "model.freeze=none"], False),  # everything trains: allowed
        (["model.weights=null", "model.freeze=levels_0"], True),
    ],
)
def test_frozen_random_backbone_is_refused(tmp_path, overrides, refused):
    config = load_stage1_config("stage1_gcvit_tiny", overrides)
    if refused:
        with pytest.raises(ValueError, match=r"stage1_gcvit_tiny: model gcvit_tiny freezes its "
                           r"backbone.*keras-cspine weights fetch gcvit_tiny"):  # fmt: skip
            train_stage1(config, tmp_path, tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before anything is written
    else:  # gets past the check, to the data check
        with pytest.raises(CSpineDataError, match="neither a prepare folder"):
            train_stage1(config, tmp_path, tmp_path / "run")


def test_missing_imagenet_weights_name_the_fetch_command(tmp_path, monkeypatch):
    from keras_cspine.stage1.models.factory import WeightsNotFoundError, build_model

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="keras-cspine weights fetch inceptionv3"):
        build_model("inceptionv3", image_size=75, weights="imagenet")


def test_data_path_must_be_prepared_or_rsna(tmp_path):
    with pytest.raises(CSpineDataError, match="neither a prepare folder"):
        train_stage1(_config(), tmp_path, tmp_path / "run")


def _tiny_compiled_model(learning_rate=0.1):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="sigmoid")])
    model.compile(keras.optimizers.SGD(learning_rate), "binary_crossentropy")
    return model


def _lr(model):
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


def test_warmup_rises_linearly_then_plateau_schedule_takes_over():
    model = _tiny_compiled_model()
    callback = PlateauAfterWarmup(0.1, warmup_epochs=2, steps_per_epoch=4, monitor="val_f1_score",
                                  mode="max", factor=0.5, patience=2, min_delta=0.0)  # fmt: skip
    callback.set_model(model)
    callback.on_train_begin()
    seen = []
    for epoch, f1 in enumerate([0.0, 0.0, 0.5, 0.5, 0.5]):  # F1 stuck at 0 while warming up
        callback.on_epoch_begin(epoch)
        for batch in range(4):
            callback.on_train_batch_begin(batch)
            seen.append(round(_lr(model), 6))
        logs = {"val_f1_score": f1}
        callback.on_epoch_end(epoch, logs)
        if epoch < 2:  # warm-up epochs log the rate they set
            assert logs["learning_rate"] == pytest.approx(_lr(model))
    # 8 warm-up steps from base/8 to base, then the base rate untouched by the batches
    assert seen[:8] == pytest.approx([0.1 * k / 8 for k in range(1, 9)])
    assert seen[8:16] == pytest.approx([0.1] * 8)
    # epochs 0-1 (F1 0) never count as a plateau; epoch 2 sets the best, 3 and 4 wait, then halve
    assert seen[16:] == pytest.approx([0.1] * 4)
    assert _lr(model) == pytest.approx(0.05)


def test_without_warmup_it_is_reduce_lr_on_plateau():
    model = _tiny_compiled_model()
    callback = PlateauAfterWarmup(0.1, warmup_epochs=0, monitor="val_f1_score", mode="max",
                                  factor=0.5, patience=2)  # fmt: skip
    assert isinstance(callback, keras.callbacks.ReduceLROnPlateau)
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, f1 in enumerate([0.2, 0.2, 0.2]):
        callback.on_epoch_begin(epoch)
        callback.on_train_batch_begin(0)
        callback.on_epoch_end(epoch, {"val_f1_score": f1})
    assert _lr(model) == pytest.approx(0.05)


def test_build_training_state_changes_nothing_but_when_variables_are_made():
    import numpy as np

    x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    y = (x[:, :2] > 0).astype("float32")
    trained = []
    for prebuild in (False, True):
        model = _tiny_compiled_model()
        model.compile(keras.optimizers.AdamW(0.01), "binary_crossentropy",
                      metrics=[keras.metrics.F1Score(average="macro", threshold=0.5)])  # fmt: skip
        if prebuild:
            build_training_state(model, (x, y))
            assert model.optimizer.built and len(model.optimizer.variables) > 1
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        trained.append([w.copy() for w in model.get_weights()])
    for a, b in zip(*trained):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_training_keeps_freed_memory_every_epoch(prepared, tmp_path, monkeypatch):
    import keras_cspine.stage1.dataset

    calls = []
    monkeypatch.setattr(keras_cspine.stage1.dataset, "_keep_freed_memory", lambda: calls.append(1))
    config = _config("model.name=metadata_only", "train.epochs=2", "train.evaluate=false")
    train_stage1(config, prepared, tmp_path / "run", verbose=0)
    assert len(calls) >= 4  # first training and validation batch of both epochs


@pytest.mark.slow
def test_sequence_model_follows_the_config(prepared, tmp_path):
    """sequence.enabled: the run gets a sequence model fitted on the best classifier's features
    (sized to them); disabled, a fresh run leaves none behind (not even a stale one)."""
    from keras_cspine.stage1.sequence_model import load_sequence_model

    run_dir = tmp_path / "run"
    base = ["model.name=metadata_only", "train.epochs=1", "train.evaluate=false"]
    summary = train_stage1(_config(*base), prepared, run_dir, verbose=0)
    sequence_model = load_sequence_model(run_dir / "sequence_model.keras")
    classifier = keras.saving.load_model(run_dir / "model.keras")
    assert sequence_model.input["features"].shape[-1] == classifier.layers[-1].input.shape[-1]
    assert summary["sequence_model"]["epochs_run"] == 2
    summary = train_stage1(_config(*base, "sequence.enabled=false"), prepared, run_dir,
                           overwrite=True, verbose=0)  # fmt: skip
    assert "sequence_model" not in summary
    assert not (run_dir / "sequence_model.keras").exists()


def test_run_killed_after_the_fit_resumes_after_it(prepared, tmp_path, monkeypatch):
    """A kill while the evaluation runs (after the fit and the sequence model) costs neither
    again: the rerun only evaluates. --overwrite then starts afresh."""
    import keras_cspine.stage1.evaluate

    config = _config("model.name=metadata_only", "train.epochs=2")
    run_dir = tmp_path / "run"
    real_evaluate = keras_cspine.stage1.evaluate.evaluate_run

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the evaluation")

    monkeypatch.setattr(keras_cspine.stage1.evaluate, "evaluate_run", killed)
    with pytest.raises(KeyboardInterrupt):
        train_stage1(config, prepared, run_dir, verbose=0)
    assert not (run_dir / "backup").exists() and not (run_dir / "summary.json").exists()
    fit_done = json.loads((run_dir / "fit_done.json").read_text())
    assert fit_done["epochs_run"] == 2 and fit_done["sequence_model"]["epochs_run"] >= 1
    sequence_mtime = (run_dir / "sequence_model.keras").stat().st_mtime_ns

    monkeypatch.setattr(keras_cspine.stage1.evaluate, "evaluate_run", real_evaluate)
    epochs = _Epochs()
    summary = train_stage1(config, prepared, run_dir, extra_callbacks=[epochs], verbose=0)
    assert epochs.seen == []  # no epoch again
    assert (run_dir / "sequence_model.keras").stat().st_mtime_ns == sequence_mtime  # not refit
    assert summary["resumed"] and summary["epochs_run"] == 2
    assert summary["train_seconds_this_session"] == 0.0
    assert summary["sequence_model"] == fit_done["sequence_model"]
    assert "metrics_sequence_model" in summary["evaluation"]
    assert history_from_log(run_dir / "training_log.csv")["epoch"] == [0.0, 1.0]

    epochs = _Epochs()
    train_stage1(config, prepared, run_dir, extra_callbacks=[epochs], overwrite=True, verbose=0)
    assert epochs.seen == [0, 1]  # a finished run overwritten trains from scratch

    (run_dir / "summary.json").unlink()  # a killed run again, whose marker is damaged
    (run_dir / "fit_done.json").write_text('{"epochs_run": 2, "best')
    with pytest.raises(CSpineDataError, match="fit_done.json"):
        train_stage1(config, prepared, run_dir, verbose=0)
