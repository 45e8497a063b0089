"""``prepare DATA OUT --shard i/n``: one shard of a prepare job array, and the merge (not in the
paper; see :mod:`keras_cspine.data.shards` for how studies are shared out).

Shard ``i/n`` prepares the studies of the selection (after ``--studies`` and ``--limit``) whose
UID hashes to ``i`` into ``OUT/shards/<i>-of-<n>/``, a prepare folder of its own (same lock,
resume and reuse as any), and writes its ``shard.json`` last. :func:`merge_prepared_shards`
(run by the last shard to finish, or ``keras-cspine merge OUT``) joins the parts into ``OUT``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from keras_cspine import __version__
from keras_cspine.data import prepare_worker as workers_
from keras_cspine.data.prepare import (
    INDEX_COLUMNS,
    _check_arguments,
    _check_folders,
    _digest,
    _log,
    _Prepare,
    _select_studies,
    _studies,
    read_settings,
)
from keras_cspine.data.shards import (
    Shard,
    all_finished,
    check_same,
    choose_count,
    finished_parts,
    link_or_copy,
    merge_lock,
    part_dir,
    selection_digest,
    start_part,
    write_part,
)
from keras_cspine.errors import CSpineDataError
from keras_cspine.utils import atomic_write, write_json


def prepare_shard(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard: Shard | str,
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
    merge: bool = True,
) -> dict[str, Any]:
    """Prepare shard ``i/n`` (0-based) of ``prepare_dataset(data_dir, out_dir, ...)``.

    Args:
        shard: ``"i/n"`` or a :class:`~keras_cspine.data.shards.Shard`.
        merge: merge the parts into ``out_dir`` when this shard finds all ``n`` finished.
        Others: as for :func:`keras_cspine.data.prepare.prepare_dataset` (``studies`` and
            ``limit`` choose the whole selection, which is then sharded).

    Returns:
        The part's summary (its ``prepare.json``), with ``"merged"`` (the merged summary) when
        this shard merged.
    """
    if isinstance(shard, str):
        shard = Shard.parse(shard)
    settings = _check_arguments(size, mode, split, roi_mm, on_error, workers, limit, chunk_slices)
    data, out = Path(data_dir), Path(out_dir)
    layout = _check_folders(data, out, split)
    uids = _select_studies(layout, split, studies, limit)
    part = part_dir(out, shard)
    mine = shard.select(uids)
    part.mkdir(parents=True, exist_ok=True)
    with workers_.exclusive_folder(part), workers_.sigterm_exits():
        start_part(part)
        summary = _Prepare(layout, part, settings, mine, on_error == "skip",
                           workers or os.cpu_count() or 1, chunk_slices, decoder, progress).run()  # fmt: skip
        write_part(part, {
            "kind": "prepare", "shard": shard.name, "index": shard.index, "count": shard.count,
            "settings": asdict(settings), "settings_digest": settings.digest(),
            "study_selection": {"studies": len(uids), "digest": selection_digest(uids)},
            "studies": mine, "index_digest": summary["index_digest"], "version": __version__,
        })  # fmt: skip
    _log(f"shard {shard.name}: {_studies(len(mine))} of {len(uids)} in {part}")
    if merge and all_finished(out, shard.count):
        with merge_lock(out, wait=False) as mine_to_merge:
            if mine_to_merge:
                summary = {**summary, "merged": _merge_prepared(out, shard.count)}
            else:
                _log("another shard is merging the parts")
    return summary


def merge_prepared_shards(out_dir: str | os.PathLike, count: int | None = None) -> dict[str, Any]:
    """Join the parts ``out_dir/shards/<i>-of-<n>/`` of ``prepare --shard i/n`` into ``out_dir``.

    ``out_dir`` then holds what one ``prepare`` of the whole selection writes: ``index.csv``
    byte for byte, the same ``cache/<uid>.npy`` (hard links to the parts' files where the file
    system allows, else copies) and ``studies/<uid>.json`` / ``.csv``; ``errors.csv`` and
    ``prepare.json`` (its summary adds ``"shards"``: each part's studies and seconds). A later
    ``prepare`` of the same selection into ``out_dir`` finds every study done.

    Args:
        out_dir: the ``OUT`` given to every shard.
        count: the number of shards ``n`` (default: the only count under ``out_dir/shards``).

    Raises:
        CSpineDataError: naming each missing or unfinished shard, or the setting (size, mode,
            split, the study selection) on which two shards differ.
    """
    out = Path(out_dir)
    n = choose_count(out, count)
    with merge_lock(out):
        return _merge_prepared(out, n)


def _merge_prepared(out: Path, count: int) -> dict[str, Any]:
    parts = finished_parts(out, count, "prepare", lock=lambda part: part / workers_.LOCK_NAME)
    check_same(parts, "settings", "prepared")
    check_same(parts, "study_selection", "prepared")
    digest, selected = parts[0]["settings_digest"], parts[0]["study_selection"]["studies"]
    taken = [uid for part in parts for uid in part["studies"]]
    if len(taken) != selected or len(set(taken)) != len(taken):
        raise CSpineDataError(out / "shards", f"the {count} parts hold {len(set(taken))} "
                              f"studies of a selection of {selected}: run the shards again")  # fmt: skip
    done: dict[str, tuple[Path, dict[str, Any]]] = {}
    summaries, recorded = [], []
    for part in parts:
        folder = Path(part["folder"])
        summaries.append(read_settings(folder))
        markers = []
        for uid in part["studies"]:
            with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
                marker = json.loads((folder / "studies" / f"{uid}.json").read_text(encoding="utf-8"))
                if isinstance(marker, dict) and marker.get("settings_digest") == digest:
                    done[uid] = (folder, marker)
                    markers.append([uid, marker.get("rows_sha1")])
        if _digest(markers) != part.get("index_digest"):
            raise CSpineDataError(folder, f"shard {part['shard']} changed since it finished (a "
                                  "rerun at work or killed, or files removed): run it again")  # fmt: skip
        errors_csv = folder / "errors.csv"
        if errors_csv.is_file():
            recorded += pd.read_csv(errors_csv, dtype=str, keep_default_na=False).to_dict("records")
    uids = sorted(done)
    out.mkdir(parents=True, exist_ok=True)
    with workers_.exclusive_folder(out):
        previous = out / "prepare.json"
        with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
            before = json.loads(previous.read_text(encoding="utf-8"))
            if isinstance(before, dict) and before.get("settings_digest") not in (None, digest):
                raise CSpineDataError(out, f"prepared with other settings {before.get('settings')};"
                                      " choose another output folder or delete this one to "
                                      f"merge shards of {parts[0]['settings']}")  # fmt: skip
        for uid in uids:
            folder = done[uid][0]
            source, target = folder / "cache" / f"{uid}.npy", out / "cache" / f"{uid}.npy"
            if not (target.is_file() and os.path.samefile(source, target)):
                link_or_copy(source, target)
            for suffix in (".csv", ".json"):
                data = (folder / "studies" / f"{uid}{suffix}").read_bytes()
                with atomic_write(out / "studies" / f"{uid}{suffix}", "wb") as handle:
                    handle.write(data)
        workers_.write_index(out, [out / "studies" / f"{uid}.csv" for uid in uids], INDEX_COLUMNS)
        errors = workers_.write_errors(out, [*[e for uid in uids for e in done[uid][1].get("errors", [])],
                                     *recorded])  # fmt: skip
        total = lambda key: sum(int(s.get(key) or 0) for s in summaries)  # noqa: E731
        summary = {
            "version": __version__, "data_dir": summaries[0].get("data_dir"),
            "settings": parts[0]["settings"], "settings_digest": digest, "studies": len(uids),
            "studies_processed_this_run": total("studies_processed_this_run"),
            "studies_reused": total("studies_reused"),
            "studies_changed": {k: v for s in summaries for k, v in (s.get("studies_changed") or {}).items()},
            "studies_skipped": sorted(u for s in summaries for u in s.get("studies_skipped") or []),
            "slices_processed_this_run": total("slices_processed_this_run"),
            "seconds_this_run": max(float(s.get("seconds_this_run") or 0) for s in summaries),
            "errors": len(errors),
            "index_digest": _digest([[uid, done[uid][1].get("rows_sha1")] for uid in uids]),
            "shards": {"count": count, "parts": [
                {"shard": part["shard"], "studies": len(part["studies"]),
                 "seconds": s.get("seconds_this_run"), "data_dir": s.get("data_dir")}
                for part, s in zip(parts, summaries)]},
        }  # fmt: skip
        write_json(out / "prepare.json", summary)
    _log(f"merged {count} shard{'s' * (count > 1)}: {_studies(len(uids))} in {out}")
    return summary
