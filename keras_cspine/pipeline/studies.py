"""Where the studies and the models of ``predict`` are: study folders, the newest runs."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.runs import BACKUP_DIR, MODEL_FILE


def _has_dicom(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir())


def find_studies(input_path: str | os.PathLike) -> list[Path]:
    """The study folders of ``input_path``.

    ``input_path`` is one study folder (it holds ``.dcm`` files), a folder of study folders (the
    RSNA ``test_images`` layout) or an RSNA dataset root (its ``test_images`` are used).
    Sub-folders are returned sorted by name, hidden ones left out.
    """
    root = Path(input_path)
    if not root.is_dir():
        raise CSpineDataError(root, "input folder not found")
    if _has_dicom(root):
        return [root]
    if (root / "test_images").is_dir() and not any(
        p.is_dir() and _has_dicom(p) for p in root.iterdir() if not p.name.startswith(".")
    ):
        root = root / "test_images"
    studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not studies:
        raise CSpineDataError(
            root, "no study folders: expected <UID>/<n>.dcm folders (RSNA test_images layout) or "
            "a folder of .dcm slices"
        )  # fmt: skip
    return studies


def _newest(paths: Iterable[Path]) -> Path | None:
    paths = [p for p in paths if p.is_file()]
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def find_latest_stage1(runs: str | os.PathLike = "runs") -> Path | None:
    """The newest stage 1 run directory under ``runs`` (one holding ``model.keras``), or None."""
    root = Path(runs)
    if not root.is_dir():
        return None
    found = _newest(p for p in root.rglob(MODEL_FILE) if BACKUP_DIR not in p.parts)
    return found.parent if found else None


def find_latest_stage2(runs: str | os.PathLike = "runs") -> Path | None:
    """The newest stage 2 weights under ``runs``: ``weights/best.onnx`` (else ``best.pt``)."""
    root = Path(runs)
    if not root.is_dir():
        return None
    return _newest(root.rglob("weights/best.onnx")) or _newest(root.rglob("weights/best.pt"))
