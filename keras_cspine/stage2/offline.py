"""Offline, private Ultralytics for stage 2 (paper Section 2.6, fracture detection with YOLO).

Ultralytics reaches for the network in several places: an online check (DNS), the font
``Arial.ttf`` that its plots and dataset checks download on first use, pip auto-install of missing
requirements, anonymous usage analytics ("sync"), and the Platform / ClearML / Comet / DVC /
MLflow / Ray Tune integrations. :func:`setup_offline` closes every one of them *before*
``ultralytics`` is imported, inside this process only, without asking anything of the user:

- ``YOLO_OFFLINE=true`` (the online check answers False without a DNS query) and
  ``YOLO_AUTOINSTALL=false`` (no pip);
- ``YOLO_CONFIG_DIR`` points to a config folder of our own (``$KERAS_CSPINE_YOLO_DIR`` or
  ``~/.cache/keras_cspine/ultralytics``) holding ``settings.json`` with sync and every
  integration off, and the fonts ``Arial.ttf`` / ``Arial.Unicode.ttf`` (copies of matplotlib's
  own DejaVuSans, so nothing is downloaded);
- ``ULTRALYTICS_API_KEY`` is removed from this process's environment (no Platform upload).

Training also passes ``amp=False`` (the AMP check downloads weights). :func:`import_ultralytics`
does all this, refuses to run after TensorFlow was imported (importing torch after TensorFlow
segfaults on this stack) and returns the module. Ultralytics is AGPL-3.0 and an optional extra.

Safe, as well as offline: a hospital that is sent a model or a dataset must not run the sender's
code. Ultralytics unpickles whole ``.pt`` files (``torch.load(weights_only=False)``), unpickles
the label caches it finds in a dataset folder (``labels/*.cache``, ``np.load(allow_pickle=True)``)
and runs the ``download`` script of a ``data.yaml`` whose images are missing. So, in the process
that imports it through :func:`import_ultralytics` (:func:`install_guards`):

- every checkpoint Ultralytics opens (``load_checkpoint`` -> ``torch_safe_load``, and every
  ``torch_load`` of ``ultralytics.utils.patches``: resume, ``strip_optimizer``, validation of
  ``best.pt`` after training) is read by :func:`safe_load_checkpoint`: a ``torch.save`` zip
  whose pickle names only the globals of :func:`checkpoint_allow_list`, loaded with
  ``torch.load(weights_only=True)`` under ``torch.serialization.safe_globals`` of exactly those,
  while building a model from a config is switched off. Anything else raises
  ``CSpineDataError`` naming the file and the global (``refuses to load posix.system``);
- label caches are neither read nor written (``load_dataset_cache_file`` /
  ``save_dataset_cache_file`` of ``ultralytics.data``): the labels are scanned again on each run,
  and a ``.cache`` planted in a dataset is never unpickled;
- ``check_det_dataset`` runs with ``autodownload=False``: a ``data.yaml`` whose images are
  missing is an error, its ``download`` (a URL, a bash or a Python script) is never run;
- ``ULTRALYTICS_SAFE_LOAD=true``: Ultralytics' own restricted mode, in which a model ``.yaml``
  names only layer classes and its ``activation`` is parsed, never passed to ``eval``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import json
import os
import pickle
import pkgutil
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from keras_cspine.errors import CSpineDataError, MissingDependencyError
from keras_cspine.utils import atomic_path, atomic_write

#: Environment variable naming the folder that holds our private Ultralytics config.
CONFIG_ENV = "KERAS_CSPINE_YOLO_DIR"

#: Fonts Ultralytics asks for, provided as copies of matplotlib's bundled DejaVuSans.
FONT_NAMES = ("Arial.ttf", "Arial.Unicode.ttf")

#: Ultralytics settings forced in our config folder: no sync, analytics or integrations.
PRIVATE_SETTINGS = {
    "sync": False,
    "api_key": "",
    "openai_api_key": "",
    "clearml": False,
    "comet": False,
    "dvc": False,
    "mlflow": False,
    "raytune": False,
    "tensorboard": False,
    "wandb": False,
    "vscode_msg": False,
    "openvino_msg": False,
}

#: Model classes a detection checkpoint may hold (its ``model`` / ``ema``).
CHECKPOINT_MODELS = ("ultralytics.nn.tasks.DetectionModel",)

#: Packages whose ``torch.nn.Module`` subclasses are the layers a checkpoint may hold.
CHECKPOINT_LAYER_PACKAGES = ("torch.nn.modules", "ultralytics.nn.modules")

#: Layer classes refused all the same: building one reaches outside the process (TorchVision
#: fetches torchvision weights).
REFUSED_LAYERS = frozenset({"ultralytics.nn.modules.block.TorchVision"})

#: Data globals a checkpoint may hold besides tensors and plain containers (which
#: ``weights_only`` allows by itself): the training arguments' namespace, NumPy scalars in
#: ``train_metrics``, paths in old ``train_args``.
CHECKPOINT_DATA = (
    "ultralytics.utils.IterableSimpleNamespace",
    "numpy.dtype",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "pathlib.PosixPath",
    "pathlib.WindowsPath",
    "pathlib._local.PosixPath",
    "pathlib._local.WindowsPath",
)

_STATE: dict[str, Any] = {}
_PRELOADED: dict[str, Any] = {}


def default_config_dir() -> Path:
    """The folder given to Ultralytics as ``YOLO_CONFIG_DIR`` (it adds ``Ultralytics/`` itself)."""
    if env := os.environ.get(CONFIG_ENV):
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "keras_cspine" / "ultralytics"


def _matplotlib_font() -> Path:
    import matplotlib

    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    if not font.is_file():
        raise FileNotFoundError(f"{font}: matplotlib's bundled DejaVuSans.ttf is missing")
    return font


def _install_fonts(folder: Path) -> None:
    source = _matplotlib_font()
    for name in FONT_NAMES:
        target = folder / name
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        with atomic_path(target) as tmp:
            shutil.copyfile(source, tmp)


def _write_settings(folder: Path) -> None:
    path = folder / "settings.json"
    settings: dict = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(path.read_text())
            if isinstance(loaded, dict):
                settings = loaded
    settings.update(PRIVATE_SETTINGS)
    settings.setdefault("weights_dir", str(folder / "weights"))
    settings.setdefault("datasets_dir", str(folder / "datasets"))
    settings.setdefault("runs_dir", str(folder / "runs"))
    with atomic_write(path) as handle:
        json.dump(settings, handle, indent=2)


def setup_offline(config_dir: str | os.PathLike | None = None) -> Path:
    """Make the coming ``import ultralytics`` offline and private; return its settings folder.

    Idempotent. Must run before ``ultralytics`` is imported: environment variables read at import
    time cannot be changed afterwards, so a prior import raises ``RuntimeError``.

    Args:
        config_dir: the folder to use as ``YOLO_CONFIG_DIR``; default :func:`default_config_dir`.

    Returns:
        The folder Ultralytics will use (``<config_dir>/Ultralytics``), with fonts and settings.
    """
    base = Path(config_dir).expanduser() if config_dir is not None else default_config_dir()
    base = base.resolve()
    folder = base / "Ultralytics"
    if "ultralytics" in sys.modules and _STATE.get("folder") != folder:
        raise RuntimeError(
            "ultralytics was imported before keras_cspine.stage2.offline.setup_offline(): its "
            "network and settings switches are read at import time. Import it through "
            "keras_cspine.stage2.offline.import_ultralytics() instead."
        )
    folder.mkdir(parents=True, exist_ok=True)
    _install_fonts(folder)
    _write_settings(folder)
    os.environ["YOLO_OFFLINE"] = "true"
    os.environ["YOLO_AUTOINSTALL"] = "false"
    os.environ["ULTRALYTICS_SAFE_LOAD"] = "true"  # model .yaml files without eval()
    os.environ["YOLO_CONFIG_DIR"] = str(base)
    os.environ.pop("ULTRALYTICS_API_KEY", None)
    os.environ.setdefault("MPLBACKEND", "Agg")
    _STATE["folder"] = folder
    return folder


def check_no_tensorflow(purpose: str = "Ultralytics (torch)") -> None:
    """Raise ``RuntimeError`` if TensorFlow is already imported: torch after TensorFlow segfaults."""
    if "tensorflow" in sys.modules:
        raise RuntimeError(
            f"{purpose} must run in a process that has not imported TensorFlow (importing torch "
            "after TensorFlow crashes this stack). Run it as `python -m keras_cspine detect ...` "
            "or in a subprocess, or import torch first."
        )


def import_ultralytics(config_dir: str | os.PathLike | None = None) -> ModuleType:
    """Set up the offline environment, import ``ultralytics``, lock its settings and install the
    guards of :func:`install_guards`; return it."""
    check_no_tensorflow()
    setup_offline(config_dir)
    try:
        import ultralytics
        from ultralytics.utils import SETTINGS
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise MissingDependencyError("ultralytics", "detect", "Stage 2 fracture detection") from exc
    known = {k: v for k, v in PRIVATE_SETTINGS.items() if k in SETTINGS.defaults}
    if any(SETTINGS.get(k) != v for k, v in known.items()):
        SETTINGS.update(known)
    install_guards()
    return ultralytics


# -- checkpoints ---------------------------------------------------------------------------------
@functools.cache
def checkpoint_allow_list() -> dict[str, Any]:
    """``{pickled name: object}``: every global an Ultralytics detection checkpoint may name.

    :data:`CHECKPOINT_MODELS`, the ``torch.nn.Module`` subclasses defined in the modules of
    :data:`CHECKPOINT_LAYER_PACKAGES` (less :data:`REFUSED_LAYERS`) and :data:`CHECKPOINT_DATA`.
    Tensors, ``OrderedDict`` and the builtin containers are allowed by ``weights_only`` itself.
    """
    import numpy as np
    import torch

    allowed: dict[str, Any] = {}
    for package_name in CHECKPOINT_LAYER_PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name] + [f"{package_name}.{m.name}"
                                  for m in pkgutil.iter_modules(package.__path__)]  # fmt: skip
        for module_name in names:
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # pragma: no cover - an optional part of a package
                continue
            for obj in vars(module).values():
                if (isinstance(obj, type) and issubclass(obj, torch.nn.Module)
                        and obj.__module__ == module_name):  # fmt: skip
                    allowed[f"{module_name}.{obj.__qualname__}"] = obj
    for name in REFUSED_LAYERS:
        allowed.pop(name, None)
    for name in CHECKPOINT_MODELS:
        module_name, _, attr = name.rpartition(".")
        allowed[name] = getattr(importlib.import_module(module_name), attr)
    from ultralytics.utils import IterableSimpleNamespace

    path = type(Path())  # PosixPath here: a path pickled on another system becomes a local one
    scalar = np.float64(0).__reduce__()[0]
    data = {"ultralytics.utils.IterableSimpleNamespace": IterableSimpleNamespace,
            "numpy.dtype": np.dtype, "numpy.core.multiarray.scalar": scalar,
            "numpy._core.multiarray.scalar": scalar}  # fmt: skip
    allowed.update({name: data.get(name, path) for name in CHECKPOINT_DATA})
    return allowed


def _dtype_classes() -> list[type]:
    """NumPy's dtype classes (``Float64DType``...): a dtype in a pickle is built as one of them."""
    import numpy as np

    return [type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64,
                                        np.bool_)]  # fmt: skip


