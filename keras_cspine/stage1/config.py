"""Stage 1 run configuration (Section 2.5): what a ``stage1_*.yaml`` config holds.

Frozen dataclasses read by :func:`load_stage1_config` from a YAML file (a path or a bundled name in
``keras_cspine/configs``) and ``--set key=value`` overrides (see :mod:`keras_cspine.config`). A run
writes its resolved configuration into its run folder (:mod:`keras_cspine.stage1.runs`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from keras_cspine.config import load_config

DEFAULT_CONFIG = "stage1_synthetic_small"


@dataclass(frozen=True)
class SequenceConfig:
    """The study sequence model of a stage 1 run (``sequence:`` in a stage 1 config).

    Args:
        enabled: train it after the classifier (``train``) and use it (``evaluate``,
            ``predict``).
        projection: units of the Dense layer before the GRU.
        units: GRU units per direction.
        noise: standard deviation of the Gaussian noise added to the normalised features while
            training (the classifier's features of its own training studies are cleaner than
            those of unseen studies).
        dropout: dropout rate on the features while training.
        epochs, patience: at most ``epochs``; stop after ``patience`` epochs without a lower
            validation loss and keep the best weights.
        learning_rate: Adam's learning rate.
        batch_size: studies per batch.
    """

    enabled: bool = True
    projection: int = 64
    units: int = 64
    noise: float = 0.3
    dropout: float = 0.2
    epochs: int = 60
    patience: int = 10
    learning_rate: float = 3e-3
    batch_size: int = 8

    def __post_init__(self):
        for name in ("projection", "units", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"sequence.{name} must be a positive integer, got {value!r}")
        if not isinstance(self.patience, int) or self.patience < 0:
            raise ValueError(f"sequence.patience must be an integer >= 0, got {self.patience!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"sequence.dropout must be in [0, 1), got {self.dropout!r}")
        if self.noise < 0.0 or self.learning_rate <= 0.0:
            raise ValueError(
                f"sequence.noise must be >= 0 and sequence.learning_rate > 0, got "
                f"{self.noise!r}, {self.learning_rate!r}"
            )


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
        prepare_size, prepare_mode, prepare_roi_mm: ``prepare``'s size, mode and spine window
            (None: whole slices), used only when DATA is a raw RSNA folder.
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
    prepare_roi_mm: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The registry model (``keras_cspine.stage1.models.factory.build_model``).

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
        strategy: "default" (one device), "mirrored" (tf.distribute.MirroredStrategy: the
            devices of one machine) or "multi_worker" (tf.distribute.MultiWorkerMirroredStrategy
            over the machines and processes named by the ``TF_CONFIG`` environment variable;
            ``batch_size`` is then per worker, see :mod:`keras_cspine.stage1.distribute`).
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
        if self.strategy not in ("default", "mirrored", "multi_worker"):
            raise ValueError(f"strategy must be 'default', 'mirrored' or 'multi_worker', got "
                             f"{self.strategy!r}")  # fmt: skip
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
