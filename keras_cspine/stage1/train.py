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
- ``tensorboard/``: Keras' TensorBoard logs (``train/`` and ``validation/``: loss, macro F1 and
  learning rate per epoch), continued across resumes: ``tensorboard --logdir RUN/tensorboard``
  (written when the ``tensorboard`` package is installed);
- ``backup/``: the BackupAndRestore state while training runs: rerunning the same command after a
  kill resumes at the next epoch (the checkpoint's best score is restored from the log;
  ReduceLROnPlateau and EarlyStopping counters restart, the learning rate itself is restored);
- ``fit_done.json``: written when the classifier's fit ends (and updated once the sequence model
  is saved), removed with the finished run's ``summary.json``: a run killed after the fit (while
  the sequence model trains or the evaluation runs) resumes after it, not from scratch;
- after training, the evaluation of :mod:`keras_cspine.stage1.evaluate` on the test split (or the
  validation split when there is no test split): ``metrics.json``, ``table1_row.csv``,
  ``table2.csv``/``.md``, ``predictions.csv`` and ``figures/loss_curves.png`` (Figure 6).

Several machines (``train.strategy: multi_worker``, configured by ``TF_CONFIG``): every worker
runs the same command on its part of the training batches; only the chief writes the run
directory, the others work in a temporary folder they remove (:mod:`keras_cspine.stage1.distribute`).

The default configuration (``stage1_synthetic_small``) trains a narrow GCViT at 64 px on the
synthetic data: about half an hour on 2 CPU cores for 20 epochs over 144 studies (its header has
the commands and figures). The paper's rows are ``stage1_<model>`` (see ``configs/``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keras_cspine.config import ConfigError, dump_config, save_config
from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1 import distribute, runs
from keras_cspine.stage1.callbacks import MONITOR, AtomicBestCheckpoint, PlateauAfterWarmup
from keras_cspine.stage1.config import (  # noqa: F401 - the config names, re-exported here
    DEFAULT_CONFIG,
    AugmentConfig,
    DataConfig,
    ModelConfig,
    Stage1Config,
    TrainConfig,
    load_stage1_config,
)
from keras_cspine.stage1.level_decoding import fit_from_prepared
from keras_cspine.stage1.runs import history_from_log, nanmax, nanmin
from keras_cspine.utils import seed_everything, write_json


def _keras():
    import keras

    return keras


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

    size, mode, roi_mm = config.data.prepare_size, config.data.prepare_mode, config.data.prepare_roi_mm
    window = f"-roi{roi_mm:g}" if roi_mm else ""
    out = (Path(prepared_dir) if prepared_dir
           else data.parent / f"{data.name}-prepared-{size}-{mode}{window}")  # fmt: skip
    print(f"[train] preparing {data} -> {out} (size {size}, mode {mode}"
          f"{f', {roi_mm:g} mm spine window' if roi_mm else ''})", file=sys.stderr)  # fmt: skip
    prepare_dataset(data, out, size=size, mode=mode, roi_mm=roi_mm, split="train")
    return out


def make_sequences(config: Stage1Config, prepared: str | os.PathLike, splits: dict[str, list[str]],
                   plain: bool = False):
    """``{"train", "val", "test"}`` CSpineSequences (empty splits left out) for ``config``.

    The training sequence shuffles, augments and balances as configured, unless ``plain``
    (then it reads its slices in order, as the others do: for prediction).
    """
    from keras_cspine.stage1.dataset import Augmenter, CSpineSequence
    from keras_cspine.stage1.models.factory import get_spec

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


