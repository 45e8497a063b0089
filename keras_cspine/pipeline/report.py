"""Per-study reports of the two-stage pipeline (the paper's stage 1 and stage 2, Sections 2.5-2.6).

For one :class:`keras_cspine.pipeline.results.StudyResult` this module draws three figures and writes an
HTML or Markdown page around them:

- ``overview.png``: a sagittal projection through the spine (head at the top, anterior on the
  left, millimetres on both axes) with a coloured band per vertebra over the slices where stage 1
  finds it, the fracture boxes drawn at their slice and antero-posterior extent, and beside it
  the per-slice C1..C7 probabilities with the slices stage 2 looked at (the gate);
- ``fractures.png``: the slices with the strongest fracture boxes, boxes drawn with their score
  and vertebrae (slices with predicted fracture boxes, like Ultralytics' prediction images; here
  on native slices in the bone window);
- ``vertebrae.png``: a bar chart of the fracture probability of C1..C7 and of the patient.

``index.html``, the page that links them all, is :mod:`keras_cspine.pipeline.index_page`.
Figures use matplotlib's Agg backend; every file is written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.io.rsna import TARGETS, VERTEBRAE
from keras_cspine.pipeline.results import StudyResult
from keras_cspine.utils import atomic_write
from keras_cspine.viz import VERTEBRA_COLOURS, _pyplot, save_figure

__all__ = [
    "figure_key_slices",
    "figure_overview",
    "figure_vertebra_bars",
    "ReportPool",
    "render_html",
    "load_study_result",
    "render_markdown",
    "render_saved_reports",
    "save_report_images",
    "write_study_report",
]

FIGURES = ("overview", "fractures", "vertebrae")


def _spacing(result: StudyResult) -> float:
    spacing = result.info.get("pixel_spacing_mm") or [1.0, 1.0]
    return float(spacing[0])


def figure_overview(result: StudyResult, threshold: float = 0.5):
    """Sagittal overview: vertebra bands, fracture boxes, per-slice probabilities and the gate."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    z = np.asarray(result.positions_mm, dtype=np.float64)
    z_top, z_bottom = (float(z.min()), float(z.max())) if len(z) else (0.0, 1.0)
    half = (z_bottom - z_top) / max(len(z) - 1, 1) / 2 or 0.5
    fig, (ax_img, ax_prob) = plt.subplots(
        1, 2, figsize=(9, 6.5), gridspec_kw={"width_ratios": [3, 2]}, sharey=True
    )
    row_mm = _spacing(result)
    width_mm = (result.sagittal.shape[1] if result.sagittal is not None else 1) * row_mm
    if result.sagittal is not None:
        ax_img.imshow(result.sagittal, cmap="gray", aspect="auto",
                      extent=(0, width_mm, z_bottom + half, z_top - half))  # fmt: skip
    ax_img.set_xlim(0, width_mm)
    ax_img.set_xlabel("anterior -> posterior (mm)")
    ax_img.set_ylabel("mm below the first slice (head at the top)")
    ax_img.set_title(f"study {result.uid}", fontsize=9)
    probabilities = np.asarray(result.probabilities)
    for k, name in enumerate(VERTEBRAE):
        on = np.flatnonzero(probabilities[:, k] >= threshold)
        if not len(on):
            continue
        top, bottom = z[on[0]] - half, z[on[-1]] + half
        ax_img.add_patch(Rectangle((0, top), width_mm * 0.04, bottom - top, color=VERTEBRA_COLOURS[k],
                                   alpha=0.9))  # fmt: skip
        ax_img.text(width_mm * 0.05, (top + bottom) / 2, name, color=VERTEBRA_COLOURS[k],
                    fontsize=8, va="center", fontweight="bold")  # fmt: skip
    for box in result.boxes[:50]:
        top = z[box.series_index] - half
        ax_img.add_patch(Rectangle((box.y * row_mm, top), box.height * row_mm, 2 * half,
                                   fill=False, edgecolor="red", linewidth=1.2,
                                   alpha=float(np.clip(0.3 + box.score, 0, 1))))  # fmt: skip
    extent = (-0.5, len(VERTEBRAE) - 0.5, z_bottom + half, z_top - half)
    heat = ax_prob.imshow(probabilities, aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          extent=extent, interpolation="nearest")  # fmt: skip
    fig.colorbar(heat, ax=ax_prob, fraction=0.05, pad=0.08)
    gated = np.asarray(result.gated, dtype=bool)
    if gated.any() and not gated.all():
        ax_prob.scatter(np.full(gated.sum(), len(VERTEBRAE) - 0.2), z[gated], marker="s", s=5,
                        color="black", clip_on=False, label="stage 2 ran")  # fmt: skip
    box_slices = sorted({b.series_index for b in result.boxes})
    if box_slices:
        ax_prob.scatter(np.full(len(box_slices), -0.8), z[box_slices], marker=">", s=14,
                        color="red", clip_on=False, label="fracture box")  # fmt: skip
    ax_prob.set_xticks(range(len(VERTEBRAE)), VERTEBRAE)
    ax_prob.set_title("stage 1: P(vertebra on slice)", fontsize=9)
    if box_slices or (gated.any() and not gated.all()):
        ax_prob.legend(loc="lower right", fontsize=7, framealpha=0.6)
    fig.tight_layout()
    return fig


