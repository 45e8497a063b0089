"""Reports drawn off the critical path (pipeline/report.py ReportPool, the ``report`` command)
and the coarse-to-fine stage 2 gate (pipeline/results.py refine_slices)."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from keras_cspine.pipeline.report import (
    ReportPool,
    load_study_result,
    render_saved_reports,
    save_report_images,
    write_study_report,
)
from keras_cspine.pipeline.results import refine_slices
from tests.test_report import UID, make_result


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def _same_png(a, b) -> bool:
    return np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_pool_draws_the_same_files_as_drawing_inline(tmp_path):
    result = make_result()
    inline = write_study_report(result, tmp_path / "inline")
    with ReportPool(workers=1) as pool:
        pool.submit(result, tmp_path / "pool")
    reports, failures = pool.reports, pool.failures
    assert failures == {} and reports == {UID: str(tmp_path / "pool" / "report.html")}
    assert _files(tmp_path / "inline") == _files(tmp_path / "pool")
    assert (tmp_path / "pool" / "report.html").read_text().replace("pool", "") == inline.read_text(
        ).replace("inline", "")  # fmt: skip
    for name in ("overview.png", "fractures.png", "vertebrae.png"):
        assert _same_png(tmp_path / "inline" / name, tmp_path / "pool" / name)
    assert pool.tensorflow_in_worker is False  # spawned workers import no TensorFlow
    assert pool.render_seconds > 0


def test_a_failing_report_names_its_study_and_loses_no_other(tmp_path):
    good = make_result()
    bad = dataclasses.replace(make_result(), uid="1.2.3.999", fracture={})  # no probabilities
    pool = ReportPool(workers=1)
    pool.submit(bad, tmp_path / "bad")
    pool.submit(good, tmp_path / "good")
    reports, failures = pool.close()
    assert list(failures) == ["1.2.3.999"] and "KeyError" in failures["1.2.3.999"]
    assert list(reports) == [UID] and (tmp_path / "good" / "report.html").is_file()


@pytest.mark.parametrize("workers", [0, 1])
def test_reports_later_from_the_saved_json_and_images(tmp_path, workers):
    result = make_result()
    write_study_report(result, tmp_path / "now")
    out = tmp_path / "out"
    (out / "studies").mkdir(parents=True)
    (out / "studies" / f"{UID}.json").write_text(json.dumps(result.to_json()))
    save_report_images(result, out / "report_data" / f"{UID}.npz")
    back = load_study_result(out / "studies" / f"{UID}.json")
    assert list(back.key_slices) == list(result.key_slices)
    assert np.array_equal(back.sagittal, result.sagittal)
    (out / "predictions.csv").write_text(
        "StudyInstanceUID,C1,C2,C3,C4,C5,C6,C7,patient_overall,n_slices,n_gated,n_boxes,status\n"
        f"{UID},.05,.62,.05,.05,.05,.05,.05,.65,20,10,2,ok\n")  # fmt: skip
    done = render_saved_reports(out, workers=workers)
    assert done["failures"] == {} and list(done["reports"]) == [UID]
    assert _files(out / "reports" / UID) == _files(tmp_path / "now")
    for name in ("overview.png", "fractures.png", "vertebrae.png"):
        assert _same_png(tmp_path / "now" / name, out / "reports" / UID / name)
    assert UID in (out / "index.html").read_text()


def test_report_command_needs_a_predict_output(tmp_path):
    from keras_cspine.cli import main

    assert main(["report", str(tmp_path)]) == 2


# ---- refine_slices: the gate's coarse-to-fine pass --------------------------------------------
def _run(candidates, stride, box_slices):
    looked = []

    def look(i):
        looked.append(i)
        return i in box_slices

    return refine_slices(np.asarray(candidates, bool), stride, look), looked


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_refine_finds_every_run_of_boxes_at_least_stride_long(stride):
    candidates = np.ones(40, bool)
    candidates[:3] = candidates[-4:] = False
    runs = [range(5, 5 + stride), range(20, 27), range(30, 30 + stride)]
    boxes = {i for r in runs for i in r}
    seen, looked = _run(candidates, stride, boxes)
    assert boxes <= set(np.flatnonzero(seen))  # every slice with a box was looked at
    assert len(looked) == len(set(looked)) == seen.sum()  # each slice once
    assert not seen[~candidates].any()
    if stride == 1:
        assert np.array_equal(seen, candidates) and looked == sorted(looked)


def test_refine_with_no_box_looks_at_about_one_slice_in_stride():
    candidates = np.zeros(300, bool)
    candidates[30:270] = True
    seen, _ = _run(candidates, 2, set())
    assert seen.sum() == 121  # 120 even slices + the run's last one
    with pytest.raises(ValueError, match="stride"):
        _run(candidates, 0, set())