def check_weights(config: Stage1Config) -> None:
    """Refuse, before any work, a run whose weights are missing or whose frozen layers would
    stay random (:class:`~keras_cspine.config.ConfigError` naming the weights and the command
    that gets them). Nothing is downloaded here."""
    from keras_cspine.stage1.models.factory import frozen_random_problem
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
    from keras_cspine.stage1.models.factory import build_model

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

    With ``train.strategy: multi_worker`` every process of the ``TF_CONFIG`` cluster calls this
    with the same arguments; the chief trains into ``run_dir`` and returns the summary, the other
    workers train in a temporary folder (removed) and return a summary of their part only.
    """
    cluster = strategy = None
    if config.train.strategy == "multi_worker":
        cluster = distribute.cluster_from_environment()  # a bad TF_CONFIG fails here, first
    check_weights(config)
    if cluster is not None:
        # before TensorFlow's first operation in this process, which fixes its runtime
        strategy = distribute.make_strategy("multi_worker", cluster)
        if not cluster.is_chief:
            with distribute.worker_temp_dir(cluster, run_dir) as scratch:
                return _train_worker(config, data, scratch, strategy, cluster,
                                     prepared_dir, extra_callbacks, verbose)  # fmt: skip
    return _train_chief(config, data, Path(run_dir), strategy, cluster, prepared_dir,
                        extra_callbacks, overwrite, verbose)  # fmt: skip


def _prepare_inputs(config: Stage1Config, data, prepared_dir) -> tuple[Path, dict[str, list[str]]]:
    """The prepared folder, seeded; and the study splits."""
    from keras_cspine.stage1.dataset import split_prepared

    prepared = resolve_prepared(data, config, prepared_dir)
    seed_everything(config.train.seed)
    _keras().utils.set_random_seed(config.train.seed)
    splits = split_prepared(
        prepared, config.data.val_fraction, config.data.test_fraction, config.data.split_seed
    )
    if not splits["val"]:
        raise CSpineDataError(prepared, "too few labelled studies for a validation split")
    return prepared, splits


def _train_worker(config: Stage1Config, data, scratch: Path, strategy, cluster,
                  prepared_dir, extra_callbacks, verbose) -> dict[str, Any]:  # fmt: skip
    """A non-chief worker of a multi-worker run: the chief's fit, its part of the batches, every
    file in ``scratch``; nothing after the fit (the chief alone fits the sequence model and
    evaluates)."""
    prepared, splits = _prepare_inputs(config, data, prepared_dir)
    sequences = make_sequences(config, prepared, splits)
    summary: dict[str, Any] = {"name": config.name, "model": config.model.name,
                               "worker": cluster.name, "workers": cluster.num_workers}  # fmt: skip
    # the chief decides whether the fit runs (it is skipped when the chief's run had ended it)
    if distribute.broadcast_from_chief(strategy, [0], is_chief=False)[0]:
        fit = _fit_classifier(config, scratch, sequences["train"], sequences["val"],
                              extra_callbacks, verbose, strategy, cluster)  # fmt: skip
        summary.update({k: fit[k] for k in ("epochs_run", "steps_per_epoch", "train_seconds")})
    # wait for the chief's end (sequence model, evaluation): a worker gone early reads as a
    # crash to the chief's TensorFlow
    distribute.broadcast_from_chief(strategy, [0], is_chief=False)
    return summary


def _train_chief(config: Stage1Config, data, run_dir: Path, strategy, cluster, prepared_dir,
                 extra_callbacks, overwrite, verbose) -> dict[str, Any]:  # fmt: skip
    """The run itself (one process, or the chief of several): everything in ``run_dir``."""
    summary_path = run_dir / runs.SUMMARY_FILE
    backup_dir = run_dir / runs.BACKUP_DIR
    log_path = run_dir / runs.TRAINING_LOG_FILE
    fit_done_path = run_dir / runs.FIT_DONE_FILE
    if summary_path.exists() and not backup_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"{run_dir}: holds a finished run (summary.json); choose another --run-dir or "
                f"pass --overwrite"
            )
        for name in (runs.SUMMARY_FILE, runs.TRAINING_LOG_FILE, runs.HISTORY_FILE,
                     runs.MODEL_FILE, runs.SEQUENCE_MODEL_FILE, runs.FIT_DONE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (run_dir / name).unlink()
    fit_done = None
    if fit_done_path.is_file() and not backup_dir.exists() and (run_dir / runs.MODEL_FILE).is_file():
        try:
            fit_done = json.loads(fit_done_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise CSpineDataError(fit_done_path, f"unreadable ({err}); delete it to train this "
                                  "run's classifier again, or pass another --run-dir") from err
    resuming = backup_dir.exists() or fit_done is not None
    if not resuming:  # from a run that cannot resume
        for stale in (log_path, run_dir / runs.SEQUENCE_MODEL_FILE, fit_done_path):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        shutil.rmtree(run_dir / runs.TENSORBOARD_DIR, ignore_errors=True)  # not two runs' curves
    run_dir.mkdir(parents=True, exist_ok=True)

    prepared, splits = _prepare_inputs(config, data, prepared_dir)
    save_config(config, run_dir / runs.CONFIG_FILE)
    write_json(run_dir / runs.SPLITS_FILE, {**splits, "prepared": str(Path(prepared).resolve())})
    fit_from_prepared(prepared, splits["train"]).save(run_dir / runs.LEVEL_DECODER_FILE)
    sequences = make_sequences(config, prepared, splits)
    train_seq, val_seq = sequences["train"], sequences["val"]
    _write_preprocessing(run_dir, prepared, config, sequences["train"])
    write_json(run_dir / runs.DATA_FILE, {k: s.get_config() for k, s in sequences.items()})
    fitted_now = fit_done is None
    if cluster is not None:  # the workers follow the chief: all fit, or none
        distribute.broadcast_from_chief(strategy, [int(fitted_now)], is_chief=True)
    if fitted_now:
        fit_done = _fit_classifier(config, run_dir, train_seq, val_seq, extra_callbacks, verbose,
                                   strategy, cluster)  # fmt: skip
        write_json(fit_done_path, fit_done)
    summary: dict[str, Any] = {
        "name": config.name,
        "model": config.model.name,
        **{k: fit_done[k] for k in ("epochs_run", "best_val_f1_score", "parameters")},
        **{k: fit_done[k] for k in ("workers", "steps_per_epoch") if k in fit_done},
        "train_seconds_this_session": fit_done["train_seconds"] if fitted_now else 0.0,
        "resumed": resuming,
        "config": dump_config(config),
    }
    if config.sequence.enabled:
        done = fit_done.get("sequence_model")
        if done is None or not (run_dir / runs.SEQUENCE_MODEL_FILE).is_file():
            done = train_sequence_model(config, prepared, splits, run_dir,
                                        verbose=0 if verbose == 0 else 2)  # fmt: skip
            write_json(fit_done_path, {**fit_done, "sequence_model": done})
        summary["sequence_model"] = done
    if config.train.evaluate:
        from keras_cspine.stage1.evaluate import evaluate_run

        split = "test" if splits["test"] else "val"
        summary["evaluation"] = evaluate_run(run_dir, split=split)
    write_json(summary_path, summary)
    if cluster is not None:  # the workers wait for this
        distribute.broadcast_from_chief(strategy, [1], is_chief=True)
    return summary


def _write_preprocessing(run_dir: Path, prepared: Path, config: Stage1Config, sequence) -> None:
    """``preprocessing.json``: the prepared data's mode and render size, the model's input size,
    the metadata columns and their scaling (:func:`keras_cspine.stage1.runs.write_preprocessing`)."""
    from keras_cspine.data.prepare import read_settings
    from keras_cspine.stage1.dataset import METADATA_SCALE

    settings = read_settings(prepared).get("settings", {})
    runs.write_preprocessing(
        run_dir, mode=settings.get("mode", config.data.prepare_mode),
        render_size=settings.get("size") or sequence.cache_size, image_size=sequence.image_size,
        metadata_columns=config.data.metadata_columns, metadata_scale=METADATA_SCALE,
        source=str(Path(prepared).resolve()), roi_mm=settings.get("roi_mm"),
    )  # fmt: skip


def tensorboard_installed() -> bool:
    """Whether ``tf.summary`` can write scalars: its implementation is the ``tensorboard``
    package, which TensorFlow does not install by itself."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _tensorboard(keras, log_dir: Path) -> list:
    """``[TensorBoard]``: Keras' callback writing, per epoch, in ``train/`` and ``validation/``,
    the losses (``epoch_loss``), the macro F1 (``epoch_f1_score``) and, in ``train/``, the
    learning rate (``epoch_learning_rate``); no graph, no profiler, no network. ``[]`` without
    the ``tensorboard`` package (one line says so)."""
    if not tensorboard_installed():
        print("[train] no TensorBoard logs: the tensorboard package is not installed "
              "(pip install tensorboard)", file=sys.stderr)  # fmt: skip
        return []
    return [keras.callbacks.TensorBoard(log_dir=str(log_dir), write_graph=False, profile_batch=0,
                                        update_freq="epoch")]  # fmt: skip


