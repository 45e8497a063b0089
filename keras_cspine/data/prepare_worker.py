"""The part of ``prepare`` that runs in its worker processes.

Kept apart from ``keras_cspine.data.prepare`` so that the workers import only the DICOM and
preprocessing stack (no pandas, no tqdm): they start faster, and a forkserver preloads exactly this.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_cspine.data.preprocess import to_model_image
from keras_cspine.io.dicom import read_slice


def render_chunk(
    paths: Sequence[str], start: int, cache_tmp: str, mode: str, size: int, decoder: str
) -> list:
    """Decode, preprocess and store files ``start .. start+len(paths)`` (file order) of a study.

    Returns the files' SliceMeta: each file is parsed once, here, and the series is ordered from
    these headers afterwards (``keras_cspine.io.dicom.series_from_slices``).
    """
    cache = np.load(cache_tmp, mmap_mode="r+")
    metas = []
    for offset, path in enumerate(paths):
        hu, meta = read_slice(path, decoder=decoder)
        cache[start + offset] = to_model_image(hu, mode=mode, size=size)
        metas.append(meta)
    cache.flush()
    del cache
    return metas