@contextlib.contextmanager
def _no_model_building() -> Iterator[None]:
    """While a checkpoint is unpickled, a model class called with arguments (``REDUCE``) instead
    of restored (``NEWOBJ`` + state) may not build itself from a config."""
    tasks = sys.modules.get("ultralytics.nn.tasks")
    original = getattr(tasks, "parse_model", None)
    if original is None:
        yield
        return

    def refuse(*args, **kwargs):
        raise pickle.UnpicklingError("a checkpoint may not build a model from a config")

    tasks.parse_model = refuse
    try:
        yield
    finally:
        tasks.parse_model = original


def _unpickling_problem(err: Exception) -> str:
    """What ``weights_only`` refused, in a line: the global, else torch's reason."""
    text = str(err)
    if match := re.search(r"GLOBAL ([\w.]+)", text):
        return f"refuses to load {match.group(1)} (a checkpoint may hold only model classes)"
    text = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation", 1)[0]
    paragraphs = [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]
    return f"refuses to load it: {(paragraphs or [type(err).__name__])[-1][:300]}"


def safe_load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """Load a ``.pt`` without running any code it may carry; return what ``torch.load`` returns.

    The file must be a ``torch.save`` zip archive whose pickle names only globals of
    :func:`checkpoint_allow_list` (checked from its opcodes before anything is unpickled); it is
    then loaded with ``torch.load(weights_only=True)`` under ``safe_globals`` of exactly the ones
    it names, while Ultralytics cannot build a model from a config.

    Raises:
        CSpineDataError: naming the file: missing, not a ``torch.save`` archive, or naming a
            global outside the allow-list (``refuses to load posix.system``).
    """
    path = Path(path)
    key = str(path.resolve())
    if key in _PRELOADED:
        return _PRELOADED[key]
    import_ultralytics()  # the allow-list names its classes: offline first
    import torch

    if not path.is_file():
        raise CSpineDataError(path, "checkpoint not found (nothing is downloaded)")
    serialization = torch.serialization
    if not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):  # pragma: no cover
        raise CSpineDataError(path, f"loading a checkpoint safely needs torch >= 2.6 (this is "
                                    f"{torch.__version__})")  # fmt: skip
    try:
        named = serialization.get_unsafe_globals_in_checkpoint(str(path))
    except (ValueError, RuntimeError, OSError, EOFError) as err:
        raise CSpineDataError(path, f"not a checkpoint written by torch.save ({err}); only those "
                                    "are loaded") from err  # fmt: skip
    allowed = checkpoint_allow_list()
    refused = sorted(n for n in named if n not in allowed)
    if refused:
        raise CSpineDataError(path, f"refuses to load {', '.join(refused)} (a checkpoint may hold "
                                    "only model classes)")  # fmt: skip
    entries = [(allowed[n], n) for n in named] + _dtype_classes()
    try:
        with serialization.safe_globals(entries), _no_model_building():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CSpineDataError(path, _unpickling_problem(err)) from err
    except (RuntimeError, EOFError) as err:
        raise CSpineDataError(path, f"not a loadable checkpoint ({err})") from err


