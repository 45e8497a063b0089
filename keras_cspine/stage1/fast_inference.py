"""Stage 1 at inference, fast (Section 2.5, the network of Figure 5): the classifier run by XLA,
or from an ONNX export by onnxruntime or OpenVINO, agreeing with plain Keras.

Engines (``Stage1Model.use_engine``, ``predict --stage1-engine``):

- ``keras``: ``model.predict_on_batch`` (the reference);
- ``xla``: the same graph under ``tf.function(jit_compile=True)``;
- ``onnx``: the model converted by tf2onnx and run by onnxruntime (float32);
- ``onnx_int8``: the ONNX model with dynamically quantised int8 weights
  (``onnxruntime.quantization.quantize_dynamic``): reduced precision, opt-in only;
- ``openvino``: the same ONNX export compiled by OpenVINO for the CPU, float32 (OpenVINO's own
  default is bfloat16 on CPUs that have it), a batch split across OpenVINO's streams (one per
  core on a small machine), which pays more than one stream on all threads;
- ``openvino_bf16``: the same in bfloat16: reduced precision (within ``BF16_TOLERANCE`` of
  Keras on a probe batch);
- ``auto`` (:func:`auto_engine`): ``openvino_bf16`` where OpenVINO is installed and the CPU
  computes bfloat16 natively (OpenVINO's ``OPTIMIZATION_CAPABILITIES`` lists ``BF16``: AVX-512
  BF16 or AMX), else ``keras``.

Measured side by side (``benchmarks/bench_stage1_inference.py``, 2-core AMD EPYC with AVX-512
and its bfloat16 instructions, no AMX; random weights), for the paper's GCViT-tiny at 224 px,
batch 16, against Keras' oneDNN kernels: ``xla`` 0.49x, ``onnx`` 0.93x, ``openvino`` 1.26x
(float32, equal within 3e-7), ``openvino_bf16`` 2.43x (2.4e-3 apart); GCViT-xxtiny at 64 px,
batch 32: ``onnx`` 1.04x, ``openvino`` 0.96x, ``openvino_bf16`` 1.89x. No float32 engine gains
a factor 1.5. What bfloat16 costs in accuracy, on the 35 held-out studies (2,050 slices) of the
demo's trained run (``benchmarks/bench_stage1_precision.py``): 2 of 14,350 slice-vertebra
decisions differ from Keras' (largest probability difference 0.05), macro F1 0.8288 against
0.8282; int8 weights change 11 decisions. ``--stage1-engine keras`` forces the plain path.

The ONNX export has two outputs, the slice features (the input of the classifier's last layer,
what the run's sequence model reads) and the 7 probabilities. It is cached in
``$KERAS_CSPINE_CACHE/stage1_onnx`` (default ``~/.cache/keras_cspine/stage1_onnx``), named by the
SHA-256 of the ``.keras`` file it was made from, so that a changed model never meets a stale
export; it is written under a temporary name and renamed, and the SHA-256 is also recorded in its
metadata and checked when it is opened (OpenVINO keeps its compiled models beside it, in
``openvino/``). An engine is used only after it agreed with Keras on a probe batch
(``FLOAT_TOLERANCE`` on every probability for the float32 ones, ``BF16_TOLERANCE`` for
``openvino_bf16``): one that does not is refused when asked for by name, and ``auto`` falls
back to Keras with a warning. The ``.keras`` file itself is only ever opened by ``keras.saving.load_model`` in
safe mode (by the caller); TensorGraph-to-ONNX conversion runs no code from any file.

TensorFlow's exact GELU lowers to ``Erfc``, which tf2onnx lacks: it is written as
``1 - Erf(x)`` (:func:`_register_erfc`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.errors import CSpineDataError, MissingDependencyError
from keras_cspine.utils import atomic_path

ENGINES = ("auto", "keras", "xla", "onnx", "onnx_int8", "openvino", "openvino_bf16")
#: Engines that compute in float32: they must agree with Keras within FLOAT_TOLERANCE.
FLOAT_ENGINES = ("keras", "xla", "onnx", "openvino")
#: Engines of reduced precision (their results differ from Keras' beyond FLOAT_TOLERANCE).
REDUCED_PRECISION_ENGINES = ("onnx_int8", "openvino_bf16")
#: Largest absolute difference of a probability allowed between a float engine and Keras.
FLOAT_TOLERANCE = 1e-4
#: Largest absolute difference of a probability allowed between ``openvino_bf16`` and Keras.
BF16_TOLERANCE = 2e-2
#: What ``auto`` becomes where the CPU computes bfloat16 natively and OpenVINO is installed.
AUTO_ENGINE = "openvino_bf16"
CACHE_ENV = "KERAS_CSPINE_CACHE"
METADATA_KEY = "keras_cspine_stage1"
EXPORT_FORMAT = 1
OPSET = 17


def cache_dir() -> Path:
    """Where ONNX exports of stage 1 models are kept (``$KERAS_CSPINE_CACHE`` or
    ``$XDG_CACHE_HOME/keras_cspine`` or ``~/.cache/keras_cspine``, then ``stage1_onnx``)."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "keras_cspine")
    return Path(root) / "stage1_onnx"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """The SHA-256 of a model's weights (for a model that has no file)."""
    digest = hashlib.sha256()
    for weights in model.get_weights():
        array = np.ascontiguousarray(weights)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _importable(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


def onnx_available() -> bool:
    return _importable("tf2onnx", "onnxruntime", "onnx")


def openvino_available() -> bool:
    """Whether the ``openvino`` engine can run: OpenVINO, and tf2onnx for the export."""
    return _importable("openvino") and onnx_available()


def _require_onnx() -> None:
    if not onnx_available():
        raise MissingDependencyError("tf2onnx", "onnx", "The ONNX stage 1 engine")


def _require_openvino() -> None:
    if not _importable("openvino"):
        raise MissingDependencyError("openvino", "onnx", "The OpenVINO stage 1 engine")


def import_openvino():
    """``openvino``, imported with its usage telemetry off.

    ``import openvino`` imports its model converter, which starts ``openvino_telemetry``; that
    sends events to Google Analytics unless a consent file says no (or ``CI=true``). This
    package opens no connection the user did not ask for: ``openvino_telemetry`` is made
    unimportable for the process before OpenVINO first loads, and OpenVINO then uses its own
    no-op stub (``openvino.tools.ovc.telemetry_stub``). Only the runtime is used here.
    """
    import sys

    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: ``import`` raises ImportError
    import openvino

    return openvino


def cpu_has_bf16() -> bool:
    """Whether OpenVINO finds native bfloat16 on this CPU (``BF16`` among its CPU plug-in's
    ``OPTIMIZATION_CAPABILITIES``); False without OpenVINO."""
    if not openvino_available():
        return False
    try:
        ov = import_openvino()

        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:  # noqa: BLE001 - OpenVINO raises its own types; then: not known to have it
        return False


def auto_engine() -> str:
    """The engine ``auto`` stands for here: :data:`AUTO_ENGINE` where OpenVINO is installed and
    the CPU computes bfloat16 natively (elsewhere bfloat16 is emulated and slow), else ``keras``."""
    return AUTO_ENGINE if cpu_has_bf16() else "keras"


def engine_available(engine: str) -> bool:
    """Whether the optional packages ``engine`` needs are installed (the import is not tried)."""
    if engine in ("onnx", "onnx_int8"):
        return onnx_available()
    if engine in ("openvino", "openvino_bf16"):
        return openvino_available()
    return True


_ERFC_REGISTERED = False


def _register_erfc() -> None:
    """Teach tf2onnx TensorFlow's ``Erfc`` (exact GELU) as ``1 - Erf(x)``."""
    global _ERFC_REGISTERED
    if _ERFC_REGISTERED:
        return
    from tf2onnx import utils
    from tf2onnx.handler import tf_op

    @tf_op("Erfc")
    class Erfc:  # noqa: F841 - registered by the decorator
        @classmethod
        def version_9(cls, ctx, node, **kwargs):
            dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
            one = ctx.make_const(utils.make_name("erfc_one"), np.array(1, dtype=dtype))
            erf = ctx.make_node("Erf", [node.input[0]], op_name_scope=node.name, name="erf")
            output, name = node.output[0], node.name
            ctx.remove_node(name)
            ctx.make_node("Sub", [one.output[0], erf.output[0]], outputs=[output], name=name)

    _ERFC_REGISTERED = True


def _named_inputs(model) -> dict[str, Any]:
    """The symbolic inputs of a stage 1 model by name (``image``, ``metadata``; a single unnamed
    one is the image), as ``keras_cspine.stage1.inference.classifier_inputs`` checked them."""
    inputs = list(model.inputs)
    if len(inputs) == 1 and inputs[0].name not in ("image", "metadata"):
        return {"image": inputs[0]}
    return {t.name: t for t in inputs}


def _export_model(model):
    """The model to export: features and probabilities when the last layer has one input."""
    from keras_cspine.stage1.sequence_model import feature_model

    try:
        return feature_model(model), ["features", "probabilities"]
    except ValueError:
        return model, ["probabilities"]


def export_onnx(model, path: str | os.PathLike, source_sha256: str, opset: int = OPSET) -> Path:
    """Convert a stage 1 classifier to ONNX at ``path`` (atomically), inputs named as the
    model's (``image``, ``metadata``, any batch size), outputs ``features`` (when the classifier
    has a one-input last layer) and ``probabilities``; ``source_sha256`` goes into the metadata."""
    _require_onnx()
    import onnx
    import tensorflow as tf
    import tf2onnx

    _register_erfc()
    inputs = _named_inputs(model)
    names = list(inputs)
    exported, outputs = _export_model(model)
    specs = [tf.TensorSpec((None, *tuple(inputs[n].shape)[1:]), tf.float32, name=n) for n in names]

    @tf.function(input_signature=specs, autograph=False)
    def forward(*args):
        out = exported(dict(zip(names, args)), training=False)
        return tuple(out) if isinstance(out, list | tuple) else (out,)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_function(forward, specs, opset=opset)
    if len(proto.graph.output) != len(outputs):
        raise ValueError(f"the ONNX export has {len(proto.graph.output)} outputs, expected "
                         f"{len(outputs)}")  # fmt: skip
    meta = {"format": EXPORT_FORMAT, "source_sha256": source_sha256, "inputs": names,
            "outputs": outputs, "opset": opset, "tf2onnx": tf2onnx.__version__}  # fmt: skip
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    with atomic_path(path) as tmp:
        onnx.save(proto, str(tmp))
    return Path(path)


def quantize_int8(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``source`` with int8 weights (``quantize_dynamic``: MatMul weights, per tensor), atomically."""
    _require_onnx()
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(source), str(tmp), weight_type=QuantType.QInt8)
        proto = onnx.load(str(tmp))
        meta = json.loads(dict((p.key, p.value) for p in onnx.load(str(source)).metadata_props)
                          [METADATA_KEY])  # fmt: skip
        meta["int8"] = True
        del proto.metadata_props[:]
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(meta)
        onnx.save(proto, str(tmp))
    return Path(path)


class KerasRunner:
    """``predict_on_batch`` of the classifier (or its feature model)."""

    name = "keras"

    def __init__(self, model):
        self.model = model
        self._features = None

    def __call__(self, batch: Mapping[str, np.ndarray], features: bool = False):
        if not features:
            return None, np.asarray(self.model.predict_on_batch(dict(batch)), np.float32)
        if self._features is None:
            from keras_cspine.stage1.sequence_model import feature_model

            self._features = feature_model(self.model)
        feats, scores = self._features.predict_on_batch(dict(batch))
        return np.asarray(feats, np.float32), np.asarray(scores, np.float32)


class XlaRunner:
    """The classifier's forward pass (features and probabilities) compiled by XLA."""

    name = "xla"

    def __init__(self, model):
        import tensorflow as tf

        exported, self.outputs = _export_model(model)
        self._fn = tf.function(lambda batch: exported(batch, training=False), jit_compile=True)

    def __call__(self, batch: Mapping[str, np.ndarray], features: bool = False):
        out = self._fn({k: np.asarray(v, np.float32) for k, v in batch.items()})
        out = [np.asarray(o, np.float32) for o in (out if isinstance(out, list | tuple) else [out])]
        if features and len(out) < 2:
            raise ValueError("this classifier has no slice features (its last layer takes "
                             "several inputs)")  # fmt: skip
        return (out[0] if len(out) == 2 else None), out[-1]


class OnnxRunner:
    """An ONNX export of the classifier run by onnxruntime on the CPU."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 expect_sha256: str | None = None):  # fmt: skip
        _require_onnx()
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # read when onnxruntime starts
        import onnxruntime as ort

        self.path = Path(path)
        switch_off = getattr(ort, "disable_telemetry_events", None)
        if switch_off is not None:  # onnxruntime >= 1.5
            switch_off()
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=["CPUExecutionProvider"])  # fmt: skip
            meta = json.loads(self.session.get_modelmeta().custom_metadata_map[METADATA_KEY])
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
            raise CSpineDataError(self.path, f"not a stage 1 ONNX export: {err}") from err
        if expect_sha256 is not None and meta.get("source_sha256") != expect_sha256:
            raise CSpineDataError(self.path, "made from another model than the one given "
                                             "(SHA-256 differs)")  # fmt: skip
        self.meta = meta
        self.name = "onnx_int8" if meta.get("int8") else "onnx"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.outputs = list(meta["outputs"])

    def __call__(self, batch: Mapping[str, np.ndarray], features: bool = False):
        feed = {n: np.ascontiguousarray(batch[n], np.float32) for n in self.input_names}
        out = self.session.run(None, feed)
        if features and len(out) < 2:
            raise ValueError("this classifier has no slice features (its last layer takes "
                             "several inputs)")  # fmt: skip
        return (out[0] if len(out) == 2 else None), np.asarray(out[-1], np.float32)


def _openvino_metadata(model, path: Path) -> str:
    """The export's metadata entry: from OpenVINO's copy of the ONNX metadata, else (an OpenVINO
    that keeps none) read by ``onnx``."""
    key = ["framework", METADATA_KEY]
    if model.has_rt_info(key):
        return model.get_rt_info(key).astype(str)
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in proto.metadata_props}[METADATA_KEY]


class OpenVinoRunner:
    """An ONNX export of the classifier compiled by OpenVINO for the CPU.

    Args:
        path: the ``.onnx`` file (made by :func:`export_onnx`).
        threads: inference threads in all (``INFERENCE_NUM_THREADS``); None lets OpenVINO choose.
        expect_sha256: the SHA-256 the export must have been made from.
        compiled_cache: a folder for OpenVINO's compiled models (``CACHE_DIR``), or None.
        streams: how many parts a batch is split into, run at once, each on its own share of
            the threads (``THROUGHPUT`` hint, ``NUM_STREAMS``); None lets OpenVINO choose (as
            many as cores, at most, on a small machine); 1 runs a batch as one request on all
            threads (``LATENCY`` hint).
        precision: ``INFERENCE_PRECISION_HINT``: ``f32`` (the default; OpenVINO's own default
            is ``bf16`` on CPUs with bfloat16 units) agrees with Keras; ``bf16`` is reduced
            precision (the ``openvino_bf16`` engine).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None,
                 expect_sha256: str | None = None, compiled_cache: str | os.PathLike | None = None,
                 streams: int | None = None, precision: str = "f32"):  # fmt: skip
        if streams is not None and int(streams) < 1:
            raise ValueError(f"streams must be at least 1, got {streams!r}")
        if precision not in ("f32", "bf16"):
            raise ValueError(f"precision must be 'f32' or 'bf16', got {precision!r}")
        _require_openvino()
        ov = import_openvino()

        self.path = Path(path)
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            meta = json.loads(_openvino_metadata(model, self.path))
        except Exception as err:  # noqa: BLE001 - OpenVINO raises its own types
            raise CSpineDataError(self.path, f"not a stage 1 ONNX export: {err}") from err
        if expect_sha256 is not None and meta.get("source_sha256") != expect_sha256:
            raise CSpineDataError(self.path, "made from another model than the one given "
                                             "(SHA-256 differs)")  # fmt: skip
        config = {"INFERENCE_PRECISION_HINT": precision}
        if streams == 1:
            config["PERFORMANCE_HINT"] = "LATENCY"
        else:
            config["PERFORMANCE_HINT"] = "THROUGHPUT"
            if streams is not None:
                config["NUM_STREAMS"] = int(streams)
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if compiled_cache is not None:
            config["CACHE_DIR"] = str(compiled_cache)
        self.meta = meta
        self.name = "openvino_bf16" if precision == "bf16" else "openvino"
        self.compiled = core.compile_model(model, "CPU", config)
        self.streams = int(self.compiled.get_property("NUM_STREAMS"))
        self.requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self.input_names = [i.get_any_name() for i in model.inputs]
        self.outputs = list(meta["outputs"])

    def __call__(self, batch: Mapping[str, np.ndarray], features: bool = False):
        feed = {n: np.ascontiguousarray(batch[n], np.float32) for n in self.input_names}
        size = len(feed[self.input_names[0]])
        parts = min(len(self.requests), size) or 1
        edges = np.linspace(0, size, parts + 1).round().astype(int)
        running = self.requests[:parts]
        for request, start, stop in zip(running, edges[:-1], edges[1:]):
            request.start_async({n: a[start:stop] for n, a in feed.items()}, share_inputs=True)
        for request in running:
            request.wait()
        out = [np.concatenate([r.get_output_tensor(i).data for r in running]).astype(np.float32)
               for i in range(len(self.compiled.outputs))]  # fmt: skip
        if features and len(out) < 2:
            raise ValueError("this classifier has no slice features (its last layer takes "
                             "several inputs)")  # fmt: skip
        return (out[0] if len(out) == 2 else None), out[-1]


def probe_batch(model, n: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """A batch of random inputs for a stage 1 model (uint8-range images, metadata in [0, 2))."""
    rng = np.random.default_rng(seed)
    batch = {}
    for name, tensor in _named_inputs(model).items():
        shape = (n, *tuple(tensor.shape)[1:])
        batch[name] = (rng.integers(0, 256, shape).astype(np.float32) if name == "image"
                       else rng.uniform(0, 2, shape).astype(np.float32))  # fmt: skip
    return batch


def max_difference(runner, reference, batch) -> float:
    """Largest absolute probability difference between two runners on ``batch``."""
    _, got = runner(batch)
    _, want = reference(batch)
    return float(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64)).max())


