"""Prepare: the slice index and the model-ready image cache (the paper's preprocessing, Sec. 2.4).

``python -m keras_cspine prepare DATA_DIR OUT --size 224 --mode bone`` reads every study of an
RSNA-layout folder once and writes (see docs/internals.md for the contract):

- ``OUT/index.csv``: one row per slice (study, slice number, position, slice ratio, C1..C7 presence
  from the segmentation or -1 when unknown, fracture boxes), validated against
  ``data_spec/slice_index.schema.json``;
- ``OUT/cache/<uid>.npy``: uint8 ``(Z, size, size, 3)`` images in series order, memory-mappable;
- ``OUT/prepare.json``: the settings and a summary; ``OUT/errors.csv`` with ``--on-error skip``
  (exactly the failures of the current inputs; no file when there are none).

Chunks of slices are spread over processes (``prepare_worker``: they die with the job), so one
long study uses every core. Each study is committed as soon as it is complete (its cache renamed
into place, then its marker ``OUT/studies/<uid>.json``), with one worker too: a killed run keeps
every finished study. Content, not paths, decides reuse: a marker holds the settings digest and a
fingerprint of all the study's result depends on (its DICOM files' names, sizes and mtimes, its
segmentation's SHA-1, its rows of train.csv and train_bounding_boxes.csv); a changed study is
redone, and prepare says so. One prepare writes into a folder at a time (a lock file).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from keras_cspine import __version__
from keras_cspine.data import prepare_worker as workers_
from keras_cspine.data.roi import SpineRoi, read_study_roi
from keras_cspine.data.slice_index import index_rows, slice_labels, study_boxes
from keras_cspine.errors import CSpineDataError
from keras_cspine.io.dicom import list_series_files
from keras_cspine.io.rsna import VERTEBRAE, RsnaLayout, validate_frame
from keras_cspine.utils import atomic_path, atomic_write, write_json

CACHE_FORMAT = 1
MARKER_FORMAT = 2  # studies/<uid>.json with an input fingerprint (format 1 had none)
MIN_SIZE, MAX_SIZE = 16, 1024  # model image side in pixels (RSNA slices are 512 px)
MIN_ROI_MM, MAX_ROI_MM = 20.0, 500.0  # spine window side (an adult neck is about 120 mm across)
#: temporary names of a run (``atomic_write``, ``atomic_path``, partial caches) in each folder
LEFTOVERS = {".": re.compile(r"\.(prepare\.json|index\.csv|errors\.csv)\.\w+\.tmp"),
             "cache": re.compile(r"\..+\.npy\.partial|\..+\.\w+\.tmp\.npy"),
             "studies": re.compile(r"\..+\.(json|csv)\.\w+\.tmp")}  # fmt: skip
INDEX_COLUMNS = (
    "StudyInstanceUID", "slice_number", "series_index", "n_slices", "z_mm", "position_mm",
    "slice_ratio", *VERTEBRAE, "labels_known", "has_fracture_box", "boxes", "rows", "columns",
    "cache_file",
)  # fmt: skip


@dataclass(frozen=True)
class PrepareSettings:
    """What the cache depends on: a change of any of these rebuilds it.

    Args:
        size: side of the square model image in pixels.
        mode: preprocessing mode of ``keras_cspine.data.preprocess`` ("paper", "bone", "multiwindow").
        split: "train" (train_images, with labels) or "test" (test_images).
        roi_mm: render only the square window of this many mm around the study's cervical
            column (:mod:`keras_cspine.data.roi`; beyond the paper); None: the whole slice.
    """

    size: int = 224
    mode: str = "bone"
    split: str = "train"
    roi_mm: float | None = None

    def __post_init__(self):
        from keras_cspine.data.preprocess import MODES

        if self.mode not in MODES or self.mode == "hu":
            raise ValueError(f"mode must be one of {[m for m in MODES if m != 'hu']}, got {self.mode!r}")
        if (not isinstance(self.size, (int, np.integer)) or isinstance(self.size, bool)
                or not MIN_SIZE <= self.size <= MAX_SIZE):  # fmt: skip
            raise ValueError(f"size must be a whole number of pixels from {MIN_SIZE} to "
                             f"{MAX_SIZE}, got {self.size!r}")  # fmt: skip
        object.__setattr__(self, "size", int(self.size))
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        if self.roi_mm is not None:
            if (isinstance(self.roi_mm, bool) or not isinstance(self.roi_mm, (int, float, np.number))
                    or not MIN_ROI_MM <= self.roi_mm <= MAX_ROI_MM):  # fmt: skip
                raise ValueError(f"roi_mm must be a length from {MIN_ROI_MM} to {MAX_ROI_MM} mm "
                                 f"(or None for the whole slice), got {self.roi_mm!r}")  # fmt: skip
            object.__setattr__(self, "roi_mm", float(self.roi_mm))

    def digest(self) -> str:
        fields = {k: v for k, v in asdict(self).items() if not (k == "roi_mm" and v is None)}
        payload = json.dumps({**fields, "cache_format": CACHE_FORMAT}, sort_keys=True)
        return hashlib.sha1(payload.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Reading the output
# --------------------------------------------------------------------------------------------
def load_index(prepared: str | os.PathLike) -> pd.DataFrame:
    """``index.csv`` of a prepare folder, validated; ``boxes`` parsed into lists."""
    path = Path(prepared) / "index.csv"
    if not path.is_file():
        raise CSpineDataError(path, "no index.csv: run `python -m keras_cspine prepare` first")
    frame = validate_frame(pd.read_csv(path, dtype=str, keep_default_na=False), "slice_index", path)
    frame["boxes"] = frame["boxes"].map(json.loads)
    return frame


def load_cache(prepared: str | os.PathLike, uid: str, mmap: bool = True) -> np.ndarray:
    """The uint8 ``(Z, size, size, 3)`` image array of one study (memory-mapped by default)."""
    path = Path(prepared) / "cache" / f"{uid}.npy"
    if not path.is_file():
        raise CSpineDataError(path, f"no cached images for study {uid}")
    return np.load(path, mmap_mode="r" if mmap else None)


def load_roi(prepared: str | os.PathLike, uid: str):
    """The spine window (:class:`keras_cspine.data.roi.SpineRoi`) a study's cached images show,
    or None when they show the whole slice (prepared without ``roi_mm``: ``prepare.json`` says
    so, and the study's marker is not needed)."""
    settings = Path(prepared) / "prepare.json"
    if settings.is_file() and (read_settings(prepared).get("settings") or {}).get("roi_mm") is None:
        return None
    path = Path(prepared) / "studies" / f"{uid}.json"
    try:
        roi = json.loads(path.read_text(encoding="utf-8")).get("roi")
        return None if roi is None else SpineRoi.from_json(roi)
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise CSpineDataError(path, f"no readable record of the study's window ({err})") from err


def read_settings(prepared: str | os.PathLike) -> dict[str, Any]:
    """``prepare.json`` of a prepare folder."""
    path = Path(prepared) / "prepare.json"
    if not path.is_file():
        raise CSpineDataError(path, "not a prepare folder (no prepare.json)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------
# What a study's result depends on (its input fingerprint)
# --------------------------------------------------------------------------------------------
#: the parts of a fingerprint, in the words the log uses
INPUT_PARTS = {"dicom": "DICOM files", "segmentation": "segmentation",
               "boxes": "rows of train_bounding_boxes.csv", "labels": "row of train.csv"}  # fmt: skip


def _digest(obj: Any) -> str:
    payload = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def _segmentation_entry(path: Path | None, old: dict | None) -> dict | None:
    """Name, size, mtime and SHA-1 of a segmentation; the hash is reused while size and mtime hold."""
    if path is None:
        return None
    stat = path.stat()
    entry: dict[str, Any] = {"file": path.name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if isinstance(old, dict) and old.get("sha1") and all(old.get(k) == v for k, v in entry.items()):
        return {**entry, "sha1": old["sha1"]}
    sha = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
    return {**entry, "sha1": sha.hexdigest()}


def changed_inputs(old: dict | None, new: dict) -> list[str]:
    """The parts of :data:`INPUT_PARTS` that differ between two fingerprints ([] when the same).

    A segmentation counts as changed when its name or content (SHA-1) changed, not its mtime.
    """
    if not isinstance(old, dict):
        return list(INPUT_PARTS)

    def content(inputs: dict, part: str) -> Any:
        value = inputs.get(part)
        return (value.get("file"), value.get("sha1")) if isinstance(value, dict) else value

    return [part for part in INPUT_PARTS if content(old, part) != content(new, part)]


@dataclass
class _Study:
    """One study of this run: its files, its fingerprint and what the last run left of it."""

    uid: str
    marker: dict[str, Any] | None = None
    numbered: list[tuple[int, Path]] = field(default_factory=list)
    listing_error: CSpineDataError | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    why: list[str] = field(default_factory=list)  # why it is (re)done; [] when reused


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------
def prepare_dataset(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    size: int = 224,
    mode: str = "bone",
    split: str = "train",
    roi_mm: float | None = None,
    studies: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int | None = None,
    chunk_slices: int = 48,
    decoder: str = "auto",
    on_error: str = "raise",
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish, or bring up to date) the slice index and image cache of ``data_dir``.

    Args:
        data_dir: an RSNA-layout folder.
        out_dir: the prepare folder (created; must not be a file or the dataset folder).
        size, mode, split, roi_mm: see :class:`PrepareSettings` (size from 16 to 1024).
        studies: only these study UIDs (default: every study of the split); each must be a
            folder of ``<split>_images/``.
        limit: at most this many studies (after sorting), >= 1, for quick looks.
        workers: processes, >= 1 (default None: all cores); 1 runs in this process.
        chunk_slices: slices per work unit (>= 1).
        decoder: DICOM decoder choice passed to ``keras_cspine.io.dicom.read_slice``.
        on_error: "raise" stops at the first bad file; "skip" records it in errors.csv and goes on.
        progress: show a tqdm bar.

    Returns:
        The summary written to ``prepare.json`` (one shard of the studies: :mod:`.prepare_shards`).

    Raises:
        ValueError: an argument value out of range.
        CSpineDataError: a path that cannot serve (naming it), bad input with ``on_error="raise"``,
            or another ``prepare`` writing into ``out_dir``.
    """
    settings = _check_arguments(size, mode, split, roi_mm, on_error, workers, limit, chunk_slices)
    cores = os.cpu_count() or 1
    data, out = Path(data_dir), Path(out_dir)
    layout = _check_folders(data, out, split)
    uids = _select_studies(layout, split, studies, limit)
    out.mkdir(parents=True, exist_ok=True)
    with workers_.exclusive_folder(out), workers_.sigterm_exits():
        return _Prepare(layout, out, settings, uids, on_error == "skip", workers or cores,
                        chunk_slices, decoder, progress).run()  # fmt: skip


def _check_arguments(size, mode, split, roi_mm, on_error, workers, limit,
                     chunk_slices) -> PrepareSettings:  # fmt: skip
    """The settings of :func:`prepare_dataset`'s arguments, or a ValueError naming the bad one."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    cores = os.cpu_count() or 1
    for name, value, default in (("workers", workers, f"all {cores} cores"),
                                 ("limit", limit, "every study"), ("chunk_slices", chunk_slices, "")):  # fmt: skip
        whole = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        if (value is not None or not default) and (not whole or value < 1):
            hint = f" (None for {default})" if default else ""
            raise ValueError(f"{name} must be a whole number >= 1{hint}, got {value!r}")
    return PrepareSettings(size=size, mode=mode, split=split, roi_mm=roi_mm)


def _check_folders(data: Path, out: Path, split: str) -> RsnaLayout:
    """The dataset folder as an RsnaLayout, and an output folder that can serve, or an error."""
    if data.is_file():
        raise CSpineDataError(data, "is a file, not a folder (give the RSNA-layout dataset folder)")
    layout = RsnaLayout(data)  # raises "dataset folder not found"
    images = layout.root / f"{split}_images"
    if not images.is_dir():
        raise CSpineDataError(data, f"not an RSNA-layout folder: it has no {split}_images/ folder "
                                    f"(expected {split}_images/<StudyInstanceUID>/<n>.dcm; "
                                    "`python -m keras_cspine synth DIR` writes such a folder)")  # fmt: skip
    if out.exists() and not out.is_dir():
        raise CSpineDataError(out, "is a file, not a folder")
    if out.resolve() == data.resolve():
        raise CSpineDataError(out, "is the dataset folder itself; choose a separate output folder")
    if out.resolve().is_relative_to(images.resolve()):
        raise CSpineDataError(out, f"is inside {images}, where it would be read as a study; "
                                   "choose another folder")  # fmt: skip
    return layout


def _select_studies(layout: RsnaLayout, split: str, studies: Sequence[str] | None,
                    limit: int | None) -> list[str]:  # fmt: skip
    images = layout.root / f"{split}_images"
    available = layout.list_studies(split)
    if studies is None:
        uids = [uid for uid in available if not uid.startswith(".")]  # .ipynb_checkpoints & co
        if not uids:
            raise CSpineDataError(images, "no study folders in it")
    else:
        if isinstance(studies, str):
            raise ValueError(f"studies must be a list of StudyInstanceUIDs, got {studies!r}")
        uids = list(dict.fromkeys(str(uid) for uid in studies))
        if not uids:
            raise ValueError("studies is empty: give at least one StudyInstanceUID (None for all)")
        unknown = [uid for uid in uids if uid not in set(available)]
        if unknown:
            raise CSpineDataError(images / unknown[0],
                                  f"no such study: {unknown[0]!r} is not a folder of {images}")  # fmt: skip
    return sorted(uids)[:limit] if limit else sorted(uids)


def _log(message: str) -> None:
    print(f"[prepare] {message}", file=sys.stderr, flush=True)


def _studies(n: int) -> str:
    return f"{n} {'study' if n == 1 else 'studies'}"


class _Prepare:
    """One run of :func:`prepare_dataset` over checked arguments, holding the folder's lock."""

    def __init__(self, layout: RsnaLayout, out: Path, settings: PrepareSettings, uids: list[str],
                 skip: bool, workers: int, chunk_slices: int, decoder: str, progress: bool):  # fmt: skip
        self.layout, self.out, self.settings, self.uids = layout, out, settings, uids
        self.strict, self.workers, self.chunk_slices = not skip, workers, chunk_slices
        self.decoder, self.progress = decoder, progress
        self.digest = settings.digest()
        self.boxes_path = layout.root / "train_bounding_boxes.csv"
        self.failures: list[dict[str, str]] = []  # errors of the studies that failed this run
        self.skipped: list[str] = []
        self.finished: dict[str, dict[str, Any]] = {}  # uid -> marker, studies done this run
        self.state: dict[str, dict[str, Any]] = {}  # studies being rendered
        self.slices_done = 0

    def marker_path(self, uid: str) -> Path:
        return self.out / "studies" / f"{uid}.json"

    def rows_path(self, uid: str) -> Path:
        return self.out / "studies" / f"{uid}.csv"

    def cache_path(self, uid: str) -> Path:
        return self.out / "cache" / f"{uid}.npy"

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        out, settings, layout = self.out, self.settings, self.layout
        previous = self._previous_summary()
        if previous is not None and previous.get("settings_digest") != self.digest:
            raise CSpineDataError(out, f"prepared with other settings {previous.get('settings')}; "
                                       "choose another output folder or delete this one to use "
                                       f"{asdict(settings)}")  # fmt: skip
        for folder, pattern in LEFTOVERS.items():  # what a killed run left half-written
            (out / folder).mkdir(exist_ok=True)
            for path in (out / folder).glob(".*"):
                if pattern.fullmatch(path.name) and path.is_file():
                    path.unlink(missing_ok=True)
        self.boxes, labels = pd.DataFrame(), None
        if settings.split == "train":
            self.boxes = layout.bounding_boxes()
            labels = layout.train_labels() if (layout.root / "train.csv").is_file() else None
        studies = self._fingerprint(labels)
        todo = [study for study in studies if study.why]
        reused = [study for study in studies if not study.why]
        for study in reused:  # the same content under a newer mtime (a touched segmentation)
            if study.marker.get("inputs") != study.inputs:
                write_json(self.marker_path(study.uid), {**study.marker, "inputs": study.inputs})

        started = time.perf_counter()
        if todo:
            self._run_studies(todo)
        elapsed = time.perf_counter() - started

        markers = {**{s.uid: s.marker for s in reused}, **self.finished}
        done = [uid for uid in self.uids if uid in markers]
        index_digest = _digest([[uid, markers[uid].get("rows_sha1")] for uid in done])
        if (not (out / "index.csv").is_file() or previous is None
                or previous.get("index_digest") != index_digest):  # fmt: skip
            workers_.write_index(out, [self.rows_path(u) for u in done], INDEX_COLUMNS)
        errors = workers_.write_errors(out, [*[e for u in done for e in markers[u].get("errors", [])],
                                     *self.failures])  # exactly the current failures
        changed = {s.uid: s.why for s in todo if s.why != ["new"] and s.uid in self.finished}
        self._report(changed, len(reused))
        summary = {
            "version": __version__, "data_dir": str(layout.root.resolve()),
            "settings": asdict(settings), "settings_digest": self.digest,
            "studies": len(done), "studies_processed_this_run": len(todo) - len(self.skipped),
            "studies_reused": len(reused), "studies_changed": changed,
            "studies_skipped": self.skipped, "slices_processed_this_run": self.slices_done,
            "seconds_this_run": round(elapsed, 3), "errors": len(errors),
            "index_digest": index_digest,
        }  # fmt: skip
        write_json(out / "prepare.json", summary)
        return summary

    def _previous_summary(self) -> dict[str, Any] | None:
        path = self.out / "prepare.json"
        try:
            previous = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CSpineDataError(path, f"not readable JSON ({err}); delete it to rebuild it") from err
        if previous is not None and not isinstance(previous, dict):
            raise CSpineDataError(path, "not a prepare summary; delete it to rebuild it")
        return previous

    def _fingerprint(self, labels: pd.DataFrame | None) -> list[_Study]:
        """Each study's files, input fingerprint, and whether (and why) it must be (re)done."""
        box_rows = {str(uid): group[["slice_number", "x", "y", "width", "height"]].to_numpy(float).tolist()
                    for uid, group in self.boxes.groupby("StudyInstanceUID", sort=False)
                    } if not self.boxes.empty else {}  # fmt: skip
        label_rows = {} if labels is None else {  # as text: the same whatever numpy's scalar types
            str(row[0]): [str(v) for v in row[1:]]
            for row in labels.set_index("StudyInstanceUID").itertuples()}
        studies = []
        for uid in self.uids:
            study = _Study(uid)
            with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
                marker = json.loads(self.marker_path(uid).read_text(encoding="utf-8"))
                study.marker = marker if isinstance(marker, dict) else None
            old = (study.marker or {}).get("inputs") or {}
            try:
                study.numbered = list_series_files(self.layout.series_dir(uid, self.settings.split))
                files = [[n, p.name, st.st_size, st.st_mtime_ns]
                         for n, p in study.numbered for st in (p.stat(),)]  # fmt: skip
                seg = _segmentation_entry(self.layout.segmentation_path(uid), old.get("segmentation"))
            except (CSpineDataError, OSError) as err:
                study.listing_error = err if isinstance(err, CSpineDataError) else CSpineDataError(
                    err.filename or self.layout.root, f"cannot read: {err.strerror or err}")  # fmt: skip
                study.why = ["unreadable"]
                studies.append(study)
                continue
            study.inputs = {"dicom": _digest(files), "n_files": len(files), "segmentation": seg,
                            "boxes": _digest(box_rows.get(uid, [])),
                            "labels": _digest(label_rows.get(uid))}  # fmt: skip
            study.why = self._why_redo(study)
            studies.append(study)
        return studies

    def _why_redo(self, study: _Study) -> list[str]:
        marker = study.marker
        if marker is None or marker.get("settings_digest") != self.digest:
            return ["new"]
        if marker.get("format") != MARKER_FORMAT:
            return ["prepared by an older version"]
        cache = self.cache_path(study.uid)
        if (not self.rows_path(study.uid).is_file() or not cache.is_file()
                or cache.stat().st_size != marker.get("cache_bytes")):  # fmt: skip
            return ["output files missing"]
        changed = changed_inputs(marker.get("inputs"), study.inputs)
        if changed:
            return [INPUT_PARTS[part] for part in changed]
        if self.strict and marker.get("errors"):
            return ["errors recorded by an --on-error skip run"]
        return []

    def _report(self, changed: dict[str, list[str]], n_reused: int) -> None:
        by_reason: dict[str, list[str]] = {}
        for uid, why in changed.items():
            by_reason.setdefault(", ".join(why), []).append(uid)
        if changed:
            _log(f"{_studies(len(changed))} changed since the last run: redone (" + "; ".join(
                f"{why}: {', '.join(uids[:3])}{' ...' if len(uids) > 3 else ''}"
                for why, uids in by_reason.items()) + ")")  # fmt: skip
        if n_reused and (self.finished or self.skipped):
            _log(f"{_studies(n_reused)} unchanged: reused")

    # -- the work --------------------------------------------------------------------------
    def _run_studies(self, todo: list[_Study]) -> None:
        """Render chunks of files (in parallel when workers > 1) and commit each study as soon
        as its last chunk is in.

        Chunks are rendered in file order into ``cache/.<uid>.npy.partial``; when a study's last
        chunk is in, its headers give the series order and the cache is written in that order.
        """
        n_chunks = sum(math.ceil(len(s.numbered) / self.chunk_slices) for s in todo)
        bar = tqdm(total=sum(len(s.numbered) for s in todo), unit="slice",
                   desc=f"prepare {self.settings.mode} {self.settings.size}px",
                   disable=not self.progress, file=sys.stderr)  # fmt: skip

        def chunk_done(key: tuple[str, int], future: cf.Future) -> None:
            uid, start = key
            if uid not in self.state:
                return  # the study already failed
            try:
                metas = future.result()
                info = self.state[uid]
                info["metas"][start : start + len(metas)] = metas
                bar.update(len(metas))
                self.slices_done += len(metas)
                info["left"] -= 1
                if info["left"] == 0:
                    self._finish_study(uid, info)
                    self.state.pop(uid)
            except (CSpineDataError, OSError, ValueError) as err:
                self._fail(uid, err)

        try:
            workers_.run_jobs(self._chunks(todo), max(1, min(self.workers, n_chunks)), chunk_done)
        except (KeyboardInterrupt, SystemExit):
            bar.close()
            _log(f"interrupted: the {_studies(len(self.finished))} finished in this run are kept; "
                 "the same command again resumes")  # fmt: skip
            raise
        finally:
            bar.close()
            for info in self.state.values():  # interrupted: drop partial caches, keep finished studies
                Path(info["tmp"]).unlink(missing_ok=True)

    def _chunks(self, todo: list[_Study]) -> Iterator[tuple[tuple[str, int], Callable, tuple]]:
        """((study, first file rank), function, arguments) of every chunk, study after study."""
        size, chunk = self.settings.size, self.chunk_slices
        for study in todo:
            uid, n = study.uid, len(study.numbered)
            if study.listing_error is not None:
                self._fail(uid, study.listing_error)
                continue
            tmp = self.out / "cache" / f".{uid}.npy.partial"
            starts = range(0, n, chunk)
            self.state[uid] = {"study": study, "tmp": tmp, "metas": [None] * n,
                               "left": len(starts), "errors": []}  # fmt: skip
            try:
                np.lib.format.open_memmap(tmp, "w+", np.uint8, (n, size, size, 3)).flush()
            except OSError as err:
                self._fail(uid, err)
                continue
            roi = None
            if self.settings.roi_mm is not None:
                try:  # a few slices of the study, read here, before its chunks are handed out
                    roi = read_study_roi(study.numbered[0][1].parent, self.settings.roi_mm,
                                         self.decoder).to_json()  # fmt: skip
                except (CSpineDataError, OSError, ValueError) as err:
                    self._fail(uid, err)
                    continue
            self.state[uid]["roi"] = roi
            paths = [str(path) for _, path in study.numbered]
            for start in starts:
                if uid not in self.state:
                    break  # failed meanwhile
                args = (paths[start : start + chunk], start, str(tmp), self.settings.mode, size,
                        self.decoder, roi)  # fmt: skip
                yield (uid, start), workers_.render_chunk, args

    def _fail(self, uid: str, err: Exception) -> None:
        """A study that cannot be prepared: raise, or record it and remove what is left of it."""
        info = self.state.pop(uid, {})
        if info.get("tmp") is not None:
            Path(info["tmp"]).unlink(missing_ok=True)
        if self.strict:
            raise err
        for stale in (self.marker_path(uid), self.rows_path(uid), self.cache_path(uid)):
            stale.unlink(missing_ok=True)  # the result of inputs that are no longer there
        path = getattr(err, "path", None) or getattr(err, "filename", None)
        path = path or str(self.layout.root / f"{self.settings.split}_images" / uid)
        problem = getattr(err, "problem", None) or getattr(err, "strerror", None) or str(err)
        self.failures += [*info.get("errors", []), {"path": str(path), "problem": str(problem)}]
        self.skipped.append(uid)

    def _finish_study(self, uid: str, info: dict[str, Any]) -> None:
        """Order the study's slices, write its cache, rows and marker (in that order)."""
        from keras_cspine.io.dicom import series_from_slices

        study: _Study = info["study"]
        errors: list[dict[str, str]] = info["errors"]
        numbers = [number for number, _ in study.numbered]
        meta = series_from_slices(study.numbered[0][1].parent, numbers, info["metas"])
        try:
            labels, known = slice_labels(self.layout, uid, meta)
        except CSpineDataError as err:
            if self.strict:
                raise
            errors.append({"path": str(err.path), "problem": f"{err.problem} (labels left unknown)"})
            labels, known = np.full((len(meta.slices), len(VERTEBRAE)), -1, np.int8), False
        boxes_by_slice = study_boxes(self.boxes, uid, meta, self.boxes_path, errors, self.strict)
        cache_file = f"cache/{uid}.npy"
        rows = index_rows(uid, meta, labels, known, boxes_by_slice, cache_file)
        rank = {number: i for i, number in enumerate(numbers)}
        order = np.array([rank[number] for number in meta.slice_numbers])
        target = self.out / cache_file
        if np.array_equal(order, np.arange(len(order))):
            os.replace(info["tmp"], target)  # file order is series order (head-first)
        else:
            file_order = np.load(info["tmp"], mmap_mode="r")
            with atomic_path(target) as tmp:
                series_order = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                         shape=file_order.shape)  # fmt: skip
                for start in range(0, len(order), 64):
                    series_order[start : start + 64] = file_order[order[start : start + 64]]
                series_order.flush()
                del series_order
            del file_order
            Path(info["tmp"]).unlink()
        text = pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).to_csv(index=False, lineterminator="\n")
        with atomic_write(self.rows_path(uid), newline="") as handle:
            handle.write(text)
        marker = {
            "format": MARKER_FORMAT, "settings_digest": self.digest, "inputs": study.inputs,
            "n_slices": len(rows), "head_first": bool(meta.head_first), "labels_known": known,
            "cache_bytes": target.stat().st_size, "roi": info.get("roi"),
            "rows_sha1": hashlib.sha1(text.encode()).hexdigest(), "errors": errors,
        }  # fmt: skip
        write_json(self.marker_path(uid), marker)  # the commit: the study is done
        self.finished[uid] = marker
