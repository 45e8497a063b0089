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
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

from keras_cspine.errors import MissingDependencyError
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

_STATE: dict[str, Path] = {}


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
    """Set up the offline environment, import ``ultralytics`` and lock its settings; return it."""
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
    return ultralytics
