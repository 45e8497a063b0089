"""Stage 1 training on several machines (Section 2.5): ``train.strategy: multi_worker``.

``tf.distribute.MultiWorkerMirroredStrategy`` (synchronous data parallelism: every worker holds
the whole model and gradients are summed across workers at every step) configured by the standard
``TF_CONFIG`` environment variable, the one Kubernetes (TFJob), Vertex AI and SLURM launchers set::

    TF_CONFIG='{"cluster": {"worker": ["host-a:12345", "host-b:12345"]},
                "task": {"type": "worker", "index": 0}}'

The task of type ``chief`` (or, when the cluster has none, worker 0) is the chief.

- **Data**: each worker reads its own batches. Batch ``b`` of an epoch (the order of
  :class:`~keras_cspine.stage1.dataset.CSpineSequence`, a function of the seed and the epoch, the
  same on every worker) goes to worker ``b % n``; every worker takes ``ceil(batches / n)``
  steps (the last ones wrap around to the first batches when ``n`` does not divide the count),
  since the gradient all-reduce needs the same number of steps everywhere.
  ``train.batch_size`` is per worker: the global batch is ``n`` times it, and an epoch over the
  same slices is ``n`` times fewer steps. The per-worker datasets come from
  ``strategy.distribute_datasets_from_function``, so TensorFlow neither re-batches nor
  auto-shards them. Every worker evaluates the whole validation split: the metrics' states are
  summed across workers, which doubles every count and leaves loss, F1 and accuracy exact.
- **Files**: only the chief writes the run folder. The other workers run the same callbacks
  (saving can need every worker) in a temporary folder (:func:`worker_temp_dir`), removed when
  they finish.
- **Restart**: ``keras.callbacks.BackupAndRestore`` saves the state at every epoch end
  (the chief's in ``RUN/backup/``). After a kill, restart the whole job with the same command;
  :func:`SyncFromChief` then gives every worker the chief's restored epoch, weights and
  optimizer state, so the job resumes after the last finished epoch even where a worker lost its
  own folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keras_cspine.config import ConfigError

TF_CONFIG = "TF_CONFIG"
STRATEGIES = ("default", "mirrored", "multi_worker")
#: the task types MultiWorkerMirroredStrategy runs (``ps`` and ``evaluator`` belong to others)
TASK_TYPES = ("chief", "worker")

__all__ = [
    "STRATEGIES",
    "TF_CONFIG",
    "Cluster",
    "SyncFromChief",
    "broadcast_from_chief",
    "cluster_from_environment",
    "distributed_dataset",
    "make_strategy",
    "multi_worker_fit",
    "parse_tf_config",
    "scope",
    "shard_batches",
    "worker_temp_dir",
]


# --------------------------------------------------------------------------------------------
# TF_CONFIG
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cluster:
    """A validated ``TF_CONFIG``: the cluster and this process's task in it.

    Args:
        cluster: task type -> addresses (``host:port``), chief first.
        task_type, task_index: this process.
    """

    cluster: Mapping[str, tuple[str, ...]]
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        """Processes that train (the chief included)."""
        return sum(len(self.cluster.get(t, ())) for t in TASK_TYPES)

    @property
    def rank(self) -> int:
        """0 for the chief, then the workers in order."""
        if self.task_type == "chief":
            return 0
        return len(self.cluster.get("chief", ())) + self.task_index

    @property
    def is_chief(self) -> bool:
        """True for the process that writes the run folder."""
        return self.rank == 0

    @property
    def name(self) -> str:
        """``chief 0`` or ``worker 1``."""
        return f"{self.task_type} {self.task_index}"


def _problem(what: str) -> ConfigError:
    return ConfigError(f"{TF_CONFIG}: {what}")


def parse_tf_config(text: str | None) -> Cluster:
    """Validate a ``TF_CONFIG`` value for ``train.strategy: multi_worker``.

    Raises:
        ConfigError: ``TF_CONFIG: <problem>`` for a missing value, text that is not a JSON
            object, a missing or malformed ``cluster`` or ``task``, a task type that
            MultiWorkerMirroredStrategy does not run, or a task index outside its list.
    """
    if text is None or not text.strip():
        raise _problem(
            "not set: train.strategy multi_worker needs the cluster and this process's task, "
            'e.g. TF_CONFIG=\'{"cluster": {"worker": ["host-a:12345", "host-b:12345"]}, '
            '"task": {"type": "worker", "index": 0}}\''
        )
    try:
        data = json.loads(text)
    except ValueError as err:
        raise _problem(f"not JSON ({err})") from err
    if not isinstance(data, dict):
        raise _problem(f"not a JSON object with cluster and task, got {type(data).__name__}")
    missing = [k for k in ("cluster", "task") if k not in data]
    if missing:
        raise _problem(f"no {' and no '.join(missing)} (it needs both)")
    cluster, task = data["cluster"], data["task"]
    if not isinstance(cluster, dict) or not cluster:
        raise _problem(f"cluster must map task types to address lists, got {cluster!r}")
    addresses: dict[str, tuple[str, ...]] = {}
    for task_type, hosts in cluster.items():
        if task_type not in TASK_TYPES:
            raise _problem(f"cluster has task type {task_type!r}; MultiWorkerMirroredStrategy "
                           f"runs only {' and '.join(TASK_TYPES)}")  # fmt: skip
        if isinstance(hosts, str) or not isinstance(hosts, (list, tuple)) or not hosts:
            raise _problem(f"cluster.{task_type} must be a non-empty list of host:port, "
                           f"got {hosts!r}")  # fmt: skip
        for host in hosts:
            name, _, port = str(host).rpartition(":")
            if not isinstance(host, str) or not name or not port.isdigit():
                raise _problem(f"cluster.{task_type} address {host!r} is not host:port")
        addresses[task_type] = tuple(hosts)
    if len(addresses.get("chief", ())) > 1:
        raise _problem(f"cluster has {len(addresses['chief'])} chiefs; at most one")
    if "worker" not in addresses and "chief" not in addresses:
        raise _problem("cluster has no worker")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise _problem(f"task must be {{\"type\": ..., \"index\": ...}}, got {task!r}")
    task_type, index = task["type"], task["index"]
    if task_type not in TASK_TYPES:
        raise _problem(f"task type {task_type!r} is unknown to MultiWorkerMirroredStrategy "
                       f"(types: {', '.join(TASK_TYPES)})")  # fmt: skip
    if task_type not in addresses:
        raise _problem(f"task type {task_type!r} is not in the cluster "
                       f"({', '.join(addresses)})")  # fmt: skip
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(
        addresses[task_type]
    ):
        raise _problem(f"task index {index!r} is out of range: the cluster has "
                       f"{len(addresses[task_type])} {task_type} task(s), indices 0.."
                       f"{len(addresses[task_type]) - 1}")  # fmt: skip
    ordered = {t: addresses[t] for t in TASK_TYPES if t in addresses}
    return Cluster(ordered, task_type, index)


def cluster_from_environment(environ: Mapping[str, str] | None = None) -> Cluster:
    """:func:`parse_tf_config` of ``$TF_CONFIG``."""
    environ = os.environ if environ is None else environ
    return parse_tf_config(environ.get(TF_CONFIG))


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
def make_strategy(name: str, cluster: Cluster | None = None):
    """The ``train.strategy`` named ``name``: a ``tf.distribute`` strategy, or a null context
    for ``default``. ``multi_worker`` reads ``TF_CONFIG`` (validated as ``cluster``) and must be
    made before TensorFlow runs its first operation in this process."""
    if name not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {STRATEGIES}, got {name!r}")
    if name == "default":
        return contextlib.nullcontext()
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if cluster is None:
        cluster = cluster_from_environment()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    if strategy.num_replicas_in_sync < cluster.num_workers:  # pragma: no cover - TF's own check
        raise _problem(f"TensorFlow sees {strategy.num_replicas_in_sync} replicas for "
                       f"{cluster.num_workers} workers")  # fmt: skip
    return strategy


def scope(strategy):
    """``strategy.scope()``, or the null context of ``default``."""
    return strategy.scope() if hasattr(strategy, "scope") else strategy


def is_multi_worker(strategy) -> bool:
    """True for a MultiWorkerMirroredStrategy."""
    if not hasattr(strategy, "scope"):
        return False
    import tensorflow as tf

    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


@contextlib.contextmanager
def worker_temp_dir(cluster: Cluster, run_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder for a non-chief worker's files, removed afterwards (also on error).

    Its name depends on the task and the run folder, so the folder a killed worker left behind
    is removed when the job restarts."""
    key = json.dumps([str(Path(run_dir).resolve()), cluster.name])  # not the ports: they change
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / (
        f"keras_cspine-{cluster.task_type}{cluster.task_index}-{digest}")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def shard_batches(num_batches: int, num_workers: int, worker: int,
                  max_batches: int | None = None) -> list[int]:  # fmt: skip
    """The batch numbers of one epoch that worker ``worker`` of ``num_workers`` reads.

    Batch ``b`` goes to worker ``b % num_workers``; every worker gets
    ``ceil(num_batches / num_workers)``, the missing ones taken from the start of the epoch.
    ``max_batches`` (``train.steps_per_epoch``) first caps the epoch's batches.

    >>> shard_batches(6, 2, 1), shard_batches(5, 2, 1), shard_batches(5, 2, 0)
    ([1, 3, 5], [1, 3, 0], [0, 2, 4])
    """
    if num_batches < 1 or num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker {worker} of {num_workers} over {num_batches} batches")
    total = min(num_batches, max_batches) if max_batches else num_batches
    steps = math.ceil(total / num_workers)
    return [(k * num_workers + worker) % total for k in range(steps)]


