"""Stage 1, beyond the paper: a bidirectional GRU reads the slices of a study as one sequence.

The paper's classifier (Section 2.5) labels every axial slice on its own. The strongest RSNA 2022
solutions read the slices of a study together: a 2D CNN embeds each slice, then a recurrent
network runs over the slices in order (DOMAIN.md, "Strongest peers"). This module adds that
second step to the paper's two-input classifier:

- **features**: the classifier's last hidden layer, i.e. the input of its 7-sigmoid output (for
  the paper's head, the 256 units after the concatenation of image and metadata), one vector per
  slice (:func:`feature_model`, :func:`slice_features`);
- **model** (:func:`build_sequence_model`): the features, normalised with the training split's
  mean and variance (stored in the model), Gaussian noise and dropout (training only), a Dense
  projection, a bidirectional GRU over the slices in series order (superior to inferior) and 7
  sigmoids per slice again. Padded studies carry a mask, so a study's outputs do not depend on
  what it is batched with;
- **training** (:func:`fit_sequence_model`): after the classifier, on its features of the
  training split's studies (one study = one sequence), binary cross-entropy, early stopping on
  the validation split's loss; a minute on CPU for a few hundred studies.

It sees what the classifier saw on the neighbouring slices, so it places the boundaries between
vertebrae (where a slice holds the edge of the next one) and tells C4, C5 and C6 apart by what
lies above and below, which no single slice shows. It replaces the hand-made
:class:`~keras_cspine.stage1.level_decoding.LevelDecoder` where a run has one (the two together were not
better in our measurements).

Typical use (``train`` does this and saves ``sequence_model.keras`` in the run directory)::

    features, probs = slice_features(classifier, sequence)       # a non-shuffled CSpineSequence
    frame = sequence.frame
    smoothed = apply_sequence_model(seq_model, features, frame["StudyInstanceUID"],
                                    frame["series_index"])        # (n_slices, 7), row order
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.config import SequenceConfig
from keras_cspine.stage1.runs import SEQUENCE_MODEL_FILE

"""Its file name in a stage 1 run directory."""

__all__ = [
    "SEQUENCE_MODEL_FILE",
    "SequenceConfig",
    "StudyBatch",
    "apply_sequence_model",
    "build_sequence_model",
    "feature_model",
    "fit_sequence_model",
    "load_sequence_model",
    "pad_studies",
    "slice_features",
    "study_batch",
]


_DEFAULT_CONFIG = SequenceConfig()


class StudyBatch(NamedTuple):
    """Rows of slices grouped into padded study sequences (:func:`pad_studies`).

    ``features`` (S, L, F) float32, zero after each study's end; ``mask`` (S, L) bool, True on a
    study's slices; ``labels`` (S, L, 7) float32 or None; ``rows[s]``: the input row of each of
    study ``s``'s slices, in series order; ``studies``: the study of each sequence.
    """

    features: np.ndarray
    mask: np.ndarray
    labels: np.ndarray | None
    rows: list[np.ndarray]
    studies: list[str]


def pad_studies(features, study_ids: Sequence, order: Sequence, labels=None) -> StudyBatch:
    """Group rows (slices in any order) into one sequence a study, each in series order.

    Args:
        features: ``(n_rows, F)`` per-slice features.
        study_ids: the study of every row.
        order: the series index of every row (superior to inferior within a study).
        labels: ``(n_rows, 7)`` presence labels, or None.
    """
    features = np.asarray(features, dtype=np.float32)
    ids, order = np.asarray(study_ids), np.asarray(order)
    if features.ndim != 2 or not (len(features) == len(ids) == len(order)):
        raise ValueError(
            f"features must be (n_rows, F) with one study id and series index per row; got "
            f"{features.shape}, {len(ids)} ids, {len(order)} indices"
        )
    if labels is not None:
        labels = np.asarray(labels, dtype=np.float32)
        if labels.shape[0] != len(features):
            raise ValueError(f"labels {labels.shape} do not match {len(features)} feature rows")
    studies = list(dict.fromkeys(ids.tolist()))
    rows = []
    for uid in studies:
        study_rows = np.flatnonzero(ids == uid)
        rows.append(study_rows[np.argsort(order[study_rows], kind="stable")])
    length = max((len(r) for r in rows), default=0)
    padded = np.zeros((len(rows), length, features.shape[1]), np.float32)
    mask = np.zeros((len(rows), length), bool)
    padded_labels = None
    if labels is not None:
        padded_labels = np.zeros((len(rows), length, labels.shape[1]), np.float32)
    for s, study_rows in enumerate(rows):
        n = len(study_rows)
        padded[s, :n] = features[study_rows]
        mask[s, :n] = True
        if padded_labels is not None:
            padded_labels[s, :n] = labels[study_rows]
    return StudyBatch(padded, mask, padded_labels, rows, studies)


def build_sequence_model(feature_dim: int, config: SequenceConfig = _DEFAULT_CONFIG,
                         mean=None, variance=None, num_classes: int = 7):  # fmt: skip
    """The study sequence model: ``{"features": (B, L, F), "mask": (B, L) bool}`` -> ``(B, L, 7)``.

    ``mean`` / ``variance`` (``(F,)``, the training features' statistics) are stored in its
    ``Normalization`` layer; None leaves the features as they are (mean 0, variance 1).
    """
    import keras

    from keras_cspine.quiet import absorb_once_notices

    absorb_once_notices()  # the masked GRU's first boolean transpose notes a oneDNN fallback
    if not isinstance(feature_dim, int) or feature_dim < 1:
        raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
    mean = np.zeros(feature_dim) if mean is None else np.asarray(mean, np.float64)
    variance = np.ones(feature_dim) if variance is None else np.asarray(variance, np.float64)
    if mean.shape != (feature_dim,) or variance.shape != (feature_dim,):
        raise ValueError(f"mean and variance must have shape ({feature_dim},)")
    features = keras.Input(shape=(None, feature_dim), name="features")
    mask = keras.Input(shape=(None,), dtype="bool", name="mask")
    x = keras.layers.Normalization(mean=mean, variance=np.maximum(variance, 1e-6),
                                   name="normalise")(features)  # fmt: skip
    x = keras.layers.GaussianNoise(config.noise, name="feature_noise")(x)
    x = keras.layers.Dropout(config.dropout, name="feature_dropout")(x)
    x = keras.layers.Dense(config.projection, activation="relu", name="projection")(x)
    x = keras.layers.Bidirectional(
        keras.layers.GRU(config.units, return_sequences=True), name="slices_gru"
    )(x, mask=mask)
    outputs = keras.layers.Dense(num_classes, activation="sigmoid", name="vertebrae",
                                 dtype="float32")(x)  # fmt: skip
    return keras.Model({"features": features, "mask": mask}, outputs, name="study_sequence")


def fit_sequence_model(train: StudyBatch, val: StudyBatch | None,
                       config: SequenceConfig = _DEFAULT_CONFIG, seed: int = 0,
                       verbose: int = 0) -> tuple[Any, dict[str, list[float]]]:  # fmt: skip
    """Train a sequence model on padded studies with labels; returns ``(model, history)``.

    The normalisation statistics come from ``train``'s real slices. With ``val``, training stops
    after ``config.patience`` epochs without a lower validation loss and the best weights are
    kept.
    """
    import keras

    if train.labels is None or (val is not None and val.labels is None):
        raise ValueError("fit_sequence_model needs labelled studies")
    real = train.features[train.mask]
    if len(real) < 2:
        raise ValueError("fit_sequence_model needs at least two training slices")
    keras.utils.set_random_seed(seed)
    model = build_sequence_model(train.features.shape[-1], config, real.mean(axis=0),
                                 real.var(axis=0), train.labels.shape[-1])  # fmt: skip
    model.compile(keras.optimizers.Adam(config.learning_rate), "binary_crossentropy")
    callbacks, validation = [], None
    if val is not None:
        validation = ({"features": val.features, "mask": val.mask}, val.labels,
                      val.mask.astype(np.float32))  # fmt: skip
        if config.patience:
            callbacks.append(keras.callbacks.EarlyStopping(
                patience=config.patience, restore_best_weights=True))  # fmt: skip
    fitted = model.fit(
        {"features": train.features, "mask": train.mask}, train.labels,
        sample_weight=train.mask.astype(np.float32), validation_data=validation,
        epochs=config.epochs, batch_size=config.batch_size, shuffle=True, verbose=verbose,
        callbacks=callbacks,
    )  # fmt: skip
    history = {k: [float(v) for v in values] for k, values in fitted.history.items()}
    return model, history


#: Studies are padded (masked) to a multiple of this many slices before the sequence model
#: reads them, so that studies of many lengths share a few traced graphs (TensorFlow warns
#: when every new length retraces one); the mask keeps the padding out of the results.
LENGTH_BUCKET = 64


def apply_sequence_model(model, features, study_ids: Sequence, order: Sequence,
                         batch_size: int = 16) -> np.ndarray:  # fmt: skip
    """``(n_rows, 7)`` probabilities of the sequence model for rows in any order (each study
    read in series order, ``order`` = its series index)."""
    batch = pad_studies(features, study_ids, order)
    out = np.zeros((len(np.asarray(features)), int(model.output.shape[-1])), np.float32)
    if not batch.rows:
        return out
    length = batch.features.shape[1]
    extra = -length % LENGTH_BUCKET
    padded = np.pad(batch.features, ((0, 0), (0, extra), (0, 0)))
    mask = np.pad(batch.mask, ((0, 0), (0, extra)))
    scores = np.asarray(
        model.predict({"features": padded, "mask": mask}, batch_size=batch_size, verbose=0),
        dtype=np.float32)  # fmt: skip
    for s, study_rows in enumerate(batch.rows):
        out[study_rows] = scores[s, : len(study_rows)]
    return out


def feature_model(classifier):
    """A model with the classifier's inputs and two outputs: the slice features (the input of
    its last layer: for the paper's head the 256 units under the 7-sigmoid Dense) and its
    probabilities."""
    import keras

    features = classifier.layers[-1].input
    if isinstance(features, list | tuple | dict):
        raise ValueError(
            f"the classifier's last layer {classifier.layers[-1].name!r} takes several inputs; "
            f"the slice features are the one input of its output layer"
        )
    return keras.Model(classifier.input, [features, classifier.output],
                       name=f"{classifier.name}_features")  # fmt: skip


def slice_features(classifier, sequence) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, F), probabilities (N, 7))`` of a non-shuffled ``CSpineSequence`` (no
    augmentation), in its frame order."""
    if sequence.shuffle or sequence.balance or sequence.augment is not None:
        raise ValueError("slice features need a sequence without shuffle, balance or augmentation")
    from keras_cspine.stage1.dataset import KeepFreedMemory

    features, scores = feature_model(classifier).predict(
        sequence, verbose=0, callbacks=[KeepFreedMemory()])  # fmt: skip
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != sequence.labels.shape:
        raise ValueError(f"model gave {scores.shape} scores for {sequence.labels.shape} labels")
    return np.asarray(features, dtype=np.float32), scores


def study_batch(classifier, sequence) -> StudyBatch:
    """The labelled :class:`StudyBatch` of a sequence's studies, from the classifier's features."""
    features, _ = slice_features(classifier, sequence)
    frame = sequence.frame
    return pad_studies(features, frame["StudyInstanceUID"].to_numpy(),
                       frame["series_index"].to_numpy(), sequence.labels)  # fmt: skip


def load_sequence_model(path: str | os.PathLike):
    """A saved sequence model; :class:`CSpineDataError` naming the file when it is missing or
    not a sequence model."""
    import keras

    from keras_cspine.quiet import absorb_once_notices

    path = Path(path)
    if not path.is_file():
        raise CSpineDataError(path, "sequence model not found")
    absorb_once_notices()  # as in build_sequence_model
    try:
        model = keras.saving.load_model(path)
    except (ValueError, OSError, TypeError) as err:
        raise CSpineDataError(path, f"not a loadable Keras model: {err}") from err
    try:
        inputs = model.input
    except (AttributeError, ValueError):  # e.g. a Sequential model that was never called
        inputs = None
    if not isinstance(inputs, dict) or set(inputs) != {"features", "mask"}:
        raise CSpineDataError(path, "not a study sequence model (inputs 'features' and 'mask')")
    return model
