"""``predict INPUT --out OUT --shard i/n``: one shard of a prediction job array, and the merge.

Not in the paper. The study folders of ``INPUT`` are listed as one ``predict`` lists them, each
named by the StudyInstanceUID of its DICOM (:func:`keras_cspine.pipeline.studies.name_study`);
shard ``i/n`` (0-based) runs those whose UID hashes to ``i`` (:mod:`keras_cspine.data.shards`)
into ``OUT/shards/<i>-of-<n>/``, a complete ``predict`` output of its own, and records in its
``shard.json`` where each of its studies stands in the whole list. A study whose DICOM names no
UID (it only gets an error) goes to the shard of the empty name, so exactly one shard reports it.

:func:`merge_predicted_shards` writes into ``OUT`` what one ``predict`` of all the studies
writes: ``submission.csv`` and ``predictions.csv`` byte for byte (rows in the single run's study
order), ``errors.csv``, ``studies/<UID>.json``, ``reports/<UID>/``, ``index.html``,
``predict_config.yaml``, ``summary.json`` (with ``"shards"``) and, when the shards were given
``labels``, the evaluation of the whole submission (``evaluation.json`` / ``.md``).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from keras_cspine import __version__
from keras_cspine.data.shards import (
    SHARDS_DIR,
    Shard,
    all_finished,
    check_same,
    choose_count,
    finished_parts,
    merge_lock,
    part_dir,
    selection_digest,
    start_part,
    write_part,
)
from keras_cspine.errors import CSpineDataError
from keras_cspine.pipeline.studies import find_studies, name_study, read_study_uid
from keras_cspine.utils import atomic_write, write_csv, write_json

PART_LOCK = ".lock"
#: PredictConfig fields that change neither a study's result nor the outputs' content
_NOT_COMPARED = ("batch_size", "threads")


def _say(message: str) -> None:
    print(f"[predict] {message}", file=sys.stderr, flush=True)


def list_named_studies(input_path: str | os.PathLike, out: str | os.PathLike,
                       limit: int | None = None) -> list[tuple[Path, str | None]]:  # fmt: skip
    """The study folders ``predict`` would run (in its order) and the UID naming each (None for
    a study that cannot be named)."""
    folders = find_studies(input_path, exclude=out)[: limit or None]
    return [(folder, name_study(folder, read_study_uid(folder)).uid) for folder in folders]


def _lock_path(folder: Path) -> Path:
    """``OUT/shards/.<i>-of-<n>.lock``: beside the part, which predict wants new or its own."""
    return folder.parent / f".{folder.name}{PART_LOCK}"


@contextlib.contextmanager
def _part_lock(folder: Path) -> Iterator[None]:
    """One process works in a part folder at a time (the kernel frees the lock when it dies)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(_lock_path(folder), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CSpineDataError(folder, f"another predict (pid {holder}) is running this shard"
                                  ) from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def _check_top(out: Path) -> None:
    """``OUT`` of a sharded predict: new, a predict output, or a folder of shards only."""
    if out.exists() and not out.is_dir():
        raise CSpineDataError(out, "exists and is not a folder: --out must be a new folder or "
                                   "one that predict wrote before")  # fmt: skip
    if out.is_dir() and not (out / "predict_config.yaml").is_file() and any(
            p.name not in (SHARDS_DIR, ".merge.lock") for p in out.iterdir()):  # fmt: skip
        raise CSpineDataError(out, "is a folder that predict did not write (no "
                                   "predict_config.yaml), and the merge would overwrite files in "
                                   "it: choose a new --out")  # fmt: skip


def predict_shard(input_path: str | os.PathLike, out_dir: str | os.PathLike, shard: Shard | str,
                  *, labels: str | os.PathLike | None = None, limit: int | None = None,
                  merge: bool = True, **options: Any) -> dict[str, Any]:  # fmt: skip
    """Run shard ``i/n`` of ``predict(input_path, out_dir)`` into ``out_dir/shards/<i>-of-<n>``.

    Args:
        input_path, limit: as for :func:`keras_cspine.pipeline.predict.predict` (the selection
            is made first, then sharded).
        out_dir: the ``OUT`` of every shard.
        shard: ``"i/n"`` or a :class:`Shard` (0-based).
        labels: a ``train.csv`` path; the merge evaluates the whole submission against it.
        merge: merge when this shard finds all ``n`` finished (the last shard does it).
        **options: the other arguments of ``predict`` (stage1, stage2, runs, config, progress).

    Returns:
        The part's summary (with ``"merged"``: the merged one, when this shard merged).
    """
    from keras_cspine.pipeline.predict import predict

    if isinstance(shard, str):
        shard = Shard.parse(shard)
    if labels is not None and not isinstance(labels, (str, os.PathLike)):
        raise TypeError("labels of a shard must be a path (the merge reads it)")
    if limit is not None and (isinstance(limit, bool) or int(limit) != limit or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 (or None: every study), got {limit!r}")
    out = Path(out_dir).absolute()
    _check_top(out)
    listed = list_named_studies(input_path, out, limit)
    mine = [(position, folder, uid) for position, (folder, uid) in enumerate(listed)
            if shard.takes(uid or "")]  # fmt: skip
    part = part_dir(out, shard)
    with _part_lock(part):
        start_part(part)
        summary = predict(input_path, part, studies=[folder for _, folder, _ in mine],
                          **options)  # fmt: skip
        write_part(part, {
            "kind": "predict", "shard": shard.name, "index": shard.index, "count": shard.count,
            "settings": _settings(summary),
            "study_selection": {"studies": len(listed),
                                "digest": selection_digest([uid for _, uid in listed])},
            "positions": [[position, uid] for position, _, uid in mine],
            "labels": str(Path(labels).absolute()) if labels is not None else None,
            "version": __version__,
        })  # fmt: skip
    _say(f"shard {shard.name}: {len(mine)} of {len(listed)} studies in {part}")
    if merge and all_finished(out, shard.count):
        with merge_lock(out, wait=False) as mine_to_merge:
            if mine_to_merge:
                summary = {**summary, "merged": _merge(out, shard.count)}
            else:
                _say("another shard is merging the parts")
    return summary


def _settings(summary: dict[str, Any]) -> dict[str, Any]:
    """What two shards must share to be merged: the predict settings and the models' content
    (not where the model files were)."""
    models = {stage: ({k: v for k, v in model.items() if k != "source"} if model else model)
              for stage, model in (summary.get("models") or {}).items()}  # fmt: skip
    config = {k: v for k, v in (summary.get("config") or {}).items() if k not in _NOT_COMPARED}
    return {"config": config, "models": models}


def merge_predicted_shards(out_dir: str | os.PathLike, count: int | None = None) -> dict[str, Any]:
    """Join the parts ``out_dir/shards/<i>-of-<n>/`` of ``predict --shard i/n`` into ``out_dir``
    (see the module); returns the merged summary.

    Raises:
        CSpineDataError: naming each missing or unfinished shard, or the setting (a predict
            setting, a model file's content, the input's study list, the labels) on which two
            shards differ.
    """
    out = Path(out_dir).absolute()
    n = choose_count(out, count)
    with merge_lock(out):
        return _merge(out, n)


def _read_text(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as handle:
        return handle.read()


def _copy_file(source: Path, target: Path) -> None:
    data = source.read_bytes()
    with atomic_write(target, "wb") as handle:
        handle.write(data)


def _merge(out: Path, count: int) -> dict[str, Any]:
    import json

    parts = finished_parts(out, count, "predict", lock=_lock_path)
    for field in ("settings", "study_selection", "labels"):
        check_same(parts, field, "predicted")
    positions = sorted((p, uid) for part in parts for p, uid in part["positions"])
    selected = parts[0]["study_selection"]["studies"]
    if [p for p, _ in positions] != list(range(selected)):
        raise CSpineDataError(out / SHARDS_DIR, f"the {count} parts hold {len(positions)} "
                              f"studies of a list of {selected}: run the shards again")  # fmt: skip
    order: dict[str, int] = {}
    for p, uid in positions:
        order.setdefault(uid or "", p)

    def key(uid: str) -> int:
        return order.get(uid, selected)

    folders = [Path(part["folder"]) for part in parts]
    summaries = [json.loads(_read_text(folder / "summary.json")) for folder in folders]

    # submission.csv and predictions.csv: the parts' lines, in the single run's study order
    header, lines = None, []
    for folder in folders:
        text = _read_text(folder / "submission.csv").splitlines(keepends=True)
        header = header or text[0]
        lines += [(key(line.split("_", 1)[0]), i, line) for i, line in enumerate(text[1:])]
    predictions, columns = [], None
    for folder in folders:
        reader = csv.DictReader(io.StringIO(_read_text(folder / "predictions.csv")))
        columns = columns or reader.fieldnames
        predictions += [(key(row["StudyInstanceUID"]), i, row) for i, row in enumerate(reader)]
    predictions = [row for _, _, row in sorted(predictions, key=lambda t: t[:2])]
    errors = []
    for part, folder in zip(parts, folders):
        if (folder / "errors.csv").is_file():
            unnamed = iter(p for p, uid in part["positions"] if uid is None)
            for i, row in enumerate(csv.DictReader(io.StringIO(_read_text(folder / "errors.csv")))):
                at = key(row["StudyInstanceUID"]) if row["StudyInstanceUID"] else next(unnamed, selected)
                errors.append((at, i, row))
    errors = [row for _, _, row in sorted(errors, key=lambda t: t[:2])]

    out.mkdir(parents=True, exist_ok=True)
    _copy_file(folders[0] / "predict_config.yaml", out / "predict_config.yaml")
    reports: dict[str, str] = {}
    for summary, folder in zip(summaries, folders):
        for uid in {uid for _, uid in parts[folders.index(folder)]["positions"] if uid}:
            for path in (folder / "studies").glob(f"{uid}.*"):  # its JSON (and saved images)
                if path.is_file() and not path.name.startswith("."):
                    _copy_file(path, out / "studies" / path.name)
        for uid, report in (summary.get("reports") or {}).items():
            source = folder / "reports" / uid
            if source.is_dir():
                for path in sorted(p for p in source.rglob("*") if p.is_file()):
                    _copy_file(path, out / "reports" / uid / path.relative_to(source))
                reports[uid] = str(out / "reports" / uid / Path(report).name)
    reports = dict(sorted(reports.items(), key=lambda item: key(item[0])))
    with atomic_write(out / "submission.csv", newline="") as handle:
        handle.write(header + "".join(line for _, _, line in sorted(lines, key=lambda t: t[:2])))
    write_csv(out / "predictions.csv", predictions, columns)
    files = {"submission": str(out / "submission.csv"), "predictions": str(out / "predictions.csv")}
    if errors:
        write_csv(out / "errors.csv", errors, ["StudyInstanceUID", "path", "problem"])
        files["errors"] = str(out / "errors.csv")
    else:
        (out / "errors.csv").unlink(missing_ok=True)
    if reports:
        from keras_cspine.pipeline.index_page import write_index

        # the shards ran the same models (their settings agree): any part's record names them
        files["index"] = str(write_index(predictions, reports, out,
                                         models=summaries[0].get("models")))  # fmt: skip

    total = lambda k: sum(int(s.get(k) or 0) for s in summaries)  # noqa: E731
    n_slices, n_gated = total("n_slices"), total("n_gated")
    seconds = {step: round(sum(float(s["seconds"].get(step, 0.0)) for s in summaries), 3)
               for step in summaries[0]["seconds"]}  # fmt: skip
    ok = total("n_ok")
    warnings = sorted((w for s in summaries for w in s.get("warnings") or []),
                      key=lambda w: key(w["StudyInstanceUID"]))  # fmt: skip
    merged: dict[str, Any] = {
        "input": summaries[0]["input"], "out": str(out),
        "n_studies": total("n_studies"), "n_ok": ok, "n_failed": total("n_failed"),
        "n_reused": total("n_reused"), "n_redone": total("n_redone"),
        "n_slices": n_slices, "n_gated": n_gated,
        "gated_fraction": round(n_gated / n_slices, 4) if n_slices else None,
        "seconds": seconds,
        "seconds_per_study": round(sum(seconds.values()) / ok, 3) if ok else None,
        "models": summaries[0]["models"], "model_choice": summaries[0].get("model_choice"),
        "config": summaries[0]["config"], "errors": errors, "warnings": warnings,
        "reports": reports, "files": files,
        "shards": {"count": count, "parts": [
            {"shard": part["shard"], "studies": s["n_studies"], "seconds": s["seconds"]}
            for part, s in zip(parts, summaries)]},
    }  # fmt: skip
    for field in summaries[0]:  # what else a part's summary says, joined
        if field in merged or field in ("evaluation", "shards"):
            continue
        values = [summary.get(field) for summary in summaries]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            merged[field] = round(sum(values), 3)
        elif all(isinstance(v, dict) for v in values):
            merged[field] = {k: v for value in values for k, v in value.items()}
        elif all(isinstance(v, list) for v in values):
            merged[field] = [item for value in values for item in value]
        else:
            merged[field] = values[0]
    if parts[0].get("labels"):
        from keras_cspine.pipeline.evaluate import evaluate_predictions, evaluation_markdown

        evaluation = evaluate_predictions(out / "submission.csv", parts[0]["labels"])
        write_json(out / "evaluation.json", evaluation)
        with atomic_write(out / "evaluation.md") as handle:
            handle.write(evaluation_markdown(evaluation))
        merged["evaluation"] = evaluation
        files["evaluation"] = str(out / "evaluation.json")
    write_json(out / "summary.json", merged)
    _say(f"merged {count} shard{'s' * (count > 1)}: {ok}/{merged['n_studies']} studies in {out}")
    return merged