def figure_key_slices(result: StudyResult, ncols: int = 4):
    """The slices with the strongest boxes (``result.key_slices``), boxes drawn and labelled;
    with a stage 2 spine window (``info["stage2_roi"]``), its outline, dashed: what the detector
    looked at."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    numbers = list(result.key_slices)
    if not numbers:
        fig, ax = plt.subplots(figsize=(4, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no fracture box found", ha="center", va="center")
        return fig
    ncols = min(ncols, len(numbers))
    nrows = int(np.ceil(len(numbers) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.5 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    window = result.info.get("stage2_roi")
    for ax, number in zip(axes.ravel(), numbers):
        image = result.key_slices[number]
        ax.imshow(image, cmap="gray")
        if window:
            top, left, side = window
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), side, side, fill=False,
                                   edgecolor="gold", linestyle="--", linewidth=1))  # fmt: skip
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(image.shape[0] - 0.5, -0.5)
        best = 0.0
        for box in result.boxes:
            if box.slice_number != number:
                continue
            best = max(best, box.score)
            ax.add_patch(Rectangle((box.x, box.y), box.width, box.height, fill=False,
                                   edgecolor="red", linewidth=1.5))  # fmt: skip
            where = " ".join(box.vertebrae) or "no C-spine"
            ax.text(box.x, box.y - 2, f"{box.score:.2f} {where}", color="red", fontsize=7,
                    va="bottom")  # fmt: skip
        ax.set_title(f"slice {number} (best box {best:.2f})", fontsize=8)
    fig.tight_layout()
    return fig


def figure_vertebra_bars(result: StudyResult, truth: Mapping[str, int] | None = None):
    """Bar chart of the fracture probabilities of C1..C7 and the patient (truth marked if given)."""
    plt = _pyplot()
    values = [float(result.fracture[t]) for t in TARGETS]
    colours = [*VERTEBRA_COLOURS, "#444444"]
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    bars = ax.bar(range(len(TARGETS)), values, color=colours)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 0.02, f"{value:.2f}", ha="center",
                fontsize=8)  # fmt: skip
    if truth is not None:
        for j, target in enumerate(TARGETS):
            if int(truth.get(target, 0)):
                ax.plot(j, 1.04, marker="v", color="red", markersize=8, clip_on=False)
        ax.plot([], [], "v", color="red", label="fractured (label)")
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7)
    ax.set_xticks(range(len(TARGETS)), [*VERTEBRAE, "patient"])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("P(fracture)")
    ax.set_title("fracture probability per vertebra", fontsize=9)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------
# Pages
# --------------------------------------------------------------------------------------------
def _img_src(path: Path, base: Path, embed: bool) -> str:
    if embed:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f"data:image/png;base64,{data}"
    return html.escape(os.path.relpath(path, base))


def _probability_rows(result: StudyResult) -> list[tuple[str, float]]:
    return [(t, float(result.fracture[t])) for t in TARGETS]


def _extent_rows(result: StudyResult, threshold: float) -> list[tuple[str, str]]:
    extent = result.vertebra_extent(threshold)
    return [(v, f"slices {e['first_slice']}-{e['last_slice']} ({e['n_slices']} slices)"
             if (e := extent.get(v)) else "not found") for v in VERTEBRAE]  # fmt: skip


def render_html(result: StudyResult, figures: Mapping[str, Path], base: Path | None = None,
                threshold: float = 0.5, embed: bool = False, max_boxes: int = 25) -> str:  # fmt: skip
    """The HTML report of a study (figures linked relative to ``base`` or embedded)."""
    base = Path(base or ".")
    e = html.escape
    n_gated = int(np.asarray(result.gated).sum())
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>keras_cspine report {e(result.uid)}</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;"
        "text-align:right}img{max-width:100%}.hi{color:#b00;font-weight:bold}</style>",
        "</head><body>",
        f"<h1>Cervical spine fracture report</h1><p>Study <code>{e(result.uid)}</code>: "
        f"{len(result.slice_numbers)} slices, stage 2 on {n_gated}; {len(result.boxes)} fracture "
        f"boxes. Patient fracture probability <b>{result.fracture['patient_overall']:.3f}</b>.</p>",
        "<h2>Fracture probabilities</h2><table><tr><th>target</th><th>P(fracture)</th></tr>",
    ]
    for target, value in _probability_rows(result):
        cls = " class='hi'" if value >= 0.5 else ""
        parts.append(f"<tr><td>{e(target)}</td><td{cls}>{value:.3f}</td></tr>")
    parts.append("</table>")
    titles = {"overview": "Sagittal overview", "fractures": "Slices with the strongest boxes",
              "vertebrae": "Per-vertebra probabilities"}  # fmt: skip
    for name in FIGURES:
        if name in figures:
            parts.append(f"<h2>{titles[name]}</h2><img alt='{name}' "
                         f"src='{_img_src(Path(figures[name]), base, embed)}'>")  # fmt: skip
    parts.append("<h2>Where stage 1 finds each vertebra</h2><table>"
                 "<tr><th>vertebra</th><th>slices</th></tr>")  # fmt: skip
    parts += [f"<tr><td>{v}</td><td>{e(text)}</td></tr>" for v, text in _extent_rows(result, threshold)]
    parts.append("</table><h2>Fracture boxes</h2>")
    if result.boxes:
        parts.append("<table><tr><th>slice</th><th>x</th><th>y</th><th>width</th><th>height</th>"
                     "<th>score</th><th>vertebrae (evidence)</th></tr>")  # fmt: skip
        for box in result.boxes[:max_boxes]:
            where = ", ".join(f"{v} {w:.2f}" for v, w in box.vertebrae.items()) or "none"
            parts.append(f"<tr><td>{box.slice_number}</td><td>{box.x:.1f}</td><td>{box.y:.1f}</td>"
                         f"<td>{box.width:.1f}</td><td>{box.height:.1f}</td><td>{box.score:.3f}"
                         f"</td><td>{e(where)}</td></tr>")  # fmt: skip
        parts.append("</table>")
        if len(result.boxes) > max_boxes:
            parts.append(f"<p>... and {len(result.boxes) - max_boxes} more (see the JSON).</p>")
    else:
        parts.append("<p>No fracture box.</p>")
    parts.append(f"<p><small>Series folder: <code>{e(result.folder)}</code>. Research software, "
                 "not a medical device.</small></p></body></html>")  # fmt: skip
    return "\n".join(parts) + "\n"


def render_markdown(result: StudyResult, figures: Mapping[str, Path], base: Path | None = None,
                    threshold: float = 0.5, max_boxes: int = 25) -> str:  # fmt: skip
    """The Markdown report of a study (figures linked relative to ``base``)."""
    base = Path(base or ".")
    lines = [
        f"# Cervical spine fracture report: {result.uid}", "",
        f"{len(result.slice_numbers)} slices, stage 2 on {int(np.asarray(result.gated).sum())}; "
        f"{len(result.boxes)} fracture boxes; patient fracture probability "
        f"**{result.fracture['patient_overall']:.3f}**.", "",
        "| target | P(fracture) |", "|---|---|",
    ]  # fmt: skip
    lines += [f"| {t} | {v:.3f} |" for t, v in _probability_rows(result)]
    for name in FIGURES:
        if name in figures:
            lines += ["", f"![{name}]({os.path.relpath(figures[name], base)})"]
    lines += ["", "| vertebra | slices |", "|---|---|"]
    lines += [f"| {v} | {text} |" for v, text in _extent_rows(result, threshold)]
    lines += ["", "| slice | x | y | width | height | score | vertebrae |", "|---|---|---|---|---|---|---|"]
    for box in result.boxes[:max_boxes]:
        where = ", ".join(f"{v} {w:.2f}" for v, w in box.vertebrae.items()) or "none"
        lines.append(f"| {box.slice_number} | {box.x:.1f} | {box.y:.1f} | {box.width:.1f} | "
                     f"{box.height:.1f} | {box.score:.3f} | {where} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_study_report(result: StudyResult, folder: str | os.PathLike, fmt: str = "html",
                       threshold: float = 0.5, truth: Mapping[str, int] | None = None) -> Path:  # fmt: skip
    """Draw the figures of ``result`` into ``folder`` and write ``report.html`` or ``report.md``.

    Returns the report's path.
    """
    if fmt not in ("html", "markdown"):
        raise ValueError(f"fmt must be 'html' or 'markdown', got {fmt!r}")
    folder = Path(folder)
    figures = {
        "overview": save_figure(figure_overview(result, threshold), folder / "overview.png"),
        "fractures": save_figure(figure_key_slices(result), folder / "fractures.png"),
        "vertebrae": save_figure(figure_vertebra_bars(result, truth), folder / "vertebrae.png"),
    }
    if fmt == "html":
        path, text = folder / "report.html", render_html(result, figures, folder, threshold)
    else:
        path, text = folder / "report.md", render_markdown(result, figures, folder, threshold)
    with atomic_write(path, encoding="utf-8") as handle:
        handle.write(text)
    return path


# --------------------------------------------------------------------------------------------
# Rendering off the critical path
# --------------------------------------------------------------------------------------------
def _render_job(result: StudyResult, folder: str, fmt: str, threshold: float) -> tuple[str, float, bool]:
    """One report, in a worker: (path, seconds, whether TensorFlow was loaded in the worker)."""
    import sys
    import time

    started = time.perf_counter()
    path = write_study_report(result, folder, fmt=fmt, threshold=threshold)
    return str(path), time.perf_counter() - started, "tensorflow" in sys.modules


class ReportPool:
    """Draws study reports (:func:`write_study_report`) in worker processes while the caller
    goes on with the next study.

    The workers are started with ``spawn``: they inherit no TensorFlow state (and import none:
    this module needs matplotlib and NumPy only), so the TensorFlow-before-torch trap and
    TensorFlow's threads stay in the parent. A report that fails is named with its study in
    :attr:`failures` (uid -> problem) and costs no other output; if the pool itself breaks, the
    studies not drawn yet are drawn in this process.

    Args:
        workers: processes (0: draw in this process, at :meth:`submit`).
        fmt: ``"html"`` or ``"markdown"``.
        threshold: the presence threshold drawn in the figures.
    """

    def __init__(self, workers: int = 1, fmt: str = "html", threshold: float = 0.5):
        if fmt not in ("html", "markdown"):
            raise ValueError(f"fmt must be 'html' or 'markdown', got {fmt!r}")
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers!r}")
        self.fmt, self.threshold, self.workers = fmt, float(threshold), int(workers)
        self.reports: dict[str, str] = {}
        self.failures: dict[str, str] = {}
        #: seconds spent drawing, summed over the studies (in the workers)
        self.render_seconds = 0.0
        #: whether any worker had TensorFlow loaded (never, unless something is wrong)
        self.tensorflow_in_worker = False
        self._pending: dict[Any, tuple[StudyResult, str]] = {}
        self._executor = None

    def _pool(self):
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self._executor = ProcessPoolExecutor(self.workers,
                                                 mp_context=multiprocessing.get_context("spawn"))  # fmt: skip
        return self._executor

    def _record(self, uid: str, job: tuple[str, float, bool] | None, error: BaseException | None):
        if error is not None:
            self.failures[uid] = f"{type(error).__name__}: {error}"
            return
        path, seconds, tensorflow = job
        self.reports[uid] = path
        self.render_seconds += seconds
        self.tensorflow_in_worker |= tensorflow

    def _inline(self, result: StudyResult, folder: str) -> None:
        try:
            job = _render_job(result, folder, self.fmt, self.threshold)
        except Exception as err:  # noqa: BLE001 - one study's report, named in failures
            self._record(result.uid, None, err)
        else:
            self._record(result.uid, job, None)

    def submit(self, result: StudyResult, folder: str | os.PathLike) -> None:
        """Draw ``result``'s report into ``folder`` (in a worker when there are workers)."""
        from concurrent.futures.process import BrokenProcessPool

        if self.workers == 0:
            self._inline(result, str(folder))
            return
        self._collect(block=False)
        try:
            future = self._pool().submit(_render_job, result, str(folder), self.fmt, self.threshold)
        except BrokenProcessPool:
            self._inline(result, str(folder))
            return
        self._pending[future] = (result, str(folder))

    def _collect(self, block: bool) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait
        from concurrent.futures.process import BrokenProcessPool

        while self._pending:
            done, _ = wait(list(self._pending), timeout=None if block else 0,
                           return_when=FIRST_COMPLETED)  # fmt: skip
            if not done:
                return
            for future in done:
                result, folder = self._pending.pop(future)
                try:
                    self._record(result.uid, future.result(), None)
                except BrokenProcessPool:  # the worker died: draw it here
                    self._inline(result, folder)
                except Exception as err:  # noqa: BLE001 - named in failures
                    self._record(result.uid, None, err)

    def close(self) -> tuple[dict[str, str], dict[str, str]]:
        """Wait for every report; (uid -> report path, uid -> problem of the failed ones)."""
        try:
            self._collect(block=True)
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True, cancel_futures=True)
                self._executor = None
        return self.reports, self.failures

    def __enter__(self) -> ReportPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Reports later, from what predict saved (``predict --report none``, then ``report OUT``)
