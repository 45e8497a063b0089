"""Stage 1 training: ``python -m keras_cspine train DATA [--config NAME] [--set key=value ...]``.

Serves the paper's Section 2.5 (vertebrae classification; Table 1 in Section 3): a registry
model (the two-input GCViT or an image-only baseline, :mod:`keras_cspine.stage1.models.baselines`) is
trained on prepared slices with binary cross-entropy over the seven C1..C7 sigmoids, Keras' macro F1
(``keras.metrics.F1Score(average="macro", threshold=0.5)``, logged as ``val_f1_score``) and
ReduceLROnPlateau on ``val_f1_score`` (mode max), as in the paper.

Data: ``DATA`` is a ``prepare`` output folder (``index.csv`` + ``cache/``). When it is a raw
RSNA-layout folder instead (``train.csv`` + ``train_images/``), it is prepared first into
``--prepared-dir`` (default ``<DATA>-prepared-<size>-<mode>`` beside it; prepare is resumable, so
a second run does no work) with ``data.prepare_size`` and ``data.prepare_mode``.

Splits are by study (``keras_cspine.data.splits.split_studies``), written to ``splits.json``.

The run directory (``--run-dir``, default ``runs/<config name>``) holds:

- ``config.yaml``: the resolved configuration; ``splits.json``; ``data.json`` (generator settings);
- ``level_decoder.json``: the study-level decoder of :mod:`keras_cspine.stage1.level_decoding`, fitted on
  the training split's label sequences (used by ``evaluate`` and ``predict``);
- ``model.keras``: the best model by ``val_f1_score`` (written atomically);
- ``sequence_model.keras`` (``sequence.enabled``, beyond the paper): the study sequence model of
  :mod:`keras_cspine.stage1.sequence_model`, a bidirectional GRU trained after the classifier on the best
  model's slice features of the training split (used by ``evaluate`` and ``predict``);
- ``training_log.csv`` (CSVLogger, appended across resumes) and ``history.json``;
- ``backup/``: the BackupAndRestore state while training runs: rerunning the same command after a
  kill resumes at the next epoch (the checkpoint's best score is restored from the log;
  ReduceLROnPlateau and EarlyStopping counters restart, the learning rate itself is restored);
- ``fit_done.json``: written when the classifier's fit ends (and updated once the sequence model
  is saved), removed with the finished run's ``summary.json``: a run killed after the fit (while
  the sequence model trains or the evaluation runs) resumes after it, not from scratch;
- after training, the evaluation of :mod:`keras_cspine.stage1.evaluate` on the test split (or the
  validation split when there is no test split): ``metrics.json``, ``table1_row.csv``,
  ``table2.csv``/``.md``, ``predictions.csv`` and ``figures/loss_curves.png`` (Figure 6).

The default configuration (``stage1_synthetic_small``) trains a narrow GCViT at 64 px on the
synthetic data: about half an hour on 2 CPU cores for 20 epochs over 144 studies (its header has
the commands and figures). The paper's rows are ``stage1_<model>`` (see ``configs/``).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keras_cspine.config import ConfigError, dump_config, load_config, save_config
from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.level_decoding import LEVEL_DECODER_FILE, fit_from_prepared
from keras_cspine.stage1.sequence_model import SEQUENCE_MODEL_FILE, SequenceConfig
from keras_cspine.utils import seed_everything, write_json

DEFAULT_CONFIG = "stage1_synthetic_small"
FIT_DONE_FILE = "fit_done.json"  # the classifier's fit ended (see the module)
MONITOR = "val_f1_score"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AugmentConfig:
    """Anatomy-preserving augmentation (see :class:`keras_cspine.stage1.dataset.Augmenter`)."""

    enabled: bool = True
    max_rotation_deg: float = 10.0
    max_shift: float = 0.05
    max_zoom: float = 0.05
    contrast: float = 0.1
    brightness: float = 0.05


@dataclass(frozen=True)
class DataConfig:
    """Where the slices come from and how they are batched.

    Args:
        image_size: model input side; the cache's size when None.
        val_fraction, test_fraction, split_seed: the study split.
        metadata_columns: index columns of the metadata input.
        balance: oversample rare label combinations (``CSpineSequence(balance=True)``).
        workers, use_multiprocessing: PyDataset loading parallelism.
        prepare_size, prepare_mode: used only when DATA is a raw RSNA folder.
    """

    image_size: int | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    metadata_columns: tuple[str, ...] = ("position_mm", "slice_ratio")
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    balance: bool = False
    workers: int = 1
    use_multiprocessing: bool = False
    prepare_size: int = 224
    prepare_mode: str = "bone"


@dataclass(frozen=True)
class ModelConfig:
    """The registry model (``keras_cspine.stage1.models.baselines.build_model``).

    Args:
        name: registry name (``gcvit_tiny``, ``resnet152v2``, ``vit``, ``metadata_only``...).
        weights: None (random), a local path, or "imagenet" when cached locally.
        freeze: the builder's freeze spec (GCViT: e.g. "levels_2"; baselines: "backbone").
        options: extra builder arguments (head sizes, tiny backbone settings).
    """

    name: str = "gcvit_xxtiny"
    weights: str | None = None
    freeze: str | None = None
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Args:
        epochs, batch_size, learning_rate: as usual.
        optimizer: "adam" or "adamw" (``weight_decay`` for adamw).
        reduce_lr_factor, reduce_lr_patience, min_learning_rate: ReduceLROnPlateau on val F1.
        reduce_lr_min_delta, reduce_lr_cooldown: its ``min_delta`` (an F1 gain smaller than this
            counts as no gain) and ``cooldown`` (epochs after a cut before it counts again).
        warmup_epochs: the learning rate rises linearly, batch by batch, from
            ``learning_rate / warm-up steps`` to ``learning_rate`` over this many epochs before
            ReduceLROnPlateau may act (0: no warm-up).
        early_stopping_patience: epochs without val F1 gain before stopping (0: never stop).
        steps_per_epoch: cap on batches per epoch (None: the whole split).
        seed: seeds Python, NumPy, Keras, shuffling and augmentation.
        mixed_precision: None, "mixed_float16" or "mixed_bfloat16".
        strategy: "default" (one device) or "mirrored" (tf.distribute.MirroredStrategy).
        jit_compile: XLA compilation of the train step (None: Keras' "auto"). On CPU, False is
            often faster for GCViT (XLA compile time dominates short runs).
        evaluate: evaluate the best model on the held-out split when training ends.
    """

    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    reduce_lr_factor: float = 0.5
    reduce_lr_patience: int = 2
    min_learning_rate: float = 1e-6
    reduce_lr_min_delta: float = 0.0
    reduce_lr_cooldown: int = 0
    warmup_epochs: int = 0
    early_stopping_patience: int = 5
    steps_per_epoch: int | None = None
    seed: int = 0
    mixed_precision: str | None = None
    strategy: str = "default"
    jit_compile: bool | None = None
    evaluate: bool = True

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, "
                             f"{self.batch_size}")  # fmt: skip
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be 'adam' or 'adamw', got {self.optimizer!r}")
        if self.mixed_precision not in (None, "mixed_float16", "mixed_bfloat16"):
            raise ValueError(
                f"mixed_precision must be null, mixed_float16 or mixed_bfloat16, "
                f"got {self.mixed_precision!r}"
            )
        if self.strategy not in ("default", "mirrored"):
            raise ValueError(f"strategy must be 'default' or 'mirrored', got {self.strategy!r}")
        if self.warmup_epochs < 0 or self.reduce_lr_cooldown < 0 or self.reduce_lr_min_delta < 0:
            raise ValueError(
                f"warmup_epochs, reduce_lr_cooldown and reduce_lr_min_delta must be >= 0, got "
                f"{self.warmup_epochs}, {self.reduce_lr_cooldown}, {self.reduce_lr_min_delta}"
            )


