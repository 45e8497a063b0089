"""Prepare: the slice index and the model-ready image cache (the paper's preprocessing, Sec. 2.4).

``python -m keras_cspine prepare DATA_DIR OUT --size 224 --mode bone`` reads every study of an
RSNA-layout folder once and writes (see docs/internals.md for the contract):

- ``OUT/index.csv``: one row per slice (study, slice number, position, slice ratio, C1..C7 presence
  from the segmentation or -1 when unknown, fracture boxes), validated against
  ``data_spec/slice_index.schema.json``;
- ``OUT/cache/<uid>.npy``: uint8 ``(Z, size, size, 3)`` images in series order, memory-mappable;
- ``OUT/prepare.json``: the settings and a summary; ``OUT/errors.csv`` with ``--on-error skip``.

Work is split into chunks of slices and spread over processes, so one long study uses every core.
Each study is written to a temporary name and renamed when complete, with a marker in
``OUT/studies/``: a killed run resumes at the first unfinished study, and a second run with the same
settings does no work.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from keras_cspine import __version__
from keras_cspine.data.prepare_worker import render_chunk
from keras_cspine.errors import BoxError, CSpineDataError
from keras_cspine.io.dicom import list_series_files
from keras_cspine.io.rsna import VERTEBRAE, RsnaLayout, validate_frame
from keras_cspine.utils import atomic_path, atomic_write, write_json

CACHE_FORMAT = 1
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
    """

    size: int = 224
    mode: str = "bone"
    split: str = "train"

    def __post_init__(self):
        from keras_cspine.data.preprocess import MODES

        if self.mode not in MODES or self.mode == "hu":
            raise ValueError(f"mode must be one of {[m for m in MODES if m != 'hu']}, got {self.mode!r}")
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size must be an integer >= 8, got {self.size!r}")
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")

    def digest(self) -> str:
        payload = json.dumps({**asdict(self), "cache_format": CACHE_FORMAT}, sort_keys=True)
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


