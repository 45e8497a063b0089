"""A synthetic dataset in the RSNA 2022 Cervical Spine Fracture Detection layout (the paper's data, Figures 3-4).

Serves the paper's data, the RSNA 2022 studies (axial neck CT, vertebra segmentations, fracture
boxes; the paper's Figures 3-4 show them): it writes, in exactly the Kaggle layout, CT studies of a
phantom neck so that the whole pipeline (Algorithm 1, stage 1 vertebrae classification, stage 2
fracture detection) runs and is tested without the 300 GB competition data::

    OUT/train_images/<UID>/<n>.dcm       CT Image Storage, file number n == InstanceNumber, 1-based
    OUT/test_images/<UID>/<n>.dcm        a few unlabelled studies, like Kaggle's test set
    OUT/segmentations/<UID>.nii          uint8 labels (1..7 = C1..C7, 8.. = T1..), RSNA axis order
    OUT/train.csv                        StudyInstanceUID, patient_overall, C1..C7
    OUT/train_bounding_boxes.csv         StudyInstanceUID, x, y, width, height, slice_number
    OUT/test.csv, OUT/sample_submission.csv
    OUT/synthetic_manifest.json          seed, preset and the truth of every study

What varies between studies, as in the real data: head-first (file 1 at the top, z decreasing
with the file number) or feet-first file order, JPEG-lossless (1.2.840.10008.1.2.4.70, encoded
with python-gdcm) or uncompressed pixels, unsigned 12/16-bit with RescaleIntercept -1024 or signed
16-bit with intercept 0 (with a -2048 HU padding outside the reconstruction circle), slice count,
slice spacing and thickness, field of view, patient offset, a small gantry-like tilt of the slice
plane (ImageOrientationPatient rotated about x, and the pixels follow it), noise, anatomy size and
lordosis, and above all the *coverage*: scans start above C1 or mid-C1 and end between C6 and T2,
so a slice's relative position does not give its labels away.

The anatomy is rendered in patient coordinates (:mod:`keras_cspine.synthetic.anatomy`), so
pixels, segmentation and boxes agree with the geometry tags by construction. Fractures are
acute, conspicuous cortical breaks as a reader boxes them: a lucent line (a 2-3.5 mm soft-tissue
gap, at least 2 pixels wide), usually with a cortical step-off (a fragment displaced by 1-3 mm,
at least a pixel); a vertebra is labelled fractured exactly when its break shows on at least one
slice, and each such slice has a box drawn around the fracture region (the crack and the
displaced fragment, plus a margin in millimetres; see :func:`_boxes_from_breaks`); slices that
the break only grazes get no box, and boxes that overlap on a slice are merged into one
(:func:`merge_slice_boxes`).
Everything is deterministic for a seed:
the same seed gives byte-identical files, whatever the number of workers.

Example::

    from keras_cspine.synthetic.dataset import generate_dataset
    generate_dataset("data/synth", n_studies=16, seed=0, preset="small")

or ``python -m keras_cspine synth data/synth --studies 16 --seed 0 --preset small``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.synthetic.anatomy import (
    VERTEBRA_NAMES,
)
from keras_cspine.synthetic.dicom_writer import _check_decodes, _SliceWriter, _write_nifti
from keras_cspine.synthetic.study import (  # noqa: F401 - the public names, re-exported
    _TMP,
    JPEG_LOSSLESS,
    MANIFEST,
    OUTPUT_NAMES,
    PRESETS,
    UID_ROOT,
    VERTEBRAE,
    Preset,
    StudySpec,
    SyntheticStudy,
    _boxes_from_breaks,
    get_preset,
    merge_slice_boxes,
    render_study,
    sample_study,
    study_uid,
)
from keras_cspine.utils import write_csv, write_json


def _record(spec: StudySpec, seg_present: Sequence[int], per_fracture: dict, labels: dict) -> dict:
    """The manifest entry of a study (JSON-ready, deterministic)."""
    g = spec.grid
    fractures = []
    for bone_name, k in spec.fractures:
        frac = spec.anatomy.vertebra(bone_name).fractures[k]
        boxes = per_fracture.get((bone_name, k), [])
        fractures.append({
            "vertebra": bone_name, "kind": frac.kind, "gap_mm": round(frac.gap, 3),
            "displacement_mm": round(float(np.linalg.norm(frac.shift)), 3),
            "visible": bool(boxes), "slice_numbers": sorted(b["slice_number"] for b in boxes),
        })  # fmt: skip
    return {
        "StudyInstanceUID": spec.uid, "split": spec.split, "index": spec.index,
        "head_first": spec.head_first, "compressed": spec.compressed,
        "transfer_syntax": JPEG_LOSSLESS if spec.compressed else "1.2.840.10008.1.2.1",
        "rows": g.rows, "columns": g.columns, "pixel_spacing": [g.dr, g.dc],
        "n_slices": spec.n_slices, "spacing": spec.spacing, "slice_thickness": spec.slice_thickness,
        "tilt_deg": spec.tilt_deg, "image_orientation": [float(v) for v in spec.iop],
        "pixel_representation": spec.pixel_representation, "bits_stored": spec.bits_stored,
        "rescale_intercept": spec.rescale_intercept, "padding_hu": spec.padding_hu,
        "noise_hu": round(spec.noise_hu, 3), "top": spec.top,
        "coverage": [VERTEBRA_NAMES[v - 1] for v in sorted(seg_present) if v],
        "segmentation": spec.segmentation, "labels": labels, "fractures": fractures,
    }  # fmt: skip


def _render_and_write(spec: StudySpec, root: Path | None, *, keep_volumes: bool) -> SyntheticStudy:
    """Render a study chunk by chunk and write its slices (and segmentation) under ``root``."""
    g, n = spec.grid, spec.n_slices
    seg = np.zeros((n, g.rows, g.columns), np.uint8)
    hu_all = np.zeros(seg.shape, np.float32) if keep_volumes else None
    tissue_all = np.zeros(seg.shape, np.uint8) if keep_volumes else None
    per_fracture: dict[tuple[str, int], list[dict]] = {}
    folder = staging = None
    if root is not None:
        folder = root / f"{spec.split}_images" / spec.uid
        (root / _TMP).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{spec.uid}.", dir=root / _TMP))
        (staging / "series").mkdir()
        writer = _SliceWriter(spec, staging)
    checked = False
    try:
        for s0 in range(0, n, spec.preset.chunk_slices):
            s1 = min(s0 + spec.preset.chunk_slices, n)
            hu, seg[s0:s1], tissue, breaks = render_study(spec, s0=s0, s1=s1)
            for key, boxes in _boxes_from_breaks(spec, s0, breaks).items():
                per_fracture.setdefault(key, []).extend(boxes)
            if keep_volumes:
                hu_all[s0:s1], tissue_all[s0:s1] = hu, tissue
            if staging is None:
                continue
            stored = (hu - spec.rescale_intercept).astype(np.int32)
            for s in range(s0, s1):
                path = staging / "series" / f"{spec.file_number(s)}.dcm"
                writer.write(s, stored[s - s0], path)
                if spec.compressed and not checked:  # one decode per study, all in the tests
                    dtype = np.int16 if spec.pixel_representation else np.uint16
                    _check_decodes(path, stored[s - s0].astype(dtype))
                    checked = True
        present = np.unique(seg)
        labels = {v: 0 for v in VERTEBRAE}
        for bone_name, _k in per_fracture:
            labels[bone_name] = 1
        labels["patient_overall"] = int(any(labels[v] for v in VERTEBRAE))
        boxes = merge_slice_boxes([b for rows in per_fracture.values() for b in rows])
        record = _record(spec, present.tolist(), per_fracture, labels)
        if staging is not None:
            for stale in (staging / "plain.dcm", staging / "packed.dcm"):
                stale.unlink(missing_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            folder.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / "series", folder)
            if spec.segmentation:
                _write_nifti(spec, seg, root / "segmentations" / f"{spec.uid}.nii")
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return SyntheticStudy(spec, record, labels, boxes, seg, hu_all, tissue_all, folder)


def generate_study(out_dir: str | os.PathLike | None = None, *, seed: int = 0, index: int = 0,
                   preset: str | Preset = "tiny", keep_volumes: bool = True,
                   **options: Any) -> SyntheticStudy:  # fmt: skip
    """Generate one study; write it in the RSNA layout under ``out_dir`` when given.

    Writes ``<out_dir>/<split>_images/<uid>/<n>.dcm`` and, for a train study,
    ``<out_dir>/segmentations/<uid>.nii`` (no CSVs: see :func:`generate_dataset`).

    Args:
        out_dir: dataset root, or None to only render in memory.
        seed, index, preset: see :func:`sample_study`.
        keep_volumes: keep ``hu`` and ``tissue`` on the returned object.
        **options: forwarded to :func:`sample_study` (split, uid, head_first, compressed,
            tilted, signed, fractured, top, bottom, nonsquare, segmentation).

    Returns:
        A :class:`SyntheticStudy` with labels, boxes, the segmentation in series order and the
        manifest record.
    """
    spec = sample_study(seed, index, preset, **options)
    root = None if out_dir is None else Path(out_dir)
    return _render_and_write(spec, root, keep_volumes=keep_volumes)


def _study_job(job: dict) -> dict:
    """Worker entry point: generate and write one study, return what the CSVs need."""
    study = generate_study(job.pop("root"), keep_volumes=False, **job)
    return {"record": study.record, "labels": study.labels, "boxes": study.boxes}


def _balanced(rng: np.random.Generator, n: int, fraction: float) -> list[bool]:
    """Exactly round(n * fraction) True values (at least one when n >= 2), shuffled."""
    k = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        k = max(k, 1)
    flags = np.zeros(n, bool)
    flags[rng.permutation(n)[:k]] = True
    return flags.tolist()


def _plan(n_train: int, n_test: int, seed: int, segmentation_fraction: float,
          preset: str = "small") -> list[dict]:  # fmt: skip
    """Dataset-level draws: balanced study properties (so that even a small dataset has head- and
    feet-first, compressed, tilted, signed, fractured and intact studies), and UIDs from the
    dataset's identity (:func:`~keras_cspine.synthetic.study.study_uid`: seed, sizes, preset,
    segmentation share, split, index), unique across datasets."""
    rng = np.random.default_rng([int(seed), 99])
    rng.choice(np.arange(10000, 33000), size=n_train + n_test, replace=False)  # keeps the draws below
    identity = {"seed": int(seed), "n_train": int(n_train), "n_test": int(n_test),
                "preset": str(preset), "segmentation_fraction": float(segmentation_fraction)}  # fmt: skip
    jobs = []
    for split, n in (("train", n_train), ("test", n_test)):
        flags = {
            "head_first": [not f for f in _balanced(rng, n, 1 / 3)],
            "compressed": _balanced(rng, n, 1 / 3),
            "tilted": _balanced(rng, n, 1 / 3),
            "signed": _balanced(rng, n, 1 / 4),
            "fractured": _balanced(rng, n, 1 / 2),
            "top": ["above_c1" if f else "mid_c1" for f in _balanced(rng, n, 1 / 2)],
            "segmentation": _balanced(rng, n, segmentation_fraction) if split == "train" else
            [False] * n,
        }  # fmt: skip
        bottoms = (rng.permutation(n) + rng.random(n)) / max(n, 1)  # stratified C6 .. T2
        for i in range(n):
            job = {key: values[i] for key, values in flags.items()}
            job.update(split=split, index=i, bottom=float(bottoms[i]),
                       uid=study_uid(**identity, split=split, index=i))  # fmt: skip
            jobs.append(job)
    uids = [job["uid"] for job in jobs]
    if len(set(uids)) != len(uids):  # 1 chance in 10**16 per pair: never silently
        raise RuntimeError(f"two synthetic studies drew the same UID for seed {seed}")
    return jobs


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise CSpineDataError(out, "exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise CSpineDataError(out, "is not empty; pass overwrite=True (--overwrite) to "
                                       "replace a synthetic dataset there")  # fmt: skip
        if not (out / MANIFEST).is_file():
            raise CSpineDataError(out, f"is not empty and has no {MANIFEST}: refusing to "
                                       "overwrite what may be real data")  # fmt: skip
        for name in (*OUTPUT_NAMES, _TMP):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def generate_dataset(
    out_dir: str | os.PathLike,
    n_studies: int = 8,
    seed: int = 0,
    preset: str | Preset = "small",
    *,
    n_test: int | None = None,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    segmentation_fraction: float = 1.0,
) -> Path:
    """Write a synthetic dataset in the RSNA 2022 layout; returns ``out_dir``.

    Args:
        out_dir: the dataset folder (created; must be empty unless ``overwrite``).
        n_studies: training studies (train.csv, boxes, segmentations).
        seed: the same seed gives byte-identical files, whatever ``workers`` is.
        preset: "tiny" (tests), "small" (demo) or "full" (realistic), or a :class:`Preset`.
        n_test: unlabelled studies in test_images/ (default: n_studies // 4, between 1 and 3).
        workers: processes writing studies in parallel.
        overwrite: replace an earlier synthetic dataset in ``out_dir``.
        progress: show a progress bar over studies.
        segmentation_fraction: share of training studies with a segmentation (RSNA: ~4%).

    Example:
        >>> generate_dataset("data/synth", n_studies=4, seed=0, preset="tiny")  # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    if int(n_studies) < 1:
        raise ValueError(f"n_studies must be >= 1, got {n_studies!r}")
    n_test = min(3, max(1, int(n_studies) // 4)) if n_test is None else int(n_test)
    if n_test < 0:
        raise ValueError(f"n_test must be >= 0, got {n_test!r}")
    if not 0.0 <= segmentation_fraction <= 1.0:
        raise ValueError(f"segmentation_fraction must be in [0, 1], got {segmentation_fraction!r}")
    if int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers!r}")
    preset = get_preset(preset)
    out = Path(out_dir)
    _prepare_out(out, overwrite)
    for folder in ("train_images", "test_images", "segmentations"):
        (out / folder).mkdir(exist_ok=True)
    jobs = _plan(int(n_studies), n_test, int(seed), float(segmentation_fraction), preset.name)
    for job in jobs:
        job.update(root=out, seed=int(seed), preset=preset)
    bar = tqdm(total=len(jobs), desc="synth", unit="study", disable=not progress)
    results: list[dict] = []
    try:
        if workers == 1:
            for job in jobs:
                results.append(_study_job(dict(job)))
                bar.update()
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            context = multiprocessing.get_context("spawn")  # safe after TensorFlow/torch imports
            with ProcessPoolExecutor(int(workers), mp_context=context) as pool:
                for result in pool.map(_study_job, [dict(job) for job in jobs]):
                    results.append(result)
                    bar.update()
    finally:
        bar.close()
        shutil.rmtree(out / _TMP, ignore_errors=True)

    train = [r for r in results if r["record"]["split"] == "train"]
    test = [r for r in results if r["record"]["split"] == "test"]
    write_csv(out / "train.csv",
              [{"StudyInstanceUID": r["record"]["StudyInstanceUID"], **r["labels"]}
               for r in train], ("StudyInstanceUID", "patient_overall", *VERTEBRAE))  # fmt: skip
    write_csv(out / "train_bounding_boxes.csv", [b for r in train for b in r["boxes"]],
              ("StudyInstanceUID", "x", "y", "width", "height", "slice_number"))  # fmt: skip
    targets = (*VERTEBRAE, "patient_overall")
    test_rows = [{"row_id": f"{r['record']['StudyInstanceUID']}_{t}",
                  "StudyInstanceUID": r["record"]["StudyInstanceUID"], "prediction_type": t}
                 for r in test for t in targets]  # fmt: skip
    write_csv(out / "test.csv", test_rows, ("row_id", "StudyInstanceUID", "prediction_type"))
    write_csv(out / "sample_submission.csv",
              [{"row_id": row["row_id"], "fractured": 0.5} for row in test_rows],
              ("row_id", "fractured"))  # fmt: skip
    from keras_cspine import __version__

    write_json(out / MANIFEST, {
        "generator": "keras_cspine.synthetic.dataset", "version": __version__, "seed": int(seed),
        "preset": preset.name, "preset_settings": asdict(preset), "n_train": len(train),
        "n_test": len(test), "studies": [r["record"] for r in results],
    })  # fmt: skip
    return out


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``synthetic_manifest.json`` of a dataset written by :func:`generate_dataset`."""
    import json

    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise CSpineDataError(path, "no synthetic manifest: not a synthetic dataset?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CSpineDataError(path, f"invalid JSON: {exc}") from exc
