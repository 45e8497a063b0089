"""Slice preprocessing: the paper's Algorithm 1 (paper Section 2.4, preprocessing) and
Hounsfield-window modes.

Algorithm 1 of the paper reads each slice (pydicom-style ``dcmread``), sets
PhotometricInterpretation to "YBR_FULL", takes the pixel array, min-max normalises it per slice,
casts to uint8 and repeats the grey image into three RGB channels. (Our reading of the YBR_FULL
step: the usual workaround for decoding JPEG-lossless RSNA slices with pylibjpeg. The decoders
used here, pylibjpeg, GDCM or dicomsdl, are this package's choice.)
:func:`paper_algorithm1` does exactly that on a file. :func:`to_model_image` turns a float32 HU
slice (from :func:`keras_cspine.io.dicom.read_slice`) into the model's uint8 RGB image, in one of
these modes:

======================  ======================================================================
``"paper"``             per-slice min-max of the slice, grey -> RGB: Algorithm 1 on the HU array
                        (equal to :func:`paper_algorithm1` within one grey level).
``"bone"``              bone window, level 400 / width 1800 HU, repeated into three channels.
``"multiwindow"``       three windows as three channels: (500, 1800), (400, 650), (80, 300)
                        (this package's addition, after strong RSNA 2022 solutions).
``"hu"``                float32 HU clipped to [-1024, 3071], three equal channels (research).
======================  ======================================================================

Windows and window modes live in registries (:data:`WINDOWS`, :data:`WINDOW_MODES`) that
:func:`register_window` and :func:`register_window_mode` extend.

Resizing (``size`` not None): a non-square slice is first padded to a square, centred, with the
slice's minimum value (so no anatomy is distorted or cut), then resized to ``size x size`` with
Pillow's antialiased bilinear filter in 32-bit float (deterministic, no OpenCV needed).
:func:`square_transform` gives the mapping of native pixel coordinates to the model image, for
boxes. Window modes resample the HU slice and then apply the windows (one resampling for any
number of channels: partial-volume averaging of HU, as a coarser reconstruction would give);
``"paper"`` normalises at native resolution and then resamples, i.e. Algorithm 1 then a resize.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from keras_cspine.errors import DicomReadError

__all__ = [
    "HU_RANGE",
    "MODES",
    "WINDOWS",
    "WINDOW_MODES",
    "Window",
    "apply_window",
    "check_mode",
    "paper_algorithm1",
    "register_window",
    "register_window_mode",
    "resize_square",
    "square_transform",
    "to_model_image",
]

#: the built-in modes (docs/internals.md); registered window modes add to these
MODES = ("paper", "bone", "multiwindow", "hu")
#: clipping range of the "hu" mode (12-bit CT range)
HU_RANGE = (-1024.0, 3071.0)


@dataclass(frozen=True)
class Window:
    """A display window in HU: ``level`` (centre) and ``width``."""

    level: float
    width: float

    def __post_init__(self):
        if not np.isfinite(self.level) or not np.isfinite(self.width) or self.width <= 0:
            raise ValueError(f"a window needs a finite level and a positive width, got {self}")

    @property
    def bounds(self) -> tuple[float, float]:
        """(lowest, highest) HU of the window."""
        return self.level - self.width / 2, self.level + self.width / 2


#: named windows (level, width) in HU; extend with :func:`register_window`
WINDOWS: dict[str, Window] = {
    "bone": Window(400.0, 1800.0),
    "bone_wide": Window(500.0, 1800.0),
    "bone_narrow": Window(400.0, 650.0),
    "soft_tissue": Window(80.0, 300.0),
}

#: window modes: the three windows giving the R, G, B channels
WINDOW_MODES: dict[str, tuple[str, str, str]] = {
    "bone": ("bone", "bone", "bone"),
    "multiwindow": ("bone_wide", "bone_narrow", "soft_tissue"),
}


def register_window(name: str, level: float, width: float) -> Window:
    """Add (or replace) a named window in :data:`WINDOWS` and return it."""
    if not name or not isinstance(name, str):
        raise ValueError(f"a window needs a non-empty name, got {name!r}")
    window = Window(float(level), float(width))
    WINDOWS[name] = window
    return window


def register_window_mode(name: str, windows: tuple[str, ...] | list[str]) -> None:
    """Add a mode to :func:`to_model_image` from one window name (repeated) or three.

    Example:
        >>> register_window("brain", 40, 80)
        Window(level=40.0, width=80.0)
        >>> register_window_mode("bone_brain", ["bone", "brain", "soft_tissue"])
    """
    if name in ("paper", "hu"):
        raise ValueError(f"{name!r} is a built-in mode that is not a window mode")
    windows = tuple(windows)
    if len(windows) == 1:
        windows = windows * 3
    if len(windows) != 3:
        raise ValueError(f"a window mode needs 1 or 3 windows, got {len(windows)}: {windows}")
    unknown = [w for w in windows if w not in WINDOWS]
    if unknown:
        raise ValueError(f"unknown windows {unknown}; registered: {sorted(WINDOWS)}")
    WINDOW_MODES[name] = windows


def apply_window(hu: np.ndarray, window: Window | str) -> np.ndarray:
    """HU -> float32 grey levels in [0, 255] (below the window 0, above 255)."""
    if isinstance(window, str):
        window = WINDOWS[window]
    low, _ = window.bounds
    out = np.asarray(hu, dtype=np.float32) - np.float32(low)
    out *= np.float32(255.0 / window.width)
    return np.clip(out, 0.0, 255.0, out=out)


# --------------------------------------------------------------------------------------------
# Algorithm 1
# --------------------------------------------------------------------------------------------
def paper_algorithm1(path: str | os.PathLike) -> np.ndarray:
    """The paper's Algorithm 1 on one DICOM file: uint8 ``(rows, columns, 3)``.

    Steps, as published (paper Section 2.4): ``dcmread``; ``PhotometricInterpretation =
    "YBR_FULL"`` on the dataset (our reading: the usual workaround for decoding JPEG-lossless
    slices with pylibjpeg); ``pixel_array``; ``data - min``, then ``/ max`` when max is not 0;
    ``(data * 255).astype(uint8)``; grey -> RGB.

    Two adaptations of this package keep it running under pydicom 3 without changing its
    result: pydicom 3 would convert a "YBR_FULL" array to RGB (pydicom 2 did not for one sample
    per pixel, and pydicom 3 refuses 16-bit data), so ``as_rgb=False`` is set; and this package
    prefers the pylibjpeg plugin when it is installed (GDCM aborts the process on JPEG 2000 slices
    relabelled "YBR_FULL"). Rescale slope/intercept are not applied, as Algorithm 1 does not
    apply them.

    Raises:
        DicomReadError: unreadable file, no decoder for its transfer syntax, or not one
            greyscale frame.
    """
    from keras_cspine.io.dicom import pydicom_decoder, read_dataset

    path = os.fspath(path)
    ds = read_dataset(path)
    if "PixelData" not in ds:
        raise DicomReadError(path, "no PixelData element (not an image, or the file is truncated)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise DicomReadError(path, "Algorithm 1 expects one greyscale frame")
    plugins = pydicom_decoder(path, str(ds.file_meta.TransferSyntaxUID)).available_plugins
    ds.PhotometricInterpretation = "YBR_FULL"
    options = {"as_rgb": False}
    if "pylibjpeg" in plugins:
        options["decoding_plugin"] = "pylibjpeg"
    ds.pixel_array_options(**options)
    try:
        data = ds.pixel_array
    except Exception as err:  # noqa: BLE001 - decoder plugins raise anything
        raise DicomReadError(path, f"cannot decode pixel data ({type(err).__name__}: {err})") from err
    if data.ndim != 2:
        raise DicomReadError(path, f"Algorithm 1 expects a 2-D slice, decoded {data.shape}")
    data = data - np.min(data)
    if np.max(data) != 0:
        data = data / np.max(data)
    data = (data * 255).astype(np.uint8)
    return np.stack([data, data, data], axis=-1)


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------
def square_transform(rows: int, columns: int, size: int) -> tuple[float, float, float]:
    """``(scale, offset_x, offset_y)`` mapping native pixel coordinates to the model image.

    A point ``(x, y)`` of the native slice (x along columns) lands at
    ``(x * scale + offset_x, y * scale + offset_y)`` in the ``size x size`` image of
    :func:`to_model_image`; a box ``(x, y, w, h)`` becomes ``(x*s+ox, y*s+oy, w*s, h*s)``.
    """
    side = max(rows, columns)
    scale = size / side
    return scale, (side - columns) // 2 * scale, (side - rows) // 2 * scale


def resize_square(image: np.ndarray, size: int, pad_value: float) -> np.ndarray:
    """Pad a 2-D float image to a centred square with ``pad_value``, then resize it to
    ``size x size`` (Pillow bilinear, antialiased when shrinking). Returns float32."""
    from PIL import Image

    rows, columns = image.shape
    side = max(rows, columns)
    image = np.asarray(image, dtype=np.float32)
    if rows != columns:
        canvas = np.full((side, side), pad_value, dtype=np.float32)
        top, left = (side - rows) // 2, (side - columns) // 2
        canvas[top : top + rows, left : left + columns] = image
        image = canvas
    if side == size:
        return np.array(image, dtype=np.float32, copy=True)
    resized = Image.fromarray(np.ascontiguousarray(image)).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Model images
# --------------------------------------------------------------------------------------------
def check_mode(mode: str) -> None:
    """Raise ValueError unless ``mode`` is "paper", "hu" or a registered window mode."""
    if mode not in ("paper", "hu") and mode not in WINDOW_MODES:
        raise ValueError(f"mode must be one of {('paper', 'hu', *WINDOW_MODES)}, got {mode!r}")


_check_mode = check_mode  # the earlier private name, still imported by pipeline.py


def to_model_image(hu: np.ndarray, mode: str = "bone", size: int | None = 224) -> np.ndarray:
    """A HU slice as the model's input image.

    Args:
        hu: float ``(rows, columns)`` Hounsfield units (e.g. from ``read_slice``).
        mode: "paper", "bone", "multiwindow", "hu" or a registered window mode.
        size: side of the square output; None keeps the native grid (no padding).

    Returns:
        uint8 ``(size, size, 3)`` (float32 for ``mode="hu"``).

    Example:
        >>> hu = np.linspace(-1000, 1500, 64 * 48, dtype=np.float32).reshape(64, 48)
        >>> to_model_image(hu, "multiwindow", size=32).shape
        (32, 32, 3)
    """
    check_mode(mode)
    hu = np.asarray(hu)
    if hu.ndim != 2 or hu.size == 0:
        raise ValueError(f"expected a 2-D slice, got shape {hu.shape}")
    if size is not None and (not isinstance(size, int | np.integer) or size < 1):
        raise ValueError(f"size must be a positive integer or None, got {size!r}")
    hu = hu.astype(np.float32, copy=False)
    low, high = float(hu.min()), float(hu.max())  # NaN and inf propagate to these
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ValueError("the slice holds NaN or infinite values")

    if mode == "paper":
        grey = hu - np.float32(low)
        if high > low:
            grey *= np.float32(255.0 / (high - low))
        np.floor(grey, out=grey)  # Algorithm 1's astype(uint8) truncates
        np.clip(grey, 0.0, 255.0, out=grey)  # float32 rounding must not reach 256
        if size is not None:
            grey = np.rint(resize_square(grey, size, 0.0))
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)

    if size is not None:
        hu = resize_square(hu, size, low)
    if mode == "hu":
        clipped = np.clip(hu, *HU_RANGE).astype(np.float32)
        return np.repeat(clipped[..., None], 3, axis=2)

    names = WINDOW_MODES[mode]
    out = np.empty((*hu.shape, 3), dtype=np.uint8)
    done: dict[str, int] = {}
    for channel, name in enumerate(names):
        if name in done:
            out[..., channel] = out[..., done[name]]
            continue
        out[..., channel] = np.rint(apply_window(hu, WINDOWS[name]))
        done[name] = channel
    return out