@dataclass(frozen=True)
class Stage1Config:
    """A stage 1 run: one row of the paper's Table 1."""

    name: str = "stage1"
    paper_row: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sequence: SequenceConfig = field(default_factory=SequenceConfig)


def load_stage1_config(
    path: str | os.PathLike | None = DEFAULT_CONFIG, overrides: Sequence[str] = ()
) -> Stage1Config:
    """A :class:`Stage1Config` from a file (path or bundled name) plus ``key=value`` overrides."""
    return load_config(Stage1Config, path, overrides)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def is_prepared(folder: str | os.PathLike) -> bool:
    """True for a ``prepare`` output folder."""
    return (Path(folder) / "index.csv").is_file()


def is_raw_rsna(folder: str | os.PathLike) -> bool:
    """True for an RSNA-layout folder (``train.csv`` and ``train_images/``)."""
    folder = Path(folder)
    return (folder / "train.csv").is_file() and (folder / "train_images").is_dir()


def resolve_prepared(
    data: str | os.PathLike, config: Stage1Config, prepared_dir: str | os.PathLike | None = None
) -> Path:
    """The prepare folder for ``data``: itself, or a (resumable) preparation of a raw folder."""
    data = Path(data)
    if is_prepared(data):
        return data
    if not is_raw_rsna(data):
        raise CSpineDataError(
            data,
            "neither a prepare folder (index.csv) nor an RSNA-layout folder (train.csv + "
            "train_images/); make one with `python -m keras_cspine synth DIR` then "
            "`python -m keras_cspine prepare DIR OUT`",
        )
    from keras_cspine.data.prepare import prepare_dataset

    size, mode = config.data.prepare_size, config.data.prepare_mode
    out = Path(prepared_dir) if prepared_dir else data.parent / f"{data.name}-prepared-{size}-{mode}"
    print(f"[train] preparing {data} -> {out} (size {size}, mode {mode})", file=sys.stderr)
    prepare_dataset(data, out, size=size, mode=mode, split="train")
    return out


