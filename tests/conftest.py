"""Shared fixtures: a tiny synthetic RSNA dataset and its prepare output, built once per worker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

REPO = Path(__file__).resolve().parent.parent
N_TINY_STUDIES = 4


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the RSNA layout (4 train studies, fixed seed)."""
    from keras_cspine.synthetic.dataset import generate_dataset

    out = tmp_path_factory.mktemp("synthetic") / "rsna"
    generate_dataset(out, n_studies=N_TINY_STUDIES, seed=7, preset="tiny", progress=False)
    return out


@pytest.fixture(scope="session")
def prepared(synthetic_data, tmp_path_factory) -> Path:
    """``prepare`` of :func:`synthetic_data` at 32 px, bone window, in this process."""
    from keras_cspine.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "prep32"
    prepare_dataset(synthetic_data, out, size=32, mode="bone", workers=1, progress=False)
    return out