def read_settings(prepared: str | os.PathLike) -> dict[str, Any]:
    """``prepare.json`` of a prepare folder."""
    path = Path(prepared) / "prepare.json"
    if not path.is_file():
        raise CSpineDataError(path, "not a prepare folder (no prepare.json)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


# --------------------------------------------------------------------------------------------
# Work units (module level so that worker processes can run them)
# --------------------------------------------------------------------------------------------
def _slice_labels(layout: RsnaLayout, uid: str, meta) -> tuple[np.ndarray, bool]:
    """(Z, 7) presence labels from the segmentation, or -1 and False when there is none."""
    seg_path = layout.segmentation_path(uid)
    if seg_path is None:
        return np.full((len(meta.slices), len(VERTEBRAE)), -1, np.int8), False
    from keras_cspine.io.nifti import align_segmentation, vertebra_presence

    seg = align_segmentation(seg_path, meta)
    return vertebra_presence(seg).astype(np.int8), True


def _study_boxes(
    boxes: pd.DataFrame, uid: str, meta, boxes_path: Path, errors: list[dict[str, str]], strict: bool
) -> dict[int, list[list[float]]]:
    """Boxes of a study keyed by slice number, each checked to lie inside its slice."""
    by_slice: dict[int, list[list[float]]] = {}
    if boxes.empty:
        return by_slice
    rows_of = {n: (s.rows, s.columns) for n, s in zip(meta.slice_numbers, meta.slices)}
    for row in boxes[boxes.StudyInstanceUID == uid].itertuples(index=False):
        number = int(row.slice_number)
        box = [float(row.x), float(row.y), float(row.width), float(row.height)]
        problem = None
        if number not in rows_of:
            problem = f"study {uid}: box on slice {number}, which is not in the series"
        else:
            rows, columns = rows_of[number]
            if box[0] + box[2] > columns + 0.5 or box[1] + box[3] > rows + 0.5:
                problem = (
                    f"study {uid} slice {number}: box {box} reaches outside the "
                    f"{columns}x{rows} image"
                )
        if problem:
            if strict:
                raise BoxError(boxes_path, problem)
            errors.append({"path": str(boxes_path), "problem": problem})
            continue
        by_slice.setdefault(number, []).append(box)
    return by_slice


def _index_rows(uid: str, meta, labels: np.ndarray, known: bool, boxes, cache_file: str):
    n = len(meta.slices)
    positions = np.asarray(meta.positions_mm, dtype=float)
    rows = []
    for i, (number, sl) in enumerate(zip(meta.slice_numbers, meta.slices)):
        slice_boxes = boxes.get(int(number), [])
        rows.append(
            {
                "StudyInstanceUID": uid,
                "slice_number": int(number),
                "series_index": i,
                "n_slices": n,
                "z_mm": round(float(sl.image_position[2]), 4),
                "position_mm": round(float(positions[0] - positions[i]), 4),
                "slice_ratio": round(i / (n - 1), 6) if n > 1 else 0.0,
                **{v: int(labels[i, k]) for k, v in enumerate(VERTEBRAE)},
                "labels_known": int(known),
                "has_fracture_box": int(bool(slice_boxes)),
                "boxes": json.dumps(slice_boxes),
                "rows": int(sl.rows),
                "columns": int(sl.columns),
                "cache_file": cache_file,
            }
        )
    return rows


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
    studies: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int | None = None,
    chunk_slices: int = 48,
    decoder: str = "auto",
    on_error: str = "raise",
    progress: bool = True,
) -> dict[str, Any]:
    """Build (or finish) the slice index and image cache of ``data_dir`` in ``out_dir``.

    Args:
        data_dir: an RSNA-layout folder.
        out_dir: the prepare folder (created).
        size, mode, split: see :class:`PrepareSettings`.
        studies: only these study UIDs (default: every study of the split).
        limit: at most this many studies (after sorting), for quick looks.
        workers: processes (default: all cores); 1 runs in this process.
        chunk_slices: slices per work unit.
        decoder: DICOM decoder choice passed to ``keras_cspine.io.dicom.read_slice``.
        on_error: "raise" stops at the first bad file; "skip" records it in errors.csv and goes on.
        progress: show a tqdm bar.

    Returns:
        The summary written to ``prepare.json``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    settings = PrepareSettings(size=size, mode=mode, split=split)
    strict = on_error == "raise"
    layout = RsnaLayout(data_dir)
    out = Path(out_dir)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    digest = settings.digest()
    previous = out / "prepare.json"
    if previous.is_file():
        old = json.loads(previous.read_text())
        if old.get("settings_digest") != digest:
            raise CSpineDataError(
                out,
                f"prepared with other settings {old.get('settings')}; choose another output "
                f"folder or delete this one to use {asdict(settings)}",
            )

    uids = list(studies) if studies else layout.list_studies(split)
    uids = sorted(uids)[:limit] if limit else sorted(uids)
    if not uids:
        raise CSpineDataError(layout.root / f"{split}_images", "no studies found")
    boxes_path = layout.root / "train_bounding_boxes.csv"
    boxes = layout.bounding_boxes() if split == "train" else pd.DataFrame()

    def marker(uid: str) -> Path:
        return out / "studies" / f"{uid}.json"

    def is_done(uid: str) -> bool:
        path = marker(uid)
        if not path.is_file() or not (out / "studies" / f"{uid}.csv").is_file():
            return False
        return json.loads(path.read_text()).get("settings_digest") == digest

    errors: list[dict[str, str]] = []
    skipped: list[str] = []
    todo = [uid for uid in uids if not is_done(uid)]
    started = time.perf_counter()
    n_slices_done = 0
    if todo:
        n_slices_done, skipped = _run_studies(
            layout, todo, out, settings, boxes, boxes_path, errors, strict,
            workers, chunk_slices, decoder, progress, marker, digest,
        )  # fmt: skip
    elapsed = time.perf_counter() - started

    done = [uid for uid in uids if is_done(uid)]
    index_path = out / "index.csv"
    if todo or not index_path.is_file():
        parts = [pd.read_csv(out / "studies" / f"{u}.csv", dtype=str, keep_default_na=False)
                 for u in done]  # fmt: skip
        index = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=INDEX_COLUMNS)
        with atomic_write(index_path, newline="") as handle:
            index[list(INDEX_COLUMNS)].to_csv(handle, index=False)
    _record_errors(out / "errors.csv", errors)
    summary = {
        "version": __version__,
        "data_dir": str(layout.root.resolve()),
        "settings": asdict(settings),
        "settings_digest": digest,
        "studies": len(done),
        "studies_processed_this_run": len(todo) - len(skipped),
        "studies_skipped": skipped,
        "slices_processed_this_run": n_slices_done,
        "seconds_this_run": round(elapsed, 3),
        "errors": len(errors),
    }
    write_json(out / "prepare.json", summary)
    return summary


def _record_errors(path: Path, errors: list[dict[str, str]]) -> None:
    if not errors and not path.is_file():
        return
    old = pd.read_csv(path, dtype=str) if path.is_file() else pd.DataFrame(columns=["path", "problem"])
    frame = pd.concat([old, pd.DataFrame(errors, columns=["path", "problem"])], ignore_index=True)
    with atomic_write(path, newline="") as handle:
        frame.drop_duplicates().to_csv(handle, index=False)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Worker processes that start fast and are safe beside TensorFlow or torch.

    Plain fork is not safe once TensorFlow runs threads in the parent; spawn re-imports everything
    in every worker (seconds each). A forkserver imports the decoding stack once and forks workers
    from that clean process.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        preload = ["keras_cspine.data.prepare_worker", "pydicom", "PIL.Image"]
        from keras_cspine.io.dicom import dicomsdl_available

        if dicomsdl_available():
            preload.append("dicomsdl")
        context.set_forkserver_preload(preload)
        return context
    return multiprocessing.get_context("spawn")


def _run_studies(
    layout, todo, out, settings, boxes, boxes_path, errors, strict,
    workers, chunk_slices, decoder, progress, marker, digest,
):  # fmt: skip
    """Allocate each study's cache, render chunks of files in parallel, then finish each study.

    Chunks are rendered in file order into ``.<uid>.npy.partial``; when a study's last chunk is
    in, its headers give the series order and the cache is written in that order.
    """
    workers = workers or os.cpu_count() or 1
    pool: cf.Executor | None = None
    if workers > 1:
        pool = cf.ProcessPoolExecutor(workers, mp_context=_worker_context())
    elif workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")

    def submit(fn, *args):
        if pool is None:
            future: cf.Future = cf.Future()
            try:
                future.set_result(fn(*args))
            except Exception as err:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(err)
            return future
        return pool.submit(fn, *args)

    skipped: list[str] = []
    state: dict[str, dict[str, Any]] = {}
    slices_done = 0
    bar = tqdm(total=0, unit="slice", desc=f"prepare {settings.mode} {settings.size}px",
               disable=not progress, file=sys.stderr)  # fmt: skip

    def fail(uid: str, err: Exception) -> None:
        info = state.pop(uid, {})
        tmp = info.get("tmp")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if strict:
            raise err
        path = getattr(err, "path", None) or str(layout.root / f"{settings.split}_images" / uid)
        errors.append({"path": str(path), "problem": getattr(err, "problem", str(err))})
        skipped.append(uid)

    try:
        pending: dict[cf.Future, tuple[str, int]] = {}  # future -> (study, first file rank)
        for uid in todo:
            try:
                numbered = list_series_files(layout.series_dir(uid, settings.split))
            except CSpineDataError as err:
                fail(uid, err)
                continue
            n = len(numbered)
            tmp = out / "cache" / f".{uid}.npy.partial"
            np.lib.format.open_memmap(
                tmp, mode="w+", dtype=np.uint8, shape=(n, settings.size, settings.size, 3)
            ).flush()
            state[uid] = {"numbered": numbered, "tmp": tmp, "metas": [None] * n, "left": 0}
            bar.total += n
            paths = [str(path) for _, path in numbered]
            for start in range(0, n, chunk_slices):
                job = submit(render_chunk, paths[start : start + chunk_slices], start, str(tmp),
                             settings.mode, settings.size, decoder)  # fmt: skip
                pending[job] = (uid, start)
                state[uid]["left"] += 1
        bar.refresh()
        while pending:
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                uid, start = pending.pop(future)
                if uid not in state:
                    continue  # the study already failed
                try:
                    metas = future.result()
                except (CSpineDataError, OSError, ValueError) as err:
                    fail(uid, err)
                    continue
                info = state[uid]
                info["metas"][start : start + len(metas)] = metas
                bar.update(len(metas))
                slices_done += len(metas)
                info["left"] -= 1
                if info["left"] == 0:
                    try:
                        _finish_study(layout, uid, info, out, boxes, boxes_path, errors, strict,
                                      marker, digest)  # fmt: skip
                    except (CSpineDataError, OSError, ValueError) as err:
                        fail(uid, err)
                        continue
                    state.pop(uid)
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        for info in state.values():  # interrupted: drop partial caches, keep finished studies
            Path(info["tmp"]).unlink(missing_ok=True)
    return slices_done, skipped


def _finish_study(layout, uid, info, out, boxes, boxes_path, errors, strict, marker, digest):
    from keras_cspine.io.dicom import series_from_slices

    numbers = [number for number, _ in info["numbered"]]
    meta = series_from_slices(info["numbered"][0][1].parent, numbers, info["metas"])
    try:
        labels, known = _slice_labels(layout, uid, meta)
    except CSpineDataError as err:
        if strict:
            raise
        errors.append({"path": str(err.path), "problem": f"{err.problem} (labels left unknown)"})
        labels, known = np.full((len(meta.slices), len(VERTEBRAE)), -1, np.int8), False
    study_boxes = _study_boxes(boxes, uid, meta, boxes_path, errors, strict)
    cache_file = f"cache/{uid}.npy"
    rows = _index_rows(uid, meta, labels, known, study_boxes, cache_file)
    rank = {number: i for i, number in enumerate(numbers)}
    order = np.array([rank[number] for number in meta.slice_numbers])
    if np.array_equal(order, np.arange(len(order))):
        os.replace(info["tmp"], out / cache_file)  # file order is series order (head-first)
    else:
        file_order = np.load(info["tmp"], mmap_mode="r")
        with atomic_path(out / cache_file) as tmp:
            series_order = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                                     shape=file_order.shape)  # fmt: skip
            for start in range(0, len(order), 64):
                series_order[start : start + 64] = file_order[order[start : start + 64]]
            series_order.flush()
            del series_order
        del file_order
        Path(info["tmp"]).unlink()
    with atomic_write(out / "studies" / f"{uid}.csv", newline="") as handle:
        pd.DataFrame(rows, columns=list(INDEX_COLUMNS)).to_csv(handle, index=False)
    write_json(marker(uid), {"settings_digest": digest, "n_slices": len(rows),
                             "head_first": bool(meta.head_first), "labels_known": known})  # fmt: skip