def make_sequences(config: Stage1Config, prepared: str | os.PathLike, splits: dict[str, list[str]],
                   plain: bool = False):
    """``{"train", "val", "test"}`` CSpineSequences (empty splits left out) for ``config``.

    The training sequence shuffles, augments and balances as configured, unless ``plain``
    (then it reads its slices in order, as the others do: for prediction).
    """
    from keras_cspine.stage1.dataset import Augmenter, CSpineSequence
    from keras_cspine.stage1.models.baselines import get_spec

    inputs = get_spec(config.model.name).inputs
    aug = config.data.augment
    augmenter = None
    if aug.enabled:
        augmenter = Augmenter(
            max_rotation_deg=aug.max_rotation_deg, max_shift=aug.max_shift,
            max_zoom=aug.max_zoom, contrast=aug.contrast, brightness=aug.brightness,
        )  # fmt: skip
    common = {
        "batch_size": config.train.batch_size,
        "inputs": inputs,
        "metadata_columns": config.data.metadata_columns,
        "image_size": config.data.image_size,
        "workers": config.data.workers,
        "use_multiprocessing": config.data.use_multiprocessing,
    }
    if plain:
        out = {"train": CSpineSequence(prepared, splits["train"], **common)}
    else:
        out = {
            "train": CSpineSequence(
                prepared, splits["train"], shuffle=True, seed=config.train.seed, augment=augmenter,
                balance=config.data.balance, **common,
            )  # fmt: skip
        }
    for name in ("val", "test"):
        if splits.get(name):
            out[name] = CSpineSequence(prepared, splits[name], **common)
    return out


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------
def _keras():
    import keras

    return keras


class AtomicBestCheckpoint:
    """Save the best model (by ``monitor``, mode max) atomically; a Keras callback.

    ``keras.callbacks.ModelCheckpoint(save_best_only=True)`` writing to a temporary name that is
    renamed over ``path`` only once complete, so a kill never leaves a torn ``.keras``.
    """

    def __new__(cls, path: str | os.PathLike, monitor: str = MONITOR, best: float | None = None):
        keras = _keras()

        class _Checkpoint(keras.callbacks.ModelCheckpoint):
            def __init__(self):
                self.final_path = Path(path)
                self.tmp_path = self.final_path.with_name(f".{self.final_path.stem}.tmp.keras")
                super().__init__(
                    str(self.tmp_path), monitor=monitor, mode="max", save_best_only=True
                )
                if best is not None:
                    self.best = best

            def on_epoch_end(self, epoch, logs=None):
                super().on_epoch_end(epoch, logs)
                if self.tmp_path.exists():
                    os.replace(self.tmp_path, self.final_path)

        return _Checkpoint()


