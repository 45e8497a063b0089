"""prepare against a careless or hostile user: content (not paths) decides reuse, errors.csv lists
exactly the current failures, killed runs leave no process behind and keep their finished work,
and argument values out of range are refused before any work."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from keras_cspine.data.prepare import load_index, prepare_dataset, read_settings
from keras_cspine.errors import BoxError, CSpineDataError
from keras_cspine.io.rsna import VERTEBRAE, RsnaLayout

REPO = Path(__file__).resolve().parent.parent
SIZE = 16


def _prepare(data, out, **kw):
    return prepare_dataset(data, out, size=SIZE, workers=1, progress=False, **kw)


@pytest.fixture
def data(synthetic_data, tmp_path) -> Path:
    """A private copy of the synthetic dataset (mtimes kept), free to edit."""
    copy = tmp_path / "data"
    shutil.copytree(synthetic_data, copy)
    return copy


def _marker_times(out: Path) -> dict[str, int]:
    return {p.stem: p.stat().st_mtime_ns for p in (out / "studies").glob("*.json")}


# -- 1. a changed input redoes exactly its study -------------------------------------------------
def _first_uid(data: Path) -> str:
    return RsnaLayout(data).list_studies()[0]


def move_a_box(data):
    boxes = pd.read_csv(data / "train_bounding_boxes.csv")
    boxes.loc[0, "x"] = boxes.loc[0, "x"] + 1.0
    boxes.to_csv(data / "train_bounding_boxes.csv", index=False)
    return str(boxes.StudyInstanceUID.iloc[0])


def remove_a_study_s_boxes(data):
    boxes = pd.read_csv(data / "train_bounding_boxes.csv")
    uid = str(boxes.StudyInstanceUID.iloc[0])
    boxes[boxes.StudyInstanceUID != uid].to_csv(data / "train_bounding_boxes.csv", index=False)
    return uid


def change_a_label(data):
    train = pd.read_csv(data / "train.csv", dtype=str)
    uid = _first_uid(data)
    row = train.index[train.StudyInstanceUID == uid][0]
    fractured = train.loc[row, "patient_overall"] == "1"
    for column in [*VERTEBRAE, "patient_overall"]:
        train.loc[row, column] = "0"
    if not fractured:
        train.loc[row, ["C3", "patient_overall"]] = "1"
    train.to_csv(data / "train.csv", index=False)
    return uid


def _vertebra_of(data, uid) -> int:
    import nibabel as nib

    values = np.unique(np.asarray(nib.load(RsnaLayout(data).segmentation_path(uid)).dataobj))
    return int(min(v for v in values if 1 <= v <= 7))


def replace_a_segmentation(data):
    import nibabel as nib

    uid = _first_uid(data)
    path = RsnaLayout(data).segmentation_path(uid)
    image = nib.load(path, mmap=False)
    seg = np.asarray(image.dataobj).copy()
    seg[seg == _vertebra_of(data, uid)] = 0  # the study's top vertebra is gone
    nib.save(nib.Nifti1Image(seg, image.affine, image.header), path)
    return uid


def remove_a_segmentation(data):
    uid = _first_uid(data)
    RsnaLayout(data).segmentation_path(uid).unlink()
    return uid


def touch_a_dicom_file(data):
    uid = _first_uid(data)
    path = sorted(RsnaLayout(data).series_dir(uid).glob("*.dcm"))[2]
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    return uid


def rewrite_a_slice(data):
    """A DICOM file replaced by another version of itself (another header)."""
    import pydicom

    uid = _first_uid(data)
    path = sorted(RsnaLayout(data).series_dir(uid).glob("*.dcm"))[1]
    ds = pydicom.dcmread(path)
    ds.PatientName = "Someone^Else"
    ds.save_as(path)
    return uid


def touch_a_segmentation(data):
    """Same bytes, newer mtime (a copy, a restore from backup): not a change."""
    uid = _first_uid(data)
    path = RsnaLayout(data).segmentation_path(uid)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    return uid


# (edit of the data, the reason prepare gives; None: the study is not redone)
CHANGES = [
    (move_a_box, "rows of train_bounding_boxes.csv"),
    (remove_a_study_s_boxes, "rows of train_bounding_boxes.csv"),
    (change_a_label, "row of train.csv"),
    (replace_a_segmentation, "segmentation"),
    (remove_a_segmentation, "segmentation"),
    (touch_a_dicom_file, "DICOM files"),
    (rewrite_a_slice, "DICOM files"),
    (touch_a_segmentation, None),
]


@pytest.mark.parametrize("edit, reason", CHANGES, ids=[c[0].__name__ for c in CHANGES])
def test_a_changed_input_redoes_its_study(data, tmp_path, capsys, edit, reason):
    out = tmp_path / "prep"
    _prepare(data, out)
    before, times = load_index(out), _marker_times(out)
    caches = {p.stem: p.stat().st_mtime_ns for p in (out / "cache").glob("*.npy")}
    uid = edit(data)
    capsys.readouterr()
    summary = _prepare(data, out)
    log = capsys.readouterr().err
    after = load_index(out)
    others = sorted(set(times) - {uid})
    # the other studies: not touched, same rows
    assert {u: t for u, t in _marker_times(out).items() if u != uid} == {u: times[u] for u in others}
    pd.testing.assert_frame_equal(
        before[before.StudyInstanceUID != uid].reset_index(drop=True),
        after[after.StudyInstanceUID != uid].reset_index(drop=True),
    )
    assert read_settings(out)["studies"] == len(times) == after.StudyInstanceUID.nunique()
    if reason is None:
        assert summary["studies_processed_this_run"] == 0 and summary["studies_changed"] == {}
        assert (out / "cache" / f"{uid}.npy").stat().st_mtime_ns == caches[uid]
        assert "changed since the last run" not in log
        # the marker learnt the new mtime: the next run does not hash the file again
        marker = json.loads((out / "studies" / f"{uid}.json").read_text())
        seg = RsnaLayout(data).segmentation_path(uid)
        assert marker["inputs"]["segmentation"]["mtime_ns"] == seg.stat().st_mtime_ns
        return
    assert summary["studies_changed"] == {uid: [reason]}
    assert summary["studies_processed_this_run"] == 1 and summary["studies_reused"] == len(others)
    assert "[prepare] 1 study changed since the last run: redone" in log and uid in log
    study, old = after[after.StudyInstanceUID == uid], before[before.StudyInstanceUID == uid]
    boxes = RsnaLayout(data).bounding_boxes()
    expected_boxes = boxes[boxes.StudyInstanceUID == uid]
    assert study.has_fracture_box.sum() == expected_boxes.groupby("slice_number").ngroups
    if edit is move_a_box:
        first = expected_boxes.iloc[0]
        hit = study[study.slice_number == first.slice_number].boxes.iloc[0]
        assert [first.x, first.y, first.width, first.height] in hit
    if edit is replace_a_segmentation:
        column = next(v for v in VERTEBRAE if old[v].sum() > 0)  # the vertebra taken out
        assert study[column].sum() == 0
    if edit is remove_a_segmentation:
        assert (study.labels_known == 0).all() and (study[list(VERTEBRAE)] == -1).all().all()
    if edit in (touch_a_dicom_file, rewrite_a_slice):  # the same pixels, so the same result
        pd.testing.assert_frame_equal(study.reset_index(drop=True), old.reset_index(drop=True))
    # and a third run does nothing
    again = _prepare(data, out)
    assert again["studies_processed_this_run"] == 0 and again["studies_changed"] == {}


@pytest.mark.parametrize("damage, reason", [
    (lambda out, uid: (out / "cache" / f"{uid}.npy").unlink(), "output files missing"),
    (lambda out, uid: (out / "cache" / f"{uid}.npy").write_bytes(b"truncated"),
     "output files missing"),
    (lambda out, uid: (out / "studies" / f"{uid}.csv").unlink(), "output files missing"),
    (lambda out, uid: _rewrite_marker(out, uid, format=1), "prepared by an older version"),
], ids=["cache deleted", "cache truncated", "rows deleted", "old marker"])  # fmt: skip
def test_damaged_output_is_redone(data, tmp_path, damage, reason):
    out = tmp_path / "prep"
    _prepare(data, out)
    uid = _first_uid(data)
    reference = (out / "cache" / f"{uid}.npy").read_bytes()
    damage(out, uid)
    summary = _prepare(data, out)
    assert summary["studies_processed_this_run"] == 1
    assert summary["studies_changed"] == {uid: [reason]}
    assert (out / "cache" / f"{uid}.npy").read_bytes() == reference


def _rewrite_marker(out, uid, **changes):
    path = out / "studies" / f"{uid}.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_index_follows_the_studies_asked_for(data, tmp_path):
    out = tmp_path / "prep"
    n = len(RsnaLayout(data).list_studies())
    _prepare(data, out)
    fewer = _prepare(data, out, limit=2)
    assert fewer["studies_processed_this_run"] == 0
    assert load_index(out).StudyInstanceUID.nunique() == 2 == read_settings(out)["studies"]
    again = _prepare(data, out)
    assert again["studies_processed_this_run"] == 0
    assert load_index(out).StudyInstanceUID.nunique() == n == read_settings(out)["studies"]


def test_prepare_json_names_the_data_it_was_made_from(data, tmp_path):
    """The same studies in another folder: reused (same content), and prepare.json says where."""
    out = tmp_path / "prep"
    _prepare(data, out)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)  # copy2 keeps mtimes: the same content
    summary = _prepare(moved, out)
    assert summary["studies_processed_this_run"] == 0
    assert read_settings(out)["data_dir"] == str(moved.resolve())
    move_a_box(moved)
    assert len(_prepare(moved, out)["studies_changed"]) == 1


def test_leftovers_of_a_killed_run_go_and_nothing_else(data, tmp_path):
    out = tmp_path / "prep"
    _prepare(data, out, limit=1)
    ours = [out / ".index.csv.k2j4_x9q.tmp", out / "cache" / ".1.2.3.npy.partial",
            out / "cache" / ".1.2.3.abcd1234.tmp.npy", out / "studies" / ".1.2.3.json.zz99abcd.tmp"]
    theirs = [out / ".notes.tmp", out / ".keep", out / "cache" / ".DS_Store"]  # fmt: skip
    for path in ours + theirs:
        path.write_bytes(b"x")
    _prepare(data, out, limit=1)
    assert [p for p in ours if p.exists()] == [] and all(p.exists() for p in theirs)


def test_a_damaged_summary_is_named(data, tmp_path):
    out = tmp_path / "prep"
    _prepare(data, out, limit=1)
    (out / "prepare.json").write_text("{not json")
    with pytest.raises(CSpineDataError, match="prepare.json: not readable JSON"):
        _prepare(data, out, limit=1)


# -- 2. errors.csv lists exactly the current failures ------------------------------------------
def test_a_fixed_file_leaves_errors_csv(data, tmp_path):
    layout = RsnaLayout(data)
    uid = layout.list_studies()[1]
    bad = sorted(layout.series_dir(uid).glob("*.dcm"))[3]
    good = bad.read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    out = tmp_path / "prep"
    first = _prepare(data, out, on_error="skip")
    assert first["errors"] == 1 and first["studies_skipped"] == [uid]
    assert pd.read_csv(out / "errors.csv").path.str.contains(bad.name).all()
    # still broken: the error stays, listed once
    second = _prepare(data, out, on_error="skip")
    assert second["errors"] == 1 and len(pd.read_csv(out / "errors.csv")) == 1
    bad.write_bytes(good)  # fixed
    third = _prepare(data, out, on_error="skip")
    assert third["errors"] == 0 and third["studies_skipped"] == []
    assert third["studies_processed_this_run"] == 1
    assert not (out / "errors.csv").exists()
    assert uid in set(load_index(out).StudyInstanceUID)
    assert read_settings(out)["errors"] == 0


def test_errors_of_a_reused_study_stay_until_fixed(data, tmp_path):
    boxes = pd.read_csv(data / "train_bounding_boxes.csv")
    x = boxes.loc[0, "x"]
    boxes.loc[0, "x"] = 10_000.0
    boxes.to_csv(data / "train_bounding_boxes.csv", index=False)
    out = tmp_path / "prep"
    assert _prepare(data, out, on_error="skip")["errors"] == 1
    again = _prepare(data, out, on_error="skip")  # nothing to do, the box is still wrong
    assert again["studies_processed_this_run"] == 0 and again["errors"] == 1
    assert pd.read_csv(out / "errors.csv").problem.str.contains("outside").all()
    with pytest.raises(BoxError, match="outside"):  # --on-error raise does not hide it
        _prepare(data, out)
    boxes.loc[0, "x"] = x
    boxes.to_csv(data / "train_bounding_boxes.csv", index=False)
    fixed = _prepare(data, out, on_error="skip")
    assert fixed["errors"] == 0 and not (out / "errors.csv").exists()
    assert fixed["studies_processed_this_run"] == 1
    assert load_index(out).has_fracture_box.sum() == boxes.groupby(
        ["StudyInstanceUID", "slice_number"]).ngroups  # fmt: skip


def test_a_study_broken_after_it_was_done_loses_its_stale_result(data, tmp_path):
    out = tmp_path / "prep"
    _prepare(data, out)
    uid = _first_uid(data)
    folder = RsnaLayout(data).series_dir(uid)
    for path in folder.glob("*.dcm"):
        path.unlink()
    summary = _prepare(data, out, on_error="skip")
    assert summary["studies_skipped"] == [uid] and summary["errors"] == 1
    assert not (out / "cache" / f"{uid}.npy").exists()
    assert not (out / "studies" / f"{uid}.json").exists()
    assert uid not in set(load_index(out).StudyInstanceUID)


# -- 4. argument floors and paths, refused before any work --------------------------------------
def _cli(*args) -> int:
    from keras_cspine.cli import main

    try:
        return main(["prepare", *map(str, args)])
    except SystemExit as exit_:  # argparse
        return int(exit_.code)


def _file(t: Path) -> Path:
    t.joinpath("a_file").write_text("x")
    return t / "a_file"


def _no_images(t: Path) -> Path:
    (t / "empty").mkdir()
    (t / "empty" / "train.csv").write_text("StudyInstanceUID\n")
    return t / "empty"


# (id, arguments after `prepare` given (data, tmp), what stderr says)
ILLEGAL = [
    ("workers 0", lambda d, t: [d, t / "o", "--workers", "0"],
     "argument --workers: must be >= 1, got 0 (leave --workers out, or give --workers all"),
    ("workers -2", lambda d, t: [d, t / "o", "--workers", "-2"], "must be >= 1, got -2"),
    ("workers two", lambda d, t: [d, t / "o", "--workers", "two"], "'two' is not a whole number"),
    ("size 8", lambda d, t: [d, t / "o", "--size", "8"],
     "argument --size: must be from 16 to 1024 pixels, got 8"),
    ("size 100000", lambda d, t: [d, t / "o", "--size", "100000"], "must be from 16 to 1024"),
    ("limit 0", lambda d, t: [d, t / "o", "--limit", "0"], "argument --limit: must be >= 1, got 0"),
    ("studies with no UID", lambda d, t: [d, t / "o", "--studies"],
     "argument --studies: expected at least one argument"),
    ("unknown study", lambda d, t: [d, t / "o", "--studies", "1.2.3"], "no such study: '1.2.3'"),
    ("study outside the folder", lambda d, t: [d, t / "o", "--studies", "../segmentations"],
     "no such study"),
    ("OUT is a file", lambda d, t: [d, _file(t)], "a_file: is a file, not a folder"),
    ("DATA is a file", lambda d, t: [_file(t), t / "o"], "a_file: is a file, not a folder"),
    ("DATA missing", lambda d, t: [t / "nowhere", t / "o"], "nowhere: dataset folder not found"),
    ("DATA not RSNA", lambda d, t: [_no_images(t), t / "o"],
     "empty: not an RSNA-layout folder: it has no train_images/ folder"),
    ("OUT is DATA", lambda d, t: [d, d], "is the dataset folder itself"),
    ("OUT inside the images", lambda d, t: [d, d / "train_images" / "prep"],
     "where it would be read as a study"),
]  # fmt: skip


@pytest.mark.parametrize("make, says", [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL])
def test_illegal_arguments_are_refused_up_front(synthetic_data, tmp_path, capsys, make, says):
    data = tmp_path / "data"
    shutil.copytree(synthetic_data, data)
    args = make(data, tmp_path)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    assert _cli(*args) == 2
    err = capsys.readouterr().err
    assert says in err, err
    if "error: argument" not in err:  # a CSpineDataError: one line naming the path
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists(), "nothing may be created for a refused command"
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before


@pytest.mark.parametrize("kwargs, says", [
    ({"workers": 0}, "workers must be a whole number >= 1"),
    ({"workers": 1.5}, "workers must be a whole number >= 1"),
    ({"limit": 0}, "limit must be a whole number >= 1"),
    ({"size": 8}, "size must be a whole number of pixels from 16 to 1024"),
    ({"size": True}, "size must be a whole number"),
    ({"chunk_slices": 0}, "chunk_slices must be a whole number >= 1"),
    ({"studies": []}, "studies is empty"),
    ({"studies": "1.2.3"}, "must be a list of StudyInstanceUIDs"),
], ids=lambda v: json.dumps(v) if isinstance(v, dict) else None)  # fmt: skip
def test_illegal_values_in_the_api(synthetic_data, tmp_path, kwargs, says):
    args = {"size": SIZE, "workers": 1, "progress": False, **kwargs}
    with pytest.raises(ValueError, match=says):
        prepare_dataset(synthetic_data, tmp_path / "o", **args)
    assert not (tmp_path / "o").exists()


def test_workers_all_is_every_core(synthetic_data, tmp_path, capsys):
    assert _cli(synthetic_data, tmp_path / "o", "--workers", "all", "--size", "16", "--limit", "1") == 0
    assert "prepared 1 studies" in capsys.readouterr().out


def test_one_prepare_per_folder(synthetic_data, tmp_path):
    fcntl = pytest.importorskip("fcntl")
    out = tmp_path / "prep"
    out.mkdir()
    with open(out / ".prepare.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(CSpineDataError, match="another prepare"):
            _prepare(synthetic_data, out, limit=1)
    assert _prepare(synthetic_data, out, limit=1)["studies"] == 1  # free again


# -- 3. killed runs: no process left, finished studies kept -------------------------------------
N_CLONES = 3  # the kill tests' dataset: the synthetic studies and three copies of each (16)


@pytest.fixture(scope="module")
def many_studies(synthetic_data, tmp_path_factory) -> Path:
    """More studies than the first finishes in (series folders linked under new UIDs)."""
    data = tmp_path_factory.mktemp("many") / "rsna"
    shutil.copytree(synthetic_data, data)
    for folder in sorted((data / "train_images").iterdir()):
        for k in range(1, N_CLONES + 1):
            (data / "train_images" / f"{folder.name}.9{k}").symlink_to(folder.resolve())
    return data


@pytest.fixture(scope="module")
def many_prepared(many_studies, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("many_prepared") / "prep"
    prepare_dataset(many_studies, out, size=32, workers=1, progress=False)
    return out


def _tagged_processes(tag: str) -> list[tuple[int, str]]:
    """Live (not zombie) processes whose environment holds ``tag``: the run and all it started."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if tag.encode() not in (entry / "environ").read_bytes():
                continue
            stat = (entry / "stat").read_bytes()
            if stat[stat.rfind(b")") + 2 :][:1] in (b"Z", b"X"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append((int(entry.name), cmdline[:120]))
    return found


def _start_and_kill(data: Path, out: Path, workers: int, sig: int) -> tuple[int, str]:
    """Run `prepare` in a fresh interpreter, send ``sig`` once its first study is committed,
    and wait until no process it started is alive. Returns (exit code, stderr)."""
    tag = f"KERAS_CSPINE_TEST_{uuid.uuid4().hex}"
    env = {**os.environ, "KERAS_CSPINE_TEST_TAG": tag}
    process = subprocess.Popen(
        [sys.executable, "-m", "keras_cspine", "prepare", str(data), str(out), "--size", "32",
         "--workers", str(workers)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("studies/*.json")):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no study finished in time"
            time.sleep(0.005)
        assert process.poll() is None, "the run ended before it could be killed"
        started = [pid for pid, _ in _tagged_processes(tag) if pid != process.pid]
        if workers > 1:
            assert started, "a parallel run starts worker processes"
        process.send_signal(sig)
        code = process.wait(30)
        deadline = time.monotonic() + 10
        while (left := _tagged_processes(tag)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"processes of the killed run still alive: {left}"
        return code, process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid, _ in _tagged_processes(tag):  # never leave our own strays behind
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def _same_output(out: Path, reference: Path) -> None:
    names = sorted(str(p.relative_to(reference)) for p in reference.rglob("*")
                   if p.is_file() and not p.name.startswith(".") and p.name != "prepare.json")  # fmt: skip
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*")
                 if p.is_file() and not p.name.startswith(".") and p.name != "prepare.json")  # fmt: skip
    assert got == names
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")


@needs_proc
@pytest.mark.parametrize("workers, sig", [(2, signal.SIGKILL), (2, signal.SIGTERM),
                                          (1, signal.SIGKILL)],
                         ids=["workers2-SIGKILL", "workers2-SIGTERM", "workers1-SIGKILL"])  # fmt: skip
def test_a_killed_prepare_leaves_nothing_running_and_keeps_its_work(
    many_studies, many_prepared, tmp_path, workers, sig
):
    out = tmp_path / "prep"
    code, stderr = _start_and_kill(many_studies, out, workers, sig)
    assert code == (143 if sig == signal.SIGTERM else -signal.SIGKILL), stderr
    if sig == signal.SIGTERM:  # stopped in good order: no partial file, and it says so
        assert "interrupted" in stderr and not list(out.glob("cache/.*"))
    kept = sorted(p.stem for p in out.glob("studies/*.json"))
    n = len(RsnaLayout(many_studies).list_studies())
    assert 1 <= len(kept) < n
    resumed = prepare_dataset(many_studies, out, size=32, workers=1, progress=False)
    assert resumed["studies_reused"] == len(kept)
    assert resumed["studies_processed_this_run"] == n - len(kept)
    assert resumed["studies_changed"] == {}
    assert not list(out.glob("cache/.*partial"))
    _same_output(out, many_prepared)
