"""Stage 1 input pipeline: :class:`CSpineSequence`, a ``keras.utils.PyDataset`` over prepared slices.

Serves the paper's Section 2.5 (vertebrae classification): each axial slice is one sample with
two inputs, the slice image and its metadata (image position and slice ratio), and seven 0/1
targets, the presence of C1..C7 on the slice.

The sequence reads the output of ``python -m keras_cspine prepare`` (``index.csv`` and the
memory-mapped ``cache/<uid>.npy`` arrays, see docs/internals.md), so an epoch costs no DICOM
decoding. It is usable by any Keras 3 project::

    from keras_cspine.stage1.dataset import CSpineSequence, EpochSync, split_prepared

    splits = split_prepared("prep", val_fraction=0.2, seed=0)      # by study, never by slice
    train = CSpineSequence("prep", splits["train"], batch_size=32, shuffle=True,
                           augment=True, seed=0, workers=2)
    val = CSpineSequence("prep", splits["val"], batch_size=32)
    model.fit(train, validation_data=val, shuffle=False,          # the sequence shuffles itself
              callbacks=[EpochSync(train)])                       # order = f(seed, epoch)

Batches are ``({"image": float32 (B, S, S, 3) in [0, 255], "metadata": float32 (B, 2)},
float32 (B, 7))``; with ``inputs="image"`` the dict holds only ``image`` (the baselines' input),
with ``inputs="metadata"`` only ``metadata``. Models normalise the 0-255 images themselves.

Augmentation (:class:`Augmenter`) respects anatomy: small shifts, rotations and zooms, contrast
and brightness jitter; never a flip (a mirrored axial slice swaps anterior/posterior or the
patient's sides, which no scanner produces).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
from scipy import ndimage

try:  # optional: OpenCV's warpAffine is much faster than scipy.ndimage for augmentation
    import cv2 as _cv2
except ImportError:  # pragma: no cover - depends on the environment
    _cv2 = None

from keras_cspine.data.prepare import load_cache, load_index
from keras_cspine.data.splits import split_studies
from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import VERTEBRAE
from keras_cspine.utils import keep_freed_memory as _keep_freed_memory

#: Metadata features of the paper's second input (inferred: image position and slice ratio).
METADATA_COLUMNS: tuple[str, ...] = ("position_mm", "slice_ratio")
#: Scale applied to each metadata column so that every feature is of order 1.
METADATA_SCALE: dict[str, float] = {"position_mm": 0.01, "z_mm": 0.01, "slice_ratio": 1.0}
INPUT_MODES = ("image+metadata", "image", "metadata")

__all__ = [
    "INPUT_MODES",
    "METADATA_COLUMNS",
    "Augmenter",
    "CSpineSequence",
    "EpochSync",
    "KeepFreedMemory",
    "split_prepared",
]


@dataclass(frozen=True)
class Augmenter:
    """Anatomy-preserving augmentation of one uint8 slice image.

    One random affine transform (rotation about the centre, isotropic zoom, shift) resamples the
    image bilinearly, then contrast and brightness are jittered. There is deliberately no flip.

    Args:
        max_rotation_deg: rotations drawn uniformly in ``[-max, max]`` degrees.
        max_shift: shifts drawn in ``[-max, max]`` times the image side, per axis.
        max_zoom: zoom factors drawn in ``[1 - max, 1 + max]``.
        contrast: the image is scaled about its mean by a factor in ``[1 - c, 1 + c]``.
        brightness: an offset in ``[-b, b]`` * 255 is added.
    """

    max_rotation_deg: float = 10.0
    max_shift: float = 0.05
    max_zoom: float = 0.05
    contrast: float = 0.1
    brightness: float = 0.05

    def __post_init__(self):
        for name, value, upper in (
            ("max_rotation_deg", self.max_rotation_deg, 45.0),
            ("max_shift", self.max_shift, 0.5),
            ("max_zoom", self.max_zoom, 0.5),
            ("contrast", self.contrast, 1.0),
            ("brightness", self.brightness, 1.0),
        ):
            if not 0.0 <= float(value) <= upper:
                raise ValueError(f"{name} must be in [0, {upper}], got {value!r}")

    def to_dict(self) -> dict[str, float]:
        """The settings as a plain dict (for configs and logs)."""
        return asdict(self)

    def draw(self, rng: np.random.Generator) -> dict[str, float]:
        """Random parameters of one transform."""
        return {
            "angle": math.radians(rng.uniform(-self.max_rotation_deg, self.max_rotation_deg)),
            "zoom": rng.uniform(1.0 - self.max_zoom, 1.0 + self.max_zoom),
            "shift_y": rng.uniform(-self.max_shift, self.max_shift),
            "shift_x": rng.uniform(-self.max_shift, self.max_shift),
            "contrast": rng.uniform(1.0 - self.contrast, 1.0 + self.contrast),
            "brightness": rng.uniform(-self.brightness, self.brightness) * 255.0,
        }

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator, out_size: int | None = None
    ) -> np.ndarray:
        """Augment ``image`` (H, W, C) and return float32 (out_size, out_size, C) in [0, 255]."""
        params = self.draw(rng)
        out = resample(image, out_size or image.shape[0], **_geometry(params))
        mean = out.mean()
        out = (out - mean) * params["contrast"] + mean + params["brightness"]
        return np.clip(out, 0.0, 255.0, out=out)


def _geometry(params: dict[str, float]) -> dict[str, float]:
    return {k: params[k] for k in ("angle", "zoom", "shift_y", "shift_x")}


def resample(
    image: np.ndarray,
    out_size: int,
    angle: float = 0.0,
    zoom: float = 1.0,
    shift_y: float = 0.0,
    shift_x: float = 0.0,
    backend: str = "auto",
) -> np.ndarray:
    """Resize ``image`` (H, W, C) to ``out_size`` squared with an optional similarity transform.

    Rotation ``angle`` (radians) and ``zoom`` act about the image centre; shifts are fractions of
    the side. Bilinear, zero (air) outside the image. Returns float32. ``backend="auto"`` uses
    OpenCV when it is installed (it comes with the ``detect`` extra) and SciPy otherwise;
    ``"scipy"`` forces SciPy.
    """
    h, w = image.shape[:2]
    scale_y, scale_x = h / out_size, w / out_size
    cos, sin = math.cos(angle), math.sin(angle)
    # output pixel (r, c) -> input pixel: centre, rotate, unzoom, scale to the input grid, shift
    matrix2 = np.array([[cos, -sin], [sin, cos]]) / zoom * np.array([[scale_y], [scale_x]])
    out_centre = np.array([(out_size - 1) / 2.0, (out_size - 1) / 2.0])
    in_centre = np.array([(h - 1) / 2.0, (w - 1) / 2.0]) - np.array([shift_y * h, shift_x * w])
    offset2 = in_centre - matrix2 @ out_centre
    identity = angle == 0.0 and zoom == 1.0 and shift_x == 0.0 and shift_y == 0.0
    if identity and (h, w) == (out_size, out_size):
        return np.asarray(image, dtype=np.float32).copy()
    src = np.asarray(image, dtype=np.float32)
    if _cv2 is not None and backend != "scipy":  # ~20x faster; same bilinear, zero border
        inverse = np.array([[matrix2[1, 1], matrix2[1, 0], offset2[1]],
                            [matrix2[0, 1], matrix2[0, 0], offset2[0]]])  # fmt: skip
        out = _cv2.warpAffine(
            src, inverse, (out_size, out_size),
            flags=_cv2.INTER_LINEAR | _cv2.WARP_INVERSE_MAP,
            borderMode=_cv2.BORDER_CONSTANT, borderValue=0,
        )  # fmt: skip
        return out.reshape(out_size, out_size, image.shape[2])
    out = np.empty((out_size, out_size, image.shape[2]), np.float32)
    for c in range(image.shape[2]):
        if c > 0 and np.array_equal(src[..., c], src[..., 0]):
            out[..., c] = out[..., 0]  # grey stored as RGB: resample once
            continue
        ndimage.affine_transform(
            src[..., c], matrix2, offset2, output_shape=(out_size, out_size),
            output=out[..., c], order=1, mode="constant", cval=0.0, prefilter=False,
        )  # fmt: skip
    return out


def split_prepared(
    prepared: str | os.PathLike,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    labelled_only: bool = True,
) -> dict[str, list[str]]:
    """Split the studies of a prepare folder by study (never by slice).

    Args:
        prepared: the prepare output folder.
        val_fraction, test_fraction, seed: as in :func:`keras_cspine.data.splits.split_studies`.
        labelled_only: keep only studies whose slices have known labels (a segmentation).

    Raises:
        CSpineDataError: when no usable study is found.
    """
    index = load_index(prepared)
    if labelled_only:
        index = index[index["labels_known"] == 1]
    uids = sorted(index["StudyInstanceUID"].unique())
    if not uids:
        what = "labelled study (with a segmentation)" if labelled_only else "study"
        raise CSpineDataError(Path(prepared) / "index.csv", f"no {what} to split")
    return split_studies(uids, val_fraction=val_fraction, test_fraction=test_fraction, seed=seed)


class CSpineSequence(keras.utils.PyDataset):
    """Batches of prepared CT slices for the stage 1 classifier (a ``keras.utils.PyDataset``).

    Args:
        prepared: a ``prepare`` output folder (``index.csv`` + ``cache/``).
        uids: the studies to use (e.g. one split of :func:`split_prepared`); all when None.
            Order does not matter: rows follow the index (study, then series order).
        batch_size: samples per batch; the last batch may be smaller.
        inputs: which model inputs each batch holds, as a dict keyed by input name:
            ``"image+metadata"`` (the paper's two-input model: ``image`` and ``metadata``),
            ``"image"`` (image-only baselines) or ``"metadata"`` (the position-only control).
        metadata_columns: index columns forming the metadata vector, each multiplied by
            ``METADATA_SCALE`` (position in decimetres, ratio as is).
        image_size: side of the yielded images; the cache's size when None (else resampled).
        shuffle: a new sample order every epoch, drawn from ``seed`` and the epoch number.
        seed: seeds shuffling, balancing and augmentation (reproducible per epoch).
        augment: an :class:`Augmenter`, True for the default one, or None/False.
        balance: draw each epoch's samples with replacement, with probability inversely
            proportional to the frequency of their label combination (rare combinations such
            as C1 with C2, or slices at a vertebra boundary, are seen as often as common ones).
        labels: yield ``(inputs, labels)``; False yields ``(inputs,)`` for prediction.
        drop_unknown: skip slices whose labels are unknown (-1: study without segmentation).
            Must be True when ``labels`` is True.
        workers, use_multiprocessing, max_queue_size: passed to ``keras.utils.PyDataset``.

    Example:
        >>> seq = CSpineSequence("prep", batch_size=2, inputs="image+metadata")
        >>> (x, y) = seq[0]
        >>> x["image"].shape, x["metadata"].shape, y.shape
        ((2, 64, 64, 3), (2, 2), (2, 7))
    """

    def __init__(
        self,
        prepared: str | os.PathLike,
        uids: Sequence[str] | None = None,
        *,
        batch_size: int = 32,
        inputs: str = "image+metadata",
        metadata_columns: Sequence[str] = METADATA_COLUMNS,
        image_size: int | None = None,
        shuffle: bool = False,
        seed: int = 0,
        augment: Augmenter | bool | None = None,
        balance: bool = False,
        labels: bool = True,
        drop_unknown: bool = True,
        workers: int = 1,
        use_multiprocessing: bool = False,
        max_queue_size: int = 10,
    ):
        super().__init__(
            workers=workers, use_multiprocessing=use_multiprocessing, max_queue_size=max_queue_size
        )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if inputs not in INPUT_MODES:
            raise ValueError(f"inputs must be one of {INPUT_MODES}, got {inputs!r}")
        if image_size is not None and (not isinstance(image_size, int) or image_size < 8):
            raise ValueError(f"image_size must be an integer >= 8 or None, got {image_size!r}")
        if labels and not drop_unknown:
            raise ValueError("labels=True needs drop_unknown=True (unknown labels cannot train)")
        if balance and not drop_unknown:
            raise ValueError("balance=True needs known labels (drop_unknown=True)")
        if augment is True:
            augment = Augmenter()
        elif augment is False:
            augment = None
        if augment is not None and not isinstance(augment, Augmenter):
            raise TypeError(f"augment must be an Augmenter, True/False or None, got {augment!r}")

        self.prepared = Path(prepared)
        self.batch_size = batch_size
        self.inputs = inputs
        self.metadata_columns = tuple(metadata_columns)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.augment = augment
        self.balance = bool(balance)
        self.with_labels = bool(labels)
        self.epoch = 0

        index_path = self.prepared / "index.csv"
        index = load_index(self.prepared)
        unknown_cols = [c for c in self.metadata_columns if c not in index.columns]
        if unknown_cols:
            raise CSpineDataError(index_path, f"no metadata column(s) {unknown_cols}")
        if uids is not None:
            wanted = set(uids)
            missing = sorted(wanted - set(index["StudyInstanceUID"]))
            if missing:
                raise CSpineDataError(index_path, f"unknown study UID(s) {missing[:3]}")
            index = index[index["StudyInstanceUID"].isin(wanted)]
        if drop_unknown:
            index = index[index["labels_known"] == 1]
        if index.empty:
            raise CSpineDataError(index_path, "no slice left to load (check uids / labels)")
        index = index.sort_values(["StudyInstanceUID", "series_index"], kind="stable")
        self.frame: pd.DataFrame = index.reset_index(drop=True)

        self._uids = self.frame["StudyInstanceUID"].to_numpy(dtype=object)
        self._rows = self.frame["series_index"].to_numpy(dtype=np.int64)
        scale = np.array([METADATA_SCALE.get(c, 1.0) for c in self.metadata_columns], np.float32)
        self._metadata = self.frame[list(self.metadata_columns)].to_numpy(np.float32) * scale
        self.labels: np.ndarray = self.frame[list(VERTEBRAE)].to_numpy(np.float32)
        self._weights = self._balance_weights() if self.balance else None

        first = self._cache(self._uids[0])
        if first.ndim != 4 or first.shape[-1] != 3 or first.shape[1] != first.shape[2]:
            raise CSpineDataError(
                self.prepared / "cache" / f"{self._uids[0]}.npy",
                f"expected a (Z, S, S, 3) uint8 array, got shape {first.shape}",
            )
        self.cache_size = int(first.shape[1])
        self.image_size = int(image_size or self.cache_size)
        self.order = self._epoch_order(0)

    # -- sizes ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples per epoch (slices kept after filtering)."""
        return len(self.frame)

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        return math.ceil(self.num_samples / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def study_uids(self) -> list[str]:
        """The studies in this sequence, sorted."""
        return sorted(set(self._uids))

    # -- epoch order -----------------------------------------------------------------------
    def _balance_weights(self) -> np.ndarray:
        keys = (self.labels > 0.5).astype(np.int64) @ (1 << np.arange(len(VERTEBRAE)))
        _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
        weights = 1.0 / counts[inverse]
        return weights / weights.sum()

    def _epoch_order(self, epoch: int) -> np.ndarray:
        n = self.num_samples
        rng = np.random.default_rng([self.seed, epoch, 0])
        if self._weights is not None:
            return rng.choice(n, size=n, replace=True, p=self._weights)
        if self.shuffle:
            return rng.permutation(n)
        return np.arange(n)

    def set_epoch(self, epoch: int) -> None:
        """Jump to ``epoch``'s order and augmentation draws (e.g. when a run resumes)."""
        self.epoch = int(epoch)
        self.order = self._epoch_order(self.epoch)

    def on_epoch_end(self) -> None:
        """Called by Keras after each epoch (and once before training): a new order.

        For an order that depends only on the seed and Keras' epoch number (also across a
        resumed run), pass ``EpochSync(sequence)`` to ``fit``'s callbacks.
        """
        self.set_epoch(self.epoch + 1)

    # -- reading ---------------------------------------------------------------------------
    def _cache(self, uid: str) -> np.ndarray:
        caches = self.__dict__.setdefault("_caches", {})
        array = caches.get(uid)
        if array is None:
            array = load_cache(self.prepared, uid)
            caches[uid] = array
        return array

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_caches", None)  # memory maps are reopened in each worker process
        return state

    def batch_indices(self, index: int) -> np.ndarray:
        """Row numbers of ``self.frame`` in batch ``index`` of the current epoch."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} out of range (0..{self.num_batches - 1})")
        return self.order[index * self.batch_size : (index + 1) * self.batch_size]

    def load_image(self, row: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """The float32 (S, S, 3) image of ``self.frame`` row ``row`` (augmented if rng given)."""
        uid = self._uids[row]
        cache = self._cache(uid)
        series_index = int(self._rows[row])
        if not 0 <= series_index < cache.shape[0]:
            raise CSpineDataError(
                self.prepared / "cache" / f"{uid}.npy",
                f"series_index {series_index} outside the {cache.shape[0]} cached slices",
            )
        image = cache[series_index]
        if self.augment is not None and rng is not None:
            return self.augment(image, rng, self.image_size)
        return resample(image, self.image_size)

    def __getitem__(self, index: int):
        rows = self.batch_indices(index)
        if self.inputs == "metadata":
            x = {"metadata": self._metadata[rows]}
            return (x, self.labels[rows]) if self.with_labels else (x,)
        rng = None
        if self.augment is not None:
            rng = np.random.default_rng([self.seed, self.epoch, 1, index])
        images = np.empty((len(rows), self.image_size, self.image_size, 3), np.float32)
        for i, row in enumerate(rows):
            images[i] = self.load_image(int(row), rng)
        x = {"image": images}
        if self.inputs == "image+metadata":
            x["metadata"] = self._metadata[rows]
        if self.with_labels:
            return x, self.labels[rows]
        return (x,)

    def targets(self) -> np.ndarray:
        """Labels (N, 7) of the current epoch order (matching ``model.predict(self)``)."""
        return self.labels[self.order]

    def get_config(self) -> dict[str, Any]:
        """The settings (for run directories and logs)."""
        return {
            "prepared": str(self.prepared),
            "batch_size": self.batch_size,
            "inputs": self.inputs,
            "metadata_columns": list(self.metadata_columns),
            "image_size": self.image_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "augment": self.augment.to_dict() if self.augment else None,
            "balance": self.balance,
            "num_samples": self.num_samples,
            "num_studies": len(self.study_uids),
        }


class EpochSync(keras.callbacks.Callback):
    """Keras callback: set a :class:`CSpineSequence` to Keras' epoch number at each epoch start.

    Runs before the epoch's batches are requested, so the order and augmentation of epoch ``e``
    depend only on ``(seed, e)``, also when ``BackupAndRestore`` resumes a run mid-way.
    """

    def __init__(self, sequence: CSpineSequence):
        super().__init__()
        self.sequence = sequence

    def on_epoch_begin(self, epoch, logs=None):
        if self.sequence.epoch != epoch:
            self.sequence.set_epoch(epoch)


class KeepFreedMemory(keras.callbacks.Callback):
    """Keras callback: :func:`keep_freed_memory` at the first batch of every epoch and of every
    evaluation or prediction, after ``tf.data`` has made its setting (which it may repeat).

    ``model.fit`` on a PyDataset spends about half its CPU time in the kernel without it: see
    :func:`keras_cspine.utils.keep_freed_memory`.
    """

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            _keep_freed_memory()

    def on_test_batch_begin(self, batch, logs=None):
        if batch == 0:
            _keep_freed_memory()

    def on_predict_batch_begin(self, batch, logs=None):
        if batch == 0:
            _keep_freed_memory()