class PlateauAfterWarmup:
    """``keras.callbacks.ReduceLROnPlateau`` on ``val_f1_score`` (mode max, the paper's schedule)
    preceded by an optional linear warm-up; a Keras callback.

    During the first ``warmup_epochs`` epochs the learning rate rises per batch from
    ``base_lr / steps`` to ``base_lr`` and the plateau logic waits: early epochs of a model
    trained from scratch often have a macro F1 of 0 (every sigmoid below 0.5), and cutting the
    rate then only slows the start. Afterwards it is exactly ``ReduceLROnPlateau``.
    """

    def __new__(cls, base_lr: float, warmup_epochs: int = 0, steps_per_epoch: int = 1,
                **plateau_kwargs):  # fmt: skip
        keras = _keras()

        class _Plateau(keras.callbacks.ReduceLROnPlateau):
            def __init__(self):
                super().__init__(**plateau_kwargs)
                self.base_lr = float(base_lr)
                self.warmup_epochs = int(warmup_epochs)
                self.warmup_steps = max(int(warmup_epochs) * int(steps_per_epoch), 1)
                self.epoch = 0

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = int(epoch)

            def on_train_batch_begin(self, batch, logs=None):
                if self.epoch < self.warmup_epochs:
                    step = self.epoch * (self.warmup_steps // self.warmup_epochs) + int(batch)
                    lr = self.base_lr * min(step + 1, self.warmup_steps) / self.warmup_steps
                    self.model.optimizer.learning_rate = lr

            def on_epoch_end(self, epoch, logs=None):
                if epoch < self.warmup_epochs:
                    if epoch == self.warmup_epochs - 1:
                        self.model.optimizer.learning_rate = self.base_lr
                    if logs is not None:
                        logs["learning_rate"] = float(
                            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
                        )
                    return
                super().on_epoch_end(epoch, logs)

        return _Plateau()


def build_training_state(model, batch) -> None:
    """Create the optimizer, loss and metric variables before ``fit`` traces its train step.

    Without a distribution strategy, Keras' TensorFlow trainer creates them inside the first
    trace of the train step; variables created inside a ``tf.function`` make TensorFlow trace
    the step a second time, and the ~500 optimizer slots of GCViT-xxtiny are made in graph mode.
    That was about two thirds of the first step (60-250 s of CPU on GCViT-xxtiny); building
    them symbolically first (what Keras does itself under a strategy) leaves one trace.

    Args:
        model: a compiled Keras model.
        batch: one ``(inputs, targets)`` batch (e.g. ``sequence[0]``).
    """
    x, y = batch[0], batch[1]
    symbolic = getattr(model, "_symbolic_build", None)  # Keras 3 trainer, stable since 3.0
    if callable(symbolic):
        symbolic(data_batch=(x, y, None))
    elif model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def _read_log(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    out = []
    for row in rows:
        parsed = {}
        for key, value in row.items():
            try:
                parsed[key] = float(value)
            except (TypeError, ValueError):
                continue
        out.append(parsed)
    return out


def _nanmax(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return max(finite) if finite else math.nan


def _nanmin(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return min(finite) if finite else math.nan


def history_from_log(log_path: str | os.PathLike) -> dict[str, list[float]]:
    """The whole training history (all resumes) from the CSVLogger file, one list per key.

    Epochs logged twice (an epoch redone after a kill) keep their last entry.
    """
    by_epoch: dict[int, dict[str, float]] = {}
    for row in _read_log(Path(log_path)):
        if "epoch" in row:
            by_epoch[int(row["epoch"])] = row
    epochs = sorted(by_epoch)
    keys = sorted({k for row in by_epoch.values() for k in row})
    return {k: [by_epoch[e].get(k, math.nan) for e in epochs] for k in keys}


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _dtype_policy(name: str | None):
    keras = _keras()
    if name is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _strategy(name: str):
    if name == "mirrored":
        import tensorflow as tf

        return tf.distribute.MirroredStrategy()
    return contextlib.nullcontext()


def _scope(strategy):
    return strategy.scope() if hasattr(strategy, "scope") else strategy


def check_weights(config: Stage1Config) -> None:
    """Refuse, before any work, a run whose weights are missing or whose frozen layers would
    stay random (:class:`~keras_cspine.config.ConfigError` naming the weights and the command
    that gets them). Nothing is downloaded here."""
    from keras_cspine.stage1.models.baselines import frozen_random_problem
    from keras_cspine.stage1.models.pretrained import weights_status

    model = config.model
    problem = frozen_random_problem(model.name, model.weights, model.freeze)
    if problem:
        raise ConfigError(f"{config.name}: {problem}")
    if model.weights is not None and str(model.weights).endswith(".weights.h5"):
        status = {"weights_present": Path(model.weights).is_file(), "weights_source": model.weights,
                  "weights_command": "train a model first, or pass another file"}  # fmt: skip
    else:
        status = weights_status(model.name, model.weights)
    if status["weights_present"] is False:
        raise ConfigError(
            f"{config.name}: the {model.weights} weights of {model.name} are not here "
            f"({status['weights_source']}); get them with `{status['weights_command']}`"
        )


def build_and_compile(config: Stage1Config, image_size: int):
    """Build the registry model of ``config`` and compile it (BCE, macro F1, Adam)."""
    keras = _keras()
    from keras_cspine.stage1.models.baselines import build_model

    model = build_model(
        config.model.name,
        image_size=image_size,
        weights=config.model.weights,
        freeze=config.model.freeze,
        **dict(config.model.options),
    )
    t = config.train
    if t.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(t.learning_rate, weight_decay=t.weight_decay)
    else:
        optimizer = keras.optimizers.Adam(t.learning_rate)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[
            keras.metrics.F1Score(average="macro", threshold=0.5, name="f1_score"),
            keras.metrics.BinaryAccuracy(name="binary_accuracy"),
        ],
        jit_compile="auto" if t.jit_compile is None else t.jit_compile,
    )
    return model


def train_stage1(
    config: Stage1Config,
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    *,
    prepared_dir: str | os.PathLike | None = None,
    extra_callbacks: Sequence[Any] = (),
    overwrite: bool = False,
    verbose: int | str = "auto",
) -> dict[str, Any]:
    """Train one stage 1 model; resumable; returns a summary dict (also in ``summary.json``).

    Args:
        config: the resolved run configuration.
        data: a prepare folder or a raw RSNA-layout folder (prepared first).
        run_dir: the run directory (created). A run directory holding a ``backup/`` resumes
            the fit; one holding ``fit_done.json`` resumes after it; one holding a finished run
            is refused unless ``overwrite``.
        prepared_dir: where to prepare a raw folder.
        extra_callbacks: appended after the run's own callbacks (after the backup).
        overwrite: start afresh in a run directory holding a finished run.
        verbose: passed to ``model.fit``.
    """
    from keras_cspine.stage1.dataset import split_prepared

    check_weights(config)
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    backup_dir = run_dir / "backup"
    log_path = run_dir / "training_log.csv"
    fit_done_path = run_dir / FIT_DONE_FILE
    if summary_path.exists() and not backup_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"{run_dir}: holds a finished run (summary.json); choose another --run-dir or "
                f"pass --overwrite"
            )
        for name in ("summary.json", "training_log.csv", "history.json", "model.keras",
                     SEQUENCE_MODEL_FILE, FIT_DONE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    fit_done = None
    if fit_done_path.is_file() and not backup_dir.exists() and (run_dir / "model.keras").is_file():
        try:
            fit_done = json.loads(fit_done_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CSpineDataError(fit_done_path, f"unreadable ({err}); delete it to train this "
                                  "run's classifier again, or pass another --run-dir") from err
    resuming = backup_dir.exists() or fit_done is not None
    if not resuming:  # from a run that cannot resume
        for stale in (log_path, run_dir / SEQUENCE_MODEL_FILE, fit_done_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)

    prepared = resolve_prepared(data, config, prepared_dir)
    seed_everything(config.train.seed)
    _keras().utils.set_random_seed(config.train.seed)
    splits = split_prepared(
        prepared, config.data.val_fraction, config.data.test_fraction, config.data.split_seed
    )
    if not splits["val"]:
        raise CSpineDataError(prepared, "too few labelled studies for a validation split")
    save_config(config, run_dir / "config.yaml")
    write_json(run_dir / "splits.json", {**splits, "prepared": str(prepared)})
    fit_from_prepared(prepared, splits["train"]).save(run_dir / LEVEL_DECODER_FILE)
    sequences = make_sequences(config, prepared, splits)
    train_seq, val_seq = sequences["train"], sequences["val"]
    write_json(run_dir / "data.json", {k: s.get_config() for k, s in sequences.items()})
    fitted_now = fit_done is None
    if fitted_now:
        fit_done = _fit_classifier(config, run_dir, train_seq, val_seq, extra_callbacks, verbose)
        write_json(fit_done_path, fit_done)
    summary: dict[str, Any] = {
        "name": config.name,
        "model": config.model.name,
        **{k: fit_done[k] for k in ("epochs_run", "best_val_f1_score", "parameters")},
        "train_seconds_this_session": fit_done["train_seconds"] if fitted_now else 0.0,
        "resumed": resuming,
        "config": dump_config(config),
    }
    if config.sequence.enabled:
        done = fit_done.get("sequence_model")
        if done is None or not (run_dir / SEQUENCE_MODEL_FILE).is_file():
            done = train_sequence_model(config, prepared, splits, run_dir,
                                        verbose=0 if verbose == 0 else 2)  # fmt: skip
            write_json(fit_done_path, {**fit_done, "sequence_model": done})
        summary["sequence_model"] = done
    if config.train.evaluate:
        from keras_cspine.stage1.evaluate import evaluate_run

        split = "test" if splits["test"] else "val"
        summary["evaluation"] = evaluate_run(run_dir, split=split)
    write_json(summary_path, summary)
    return summary


def _fit_classifier(config: Stage1Config, run_dir: Path, train_seq, val_seq,
                    extra_callbacks: Sequence, verbose) -> dict[str, Any]:  # fmt: skip
    """``model.fit`` with the run's callbacks (resuming from ``backup/``); writes
    ``history.json``; returns what ``fit_done.json`` keeps of it."""
    keras = _keras()
    from keras_cspine.stage1.dataset import EpochSync, KeepFreedMemory

    backup_dir = run_dir / "backup"
    log_path = run_dir / "training_log.csv"
    previous = history_from_log(log_path).get(MONITOR, [])
    best_so_far = None if math.isnan(_nanmax(previous)) else _nanmax(previous)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True),
        EpochSync(train_seq),
        KeepFreedMemory(),
        AtomicBestCheckpoint(run_dir / "model.keras", MONITOR, best=best_so_far),
        PlateauAfterWarmup(
            config.train.learning_rate, config.train.warmup_epochs,
            config.train.steps_per_epoch or len(train_seq), monitor=MONITOR, mode="max",
            factor=config.train.reduce_lr_factor, patience=config.train.reduce_lr_patience,
            min_lr=config.train.min_learning_rate, min_delta=config.train.reduce_lr_min_delta,
            cooldown=config.train.reduce_lr_cooldown,
        ),  # fmt: skip
        keras.callbacks.CSVLogger(str(log_path), append=True),
    ]
    if config.train.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=MONITOR, mode="max", patience=config.train.early_stopping_patience
            )
        )
    callbacks.extend(extra_callbacks)

    started = time.time()
    with _dtype_policy(config.train.mixed_precision):
        strategy = _strategy(config.train.strategy)
        with _scope(strategy):
            model = build_and_compile(config, train_seq.image_size)
            build_training_state(model, train_seq[0])
        model.fit(
            train_seq,
            validation_data=val_seq,
            epochs=config.train.epochs,
            steps_per_epoch=config.train.steps_per_epoch,
            callbacks=callbacks,
            shuffle=False,  # CSpineSequence shuffles itself, seeded per epoch
            verbose=verbose,
        )
    history = history_from_log(log_path)
    write_json(run_dir / "history.json", history)
    from keras_cspine.stage1.models.baselines import count_parameters

    return {
        "epochs_run": len(history.get("epoch", [])),
        "best_val_f1_score": _nanmax(history.get(MONITOR, [])),
        "train_seconds": round(time.time() - started, 1),
        "parameters": count_parameters(model),
    }