def onnx_export_path(model, model_file: str | os.PathLike | None,
                     cache: str | os.PathLike | None = None) -> tuple[Path, str]:  # fmt: skip
    """(cached ONNX path, the SHA-256 it is keyed by) of a model: its ``.keras`` file's content,
    else its weights."""
    sha = sha256_file(model_file) if model_file else "w" + weights_sha256(model)
    return Path(cache or cache_dir()) / f"{sha[:32]}.onnx", sha


def _open_cached(path: Path, make: Callable[[], Any], open_: Callable[[Path], Any]):
    """``open_(path)`` of a cache entry, made by ``make()`` when it is missing, and made again
    when it is damaged or foreign (``open_`` raises ``CSpineDataError``)."""
    if not path.is_file():
        make()
    try:
        return open_(path)
    except CSpineDataError:
        path.unlink(missing_ok=True)
        make()
        return open_(path)


def onnx_runner(model, model_file: str | os.PathLike | None = None, *, int8: bool = False,
                threads: int | None = None, cache: str | os.PathLike | None = None) -> OnnxRunner:  # fmt: skip
    """The ONNX runner of a model, exporting (and quantising) it into the cache when needed."""
    path, sha = onnx_export_path(model, model_file, cache)

    def export() -> None:
        export_onnx(model, path, sha)

    def open_(entry: Path) -> OnnxRunner:
        return OnnxRunner(entry, threads=threads, expect_sha256=sha)

    if not int8:
        return _open_cached(path, export, open_)
    quantised = path.with_name(path.stem + ".int8.onnx")

    def quantise() -> None:
        if not path.is_file():
            export()
        quantize_int8(path, quantised)

    return _open_cached(quantised, quantise, open_)