@contextlib.contextmanager
def preloaded_checkpoint(path: str | os.PathLike, checkpoint: Any) -> Iterator[None]:
    """Within, :func:`safe_load_checkpoint` of ``path`` returns ``checkpoint`` (already loaded
    by it) instead of reading the file again: Ultralytics gets exactly what was checked."""
    key = str(Path(path).resolve())
    _PRELOADED[key] = checkpoint
    try:
        yield
    finally:
        _PRELOADED.pop(key, None)


def _ultralytics_checkpoint(weight, *args, **kwargs) -> tuple[dict, str]:
    """Stands in for ``ultralytics.nn.tasks.torch_safe_load``: ``(checkpoint, file)``."""
    import torch

    checkpoint = safe_load_checkpoint(weight)
    model = (checkpoint.get("ema") or checkpoint.get("model")) if isinstance(checkpoint, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise CSpineDataError(weight, "not an Ultralytics checkpoint (no model in it)")
    return checkpoint, str(weight)


def _torch_load(f, *args, **kwargs):
    """Stands in for ``ultralytics.utils.patches.torch_load`` (which passes weights_only=False)."""
    if isinstance(f, (str, os.PathLike)):
        location = kwargs.get("map_location", args[0] if args else None)
        return safe_load_checkpoint(f, map_location=location)
    import torch

    kwargs["weights_only"] = True
    return torch.load(f, *args, **kwargs)


# -- label caches and dataset downloads ----------------------------------------------------------
def _no_label_cache(path, *args, **kwargs):
    """Stands in for ``load_dataset_cache_file``: no cache (Ultralytics scans the labels)."""
    raise FileNotFoundError(f"{path}: label caches are not read (the labels are scanned)")


def _no_label_cache_written(prefix, path, x: dict, version, *args, **kwargs) -> None:
    """Stands in for ``save_dataset_cache_file``: nothing is written into the dataset (the
    cache dict gets its ``version``, as the original adds it in place)."""
    x["version"] = version


def _without_download(check: Callable) -> Callable:
    """``check_det_dataset`` with ``autodownload=False``: missing images are an error."""
    signature = inspect.signature(check)

    @functools.wraps(check)
    def check_without_download(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if "autodownload" in signature.parameters:
            bound.arguments["autodownload"] = False
        return check(*bound.args, **bound.kwargs)

    check_without_download.keras_cspine_guard = True
    return check_without_download


def _replace(module: ModuleType, name: str, replacement: Any) -> None:
    """Set ``module.name`` and every ``ultralytics`` module's copy of it (``from x import name``)."""
    original = vars(module).get(name)
    if original is None:  # not in this Ultralytics version
        return
    setattr(module, name, replacement)
    for module_name, other in list(sys.modules.items()):
        if (module_name.startswith("ultralytics") and other is not None
                and vars(other).get(name) is original):  # fmt: skip
            setattr(other, name, replacement)


def install_guards() -> None:
    """Route Ultralytics' checkpoint loads through :func:`safe_load_checkpoint`, switch its label
    caches and dataset downloads off (see the module docstring). Idempotent; called by
    :func:`import_ultralytics`."""
    if _STATE.get("guarded"):
        return
    import ultralytics.data.dataset  # noqa: F401 - the modules whose names are replaced
    import ultralytics.data.utils as data_utils
    import ultralytics.nn.tasks as tasks

    with contextlib.suppress(ImportError):  # older Ultralytics call torch.load in tasks only
        _replace(importlib.import_module("ultralytics.utils.patches"), "torch_load", _torch_load)
    _replace(tasks, "torch_safe_load", _ultralytics_checkpoint)
    _replace(data_utils, "load_dataset_cache_file", _no_label_cache)
    _replace(data_utils, "save_dataset_cache_file", _no_label_cache_written)
    if not getattr(data_utils.check_det_dataset, "keras_cspine_guard", False):
        _replace(data_utils, "check_det_dataset", _without_download(data_utils.check_det_dataset))
    _STATE["guarded"] = True
