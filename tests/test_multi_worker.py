"""Stage 1 on several workers (``train.strategy: multi_worker``, :mod:`keras_cspine.stage1.distribute`).

Two processes of the real command line (``python -m keras_cspine train``, through this file's
``__main__``, which adds probe callbacks) on localhost, each with its ``TF_CONFIG``: they share
each epoch's batches, keep identical weights, the chief alone writes the run folder, and a job
killed after an epoch resumes after it. The parsing of ``TF_CONFIG`` is tested in-process.

Run one worker by hand::

    python tests/test_multi_worker.py --probe DIR [--kill-after-epoch E --kill-marker FILE] \\
        -- train PREP --run-dir RUN --set train.strategy=multi_worker ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STUDIES, SLICES, BATCH = 5, 12, 4  # 2 training studies: 24 slices, 6 batches an epoch
FAST = ["model.name=metadata_only", "train.batch_size=4", "data.image_size=32",
        "data.val_fraction=0.25", "data.test_fraction=0.25", "train.early_stopping_patience=0",
        "sequence.enabled=false", "train.epochs=2"]  # fmt: skip
TIMEOUT = 240  # seconds for one job of two workers; a hang fails the test instead of CI


# --------------------------------------------------------------------------------------------
# TF_CONFIG (in-process)
# --------------------------------------------------------------------------------------------
def _tf_config(cluster, task_type="worker", index=0) -> str:
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


TWO = {"worker": ["localhost:1", "localhost:2"]}


@pytest.mark.parametrize(
    "text, task, rank, chief, workers",
    [
        (_tf_config(TWO, "worker", 0), "worker 0", 0, True, 2),
        (_tf_config(TWO, "worker", 1), "worker 1", 1, False, 2),
        (_tf_config({"chief": ["a:1"], "worker": ["b:1", "c:1"]}, "chief", 0), "chief 0", 0,
         True, 3),
        (_tf_config({"worker": ["b:1", "c:1"], "chief": ["a:1"]}, "worker", 0), "worker 0", 1,
         False, 3),
        (_tf_config({"worker": ["localhost:5"]}), "worker 0", 0, True, 1),
    ],
)  # fmt: skip
def test_tf_config_names_the_chief(text, task, rank, chief, workers):
    from keras_cspine.stage1.distribute import parse_tf_config

    cluster = parse_tf_config(text)
    assert (cluster.name, cluster.rank, cluster.is_chief, cluster.num_workers) == (
        task, rank, chief, workers)  # fmt: skip
    assert list(cluster.cluster)[0] == ("chief" if "chief" in text else "worker")


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "TF_CONFIG: not set"),
        ("", "TF_CONFIG: not set"),
        ("{cluster: 1", "TF_CONFIG: not JSON"),
        ("[1, 2]", "TF_CONFIG: not a JSON object"),
        (json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG: no cluster"),
        (json.dumps({"cluster": TWO}), "TF_CONFIG: no task"),
        (json.dumps({}), "no cluster and no task"),
        (json.dumps({"cluster": {}, "task": {"type": "worker", "index": 0}}), "cluster must map"),
        (_tf_config({"worker": "localhost:1"}), "non-empty list of host:port"),
        (_tf_config({"worker": ["localhost"]}), "'localhost' is not host:port"),
        (_tf_config({"ps": ["a:1"], "worker": ["b:1"]}), "task type 'ps'; MultiWorker"),
        (_tf_config({"chief": ["a:1", "b:1"]}, "chief", 0), "2 chiefs"),
        (_tf_config(TWO, "worker", 2), "task index 2 is out of range: the cluster has 2 worker"),
        (_tf_config(TWO, "worker", -1), "task index -1 is out of range"),
        (_tf_config(TWO, "worker", "0"), "task index '0' is out of range"),
        (_tf_config(TWO, "evaluator", 0), "task type 'evaluator' is unknown"),
        (_tf_config(TWO, "chief", 0), "task type 'chief' is not in the cluster"),
        (json.dumps({"cluster": TWO, "task": {"type": "worker"}}), "task must be"),
    ],
)  # fmt: skip
def test_bad_tf_config_is_one_clear_error(text, match):
    from keras_cspine.config import ConfigError
    from keras_cspine.stage1.distribute import cluster_from_environment

    environ = {} if text is None else {"TF_CONFIG": text}
    with pytest.raises(ConfigError, match=match) as info:
        cluster_from_environment(environ)
    assert "\n" not in str(info.value)


def test_shards_are_disjoint_and_equal_in_length():
    from keras_cspine.stage1.distribute import shard_batches

    for batches in range(1, 12):
        for workers in range(1, 5):
            shards = [shard_batches(batches, workers, w) for w in range(workers)]
            assert len({len(s) for s in shards}) == 1  # the same number of steps everywhere
            assert sorted(set().union(*map(set, shards))) == list(range(batches))  # all read
            if batches % workers == 0:  # each batch exactly once
                assert sorted(b for s in shards for b in s) == list(range(batches))
    assert shard_batches(10, 2, 1, max_batches=4) == [1, 3]  # train.steps_per_epoch caps first


def test_multi_worker_without_tf_config_stops_before_any_work(tmp_path, monkeypatch):
    from keras_cspine.config import ConfigError
    from keras_cspine.stage1.train import load_stage1_config, train_stage1

    monkeypatch.delenv("TF_CONFIG", raising=False)
    config = load_stage1_config("stage1_synthetic_small", [*FAST, "train.strategy=multi_worker"])
    with pytest.raises(ConfigError, match="TF_CONFIG: not set"):
        train_stage1(config, tmp_path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# Two workers on localhost (subprocesses)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from helpers_stage1 import make_prepared

    return make_prepared(tmp_path_factory.mktemp("prep"), n_studies=STUDIES, n_slices=SLICES,
                         unlabelled=1)  # fmt: skip


def _free_ports(n: int) -> list[int]:
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("localhost", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Job:
    """Two workers of ``python -m keras_cspine train`` (worker 0 is the chief)."""

    def __init__(self, tmp: Path, prepared: Path, run_dir: Path, name: str):
        self.tmp, self.prepared, self.run_dir, self.name = tmp, prepared, run_dir, name
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def probe(self, index: int) -> Path:
        return self.tmp / f"probe-{self.name}-{index}"

    def start(self, kill: dict[int, int] | None = None) -> Job:
        ports = _free_ports(2)
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        (self.tmp / "workertmp").mkdir(exist_ok=True)
        for index in range(2):
            env = {**os.environ, "TF_CONFIG": _tf_config(cluster, "worker", index),
                   "TF_CPP_MIN_LOG_LEVEL": "2", "TF_NUM_INTRAOP_THREADS": "1",
                   "TF_NUM_INTEROP_THREADS": "2", "CUDA_VISIBLE_DEVICES": "",
                   "KERAS_BACKEND": "tensorflow", "TMPDIR": str(self.tmp / "workertmp"),
                   "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
            argv = [sys.executable, str(Path(__file__).resolve()), "--probe", str(self.probe(index))]
            if kill and index in kill:
                argv += ["--kill-after-epoch", str(kill[index]),
                         "--kill-marker", str(self.tmp / f"killed-{index}")]
            argv += ["--", "train", str(self.prepared), "--run-dir", str(self.run_dir), "--quiet",
                     *[a for o in [*FAST, "train.strategy=multi_worker"] for a in ("--set", o)]]
            log = self.tmp / f"{self.name}-{index}-{len(self.logs)}.log"
            self.logs.append(log)
            with open(log, "w") as out:
                self.procs.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                   env=env, cwd=REPO))  # fmt: skip
        return self

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        try:
            for proc in self.procs:
                codes.append(proc.wait(timeout=max(deadline - time.monotonic(), 1)))
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the workers did not finish in {timeout} s:\n{self.output()}")
        return codes

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def output(self, index: int | None = None) -> str:
        logs = self.logs if index is None else self.logs[index::2]
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)


@contextlib.contextmanager
def _job(*args):
    job = Job(*args)
    try:
        yield job
    finally:
        job.stop()


def _epochs(probe: Path) -> dict[int, dict]:
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in probe.glob("epoch-*.json")}


def _files(folder: Path) -> set[str]:
    """The run's files; TensorBoard event files by kind (their names hold a time and a pid, and
    a resumed run adds one per start)."""
    return {re.sub(r"events\.out\.tfevents\..*", "events.out.tfevents", str(p.relative_to(folder)))
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


@pytest.mark.slow
def test_two_workers_killed_and_restarted_end_like_one_worker(prepared, tmp_path):
    """A job of two workers loses worker 1 after the first epoch; restarted (both, as the
    scheduler of a MultiWorkerMirroredStrategy job does), it resumes at the second epoch. Each
    worker takes half of a single worker's steps on its own slices, both end every epoch with
    the same weights, and the chief's run folder holds what a single-worker run writes."""
    from keras_cspine.stage1.train import load_stage1_config, train_stage1

    single = train_stage1(load_stage1_config("stage1_synthetic_small", FAST), prepared,
                          tmp_path / "single", verbose=0)  # fmt: skip
    assert single["steps_per_epoch"] == 6 and single["workers"] == 1

    run_dir = tmp_path / "run"
    with _job(tmp_path, prepared, run_dir, "job") as job:
        job.start(kill={1: 0})  # worker 1 dies once its first epoch has ended
        assert job.procs[1].wait(timeout=TIMEOUT) == 17, job.output(1)
        # the chief cannot go on without it; once the chief has ended the first epoch too,
        # stop it (or find it stopped) and restart the whole job
        deadline = time.monotonic() + 60
        while job.procs[0].poll() is None and not (job.probe(0) / "epoch-0.json").is_file():
            assert time.monotonic() < deadline, job.output(0)
            time.sleep(0.2)
        job.stop()
        first = {i: _epochs(job.probe(i)) for i in (0, 1)}
        assert sorted(first[0]) == sorted(first[1]) == [0], job.output()
        metadata = json.loads((run_dir / "backup" / "training_metadata.json").read_text())
        assert metadata["epoch"] == 1  # the backup of the chief holds the first epoch

        job.procs = []
        codes = job.start(kill={1: 0}).wait()  # the marker says: killed once already
        assert codes == [0, 0], job.output()
        # the restarted worker trained the second epoch only
        assert "worker 1 of 2 workers done, 1 epoch(s) trained here, 3 steps each" in job.output(1)

    # the run ends with as many epochs as a run never killed, in a complete run folder
    history = json.loads((run_dir / "history.json").read_text())
    assert history["epoch"] == [0.0, 1.0]
    assert _files(run_dir) == _files(tmp_path / "single")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] and summary["epochs_run"] == 2 and summary["workers"] == 2
    assert summary["steps_per_epoch"] == single["steps_per_epoch"] // 2 == 3
    # the other worker wrote nothing outside its temporary folder, and removed that on the
    # restart (the killed one left its folder behind)
    assert list((tmp_path / "workertmp").glob("keras_cspine-*")) == []
    for index in (0, 1):  # the restart began at the second epoch, on both workers
        begun = json.loads((job.probe(index) / "begun.json").read_text())
        assert begun == [[0], [1]], begun
    # the restarted worker had no backup of its own (a new temporary folder): it took the
    # chief's weights, so both ended the second epoch alike, as they had the first
    chief, worker = _epochs(job.probe(0)), _epochs(job.probe(1))
    for epoch in (0, 1):
        assert chief[epoch]["steps"] == worker[epoch]["steps"] == 3  # half of 6
        assert chief[epoch]["weights"] == worker[epoch]["weights"]
        assert len(chief[epoch]["batches"]) == len(worker[epoch]["batches"]) == 3
        chief_slices = {i for batch in chief[epoch]["batches"] for i in batch}
        worker_slices = {i for batch in worker[epoch]["batches"] for i in batch}
        assert not chief_slices & worker_slices  # each worker its own slices
        assert len(chief_slices | worker_slices) == SLICES * 2  # together the whole split
    assert chief[0]["weights"] != chief[1]["weights"]  # and they did train