def _fit_classifier(config: Stage1Config, run_dir: Path, train_seq, val_seq,
                    extra_callbacks: Sequence, verbose, strategy=None,
                    cluster: distribute.Cluster | None = None) -> dict[str, Any]:  # fmt: skip
    """``model.fit`` with the run's callbacks (resuming from ``backup/``); writes
    ``history.json``; returns what ``fit_done.json`` keeps of it.

    ``strategy`` and ``cluster``: a multi-worker run's (made before TensorFlow's first
    operation); otherwise ``train.strategy`` is made here.
    """
    keras = _keras()
    from keras_cspine.stage1.dataset import EpochSync, KeepFreedMemory

    if strategy is None:
        strategy = distribute.make_strategy(config.train.strategy)
    backup_dir = run_dir / runs.BACKUP_DIR
    log_path = run_dir / runs.TRAINING_LOG_FILE
    previous = history_from_log(log_path).get(MONITOR, [])
    best_so_far = None if math.isnan(nanmax(previous)) else nanmax(previous)
    train_data, val_data = train_seq, val_seq
    steps_per_epoch = config.train.steps_per_epoch
    steps = min(steps_per_epoch or len(train_seq), len(train_seq))
    if cluster is not None:  # each worker its own batches, as tf.data pipelines
        parallel = config.data.workers
        train_data, steps = distribute.distributed_dataset(
            strategy, train_seq, num_workers=cluster.num_workers, shard=True,
            max_batches=steps_per_epoch, parallel=parallel)  # fmt: skip
        val_data, _ = distribute.distributed_dataset(
            strategy, val_seq, num_workers=cluster.num_workers, shard=False, parallel=parallel)
        steps_per_epoch = None  # the datasets hold one epoch each
    callbacks = [
        EpochSync(train_seq),
        KeepFreedMemory(),
        AtomicBestCheckpoint(run_dir / runs.MODEL_FILE, MONITOR, best=best_so_far),
        PlateauAfterWarmup(
            config.train.learning_rate, config.train.warmup_epochs,
            steps, monitor=MONITOR, mode="max",
            factor=config.train.reduce_lr_factor, patience=config.train.reduce_lr_patience,
            min_lr=config.train.min_learning_rate, min_delta=config.train.reduce_lr_min_delta,
            cooldown=config.train.reduce_lr_cooldown,
        ),  # fmt: skip
        keras.callbacks.CSVLogger(str(log_path), append=True),
    ]
    if cluster is None or cluster.is_chief:  # a worker's logs would only go to its scratch folder
        callbacks.extend(_tensorboard(keras, run_dir / runs.TENSORBOARD_DIR))
    if config.train.early_stopping_patience > 0:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=MONITOR, mode="max", patience=config.train.early_stopping_patience
            )
        )
    # the backup last: an epoch is over for a resume only once its checkpoint, learning rate
    # and log row are written (a kill in between redoes the epoch; its row is then replaced)
    callbacks.append(keras.callbacks.BackupAndRestore(str(backup_dir), double_checkpoint=True))
    if cluster is not None:
        callbacks.append(distribute.SyncFromChief(strategy, cluster.is_chief))
    callbacks.extend(extra_callbacks)

    started = time.time()
    with _dtype_policy(config.train.mixed_precision):
        with distribute.scope(strategy):
            model = build_and_compile(config, train_seq.image_size)
            build_training_state(model, train_seq[0])
        fitting = distribute.multi_worker_fit(model) if cluster else contextlib.nullcontext()
        with fitting:
            model.fit(
                train_data,
                validation_data=val_data,
                epochs=config.train.epochs,
                steps_per_epoch=steps_per_epoch,
                callbacks=callbacks,
                shuffle=False,  # CSpineSequence shuffles itself, seeded per epoch
                verbose=verbose,
            )
    history = history_from_log(log_path)
    write_json(run_dir / runs.HISTORY_FILE, history)
    from keras_cspine.stage1.models.factory import count_parameters

    return {
        "epochs_run": len(history.get("epoch", [])),
        "best_val_f1_score": nanmax(history.get(MONITOR, [])),
        "train_seconds": round(time.time() - started, 1),
        "parameters": count_parameters(model),
        "workers": cluster.num_workers if cluster else 1,
        "steps_per_epoch": steps,
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
    classifier = keras.saving.load_model(run_dir / runs.MODEL_FILE)
    sequences = make_sequences(config, prepared, {k: splits[k] for k in ("train", "val")},
                               plain=True)  # fmt: skip
    train_batch = study_batch(classifier, sequences["train"])
    val_batch = study_batch(classifier, sequences["val"])
    model, history = fit_sequence_model(train_batch, val_batch, config.sequence,
                                        seed=config.train.seed, verbose=verbose)  # fmt: skip
    with atomic_path(run_dir / runs.SEQUENCE_MODEL_FILE) as tmp:
        model.save(tmp)
    return {
        "epochs_run": len(history["loss"]),
        "best_val_loss": nanmin(history.get("val_loss", [])),
        "seconds": round(time.time() - started, 1),
    }
