"""TensorFlow without its start-up noise on a machine with no GPU.

When TensorFlow starts on a CPU-only machine it writes a dozen lines to the process's standard
error before its logging is even configured (so ``TF_CPP_MIN_LOG_LEVEL`` cannot hide them)::

    WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
    I0000 ... port.cc:153] oneDNN custom operations are on. ...
    I0000 ... cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.
    I0000 ... cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use ...
    E0000 ... cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error: ... (303)

They read like a broken install. :func:`install` makes the first ``import tensorflow`` of the
process run with file descriptor 2 redirected to a temporary file, initialises the devices while
still redirected (``cuInit`` is called then, not at import), and writes back every captured line
except the known start-up notices above. The CUDA lines are dropped only when TensorFlow found no
GPU: on a GPU machine whose driver fails they stay. Warnings and errors of any other kind, from
C++ or Python, are written back unchanged and in order. It also sets ``TF_CPP_MIN_LOG_LEVEL=1``
(INFO lines off, warnings kept) unless the environment already chose a level.

The command line installs it before any command runs; a notebook or script calls
``keras_cspine.quiet.install()`` before its first ``import keras`` / ``import tensorflow``. Nothing
happens when TensorFlow is already imported. ``KERAS_CSPINE_TF_NOISE=1`` turns the filter off.

One note comes later, at the first boolean transpose of the process (a masked recurrent layer):
:func:`absorb_once_notices`, called where the study sequence model is built or loaded.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator

#: Start-up notices of every TensorFlow start (information, not problems).
STARTUP_NOTICES = (
    "All log messages before absl::InitializeLog() is called are written to STDERR",
    "oneDNN custom operations are on",
    "cpu_feature_guard.cc",
    "This TensorFlow binary is optimized to use available CPU instructions",
    "To enable the following instructions:",
)
#: What TensorFlow says when it looks for CUDA on a machine without a GPU.
NO_GPU_NOTICES = (
    "Could not find cuda drivers on your machine",
    "failed call to cuInit",
    "Unable to register cuDNN factory",
    "Unable to register cuFFT factory",
    "Unable to register cuBLAS factory",
    "computation placer already registered",
    "TF-TRT Warning: Could not find TensorRT",
)
#: What TensorFlow writes once per process at the first use of a kernel, on some CPUs (a note
#: that it falls back to its own implementation, not a problem).
ONCE_NOTICES = ("oneDNN supports DT_BOOL only on platforms with AVX-512",)
#: TensorFlow's own log line prefix (severity, date, time, thread, file:line]).
_TF_LOG_LINE = re.compile(r"^[IWEF]\d{4} ")
OFF_ENV = "KERAS_CSPINE_TF_NOISE"


def is_noise(line: str, gpu_found: bool) -> bool:
    """Whether ``line`` (captured while TensorFlow started) is one of the known start-up notices."""
    if any(notice in line for notice in STARTUP_NOTICES):
        return True
    return not gpu_found and any(notice in line for notice in NO_GPU_NOTICES)


def filter_startup_output(text: str, gpu_found: bool) -> str:
    """``text`` without the start-up notices; every other line kept, in order."""
    kept = [line for line in text.splitlines(keepends=True) if not is_noise(line, gpu_found)]
    return "".join(kept)


def _write_back(text: str) -> None:
    """What a capture kept, to standard error (nothing when empty)."""
    if text:
        sys.stderr.write(text)
        sys.stderr.flush()


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """File descriptor 2 goes to a temporary file inside the block; its text is appended to the
    yielded list when the block ends (also on an exception)."""
    captured: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


class _QuietLoader(importlib.abc.Loader):
    """Runs TensorFlow's own loader with standard error captured, then writes back what is not
    a start-up notice."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        gpu_found = True  # if device discovery fails, keep every CUDA line
        with _stderr_captured() as captured:
            self.loader.exec_module(module)
            with contextlib.suppress(Exception):
                gpu_found = bool(module.config.list_physical_devices("GPU"))
        _write_back(filter_startup_output(captured[0], gpu_found))

    def __getattr__(self, name):  # get_resource_reader, is_package, ... of the real loader
        return getattr(self.loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` through the other finders and wraps its loader, once."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "tensorflow":
            return None
        uninstall()
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _QuietLoader(spec.loader)
        return spec


_FINDER = _QuietTensorFlowFinder()


def install() -> bool:
    """Quiet the first ``import tensorflow`` of this process; False when too late or turned off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    if os.environ.get(OFF_ENV, "") not in ("", "0") or "tensorflow" in sys.modules:
        return False
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    return True


def uninstall() -> None:
    """Remove the import hook (TensorFlow then starts as it would without keras_cspine)."""
    with contextlib.suppress(ValueError):
        sys.meta_path.remove(_FINDER)


_ONCE_ABSORBED = False


def absorb_once_notices() -> None:
    """Let TensorFlow write its :data:`ONCE_NOTICES` now, with standard error captured, and write
    back everything else it wrote.

    A masked recurrent layer (the study sequence model) transposes a boolean mask: on a CPU without
    AVX-512 the first boolean transpose of the process logs the oneDNN fallback note as an error
    line (``E0000 ... util.cc:131]``). This runs one such transpose first. It runs an operation,
    which initialises TensorFlow's runtime: call it only where the runtime is about to start
    anyway (building or loading a model), never at import (a multi-worker strategy must be
    created before the first operation). Once per process; nothing when turned off.
    """
    global _ONCE_ABSORBED
    if _ONCE_ABSORBED or os.environ.get(OFF_ENV, "") not in ("", "0"):
        return
    _ONCE_ABSORBED = True
    import tensorflow as tf

    with _stderr_captured() as captured:
        with contextlib.suppress(Exception):
            tf.transpose(tf.constant([[True, False]]))
    _write_back("".join(line for line in captured[0].splitlines(keepends=True)
                        if not any(notice in line for notice in ONCE_NOTICES)))  # fmt: skip


def is_tensorflow_log_line(line: str) -> bool:
    """Whether ``line`` is in TensorFlow's C++ log format (``I0000 00:00:... file.cc:N] ...``)."""
    return bool(_TF_LOG_LINE.match(line))
