"""Small shared helpers: atomic writes, seeding, run directories."""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", **open_kwargs) -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash or exception leaves either the old file or none, never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode, **open_kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for writers that want a file name (np.save, savefig).

    The temporary keeps ``path``'s suffix so that libraries choosing a format by suffix still work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]],
              columns: Sequence[str]) -> None:  # fmt: skip
    """Write ``rows`` (mappings) under the header ``columns``, atomically, with ``\\n`` line ends."""
    import csv

    with atomic_write(path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def seed_everything(seed: int) -> None:
    """Seed Python and NumPy (and Keras/TensorFlow when already imported)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds libraries that use the global state
    import sys

    if "keras" in sys.modules:
        import keras

        keras.utils.set_random_seed(seed)


# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    When a ``PyDataset`` is fed through ``tf.data`` (what ``model.fit`` does with a
    :class:`CSpineSequence`), TensorFlow's generator dataset sets glibc's ``M_TRIM_THRESHOLD`` to
    128 kB (it logs "Memory patch applied"). Setting it switches off glibc's adaptive mmap
    threshold, so every tensor above 128 kB is mmapped, unmapped and page-faulted in again on
    every training step. Measured on GCViT at 64 px, batch 32, 2 CPU cores: 12.6 s of the
    process's 30 s CPU in the kernel and 62 s of wall time for 32 steps, against 0.9 s and 32 s
    once the thresholds are raised again (``python benchmarks/bench_fit_memory.py``). Linux/glibc
    only; elsewhere it does nothing.

    Returns:
        whether both settings were applied.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
        mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    )