def openvino_runner(model, model_file: str | os.PathLike | None = None, *,
                    threads: int | None = None, cache: str | os.PathLike | None = None,
                    **options) -> OpenVinoRunner:  # fmt: skip
    """The OpenVINO runner of a model, from its ONNX export in the cache (made when needed);
    OpenVINO keeps its compiled models in the ``openvino`` folder of the cache. ``options`` go
    to :class:`OpenVinoRunner`."""
    _require_openvino()
    path, sha = onnx_export_path(model, model_file, cache)
    return _open_cached(path, lambda: export_onnx(model, path, sha),
                        lambda entry: OpenVinoRunner(entry, threads, sha, entry.parent / "openvino",
                                                     **options))  # fmt: skip


def make_runner(model, engine: str = "auto", model_file: str | os.PathLike | None = None, *,
                threads: int | None = None, cache: str | os.PathLike | None = None,
                check: bool = True) -> tuple[Any, dict[str, Any]]:  # fmt: skip
    """The runner of ``engine`` for a stage 1 model, and a note (engine used, checked difference).

    ``auto`` is :func:`auto_engine` (see the module). A float engine (``xla``, ``onnx``,
    ``openvino``) is checked against Keras on a probe batch; beyond ``FLOAT_TOLERANCE``
    (``BF16_TOLERANCE`` for ``openvino_bf16``) it is refused (``ValueError``) when asked for by
    name, and ``auto`` falls back to Keras with a warning; so does ``auto`` when its engine fails
    to start.
    """
    if engine not in ENGINES:
        raise ValueError(f"stage 1 engine must be one of {ENGINES}, got {engine!r}")
    keras_runner = KerasRunner(model)
    asked = engine
    if engine == "auto":
        engine = auto_engine()
        engine = engine if engine_available(engine) else "keras"
    if engine == "keras":
        return keras_runner, {"engine": "keras", "asked": asked}
    try:
        if engine == "xla":
            runner = XlaRunner(model)
        elif engine in ("openvino", "openvino_bf16"):
            runner = openvino_runner(model, model_file, threads=threads, cache=cache,
                                     precision="bf16" if engine == "openvino_bf16" else "f32")  # fmt: skip
        else:
            runner = onnx_runner(model, model_file, int8=engine == "onnx_int8", threads=threads,
                                 cache=cache)  # fmt: skip
        note = {"engine": runner.name, "asked": asked}
        if check:
            batch = probe_batch(model)
            diff = max_difference(runner, keras_runner, batch)
            note["probe_max_abs_diff"] = diff
            allowed = (FLOAT_TOLERANCE if engine in FLOAT_ENGINES
                       else BF16_TOLERANCE if engine == "openvino_bf16" else None)  # fmt: skip
            if allowed is not None and not diff < allowed:
                raise ValueError(f"the {engine} engine differs from Keras by {diff:.2e} on a "
                                 f"probe batch (allowed {allowed:g})")  # fmt: skip
    except (ValueError, ImportError, OSError, RuntimeError, CSpineDataError,
            MissingDependencyError) as err:  # fmt: skip
        if asked != "auto":
            raise
        warnings.warn(f"stage 1 engine {engine} unavailable ({err}); using keras",
                      RuntimeWarning, stacklevel=2)  # fmt: skip
        return keras_runner, {"engine": "keras", "asked": asked, "fallback": str(err)}
    return runner, note