# --------------------------------------------------------------------------------------------
# One worker of the jobs above: the command line plus probe callbacks
# --------------------------------------------------------------------------------------------
def _probe_callbacks(probe: Path, kill_after_epoch: int | None, kill_marker: Path | None):
    import hashlib

    import keras
    import numpy as np

    probe.mkdir(parents=True, exist_ok=True)

    class Probe(keras.callbacks.Callback):
        """Per epoch: steps taken, a digest of the weights, and which batches were read."""

        def on_train_begin(self, logs=None):
            self.begun = []
            begun_path = probe / "begun.json"
            self.history = json.loads(begun_path.read_text()) if begun_path.exists() else []

        def on_epoch_begin(self, epoch, logs=None):
            self.steps = 0
            self.begun.append(epoch)
            self.batches = []
            (probe / "begun.json").write_text(json.dumps([*self.history, self.begun]))

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

        def on_epoch_end(self, epoch, logs=None):
            digest = hashlib.sha256()
            for weight in self.model.get_weights():
                digest.update(np.ascontiguousarray(weight).tobytes())
            (probe / f"epoch-{epoch}.json").write_text(json.dumps({
                "steps": self.steps, "weights": digest.hexdigest(), "batches": self.batches}))
            if epoch == kill_after_epoch and not kill_marker.exists():
                kill_marker.write_text("killed")
                os._exit(17)  # a crash: no cleanup, no goodbye to the other worker

    return [Probe()]


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probe", type=Path, required=True)
    parser.add_argument("--kill-after-epoch", type=int)
    parser.add_argument("--kill-marker", type=Path)
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    import keras_cspine.cli
    import keras_cspine.cli.train
    import keras_cspine.stage1.dataset

    callbacks = _probe_callbacks(args.probe, args.kill_after_epoch, args.kill_marker)
    probe = callbacks[0]
    original_getitem = keras_cspine.stage1.dataset.CSpineSequence.__getitem__

    def getitem(self, index):  # which slices each worker reads (the training sequence only)
        if self.shuffle and hasattr(probe, "batches"):
            probe.batches.append([int(i) for i in self.batch_indices(index)])
        return original_getitem(self, index)

    keras_cspine.stage1.dataset.CSpineSequence.__getitem__ = getitem
    train = keras_cspine.cli.train.train_stage1
    keras_cspine.cli.train.train_stage1 = lambda *a, **k: train(*a, extra_callbacks=callbacks, **k)
    return keras_cspine.cli.main(argv[split + 1 :])


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    raise SystemExit(_main(sys.argv[1:]))