# --------------------------------------------------------------------------------------------
def save_report_images(result: StudyResult, path: str | os.PathLike) -> Path:
    """The images of a study's report (sagittal projection, key slices) beside its JSON,
    atomically, so that :func:`render_saved_reports` draws the same report later."""
    from keras_cspine.utils import atomic_path

    arrays = {f"key_{number}": image for number, image in result.key_slices.items()}
    if result.sagittal is not None:
        arrays["sagittal"] = result.sagittal
    with atomic_path(path) as tmp:
        np.savez_compressed(tmp, **arrays)
    return Path(path)


def load_study_result(json_path: str | os.PathLike) -> StudyResult:
    """A study's result from ``OUT/studies/<UID>.json`` with its report images
    (``OUT/report_data/<UID>.npz``, written by ``predict --report none``, when there)."""

    json_path = Path(json_path)
    result = StudyResult.from_json(json.loads(json_path.read_text(encoding="utf-8")))
    images = json_path.parent.parent / "report_data" / f"{json_path.stem}.npz"
    if images.is_file():
        with np.load(images, allow_pickle=False) as data:
            result.sagittal = data["sagittal"] if "sagittal" in data.files else None
            keys = sorted((int(k[4:]) for k in data.files if k.startswith("key_")),
                          key=lambda n: next(i for i, b in enumerate(result.boxes)
                                             if b.slice_number == n))  # fmt: skip
            result.key_slices = {n: data[f"key_{n}"] for n in keys}
    return result


