"""report.py: the per-study figures and pages, on a hand-made StudyResult whose content is known."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from keras_cspine.io.rsna import TARGETS, VERTEBRAE
from keras_cspine.pipeline.index_page import write_index
from keras_cspine.pipeline.predict import Box, StudyResult
from keras_cspine.pipeline.report import (
    figure_key_slices,
    figure_overview,
    figure_vertebra_bars,
    render_html,
    write_study_report,
)

UID = "1.2.826.0.1.3680043.4242"


def make_result(with_boxes: bool = True) -> StudyResult:
    """20 slices 2 mm apart; C1 on slices 0-4, C2 on 3-9; boxes on slices 6 (C2) and 15 (none)."""
    n = 20
    probabilities = np.zeros((n, 7), np.float32)
    probabilities[0:5, 0] = 0.9
    probabilities[3:10, 1] = 0.8
    gated = probabilities.max(axis=1) >= 0.5
    boxes = [Box(6, 7, 10.0, 12.0, 6.0, 5.0, 0.8, {"C2": 0.64}),
             Box(15, 16, 20.0, 20.0, 4.0, 4.0, 0.3, {})] if with_boxes else []  # fmt: skip
    fracture = {**dict.fromkeys(VERTEBRAE, 0.05), "C2": 0.62, "patient_overall": 0.65}
    rng = np.random.default_rng(0)
    key = {7: rng.integers(0, 255, (48, 40), dtype=np.uint8)} if with_boxes else {}
    return StudyResult(
        uid=UID, folder="/data/test_images/" + UID, slice_numbers=np.arange(1, n + 1),
        positions_mm=np.arange(n) * 2.0, probabilities=probabilities, gated=gated, boxes=boxes,
        fracture=fracture, info={"pixel_spacing_mm": [0.5, 0.5], "rows": 48, "columns": 40},
        sagittal=rng.integers(0, 255, (n, 48), dtype=np.uint8), key_slices=key,
    )  # fmt: skip


def test_bar_chart_heights_are_the_probabilities():
    result = make_result()
    fig = figure_vertebra_bars(result, truth={"C2": 1, "patient_overall": 1})
    bars = fig.axes[0].patches
    assert [round(b.get_height(), 6) for b in bars] == [round(result.fracture[t], 6) for t in TARGETS]
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == [*VERTEBRAE, "patient"]
    assert len(fig.axes[0].lines) == 2 + 1  # two truth markers and the legend handle


def test_overview_draws_vertebra_bands_and_boxes():
    result = make_result()
    fig = figure_overview(result, threshold=0.5)
    ax_img, ax_prob = fig.axes[:2]
    texts = {t.get_text() for t in ax_img.texts}
    assert texts == {"C1", "C2"}  # only the vertebrae stage 1 found
    red = [p for p in ax_img.patches if not p.get_fill()]
    assert len(red) == 2  # one outline per box
    # the C2 box is drawn at its slice (6 -> 12 mm) and its rows (y 12..17 px -> 6..8.5 mm)
    first = red[0]
    assert first.get_x() == pytest.approx(6.0) and first.get_width() == pytest.approx(2.5)
    assert first.get_y() == pytest.approx(12.0 - 1.0)
    assert ax_prob.images[0].get_array().shape == (20, 7)


def test_key_slices_show_each_box_with_its_score():
    fig = figure_key_slices(make_result())
    ax = fig.axes[0]
    assert "slice 7" in ax.get_title() and "0.80" in ax.get_title()
    assert [t.get_text() for t in ax.texts] == ["0.80 C2"]
    empty = figure_key_slices(make_result(with_boxes=False))
    assert "no fracture box" in empty.axes[0].texts[0].get_text()
    # a detector on spine windows: the window is outlined (dashed), the view stays the slice
    result = make_result()
    result.info["stage2_roi"] = [-4, 5, 30]
    ax = figure_key_slices(result).axes[0]
    (window,) = [p for p in ax.patches if p.get_linestyle() == "--"]
    assert (window.get_x(), window.get_y(), window.get_width()) == (4.5, -4.5, 30)
    assert ax.get_xlim() == (-0.5, 39.5) and ax.get_ylim() == (47.5, -0.5)


@pytest.mark.parametrize("fmt, name", [("html", "report.html"), ("markdown", "report.md")])
def test_write_study_report(tmp_path, fmt, name):
    result = make_result()
    path = write_study_report(result, tmp_path / "r", fmt=fmt)
    assert path == tmp_path / "r" / name
    text = path.read_text()
    for figure in ("overview.png", "fractures.png", "vertebrae.png"):
        with Image.open(tmp_path / "r" / figure) as image:
            assert image.size[0] > 100
        assert figure in text  # linked relative to the report
    assert "0.620" in text and "0.650" in text  # C2 and patient probabilities
    assert "slices 1-5 (5 slices)" in text  # where C1 was found
    assert "slices 4-10 (7 slices)" in text  # C2
    assert "C2 0.64" in text  # the box's assignment
    assert UID in text
    with pytest.raises(ValueError, match="fmt"):
        write_study_report(result, tmp_path / "x", fmt="pdf")


def test_embedded_html_needs_no_files(tmp_path):
    result = make_result()
    figures = {"vertebrae": tmp_path / "v.png"}
    Image.new("RGB", (4, 4)).save(figures["vertebrae"])
    page = render_html(result, figures, tmp_path, embed=True)
    assert "src='data:image/png;base64," in page and "v.png" not in page


def test_index_links_each_report(tmp_path):
    table = [{"StudyInstanceUID": UID, **dict.fromkeys(TARGETS, 0.25), "n_slices": 20,
              "n_gated": 10, "n_boxes": 2, "status": "ok"},
             {"StudyInstanceUID": "1.2.3", **dict.fromkeys(TARGETS, 0.1), "n_slices": 0,
              "n_gated": 0, "n_boxes": 0, "status": "failed"}]  # fmt: skip
    path = write_index(table, {UID: str(tmp_path / "reports" / UID / "report.html")}, tmp_path)
    page = path.read_text()
    assert f"href='reports/{UID}/report.html'" in page
    assert "failed" in page and page.count("0.250") == 8


def _index_table():
    return [{"StudyInstanceUID": UID, **dict.fromkeys(TARGETS, 0.25), "n_slices": 20,
             "n_gated": 10, "n_boxes": 2, "status": "ok"}]  # fmt: skip


def _touch(path, image: bool = True):
    path.parent.mkdir(parents=True, exist_ok=True)
    if image:
        Image.new("RGB", (4, 4)).save(path)
    else:
        path.write_text("| a |\n")
    return path


def test_index_links_the_training_figures_of_the_models_used(tmp_path):
    """The stage 1 and stage 2 runs predict recorded (their model files' folders): each figure
    found, linked relative to index.html with a thumbnail, tables as plain links; figures missing
    from a run are left out."""
    stage1, stage2 = tmp_path / "runs" / "stage1 <a>", tmp_path / "runs" / "detect"
    _touch(stage1 / "figures" / "loss_curves.png")
    _touch(stage1 / "table2.md", image=False)
    (stage1 / "model.keras").write_bytes(b"")
    _touch(stage2 / "results.png")
    _touch(stage2 / "val" / "confusion_matrix.png")
    _touch(stage2 / "confusion_matrix.png")  # the training's: the validation's is preferred
    _touch(stage2 / "val" / "figures" / "fig9_confusion_matrix.png")
    (stage2 / "weights").mkdir()
    models = {"stage1": {"source": str(stage1 / "model.keras"), "mode": "bone"},
              "stage2": {"source": str(stage2 / "weights" / "best.onnx")}}  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    page = write_index(_index_table(), {}, out, models=models).read_text()
    assert "<h2>Training figures</h2>" in page
    section = page.split("<h2>Training figures</h2>")[1]
    expected = [
        ("../runs/stage1 &lt;a&gt;/figures/loss_curves.png", "Stage 1 loss and macro F1 curves (Figure 6)"),
        ("../runs/stage1 &lt;a&gt;/table2.md", "Stage 1 Table 2 (per-vertebra report)"),
        ("../runs/detect/results.png", "Stage 2 training results (Ultralytics)"),
        ("../runs/detect/val/figures/fig9_confusion_matrix.png", "Stage 2 confusion matrix (Figure 9)"),
        ("../runs/detect/val/confusion_matrix.png", "Stage 2 confusion matrix (Ultralytics)"),
    ]  # fmt: skip
    positions = [section.index(f"<a href='{href}'>") for href, _ in expected]
    assert positions == sorted(positions)  # stage 1 first, in the tables' order
    for href, name in expected:
        assert f"<a href='{href}'>" in section and name in section
    assert section.count("<img width='240'") == 4  # not for the Markdown table
    assert "<img width='240' src='../runs/detect/results.png'" in section
    assert "study_levels" not in section and "PR_curve" not in section  # not in the runs
    assert "../runs/detect/confusion_matrix.png" not in section
    assert "<code>stage1 &lt;a&gt;</code>" in section and "<a>" not in section


def test_index_shows_the_training_data_figures_and_the_runs_scores(tmp_path):
    """The prepare folder stage 1 trained on (its ``preprocessing.json`` source) gives Figures 3-4
    when ``look`` drew them there; the runs' metrics give the Table 1 and Table 3 rows beside the
    paper's."""
    import json

    from keras_cspine.stage1.runs import write_preprocessing

    prepared, stage1, stage2 = tmp_path / "prep", tmp_path / "s1", tmp_path / "s2"
    _touch(prepared / "figures" / "figure3_fracture_counts.png")
    _touch(prepared / "figures" / "slices.png")
    stage1.mkdir()
    (stage1 / "model.keras").write_bytes(b"")
    write_preprocessing(stage1, mode="bone", render_size=32, image_size=32, metadata_columns=[],
                        metadata_scale={}, source=str(prepared))  # fmt: skip
    metrics = {"split": "test", "n_studies": 35,
               "metrics": {"macro_f1": 0.8282, "exact_match_ratio": 0.7751, "coverage_error": 1.0946},
               "metrics_sequence_model": {"macro_f1": 0.9522, "exact_match_ratio": 0.9249,
                                          "coverage_error": 0.9985}}  # fmt: skip
    (stage1 / "metrics.json").write_text(json.dumps(metrics))
    (stage2 / "weights").mkdir(parents=True)
    (stage2 / "metrics.json").write_text(json.dumps({
        "model": "yolov8n", "split": "val", "images": 131, "precision": 0.779, "recall": 0.672,
        "mAP50": 0.7477, "mAP50-95": 0.2638}))  # fmt: skip
    models = {"stage1": {"source": str(stage1 / "model.keras")},
              "stage2": {"source": str(stage2 / "weights" / "best.onnx")}}  # fmt: skip
    section = write_index(_index_table(), {}, tmp_path, models=models).read_text().split(
        "<h2>Training figures</h2>")[1]  # fmt: skip
    assert "stage 1's prepared data <a href='prep'>" in section
    assert "<a href='prep/figures/figure3_fracture_counts.png'>" in section
    assert "Fractures per vertebra in the data (Figure 3)" in section
    assert "<a href='prep/figures/slices.png'>" in section and "(Figure 4)" in section
    assert "Stage 1, per slice (Table 1" in section and "0.828 / 0.775 / 1.095" in section
    assert "Stage 1, sequence model" in section and "0.952 / 0.925 / 0.999" in section
    assert "level-decoded" not in section  # not in these metrics
    assert "0.96 / 0.95 / 1.26" in section  # the paper's GCViT row
    assert "Stage 2, yolov8n (Table 3" in section and "0.779 / 0.672 / 0.748 / 0.264" in section
    assert "0.94 / 0.921 / 0.96 / 0.747 (YOLOv8s)" in section


@pytest.mark.parametrize("models", [
    None,  # an index written without the record
    {"stage1": {"source": "<in memory>"}, "stage2": None},  # models built in memory
    {"stage1": {"source": "/gone/run/model.keras"}, "stage2": {"source": "/gone/d/weights/best.onnx"}},
    "empty runs",  # run folders without any figure
])  # fmt: skip
def test_index_without_training_figures_has_no_such_section(tmp_path, models):
    if models == "empty runs":
        (tmp_path / "run").mkdir()
        models = {"stage1": {"source": str(tmp_path / "run" / "model.keras")}}
    page = write_index(_index_table(), {}, tmp_path, models=models).read_text()
    assert "Training figures" not in page and "<img" not in page
    assert page.rstrip().endswith("</table></body></html>")


def test_reports_drawn_later_link_the_training_figures_predict_recorded(tmp_path):
    """``report OUT``: the run folders come from the models in a study's saved JSON (no
    summary.json: predict was interrupted)."""
    import json

    from keras_cspine.pipeline.report import render_saved_reports

    run = tmp_path / "run"
    _touch(run / "figures" / "loss_curves.png")
    out = tmp_path / "out"
    (out / "studies").mkdir(parents=True)
    saved = {**make_result().to_json(), "models": {"stage1": {"source": str(run / "model.keras")},
                                                    "stage2": None}}  # fmt: skip
    (out / "studies" / f"{UID}.json").write_text(json.dumps(saved))
    (out / "predictions.csv").write_text(
        "StudyInstanceUID,C1,C2,C3,C4,C5,C6,C7,patient_overall,n_slices,n_gated,n_boxes,status\n"
        f"{UID},.05,.62,.05,.05,.05,.05,.05,.65,20,10,2,ok\n")  # fmt: skip
    assert render_saved_reports(out, workers=0)["failures"] == {}
    page = (out / "index.html").read_text()
    assert "<a href='../run/figures/loss_curves.png'>" in page