def distributed_dataset(strategy, sequence, *, num_workers: int, shard: bool,
                        max_batches: int | None = None, parallel: int = 1):  # fmt: skip
    """A ``tf.distribute`` dataset of ``sequence``'s batches, one pipeline per worker.

    Args:
        strategy: the MultiWorkerMirroredStrategy.
        num_workers: the workers of the cluster (:attr:`Cluster.num_workers`).
        sequence: a :class:`~keras_cspine.stage1.dataset.CSpineSequence` (any PyDataset whose
            ``__getitem__`` reads the current epoch's order).
        shard: each worker reads its own batches (:func:`shard_batches`); False: all of them
            (validation).
        max_batches: cap on the epoch's batches before sharding (``train.steps_per_epoch``).
        parallel: batches loaded at once (``data.workers``).

    The batches are read when the pipeline asks for them, so the order of epoch ``e`` is the one
    ``EpochSync`` set at the epoch's start. Returns the dataset and the steps per epoch.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    first = keras.tree.flatten(sequence[0])
    dtypes = [tf.as_dtype(np.asarray(a).dtype) for a in first]
    template = sequence[0]
    steps = len(shard_batches(len(sequence), num_workers if shard else 1, 0, max_batches))

    def load(number):
        return [np.asarray(a) for a in keras.tree.flatten(sequence[int(number)])]

    def dataset_fn(context):
        if shard:
            numbers = shard_batches(len(sequence), context.num_input_pipelines,
                                    context.input_pipeline_id, max_batches)  # fmt: skip
        else:
            numbers = shard_batches(len(sequence), 1, 0, max_batches)

        def read(number):
            flat = tf.py_function(load, [number], Tout=dtypes)
            for tensor, array in zip(flat, first):
                tensor.set_shape((None, *np.asarray(array).shape[1:]))
            return keras.tree.pack_sequence_as(template, flat)

        dataset = tf.data.Dataset.from_tensor_slices(np.asarray(numbers, np.int64))
        dataset = dataset.map(read, num_parallel_calls=max(int(parallel), 1), deterministic=True)
        return dataset.prefetch(1)

    return strategy.distribute_datasets_from_function(dataset_fn), steps


# --------------------------------------------------------------------------------------------
# Keeping the workers in step
# --------------------------------------------------------------------------------------------
def broadcast_from_chief(strategy, values: Sequence[Any], is_chief: bool) -> list[Any]:
    """The chief's ``values`` (numbers or arrays) on every worker: an all-reduce in which the
    other workers add zeros. Every worker must call it at the same point, with values of the
    same shapes."""
    import numpy as np
    import tensorflow as tf

    arrays = [np.asarray(v) for v in values]
    if not arrays:
        return []
    keep = 1.0 if is_chief else 0.0
    tensors = [tf.constant(a.astype(np.float64)) for a in arrays]

    def replica_fn(*flat):
        context = tf.distribute.get_replica_context()
        # computed here, on this replica's device (a bare function input has none to reduce to)
        return context.all_reduce(tf.distribute.ReduceOp.SUM, [f * keep for f in flat])

    @tf.function
    def run(*flat):
        return strategy.run(replica_fn, args=flat)

    out = run(*tensors)
    results = []
    for value, array in zip(out, arrays):
        local = strategy.experimental_local_results(value)[0]
        results.append(np.asarray(local).astype(array.dtype).reshape(array.shape))
    return results


class SyncFromChief:
    """Keras callback, placed after ``BackupAndRestore``: at the start of ``fit`` every worker
    takes the chief's initial epoch, weights and optimizer state.

    ``BackupAndRestore`` restores each worker from its own folder; a restarted worker whose
    folder is gone (a new machine, a temporary folder) would start at epoch 0 with fresh weights
    while the chief resumes later, and the job would hang or diverge. After this callback the
    whole job resumes where the chief's backup ends.
    """

    def __new__(cls, strategy, is_chief: bool):
        import keras

        class _SyncFromChief(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                model = self.model
                variables = list(model.weights)
                if model.optimizer is not None:
                    variables += list(model.optimizer.variables)
                values = [int(getattr(model, "_initial_epoch", None) or 0)]
                values += [keras.ops.convert_to_numpy(v.value) for v in variables]
                synced = broadcast_from_chief(strategy, values, is_chief)
                for variable, value in zip(variables, synced[1:]):
                    variable.assign(value)
                # the attribute BackupAndRestore sets and fit reads after on_train_begin
                model._initial_epoch = int(synced[0]) or None

        return _SyncFromChief()


@contextlib.contextmanager
def multi_worker_fit(model) -> Iterator[None]:
    """Work around two faults of Keras 3's TensorFlow trainer under MultiWorkerMirroredStrategy
    while ``model.fit`` runs (tensorflow/tensorflow#72388):

    - ``fit`` builds the model from a first batch with ``strategy.reduce`` of the whole
      ``(inputs, targets)`` structure, which MultiWorkerMirroredStrategy refuses: the model is
      built beforehand (``build_training_state``), so that step is skipped;
    - every step reduces its scalar logs across workers with ``axis=0``, which fails for
      scalars: the per-step logs stay this worker's. The epoch's logs (what callbacks and the
      CSV log see) are read from the metrics' variables, summed across workers by TensorFlow.
    """
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica

    def local_first(values, strategy, reduction):
        if reduction == "auto" and isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            reduction = "first"
        return original(values, strategy, reduction)

    trainer.reduce_per_replica = local_first
    model._maybe_symbolic_build = lambda *args, **kwargs: None
    try:
        yield
    finally:
        trainer.reduce_per_replica = original
        del model._maybe_symbolic_build
