"""Checks on rendered model images shared by the detection tests."""

from __future__ import annotations

import numpy as np
import pytest


def assert_label_on_bright_block(image: np.ndarray, label, centre_tol: float = 1.5,
                                 size_tol: float = 2.0) -> None:  # fmt: skip
    """The YOLO ``(cx, cy, w, h)`` label (normalised) frames the bright block of a square model
    image, within ``centre_tol`` / ``size_tol`` pixels."""
    side = image.shape[0]
    cx, cy, w, h = label
    bright = np.argwhere(image[..., 0] > 128)
    (y1, x1), (y2, x2) = bright.min(0), bright.max(0) + 1
    assert (x1 + x2) / 2 / side == pytest.approx(cx, abs=centre_tol / side)
    assert (y1 + y2) / 2 / side == pytest.approx(cy, abs=centre_tol / side)
    assert (x2 - x1) / side == pytest.approx(w, abs=size_tol / side)
    assert (y2 - y1) / side == pytest.approx(h, abs=size_tol / side)
