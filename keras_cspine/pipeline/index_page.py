"""``index.html`` of a ``predict`` output: one row per study (its probabilities, counts, status and
a link to its report), then what the models were trained on and how they scored: the data
figures of the prepare folder stage 1 trained on (Figures 3-4, when ``look`` drew them there),
the stage 1 and stage 2 runs' Table 1 / Table 3 rows beside the paper's, and their figures
(Figure 6, Figures 7-10, Table 2; :data:`DATA_FIGURES`, :data:`STAGE1_FIGURES`,
:data:`STAGE2_FIGURES`), each linked relative to the page so that the folders move together.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from keras_cspine import viz
from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import TARGETS
from keras_cspine.stage1 import runs as stage1_runs
from keras_cspine.utils import atomic_write

__all__ = ["DATA_FIGURES", "STAGE1_FIGURES", "STAGE2_FIGURES", "training_figures", "training_runs",
           "write_index"]  # fmt: skip


# What a training run shows: (where in the run folder, the first found of them; its name)
STAGE1_FIGURES: tuple[tuple[tuple[str, ...], str], ...] = (
    ((f"{stage1_runs.FIGURES_DIR}/{stage1_runs.LOSS_CURVES_FIGURE}",),
     "Stage 1 loss and macro F1 curves (Figure 6)"),
    ((f"{stage1_runs.FIGURES_DIR}/study_levels.png",),
     "Stage 1 vertebrae slice by slice on its hardest studies"),
    ((f"{stage1_runs.TABLE1_ROW}.md",), "Stage 1 Table 1 row"),
    ((f"{stage1_runs.TABLE2}.md",), "Stage 1 Table 2 (per-vertebra report)"),
)  # fmt: skip
STAGE2_FIGURES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("figures/fig7-8_training_curves.png",), "Stage 2 training curves (Figures 7-8)"),
    (("results.png",), "Stage 2 training results (Ultralytics)"),
    (("val/figures/fig9_confusion_matrix.png", "figures/fig9_confusion_matrix.png"),
     "Stage 2 confusion matrix (Figure 9)"),
    (("val/confusion_matrix.png", "confusion_matrix.png"),
     "Stage 2 confusion matrix (Ultralytics)"),
    (("val/confusion_matrix_normalized.png", "confusion_matrix_normalized.png"),
     "Stage 2 normalised confusion matrix (Ultralytics)"),
    (("val/BoxPR_curve.png", "BoxPR_curve.png", "val/PR_curve.png", "PR_curve.png"),
     "Stage 2 precision-recall curve"),
    (("val/BoxF1_curve.png", "BoxF1_curve.png", "val/F1_curve.png", "F1_curve.png"),
     "Stage 2 F1-confidence curve"),
    (("val/figures/fig10_predictions.png", "figures/fig10_predictions.png"),
     "Stage 2 predicted and true fracture boxes (Figure 10)"),
    (("labels.jpg",), "Stage 2 training boxes (Ultralytics labels)"),
)  # fmt: skip
#: What the data stage 1 trained on shows (``look`` drawn into its prepare folder's ``figures/``).
DATA_FIGURES: tuple[tuple[tuple[str, ...], str], ...] = (
    ((f"figures/{viz.FIGURE3}.png",), "Fractures per vertebra in the data (Figure 3)"),
    ((f"figures/{viz.SLICES_FIGURE}",), "Slices with their C1..C7 labels and fracture boxes (Figure 4)"),
)  # fmt: skip
_THUMBNAILS = (".png", ".jpg", ".jpeg", ".svg")


def training_runs(models: Mapping[str, Any] | None) -> dict[str, Path]:
    """The training run folders of predict's models (the ``models`` of its ``summary.json`` or of
    a study's JSON): stage 1, the folder of the ``model.keras`` it loaded; stage 2, the run that
    holds its ``weights/best.onnx`` (or ``best.onnx``). Models built in memory have none."""
    found: dict[str, Path] = {}
    for stage in ("stage1", "stage2"):
        source = ((models or {}).get(stage) or {}).get("source")
        if not source or str(source).startswith("<"):
            continue
        folder = Path(source).parent
        if stage == "stage2" and folder.name == "weights":
            folder = folder.parent
        if folder.is_dir():
            found[stage] = folder
    if "stage1" in found:  # the prepare folder it trained on, when it is still there
        with contextlib.suppress(CSpineDataError):
            source = (stage1_runs.read_preprocessing(found["stage1"]) or {}).get("source")
            if source and Path(source).is_dir():
                found["data"] = Path(source)
    return found


def training_figures(run_folders: Mapping[str, str | os.PathLike]) -> list[tuple[str, Path]]:
    """(name, path) of each figure or table of :data:`DATA_FIGURES` / :data:`STAGE1_FIGURES` /
    :data:`STAGE2_FIGURES` found in the folders of :func:`training_runs` (``{"data": folder,
    "stage1": folder, "stage2": folder}``), in that order."""
    found = []
    for stage, table in (("data", DATA_FIGURES), ("stage1", STAGE1_FIGURES),
                         ("stage2", STAGE2_FIGURES)):  # fmt: skip
        if stage not in run_folders:
            continue
        folder = Path(run_folders[stage])
        for candidates, name in table:
            path = next((folder / c for c in candidates if (folder / c).is_file()), None)
            if path is not None:
                found.append((name, path))
    return found


def _href(path: Path, base: Path) -> str:
    """``path`` relative to ``base`` (moves with it), escaped for an attribute."""
    try:
        link = Path(os.path.relpath(path, base)).as_posix()
    except ValueError:  # another drive
        link = Path(path).absolute().as_uri()
    return html.escape(link)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _score_rows(run_folders: Mapping[str, str | os.PathLike]) -> str:
    """The runs' own scores beside the paper's: stage 1's Table 1 row(s) on its test split,
    stage 2's Table 3 row on its val split (from their ``metrics.json``); "" without them."""
    from keras_cspine.stage1.evaluate import PAPER_TABLE1
    from keras_cspine.stage2.metrics import PAPER_TABLE3

    rows = []
    if "stage1" in run_folders:
        m = _read_json(Path(run_folders["stage1"]) / stage1_runs.METRICS_FILE)
        paper = PAPER_TABLE1["Proposed (GCViT)"]
        for key, label in (("metrics", "per slice"), ("metrics_level_decoded", "level-decoded"),
                           ("metrics_sequence_model", "sequence model")):  # fmt: skip
            v = m.get(key)
            if isinstance(v, dict) and "macro_f1" in v:
                rows.append(f"<tr><td style='text-align:left'>Stage 1, {label} (Table 1: macro F1 / "
                            f"EMR / coverage error)</td><td>{m.get('split', '?')}, "
                            f"{m.get('n_studies', '?')} studies</td><td>{v['macro_f1']:.3f} / "
                            f"{v.get('exact_match_ratio', float('nan')):.3f} / "
                            f"{v.get('coverage_error', float('nan')):.3f}</td>"
                            f"<td>{paper[0]} / {paper[1]} / {paper[2]}</td></tr>")  # fmt: skip
    if "stage2" in run_folders:
        folder = Path(run_folders["stage2"])
        m = _read_json(folder / "val" / "metrics.json") or _read_json(folder / "metrics.json")
        if "mAP50" in m:
            paper = PAPER_TABLE3["yolov8s"]
            rows.append(f"<tr><td style='text-align:left'>Stage 2, {html.escape(str(m.get('model')))}"
                        f" (Table 3: P / R / mAP50 / mAP50-95)</td><td>{m.get('split', 'val')}, "
                        f"{m.get('images', '?')} images</td><td>{m['precision']:.3f} / "
                        f"{m['recall']:.3f} / {m['mAP50']:.3f} / {m['mAP50-95']:.3f}</td><td>"
                        f"{' / '.join(str(x) for x in paper)} (YOLOv8s)</td></tr>")  # fmt: skip
    if not rows:
        return ""
    return ("<table><tr><th>scores of the training runs</th><th>on</th><th>here</th>"
            "<th>paper</th></tr>" + "".join(rows) + "</table>")  # fmt: skip


