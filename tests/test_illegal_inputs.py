"""Illegal inputs and what each gets: one line, ``error: <file>: <problem>``, exit code 2 (for a
bad argument value, argparse's usage line and ``<prog>: error: argument ...``).

The table :data:`CASES` is the source of the README's "Illegal inputs" table:
``python tests/test_illegal_inputs.py`` prints it, and :func:`test_readme_table_is_generated`
fails when the README's copy drifts. Each case runs the real command line, in this process
(``keras_cspine.cli.main``) or, for stage 2, in a fresh interpreter.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- illegal-inputs:begin -->", "<!-- illegal-inputs:end -->"


@dataclass(frozen=True)
class Case:
    what: str  # the input, in words (README)
    argv: Callable[[Path], list[str]]  # the command line, given a scratch folder
    gets: str  # a fragment of the one-line error (README: what the user gets)
    setup: Callable[[Path], None] = lambda tmp: None
    subprocess: bool = False  # stage 2 commands: never TensorFlow and torch in one process
    env: tuple[tuple[str, str], ...] = ()  # environment variables set for the command


def _file(name: str, text: str = "x") -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        (tmp / name).write_text(text)

    return make


def _run_without_summary(tmp: Path) -> None:
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("name: x\n")


def _shard_parts(*sizes: int) -> Callable[[Path], None]:
    """Finished prepare shards of ``len(sizes)`` under ``tmp/out``, one per size (None: missing)."""

    def make(tmp: Path) -> None:
        import json

        for i, size in enumerate(sizes):
            if size is None:
                continue
            part = tmp / "out" / "shards" / f"{i}-of-{len(sizes)}"
            part.mkdir(parents=True)
            (part / "shard.json").write_text(json.dumps({
                "kind": "prepare", "shard": part.name, "settings": {"size": size, "mode": "bone",
                "split": "train"}, "study_selection": {"studies": 4, "digest": "0"}}))  # fmt: skip

    return make


def _run_trained_on_the_data(tmp: Path) -> None:
    import json

    from helpers_stage1 import make_prepared, study_uid

    make_prepared(tmp / "prep", n_studies=3, n_slices=4, unlabelled=0)
    (tmp / "run").mkdir()
    (tmp / "run" / "config.yaml").write_text("name: x\n")
    (tmp / "run" / "model.keras").write_bytes(b"x")
    (tmp / "run" / "splits.json").write_text(json.dumps({
        "train": [study_uid(0), study_uid(1)], "val": [study_uid(2)], "test": [],
        "prepared": str(tmp / "prep")}))  # fmt: skip


def _weights_file(tmp: Path) -> None:
    (tmp / "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"not hdf5")


CASES: list[Case] = [
    Case("a data folder that is neither prepared nor in the RSNA layout",
         lambda t: ["train", str(t)], "neither a prepare folder (index.csv) nor an RSNA-layout"),
    Case("a config value out of range (`--set train.epochs=0`)",
         lambda t: ["train", str(t), "--set", "train.epochs=0"],
         "epochs and batch_size must be >= 1"),
    Case("a misspelt config key (`--set model.nme=vit`)",
         lambda t: ["train", str(t), "--set", "model.nme=vit"], "unknown config key(s) model.nme"),
    Case("a config that does not exist",
         lambda t: ["train", str(t), "--config", "stage1_alexnet"],
         "stage1_alexnet: no such config file (bundled configs:"),
    Case("a frozen backbone with random weights (`--set model.weights=null`)",
         lambda t: ["train", str(t), "--config", "stage1_gcvit_tiny", "--set", "model.weights=null"],
         "freezes its backbone (freeze 'levels_2') but model.weights is null"),
    Case("a paper config whose ImageNet weights are not here",
         lambda t: ["train", str(t), "--config", "stage1_resnet152v2"],
         "get them with `keras-cspine weights fetch resnet152v2`"),
    Case("several machines without `TF_CONFIG`",
         lambda t: ["train", str(t), "--set", "train.strategy=multi_worker"],
         "TF_CONFIG: not set: train.strategy multi_worker needs the cluster"),
    Case("a `TF_CONFIG` that is not JSON",
         lambda t: ["train", str(t), "--set", "train.strategy=multi_worker"],
         "TF_CONFIG: not JSON", env=(("TF_CONFIG", "{cluster"),)),
    Case("a `TF_CONFIG` task index outside its cluster",
         lambda t: ["train", str(t), "--set", "train.strategy=multi_worker"],
         "TF_CONFIG: task index 2 is out of range: the cluster has 2 worker task(s)",
         env=(("TF_CONFIG", '{"cluster": {"worker": ["a:1", "b:1"]}, '
                            '"task": {"type": "worker", "index": 2}}'),)),
    Case("a `TF_CONFIG` task type that MultiWorkerMirroredStrategy does not run",
         lambda t: ["train", str(t), "--set", "train.strategy=multi_worker"],
         "TF_CONFIG: task type 'ps' is unknown to MultiWorkerMirroredStrategy",
         env=(("TF_CONFIG", '{"cluster": {"worker": ["a:1"]}, "task": {"type": "ps", '
                            '"index": 0}}'),)),
    Case("an unknown model in a table",
         lambda t: ["reproduce", "table1", "--dry-run", "--models", "alexnet"],
         "unknown model 'alexnet'; known:"),
    Case("evaluating a folder that is not a finished run",
         lambda t: ["evaluate", str(t / "run")], "config.yaml: missing: not a finished training run",
         setup=lambda t: (t / "run").mkdir()),
    Case("a weights file brought by hand with the wrong hash",
         lambda t: ["weights", "add", str(t / "resnet152v2_weights_tf_dim_ordering_tf_kernels_notop.h5"),
                    "--name", "resnet152v2"],
         "notop.h5: md5 mismatch for resnet152v2: expected ed17cf2e", setup=_weights_file),
    Case("a weights name that does not exist", lambda t: ["weights", "fetch", "alexnet"],
         "unknown weights 'alexnet'"),
    Case("prediction from a stage 1 run folder without a model",
         lambda t: ["predict", str(t), "--out", str(t / "out"), "--stage1", str(t / "run")],
         "model.keras: stage 1 model not found", setup=_run_without_summary),
    Case("prepare with no worker (`--workers 0`)",
         lambda t: ["prepare", str(t), str(t / "out"), "--workers", "0"], "--workers"),
    Case("an output folder that is a file",
         lambda t: ["prepare", str(t / "data"), str(t / "out.txt")], "out.txt: ",
         setup=lambda t: ((t / "data" / "train_images").mkdir(parents=True),
                          (t / "out.txt").write_text("x"))),
    Case("prediction into an output path that is a file",
         lambda t: ["predict", str(t), "--out", str(t / "out.txt")], "out.txt: ",
         setup=_file("out.txt")),
    Case("prediction of at most zero studies (`--limit 0`)",
         lambda t: ["predict", str(t), "--out", str(t / "out"), "--limit", "0"], "--limit"),
    Case("a shard that does not exist (`--shard 3/2`; shards are 0-based)",
         lambda t: ["prepare", str(t), str(t / "out"), "--shard", "3/2"],
         "out of range for 2 shards: give i/n with 0 <= i < n"),
    Case("a shard spec that is not i/n (`--shard 1/2/3`, `a/b`)",
         lambda t: ["predict", str(t), "--out", str(t / "out"), "--shard", "1/2/3"],
         "'1/2/3' is not i/n"),
    Case("no shards at all (`--shard 0/0`)",
         lambda t: ["prepare", str(t), str(t / "out"), "--shard", "0/0"],
         "the number of shards must be >= 1"),
    Case("merging an incomplete set of shards",
         lambda t: ["merge", str(t / "out")], "missing 1: 1-of-2 (never run)",
         setup=_shard_parts(32, None)),
    Case("merging shards prepared with different settings",
         lambda t: ["merge", str(t / "out")],
         "settings.size is 48 in shard 1-of-2 but 32 in shard 0-of-2", setup=_shard_parts(32, 48)),
    Case("evaluating on data that holds the run's training studies",
         lambda t: ["evaluate", str(t / "run"), "--data", str(t / "prep")],
         "3 of its 3 labelled studies were seen in training", setup=_run_trained_on_the_data),
    Case("a YOLO export of a folder that is not in the RSNA layout",
         lambda t: ["detect", "export", str(t), str(t / "yolo")],
         "train_bounding_boxes.csv: file not found: the YOLO export needs fracture boxes",
         subprocess=True),
]  # fmt: skip


@pytest.fixture
def caches(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("KERAS_CSPINE_WEIGHTS", str(tmp_path / "cspine_weights"))
    monkeypatch.delenv("KERAS_CSPINE_DEBUG", raising=False)
    monkeypatch.delenv("TF_CONFIG", raising=False)
    scratch = tmp_path / "case"
    scratch.mkdir()
    return scratch


@pytest.mark.parametrize("case", CASES, ids=[c.what for c in CASES])
def test_illegal_input_gets_one_line(case, caches, capsys, monkeypatch):
    case.setup(caches)
    for name, value in case.env:
        monkeypatch.setenv(name, value)
    argv = case.argv(caches)
    if case.subprocess:
        from helpers_cli import run_cli

        result = run_cli(*argv, env={"KERAS_HOME": str(caches.parent / "keras_home"),
                                     **dict(case.env)})
        code, err = result.returncode, result.stderr
    else:
        from keras_cspine.cli import main

        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse: a usage line, then `<prog>: error: <problem>`
            code = exit_.code
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error: " in line]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case.gets in lines[0], lines[0]


def test_debug_shows_the_traceback(caches, monkeypatch):
    from keras_cspine.cli import main
    from keras_cspine.errors import CSpineDataError

    with pytest.raises(CSpineDataError, match="neither a prepare folder"):
        main(["--debug", "train", str(caches)])
    monkeypatch.setenv("KERAS_CSPINE_DEBUG", "1")
    with pytest.raises(CSpineDataError):
        main(["train", str(caches)])


def markdown_table() -> str:
    rows = ["| input | command | what it gets (exit code 2) |", "|---|---|---|"]
    for case in CASES:
        argv = " ".join(a.replace(str(Path("/SCRATCH")), "DIR") for a in case.argv(Path("DIR")))
        argv = " ".join([*(f"{k}='{v}'" for k, v in case.env), argv])
        gets = case.gets.replace("|", "\\|").strip()
        rows.append(f"| {case.what} | `{argv}` | `` error: ...{gets}... `` |")
    return "\n".join(rows)


def test_readme_table_is_generated():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert BEGIN in readme and END in readme, "README lacks the illegal-inputs markers"
    current = readme.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert current == markdown_table(), "run: python tests/test_illegal_inputs.py --write"


if __name__ == "__main__":  # python tests/test_illegal_inputs.py [--write]
    table = markdown_table()
    if "--write" in sys.argv:
        path = REPO / "README.md"
        text = path.read_text(encoding="utf-8")
        head, rest = text.split(BEGIN, 1)
        path.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}", encoding="utf-8")
    print(table)
