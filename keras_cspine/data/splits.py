"""Train / validation / test splits by study (never by slice: no leakage between splits)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def split_studies(
    uids: Iterable[str], val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[str]]:
    """Split study UIDs into ``train``, ``val`` and ``test`` lists, deterministically for a seed.

    Every split with a non-zero fraction gets at least one study when there are enough studies.
    """
    for name, fraction in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {fraction!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be < 1, got {val_fraction + test_fraction!r}"
        )
    unique = sorted(set(uids))
    order = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in order]
    n = len(shuffled)
    n_test = int(round(n * test_fraction)) if test_fraction else 0
    n_val = int(round(n * val_fraction)) if val_fraction else 0
    if test_fraction and n_test == 0 and n >= 3:
        n_test = 1
    if val_fraction and n_val == 0 and n - n_test >= 2:
        n_val = 1
    test = shuffled[:n_test]
    val = shuffled[n_test : n_test + n_val]
    train = shuffled[n_test + n_val :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}
