"""Where the studies and the models of ``predict`` are: study folders and their names, the newest
finished runs, and the content fingerprints of model files."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from keras_cspine.errors import CSpineDataError
from keras_cspine.stage1.runs import BACKUP_DIR, MODEL_FILE, SUMMARY_FILE

#: A DICOM UID as the submission's ``row_id`` accepts it: digits in two or more dotted parts,
#: at most 64 characters (DICOM PS3.5 9.1).
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)+$")
UID_MAX_LENGTH = 64
#: What stands in the outputs for a study folder whose name is not its StudyInstanceUID (it may be
#: a patient's name: it is never written).
WITHHELD = "<study folder; name withheld>"

# A detection run (``keras_cspine.stage2.ultralytics_train.train_detector``): ``run.json`` gets
# ``"trained": true`` when Ultralytics' training has ended, and ``metrics.json`` is written last,
# after the validation and the ONNX export.
DETECT_RUN_FILE = "run.json"
DETECT_METRICS_FILE = "metrics.json"


def _has_dicom(folder: Path) -> bool:
    return any(p.suffix.lower() == ".dcm" for p in folder.iterdir())


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def find_studies(input_path: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[Path]:
    """The study folders of ``input_path`` (absolute paths).

    ``input_path`` is one study folder (it holds ``.dcm`` files), a folder of study folders (the
    RSNA ``test_images`` layout) or an RSNA dataset root (its ``test_images`` are used).
    Sub-folders are returned sorted by name, hidden ones and ``exclude`` (``predict``'s output
    folder, when it lies inside the input) left out.
    """
    root = Path(input_path).absolute()
    if not root.is_dir():
        raise CSpineDataError(root, "input folder not found")
    if _has_dicom(root):
        return [root]
    if (root / "test_images").is_dir() and not any(
        p.is_dir() and _has_dicom(p) for p in root.iterdir() if not p.name.startswith(".")
    ):
        root = root / "test_images"
    excluded = Path(exclude).absolute() if exclude is not None else None
    studies = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                     and not (excluded is not None and _same_path(p, excluded)))  # fmt: skip
    if not studies:
        raise CSpineDataError(
            root, "no study folders: expected <UID>/<n>.dcm folders (RSNA test_images layout) or "
            "a folder of .dcm slices"
        )  # fmt: skip
    return studies


# --------------------------------------------------------------------------------------------
# Study names: the StudyInstanceUID of the DICOM, the folder name only as a fallback
# --------------------------------------------------------------------------------------------
def looks_like_uid(text: str | None) -> bool:
    """Whether ``text`` is a DICOM UID (``1.2.840...``) that can name a study in a submission."""
    return (isinstance(text, str) and len(text) <= UID_MAX_LENGTH
            and UID_PATTERN.match(text) is not None)  # fmt: skip


def read_study_uid(folder: str | os.PathLike) -> str | None:
    """The StudyInstanceUID in the header of a study's first slice file (by number), or None when
    that file cannot be read (the study's reading will then say why)."""
    from keras_cspine.errors import DicomReadError
    from keras_cspine.io.dicom import list_series_files, read_dataset

    try:
        _, first = list_series_files(folder)[0]
        value = read_dataset(first, stop_before_pixels=True).get("StudyInstanceUID", "")
    except DicomReadError:
        return None
    return str(value or "").strip() or None


@dataclass(frozen=True)
class StudyName:
    """What a study is called in every output, and where that name came from.

    Attributes:
        uid: the StudyInstanceUID (None: the study cannot be named; it gets no outputs).
        source: ``"dicom"`` (the header), ``"folder"`` (its folder's name) or ``"none"``.
        folder: the folder as outputs may show it: its path when its name is ``uid``, else the
            parent with the name withheld (a folder may be named after the patient).
        warning: a disagreement between the folder name and the DICOM worth recording.
    """

    uid: str | None
    source: str
    folder: str
    warning: str | None = None

    def redact(self, text: str, folder: str | os.PathLike) -> str:
        """``text`` with the study folder's path and name replaced by :attr:`folder`."""
        folder = Path(folder).absolute()
        if self.uid is not None and folder.name == self.uid:
            return text
        for form in {str(folder), str(folder.resolve())}:
            text = text.replace(form, self.folder)
        return text


def name_study(folder: str | os.PathLike, dicom_uid: str | None) -> StudyName:
    """Name a study by the StudyInstanceUID of its DICOM (``dicom_uid``); fall back to the folder
    name when the DICOM has no valid UID and the folder name is one."""
    folder = Path(folder).absolute()
    by_folder = looks_like_uid(folder.name)
    warning = None
    if looks_like_uid(dicom_uid):
        uid, source = dicom_uid, "dicom"
        if by_folder and folder.name != dicom_uid:
            warning = (f"the study folder is named {folder.name} but its DICOM StudyInstanceUID "
                       f"is {dicom_uid}: named by the DICOM")  # fmt: skip
    elif by_folder:
        uid, source = folder.name, "folder"
        if dicom_uid:
            warning = "the DICOM StudyInstanceUID is not a valid UID: named by its folder"
    else:
        uid, source = None, "none"
    public = str(folder) if uid is not None and folder.name == uid else str(folder.parent / WITHHELD)
    return StudyName(uid, source, public, warning)


# --------------------------------------------------------------------------------------------
# The newest finished runs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunInfo:
    """A model found under ``runs``.

    Attributes:
        path: the stage 1 run folder, or the stage 2 weights file (``best.onnx``, else ``best.pt``).
        finished: the run wrote its last file (stage 1 ``summary.json``; stage 2 ``metrics.json``
            after ``run.json`` said ``trained``).
        time: modification time of that last file (of the model file for an unfinished run).
        problem: why the run counts as unfinished (None when finished).
    """

    path: Path
    finished: bool
    time: float
    problem: str | None = None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def stage1_run_problem(run_dir: str | os.PathLike) -> str | None:
    """Why ``run_dir`` is not a finished stage 1 run (None when it is)."""
    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        return f"no {MODEL_FILE}"
    if (run_dir / BACKUP_DIR).exists():
        return f"training in progress or killed ({BACKUP_DIR}/ is there)"
    if not (run_dir / SUMMARY_FILE).is_file():
        return f"no {SUMMARY_FILE}: training was killed or is still running"
    return None


def stage2_run_problem(run_dir: str | os.PathLike) -> str | None:
    """Why ``run_dir`` is not a finished detection run (None when it is)."""
    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / DETECT_RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"no readable {DETECT_RUN_FILE}: not made by `detect train`, or killed early"
    if not isinstance(record, dict) or not record.get("trained"):
        return f"{DETECT_RUN_FILE} says training has not ended"
    if not (run_dir / DETECT_METRICS_FILE).is_file():
        return f"no {DETECT_METRICS_FILE}: killed during validation or ONNX export"
    return None


def stage1_runs(runs: str | os.PathLike = "runs") -> list[RunInfo]:
    """Every stage 1 run under ``runs`` (a folder holding ``model.keras``), newest first."""
    root = Path(runs).absolute()
    if not root.is_dir():
        return []
    found = []
    for model in root.rglob(MODEL_FILE):
        if BACKUP_DIR in model.relative_to(root).parts or not model.is_file():
            continue
        problem = stage1_run_problem(model.parent)
        stamp = _mtime(model.parent / SUMMARY_FILE) if problem is None else _mtime(model)
        found.append(RunInfo(model.parent, problem is None, stamp, problem))
    return sorted(found, key=lambda r: (-r.time, str(r.path)))


def _stage2_weights(weights_dir: Path) -> Path | None:
    onnx, pt = weights_dir / "best.onnx", weights_dir / "best.pt"
    if onnx.is_file() and (not pt.is_file() or _mtime(onnx) >= _mtime(pt)):
        return onnx
    return pt if pt.is_file() else None


def stage2_runs(runs: str | os.PathLike = "runs") -> list[RunInfo]:
    """Every detection run under ``runs`` (``weights/best.onnx`` or ``best.pt``), newest first."""
    root = Path(runs).absolute()
    if not root.is_dir():
        return []
    folders = {p.parent for pattern in ("weights/best.onnx", "weights/best.pt")
               for p in root.rglob(pattern) if p.is_file()}  # fmt: skip
    found = []
    for weights_dir in folders:
        weights = _stage2_weights(weights_dir)
        if weights is None:
            continue
        problem = stage2_run_problem(weights_dir.parent)
        stamp = (_mtime(weights_dir.parent / DETECT_METRICS_FILE) if problem is None
                 else _mtime(weights))  # fmt: skip
        found.append(RunInfo(weights, problem is None, stamp, problem))
    return sorted(found, key=lambda r: (-r.time, str(r.path)))


def _newest_finished(found: Iterable[RunInfo]) -> Path | None:
    return next((r.path for r in found if r.finished), None)


def find_latest_stage1(runs: str | os.PathLike = "runs") -> Path | None:
    """The newest *finished* stage 1 run directory under ``runs`` (by its ``summary.json``), or
    None. Runs killed before they finished are never chosen."""
    return _newest_finished(stage1_runs(runs))


def find_latest_stage2(runs: str | os.PathLike = "runs") -> Path | None:
    """The weights (``best.onnx``, else ``best.pt``) of the newest *finished* detection run under
    ``runs`` (by its ``metrics.json``), or None."""
    return _newest_finished(stage2_runs(runs))


# --------------------------------------------------------------------------------------------
# Content fingerprints
# --------------------------------------------------------------------------------------------
_SHA256_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, remembered per (path, size, mtime_ns, inode) in this
    process (a model replaced at the same path is hashed again)."""
    path = Path(path).absolute()
    try:
        stat = path.stat()
    except OSError as err:
        raise CSpineDataError(path, f"cannot read: {err.strerror or err}") from err
    key = (str(path), stat.st_size, stat.st_mtime_ns, stat.st_ino)
    if key not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[key] = digest.hexdigest()
    return _SHA256_CACHE[key]