def _training_section(run_folders: Mapping[str, str | os.PathLike], out: Path) -> str:
    """The index's "Training figures": the runs' Table 1 / Table 3 rows, and a link (and a
    thumbnail) per figure found; "" if none."""
    figures = training_figures(run_folders)
    scores = _score_rows(run_folders)
    if not figures and not scores:
        return ""
    e = html.escape
    where = "; ".join(f"{label} <a href='{_href(Path(run_folders[stage]), out)}'>"
                      f"<code>{e(Path(run_folders[stage]).name)}</code></a>"
                      for stage, label in (("data", "stage 1's prepared data"),
                                           ("stage1", "stage 1 run"), ("stage2", "stage 2 run"))
                      if stage in run_folders)  # fmt: skip
    items = []
    for name, path in figures:
        href = _href(path, out)
        thumb = (f"<img width='240' src='{href}' alt='{e(name)}'><br>"
                 if path.suffix.lower() in _THUMBNAILS else "")  # fmt: skip
        items.append(f"<figure style='display:inline-block;vertical-align:top;margin:6px'>"
                     f"<a href='{href}'>{thumb}{e(name)}</a></figure>")  # fmt: skip
    return (f"<h2>Training figures</h2><p>From the training runs of the models used: "
            f"{where}.</p>{scores}<div>" + "\n".join(items) + "</div>")  # fmt: skip


def write_index(table: Sequence[Mapping[str, Any]], reports: Mapping[str, str],
                out: str | os.PathLike, models: Mapping[str, Any] | None = None) -> Path:  # fmt: skip
    """``out/index.html``: one row per study (probabilities, counts, status, report link), then
    the figures of the training runs of ``models`` (predict's record of them, see
    :func:`training_runs`), linked relative to ``out``, when there are any."""
    out = Path(out)
    e = html.escape
    head = "".join(f"<th>{t}</th>" for t in (*TARGETS, "slices", "stage 2", "boxes", "status"))
    rows = []
    for row in table:
        uid = str(row["StudyInstanceUID"])
        link = e(uid)
        if uid in reports:
            link = f"<a href='{e(os.path.relpath(reports[uid], out))}'>{e(uid)}</a>"
        cells = "".join(f"<td>{float(row[t]):.3f}</td>" for t in TARGETS)
        cells += "".join(f"<td>{e(str(row[k]))}</td>" for k in ("n_slices", "n_gated", "n_boxes",
                                                                 "status"))  # fmt: skip
        rows.append(f"<tr><td style='text-align:left'>{link}</td>{cells}</tr>")
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>keras_cspine predictions</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid "
        "#ccc;padding:2px 6px;text-align:right}</style></head><body>"
        f"<h1>Two-stage predictions ({len(table)} studies)</h1><table><tr><th>study</th>{head}</tr>"
        + "\n".join(rows) + "</table>" + _training_section(training_runs(models), out)
        + "</body></html>\n"
    )  # fmt: skip
    path = out / "index.html"
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(page)
    return path
