"""Data preparation (Section 2.4): Algorithm 1 and the HU windows
(:mod:`~keras_cspine.data.preprocess`), the slice index and image cache
(:mod:`~keras_cspine.data.prepare`, with its worker processes in
:mod:`~keras_cspine.data.prepare_worker`) and study splits (:mod:`~keras_cspine.data.splits`).

``keras_cspine.data`` was the module of the stage 1 PyDataset, now
:mod:`keras_cspine.stage1.dataset`; its names still resolve here for one release, with a
DeprecationWarning.
"""

from __future__ import annotations

import importlib
import warnings

_MOVED = ("INPUT_MODES", "METADATA_COLUMNS", "METADATA_SCALE", "Augmenter", "CSpineSequence",
          "EpochSync", "KeepFreedMemory", "split_prepared", "resample")  # fmt: skip


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"keras_cspine.data.{name} moved to keras_cspine.stage1.dataset.{name} "
                      f"(the old path goes away in the next release)", DeprecationWarning,
                      stacklevel=2)  # fmt: skip
        return getattr(importlib.import_module("keras_cspine.stage1.dataset"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