def render_saved_reports(out: str | os.PathLike, fmt: str = "html", workers: int = 1,
                         threshold: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Draw the reports of every study ``predict`` saved in ``out/studies`` (and ``index.html``
    from ``out/predictions.csv``, with the training figures of the models predict recorded):
    ``{"reports": uid -> path, "failures": uid -> problem}``.

    The threshold is the one predict used (``out/predict_config.yaml``) unless given.
    """
    import csv

    from keras_cspine.errors import CSpineDataError

    out = Path(out)
    studies = out / "studies"
    if not studies.is_dir():
        raise CSpineDataError(out, "holds no studies/ folder: not an output of predict")
    if threshold is None:
        import yaml

        config_file = out / "predict_config.yaml"
        settings = (yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}) if (
            config_file.is_file()) else {}  # fmt: skip
        threshold = float(settings.get("presence_threshold", 0.5))
    failures: dict[str, str] = {}
    with ReportPool(workers, fmt, threshold) as pool:
        for json_path in sorted(studies.glob("*.json")):
            try:
                result = load_study_result(json_path)
            except (OSError, ValueError, KeyError, TypeError) as err:
                failures[json_path.stem] = f"{json_path}: cannot be read: {err}"
                continue
            pool.submit(result, out / "reports" / result.uid)
        reports, failed = pool.close()
    failures.update(failed)
    table_path = out / "predictions.csv"
    if table_path.is_file() and reports:
        with open(table_path, newline="", encoding="utf-8") as handle:
            table = list(csv.DictReader(handle))
        from keras_cspine.pipeline.index_page import write_index

        write_index(table, reports, out, models=_saved_models(out))
    return {"reports": reports, "failures": failures}


def _saved_models(out: Path) -> dict[str, Any] | None:
    """predict's record of its models: from ``out/summary.json``, else from a study's JSON."""

    for path in (out / "summary.json", *sorted((out / "studies").glob("*.json"))):
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(saved, dict) and isinstance(saved.get("models"), dict):
            return saved["models"]
    return None