def train_sequence_model(config: Stage1Config, prepared: str | os.PathLike,
                         splits: dict[str, list[str]], run_dir: str | os.PathLike,
                         verbose: int = 0) -> dict[str, Any]:  # fmt: skip
    """Fit the run's study sequence model (:mod:`keras_cspine.stage1.sequence_model`) on the best
    classifier's (``model.keras``) features of the training split, with early stopping on the
    validation split, and save it atomically as ``sequence_model.keras``; returns a summary."""
    keras = _keras()
    from keras_cspine.stage1.sequence_model import fit_sequence_model, study_batch
    from keras_cspine.utils import atomic_path

    started = time.time()
    run_dir = Path(run_dir)
    classifier = keras.saving.load_model(run_dir / "model.keras")
    sequences = make_sequences(config, prepared, {k: splits[k] for k in ("train", "val")},
                               plain=True)  # fmt: skip
    train_batch = study_batch(classifier, sequences["train"])
    val_batch = study_batch(classifier, sequences["val"])
    model, history = fit_sequence_model(train_batch, val_batch, config.sequence,
                                        seed=config.train.seed, verbose=verbose)  # fmt: skip
    with atomic_path(run_dir / SEQUENCE_MODEL_FILE) as tmp:
        model.save(tmp)
    return {
        "epochs_run": len(history["loss"]),
        "best_val_loss": _nanmin(history.get("val_loss", [])),
        "seconds": round(time.time() - started, 1),
    }


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine train``."""
    parser.add_argument("data", help="a prepare folder (index.csv + cache/) or an RSNA folder")
    parser.add_argument(
        "--config", default=DEFAULT_CONFIG,
        help=f"config file or bundled name (default {DEFAULT_CONFIG}; paper rows: stage1_<model>)",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.epochs=3 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--run-dir", help="run directory (default runs/<config name>)")
    parser.add_argument("--prepared-dir", help="where to prepare a raw RSNA folder")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a finished run in --run-dir"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-batch progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``train`` from parsed arguments."""
    config = load_stage1_config(args.config, args.overrides)
    run_dir = Path(args.run_dir or Path("runs") / config.name)
    summary = train_stage1(
        config, args.data, run_dir, prepared_dir=args.prepared_dir,
        overwrite=args.overwrite, verbose=2 if args.quiet else "auto",
    )  # fmt: skip
    line = f"[train] {config.name}: best val F1 {summary['best_val_f1_score']:.4f}"
    if "evaluation" in summary:
        ev = summary["evaluation"]["metrics"]
        line += (
            f"; {summary['evaluation']['split']} macro F1 {ev['macro_f1']:.4f}, "
            f"EMR {ev['exact_match_ratio']:.4f}, coverage {ev['coverage_error']:.3f}"
        )
        for key, what in (("metrics_level_decoded", "level-decoded"),
                          ("metrics_sequence_model", "sequence model")):
            extra = summary["evaluation"].get(key)
            if extra:
                line += (f" ({what}: macro F1 {extra['macro_f1']:.4f}, "
                         f"EMR {extra['exact_match_ratio']:.4f})")  # fmt: skip
    print(f"{line}; run directory {run_dir}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine.stage1.train``."""
    parser = argparse.ArgumentParser(prog="python -m keras_cspine.stage1.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
