"""The stage 2 YOLO dataset (paper Section 2.6 and Table 3's data): fracture boxes as YOLO labels.

``python -m keras_cspine detect export DATA_DIR OUT`` turns an RSNA-layout folder into an
Ultralytics dataset:

- every slice named in ``train_bounding_boxes.csv`` becomes an image (rendered from HU by
  ``keras_cspine.data.preprocess.to_model_image``, the same code as stage 1, at the chosen size and
  window mode) with a label file: one line ``0 cx cy w h`` per box (class 0 "fracture", centre
  and size normalised to the image, clipped to it);
- negatives: slices without fracture with empty label files. The paper adds about 1,000 beside
  the ~7,200 boxed RSNA slices; here ``negatives`` (a count) or ``negative_ratio`` (default 0.15,
  the paper's proportion) sizes them to the data. They come from studies whose ``train.csv``
  ``patient_overall`` is 0, or (``negative_source="unboxed"``, and as a fallback when there is
  no such study) from slices far from any box;
- ``roi_mm`` (beyond the paper): each image shows only a square window of that many mm around the
  study's cervical column (``keras_cspine.data.roi``), its boxes relative to the window;
- the split is by study (``keras_cspine.data.splits.split_studies``, fractured and healthy studies
  split separately so both kinds reach every split), never by slice; ``holdout=True`` puts every
  study in the val split instead: an independent test set (e.g. a ``synth`` dataset with
  another seed) for ``detect val``, never seen in training nor in choosing the best epoch;
- ``data.yaml``, ``manifest.csv`` (split, kind, image, label, study, slice, source DICOM, native
  size, boxes), ``export.json`` (settings, counts) and, with ``on_error="skip"``,
  ``errors.csv``.

Every box is checked against its slice: a box reaching outside the image (by more than half a
pixel) or with a slice number missing from the series raises ``BoxError`` naming the CSV, or is
recorded in ``errors.csv`` and left out with ``on_error="skip"``. The export is deterministic for a
seed, written atomically, and resumable: a killed run with the same settings only renders what is
missing.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from keras_cspine.errors import BoxError, CSpineDataError
from keras_cspine.utils import atomic_path, atomic_write, write_json

CLASS_NAMES = {0: "fracture"}
SPLITS = ("train", "val", "test")
BOX_TOLERANCE = 0.5  # pixels a box may overhang its slice before it is an error (then clipped)
EXPORT_FORMAT = 1
MANIFEST_COLUMNS = (
    "split", "kind", "image", "label", "StudyInstanceUID", "slice_number", "source", "rows",
    "columns", "n_boxes", "boxes", "clipped", "roi",
)  # fmt: skip


@dataclass(frozen=True)
class ExportConfig:
    """Settings of a YOLO export (``configs/detect_export.yaml``; ``--set key=value``).

    Args:
        size: side of the square images, pixels.
        mode: ``keras_cspine.data.preprocess`` mode: "bone", "multiwindow" or "paper".
        roi_mm: render only a square window of this many mm around the cervical column of each
            study (``keras_cspine.data.roi``; beyond the paper) instead of the whole slice;
            None: the whole slice, as the paper. Boxes outside the window are left out and
            counted as ``outside_roi`` (a positive slice left with none gives no image).
        negatives: number of negative slices; None sizes them with ``negative_ratio``.
        negative_ratio: negatives per boxed slice when ``negatives`` is None (0.15 ~ the paper's
            1,000 beside ~7,200 RSNA box slices).
        negative_source: "healthy" (slices of studies with patient_overall 0; falls back to
            "unboxed" when there is none) or "unboxed" (slices of boxed studies at least
            ``negative_margin`` slices from any box).
        negative_margin: see ``negative_source``.
        val_fraction: fraction of studies held out for validation (Table 3 is measured there).
        test_fraction: fraction of studies held out as a test split (0: none).
        holdout: every study goes to the val split (no train split; ``val_fraction`` and
            ``test_fraction`` are ignored): an independent held-out set for ``detect val``.
        seed: seed of the split and of the choice of negatives.
        on_error: "raise" at the first bad box or slice, or "skip" and record it.
        drop_known_bad: leave out the two studies the community drops (io.rsna.KNOWN_BAD_STUDIES).
        decoder: DICOM decoder for ``keras_cspine.io.dicom.read_slice``.
        workers: processes rendering images (1: in this process).
    """

    size: int = 512
    mode: str = "bone"
    roi_mm: float | None = None
    negatives: int | None = None
    negative_ratio: float = 0.15
    negative_source: str = "healthy"
    negative_margin: int = 5
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    holdout: bool = False
    seed: int = 0
    on_error: str = "raise"
    drop_known_bad: bool = True
    decoder: str = "auto"
    workers: int = 1

    def __post_init__(self):
        if not isinstance(self.size, int) or self.size < 8:
            raise ValueError(f"size must be an integer >= 8, got {self.size!r}")
        if self.mode not in ("bone", "multiwindow", "paper"):
            raise ValueError(f"mode must be 'bone', 'multiwindow' or 'paper', got {self.mode!r}")
        if self.roi_mm is not None and not self.roi_mm > 0:
            raise ValueError(f"roi_mm must be > 0 or None, got {self.roi_mm!r}")
        if self.negatives is not None and self.negatives < 0:
            raise ValueError(f"negatives must be >= 0 or None, got {self.negatives!r}")
        if self.negative_ratio < 0:
            raise ValueError(f"negative_ratio must be >= 0, got {self.negative_ratio!r}")
        if self.negative_source not in ("healthy", "unboxed"):
            raise ValueError(
                f"negative_source must be 'healthy' or 'unboxed', got {self.negative_source!r}"
            )
        if self.negative_margin < 0:
            raise ValueError(f"negative_margin must be >= 0, got {self.negative_margin!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if not 0.0 <= self.test_fraction < 1.0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"test_fraction must be in [0, 1) with val_fraction + test_fraction < 1, "
                f"got {self.test_fraction!r}"
            )
        if not isinstance(self.holdout, bool):
            raise ValueError(f"holdout must be true or false, got {self.holdout!r}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.on_error!r}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers!r}")


@dataclass(frozen=True)
class ExportItem:
    """One slice to export: where it goes, where it comes from, its native-pixel boxes."""

    split: str
    kind: str  # "positive" or "negative"
    uid: str
    slice_number: int
    source: str
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    roi: tuple[int, int, int] | None = None  # SpineRoi (top, left, side) of the study

    @property
    def name(self) -> str:
        return f"{self.uid}_{self.slice_number}"


# --------------------------------------------------------------------------------------------
# Boxes
def box_problem(box: Sequence[float], rows: int, columns: int, tolerance: float = BOX_TOLERANCE):
    """Why an ``[x, y, width, height]`` native-pixel box does not fit a ``rows x columns`` slice.

    None when it fits (overhanging by at most ``tolerance`` pixels, which clipping removes).
    """
    x, y, w, h = (float(v) for v in box)
    if not all(np.isfinite([x, y, w, h])):
        return f"box {list(box)} has a non-finite coordinate"
    if w <= 0 or h <= 0:
        return f"box {list(box)} has a non-positive width or height"
    if x < -tolerance or y < -tolerance or x + w > columns + tolerance or y + h > rows + tolerance:
        return f"box {list(box)} reaches outside the {columns}x{rows} image"
    return None


def yolo_label(box: Sequence[float], rows: int, columns: int) -> tuple[tuple[float, ...], bool]:
    """Native ``[x, y, w, h]`` -> YOLO ``(cx, cy, w, h)`` on the model image, clipped to the slice.

    ``to_model_image`` pads a non-square slice to a centred square and resizes it
    (``keras_cspine.data.preprocess.square_transform``), so the normalised coordinates are those of the
    box in the padded square and do not depend on the output size. Returns the label and whether
    clipping changed the box.
    """
    from keras_cspine.data.preprocess import square_transform

    x, y, w, h = (float(v) for v in box)
    x1, y1 = min(max(x, 0.0), columns), min(max(y, 0.0), rows)
    x2, y2 = min(max(x + w, 0.0), columns), min(max(y + h, 0.0), rows)
    clipped = (x1, y1, x2, y2) != (x, y, x + w, y + h)
    side = max(rows, columns)
    scale, offset_x, offset_y = square_transform(rows, columns, side)  # scale 1: native pixels
    x1, x2 = x1 * scale + offset_x, x2 * scale + offset_x
    y1, y2 = y1 * scale + offset_y, y2 * scale + offset_y
    label = ((x1 + x2) / 2 / side, (y1 + y2) / 2 / side, (x2 - x1) / side, (y2 - y1) / side)
    return label, clipped


def format_label(labels: Sequence[Sequence[float]], class_id: int = 0) -> str:
    """YOLO label file text: ``class cx cy w h`` per line, 6 decimals."""
    return "".join(f"{class_id} " + " ".join(f"{v:.6f}" for v in lab) + "\n" for lab in labels)


def read_label_file(path: str | os.PathLike) -> np.ndarray:
    """A YOLO label file -> ``(N, 5)`` float array (class, cx, cy, w, h); validated."""
    path = Path(path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            values = [float(p) for p in parts]
        except ValueError:
            values = []
        if len(values) != 5 or not all(0.0 <= v <= 1.0 for v in values[1:]):
            raise CSpineDataError(path, f"line {number}: expected 'class cx cy w h' in [0, 1]")
        rows.append(values)
    return np.asarray(rows, dtype=np.float64).reshape(-1, 5)


def label_boxes_xyxy(path: str | os.PathLike, rows: int, columns: int) -> np.ndarray:
    """The boxes of a YOLO label file as ``(N, 4)`` ``x1, y1, x2, y2`` pixels of a rows x columns
    image."""
    lab = read_label_file(path)
    cx, cy, w, h = lab[:, 1] * columns, lab[:, 2] * rows, lab[:, 3] * columns, lab[:, 4] * rows
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


# --------------------------------------------------------------------------------------------
# Planning
def _slice_numbers(folder: Path) -> list[int]:
    numbers = []
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, dot, ext = entry.name.rpartition(".")
            if dot and ext.lower() == "dcm" and stem.isdigit():
                numbers.append(int(stem))
    return sorted(numbers)


def _allocate(total: int, weights: dict[str, int]) -> dict[str, int]:
    """Split ``total`` in proportion to ``weights`` (largest remainder, ties in SPLITS order)."""
    weight_sum = sum(weights.values())
    if total <= 0 or weight_sum == 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / weight_sum for k, w in weights.items()}
    out = {k: int(np.floor(v)) for k, v in exact.items()}
    rest = total - sum(out.values())
    for k in sorted(weights, key=lambda k: (-(exact[k] - out[k]), SPLITS.index(k)))[:rest]:
        out[k] += 1
    return out


def plan_export(data_dir, config: ExportConfig, errors: list[dict[str, str]] | None = None):
    """Decide which slices go where (no pixels read). Returns ``(items, info)``.

    ``errors`` collects skipped problems when ``config.on_error == "skip"``.
    """
    from keras_cspine.data.splits import split_studies
    from keras_cspine.io.rsna import KNOWN_BAD_STUDIES, RsnaLayout

    errors = [] if errors is None else errors
    strict = config.on_error == "raise"
    layout = RsnaLayout(data_dir)
    boxes_path = layout.root / "train_bounding_boxes.csv"
    if not boxes_path.is_file():
        raise CSpineDataError(boxes_path, "file not found: the YOLO export needs fracture boxes")
    boxes = layout.bounding_boxes()
    if config.drop_known_bad:
        boxes = boxes[~boxes.StudyInstanceUID.isin(KNOWN_BAD_STUDIES)]

    def problem(path, text):
        if strict:
            raise BoxError(path, text) if path == boxes_path else CSpineDataError(path, text)
        errors.append({"path": str(path), "problem": text})

    folders: dict[str, Path] = {}
    numbers: dict[str, list[int]] = {}
    for uid in sorted(set(boxes.StudyInstanceUID)):
        try:
            folders[uid] = layout.series_dir(uid)
        except CSpineDataError as err:
            if strict:
                raise
            errors.append({"path": str(err.path), "problem": err.problem})
            continue
        numbers[uid] = _slice_numbers(folders[uid])

    by_slice: dict[tuple[str, int], list[tuple[float, ...]]] = {}
    present = {uid: set(n) for uid, n in numbers.items()}
    for row in boxes.itertuples(index=False):
        uid, number = row.StudyInstanceUID, int(row.slice_number)
        if uid not in folders:
            continue
        if number not in present[uid]:
            problem(boxes_path, f"study {uid}: box on slice {number}, which is not in the series")
            continue
        box = (float(row.x), float(row.y), float(row.width), float(row.height))
        by_slice.setdefault((uid, number), []).append(box)
    positive_studies = sorted({uid for uid, _ in by_slice})
    if len(positive_studies) < (1 if config.holdout else 2):
        raise CSpineDataError(
            boxes_path, f"{len(positive_studies)} studies with usable boxes: need at least "
            + ("1 for a held-out set" if config.holdout else "2 to split into train and validation")
        )  # fmt: skip

    healthy: list[str] = []
    if (layout.root / "train.csv").is_file():
        labels = layout.train_labels()
        listed = set(layout.list_studies("train"))
        healthy = sorted(
            uid
            for uid in labels.StudyInstanceUID[labels.patient_overall == 0]
            if uid in listed and uid not in by_slice and uid not in KNOWN_BAD_STUDIES
        )
    source_used = config.negative_source
    if source_used == "healthy" and not healthy:
        source_used = "unboxed"

    fractions = dict(val_fraction=config.val_fraction, test_fraction=config.test_fraction)
    split_of: dict[str, str] = {}
    for group in (positive_studies, healthy if source_used == "healthy" else []):
        if config.holdout:
            split_of.update({uid: "val" for uid in group})
            continue
        for split, uids in split_studies(group, seed=config.seed, **fractions).items():
            split_of.update({uid: split for uid in uids})

    items: list[ExportItem] = []
    for (uid, number), slice_boxes in sorted(by_slice.items()):
        source = folders[uid] / f"{number}.dcm"
        items.append(
            ExportItem(split_of[uid], "positive", uid, number, str(source), tuple(slice_boxes))
        )
    positives = {s: sum(1 for i in items if i.split == s) for s in SPLITS}
    total = config.negatives
    if total is None:
        total = int(round(config.negative_ratio * len(items)))
    wanted = _allocate(total, positives)

    healthy_pools: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    if source_used == "healthy":
        for uid in healthy:
            folders[uid] = layout.series_dir(uid)
            healthy_pools[split_of[uid]].extend((uid, n) for n in _slice_numbers(folders[uid]))
    unboxed_pools: dict[str, list[tuple[str, int]]] = {s: [] for s in SPLITS}
    for uid in positive_studies:
        boxed = np.array(sorted(n for u, n in by_slice if u == uid))
        unboxed_pools[split_of[uid]].extend(
            (uid, n) for n in numbers[uid] if np.min(np.abs(boxed - n)) > config.negative_margin
        )
    shortfall, sources = {}, {}
    for index, split in enumerate(SPLITS):
        pool = healthy_pools[split] if source_used == "healthy" else unboxed_pools[split]
        sources[split] = source_used
        if not pool and wanted[split]:  # e.g. no healthy study landed in this split
            pool, sources[split] = unboxed_pools[split], "unboxed"
        k = min(wanted[split], len(pool))
        if k < wanted[split]:
            shortfall[split] = wanted[split] - k
        rng = np.random.default_rng([config.seed, index])
        for j in sorted(rng.choice(len(pool), size=k, replace=False).tolist()) if k else []:
            uid, n = pool[j]
            items.append(ExportItem(split, "negative", uid, n, str(folders[uid] / f"{n}.dcm")))
    info = {
        "negative_source": sources,
        "negatives_wanted": wanted,
        "negatives_shortfall": shortfall,
        "studies": {s: sorted({i.uid for i in items if i.split == s}) for s in SPLITS},
        "inputs_sha1": _inputs_digest(layout.root),
    }
    return items, info


def _inputs_digest(root: Path) -> str:
    digest = hashlib.sha1()
    for name in ("train_bounding_boxes.csv", "train.csv"):
        path = root / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# Rendering
def _render(item: ExportItem, out: str, size: int, mode: str, decoder: str) -> dict[str, Any]:
    """Read, check, render and write one slice; returns its manifest record (no exception for a
    bad box: the caller decides)."""
    from PIL import Image

    from keras_cspine.data.preprocess import to_model_image
    from keras_cspine.data.roi import SpineRoi
    from keras_cspine.io.dicom import read_slice

    try:
        hu, meta = read_slice(item.source, decoder=decoder)
    except CSpineDataError as err:
        return {"name": item.name, "fatal": {"path": str(err.path or item.source),
                                             "problem": err.problem}}  # fmt: skip
    rows, columns = int(hu.shape[0]), int(hu.shape[1])
    roi = SpineRoi(*item.roi) if item.roi else None
    labels, kept, problems, clipped, outside = [], [], [], 0, 0
    for box in item.boxes:
        why = box_problem(box, rows, columns)
        if why:
            problems.append(f"study {item.uid} slice {item.slice_number}: {why}")
            continue
        if roi is None:
            label, was_clipped = yolo_label(box, rows, columns)
        else:
            label, was_clipped = roi.yolo_label(box, rows, columns)
            if label is None:
                outside += 1
                continue
        labels.append(label)
        kept.append(list(box))
        clipped += int(was_clipped)
    record = {
        "name": item.name, "rows": rows, "columns": columns, "boxes": kept,
        "clipped": clipped, "problems": problems, "outside_roi": outside,
        "roi": list(item.roi) if item.roi else None,
    }  # fmt: skip
    if item.kind == "positive" and not labels:
        return record  # every box was bad or outside the window: no image at all
    image = to_model_image(roi.crop(hu) if roi else hu, mode=mode, size=size)
    image_path = Path(out) / "images" / item.split / f"{item.name}.png"
    with atomic_path(image_path) as tmp:
        Image.fromarray(np.ascontiguousarray(image)).save(tmp, format="PNG")
    with atomic_write(Path(out) / "labels" / item.split / f"{item.name}.txt") as handle:
        handle.write(format_label(labels))
    record["written"] = True
    return record


def _render_many(items, out, size, mode, decoder):
    return [_render(item, out, size, mode, decoder) for item in items]


def _settings_digest(config: ExportConfig, data_dir: Path, inputs_sha1: str) -> str:
    settings = asdict(config)
    for key in ("workers", "on_error"):
        settings.pop(key)
    for option in ("holdout", "roi_mm"):
        if not settings[option]:
            settings.pop(option)  # digests of exports made before the option stay valid
    payload = {**settings, "data_dir": str(data_dir), "inputs": inputs_sha1,
               "format": EXPORT_FORMAT}  # fmt: skip
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def _prepare_out(out: Path, digest: str, overwrite: bool) -> dict[str, dict]:
    """Check ``out`` against a previous export; return the journal of records already done."""
    state = out / "export.json"
    journal = out / ".journal.jsonl"
    if state.is_file():
        previous = json.loads(state.read_text()).get("digest")
        if previous != digest:
            if not overwrite:
                raise CSpineDataError(
                    out, "holds a YOLO export with other settings or inputs; choose another "
                    "folder or pass --overwrite"
                )  # fmt: skip
            for name in ("images", "labels"):
                shutil.rmtree(out / name, ignore_errors=True)
            for name in (".journal.jsonl", "manifest.csv", "errors.csv", "data.yaml", "export.json"):
                (out / name).unlink(missing_ok=True)
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CSpineDataError(out, "exists and is not a YOLO export folder; choose an empty folder")
    done: dict[str, dict] = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            done[record["name"]] = record
    return done


def _with_rois(items: list[ExportItem], config: ExportConfig, errors: list[dict[str, str]],
               progress: bool) -> list[ExportItem]:  # fmt: skip
    """The items with their study's spine window (``keras_cspine.data.roi``), found from a
    few slices of each study. A study whose slices cannot be read raises, or with
    ``on_error="skip"`` is recorded in ``errors`` and left out."""
    from tqdm.auto import tqdm

    from keras_cspine.data.roi import read_study_roi

    rois = {}
    for folder in tqdm(sorted({Path(item.source).parent for item in items}), desc="spine windows",
                       unit="study", disable=not progress):  # fmt: skip
        try:
            rois[folder] = tuple(read_study_roi(folder, config.roi_mm, config.decoder).to_json())
        except CSpineDataError as err:
            if config.on_error == "raise":
                raise
            errors.append({"path": str(err.path or folder), "problem": err.problem})
    return [dataclasses.replace(item, roi=rois[Path(item.source).parent])
            for item in items if Path(item.source).parent in rois]  # fmt: skip


def export_yolo_dataset(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    config: ExportConfig | None = None,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the YOLO dataset of an RSNA-layout folder (see the module docstring); return a summary.

    Args:
        data_dir: the RSNA-layout folder (Kaggle input or ``synth`` output).
        out_dir: the output folder (created; resumed if it holds the same export).
        config: :class:`ExportConfig`; defaults when None.
        overwrite: replace an export made with other settings.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    config = config or ExportConfig()
    data_dir, out = Path(data_dir).resolve(), Path(out_dir).resolve()
    started = time.time()
    errors: list[dict[str, str]] = []
    items, info = plan_export(data_dir, config, errors)
    digest = _settings_digest(config, data_dir, info["inputs_sha1"])
    done = _prepare_out(out, digest, overwrite)
    if config.roi_mm is not None:
        items = _with_rois(items, config, errors, progress)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "export.json", {"digest": digest, "complete": False, "config": asdict(config)})

    def finished(item: ExportItem) -> bool:
        record = done.get(item.name)
        if record is None or record.get("fatal"):
            return False
        if not record.get("written"):
            return True
        return (out / "images" / item.split / f"{item.name}.png").is_file() and (
            out / "labels" / item.split / f"{item.name}.txt"
        ).is_file()

    todo = [item for item in items if not finished(item)]
    records = {name: rec for name, rec in done.items()}
    with open(out / ".journal.jsonl", "a", encoding="utf-8") as journal, tqdm(
        total=len(items), initial=len(items) - len(todo), desc="YOLO export", unit="slice",
        disable=not progress,
    ) as bar:  # fmt: skip

        def accept(item: ExportItem, record: dict) -> None:
            if record.get("fatal"):
                if config.on_error == "raise":
                    raise CSpineDataError(record["fatal"]["path"], record["fatal"]["problem"])
            elif record["problems"] and config.on_error == "raise":
                raise BoxError(data_dir / "train_bounding_boxes.csv", record["problems"][0])
            records[item.name] = record
            journal.write(json.dumps(record) + "\n")
            journal.flush()
            bar.update(1)

        if config.workers == 1 or len(todo) < 2 * config.workers:
            for item in todo:
                accept(item, _render(item, str(out), config.size, config.mode, config.decoder))
        else:
            chunks = [todo[i : i + 16] for i in range(0, len(todo), 16)]
            context = multiprocessing.get_context("spawn")  # safe beside torch / TensorFlow
            with cf.ProcessPoolExecutor(config.workers, mp_context=context) as pool:
                futures = [
                    pool.submit(_render_many, chunk, str(out), config.size, config.mode,
                                config.decoder)
                    for chunk in chunks
                ]  # fmt: skip
                for chunk, future in zip(chunks, futures):
                    for item, record in zip(chunk, future.result()):
                        accept(item, record)

    manifest, counts = [], {s: {"images": 0, "positives": 0, "negatives": 0, "instances": 0,
                                "outside_roi": 0} for s in SPLITS}  # fmt: skip
    for item in items:
        record = records[item.name]
        if record.get("fatal"):
            errors.append(record["fatal"])
            continue
        errors.extend({"path": str(data_dir / "train_bounding_boxes.csv"), "problem": p}
                      for p in record["problems"])  # fmt: skip
        c = counts[item.split]
        c["outside_roi"] += record.get("outside_roi", 0)
        if not record.get("written"):
            continue
        c["images"] += 1
        c["positives" if item.kind == "positive" else "negatives"] += 1
        c["instances"] += len(record["boxes"])
        manifest.append({
            "split": item.split, "kind": item.kind,
            "image": f"images/{item.split}/{item.name}.png",
            "label": f"labels/{item.split}/{item.name}.txt",
            "StudyInstanceUID": item.uid, "slice_number": item.slice_number,
            "source": item.source, "rows": record["rows"], "columns": record["columns"],
            "n_boxes": len(record["boxes"]), "boxes": json.dumps(record["boxes"]),
            "clipped": record["clipped"], "roi": json.dumps(record.get("roi")),
        })  # fmt: skip
    if counts["val"]["images"] == 0 or (counts["train"]["images"] == 0 and not config.holdout):
        raise CSpineDataError(out, f"export left an empty train or val split: {counts}")
    with atomic_write(out / "manifest.csv", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(manifest)
    if errors or config.on_error == "skip":
        with atomic_write(out / "errors.csv", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["path", "problem"])
            writer.writeheader()
            writer.writerows(errors)
    data_yaml = {"path": str(out), "train": "images/train", "val": "images/val"}
    if counts["test"]["images"]:
        data_yaml["test"] = "images/test"
    data_yaml["names"] = dict(CLASS_NAMES)
    with atomic_write(out / "data.yaml") as handle:
        yaml.safe_dump(data_yaml, handle, sort_keys=False)
    from keras_cspine import __version__

    summary = {
        "digest": digest,
        "complete": True,
        "version": __version__,
        "data_dir": str(data_dir),
        "config": asdict(config),
        "counts": counts,
        "errors": len(errors),
        "rendered_this_run": len(todo),
        "seconds_this_run": round(time.time() - started, 2),
        **{k: v for k, v in info.items() if k != "inputs_sha1"},
    }
    write_json(out / "export.json", summary)
    return summary


#: ONNX metadata key holding the image settings of the YOLO export a detector was trained on
#: (written by ``ultralytics_train.export_onnx``, read by ``pipeline.Stage2Model``).
EXPORT_METADATA_KEY = "keras_cspine_export"


def export_image_settings(data_yaml: str | os.PathLike | None) -> dict[str, Any]:
    """``mode``, ``size`` and ``roi_mm`` of the YOLO export whose ``data.yaml`` is given (from its
    ``export.json``); empty when that is not a keras_cspine export (or is gone)."""
    if not data_yaml:
        return {}
    export_json = Path(data_yaml).parent / "export.json"
    if not export_json.is_file():
        return {}
    config = json.loads(export_json.read_text(encoding="utf-8")).get("config", {})
    return {k: config[k] for k in ("mode", "size", "roi_mm") if k in config}


def load_manifest(export_dir: str | os.PathLike):
    """``manifest.csv`` of an export as a DataFrame (``boxes`` parsed)."""
    import pandas as pd

    path = Path(export_dir) / "manifest.csv"
    if not path.is_file():
        raise CSpineDataError(path, "no manifest: not a finished YOLO export")
    frame = pd.read_csv(path, dtype={"StudyInstanceUID": str})
    frame["boxes"] = frame["boxes"].map(json.loads)
    if "roi" in frame:  # exports made before the option have no such column
        frame["roi"] = frame["roi"].map(lambda v: json.loads(v) if isinstance(v, str) else None)
    return frame
