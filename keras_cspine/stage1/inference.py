"""Stage 1 at inference (Section 2.5): a trained run's classifier on a study's slices, with the
run's own preprocessing, sequence model and level decoder (:class:`Stage1Model`)."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.io.rsna import VERTEBRAE
from keras_cspine.stage1 import runs


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise CSpineDataError(path, f"cannot read: {err}") from err
    return data if isinstance(data, dict) else {}


def _stage1_settings(run_dir: Path) -> dict[str, Any]:
    """The preprocessing of a training run, from the run folder alone.

    ``preprocessing.json`` (:func:`keras_cspine.stage1.runs.write_preprocessing`) says it all.
    Runs trained before that file existed are read as before (``config.yaml``, then the
    ``prepare.json`` of their training data) with a warning; when that data is gone too, the
    run cannot say how its slices were made and loading it is an error naming the run.
    """
    recorded = runs.read_preprocessing(run_dir)
    if recorded is not None:
        return {
            "mode": recorded["mode"], "render_size": int(recorded["render_size"]),
            "image_size": int(recorded["image_size"]),
            "metadata_columns": tuple(recorded["metadata_columns"]),
            "metadata_scale": dict(recorded.get("metadata_scale") or {}),
            "roi_mm": recorded.get("roi_mm"),
        }  # fmt: skip
    if not (run_dir / runs.CONFIG_FILE).is_file():  # a bare .keras file, not a run
        return {}
    config = _read_yaml(run_dir / runs.CONFIG_FILE)
    data = config.get("data") or {}
    settings: dict[str, Any] = {}
    if data.get("metadata_columns"):
        settings["metadata_columns"] = tuple(data["metadata_columns"])
    splits = run_dir / runs.SPLITS_FILE
    prepared = json.loads(splits.read_text(encoding="utf-8")).get("prepared") if (
        splits.is_file()) else None  # fmt: skip
    if prepared and not Path(prepared).is_absolute():
        # an old run recorded the path as typed: relative to a working directory long gone
        raise CSpineDataError(
            run_dir, f"the run has no {runs.PREPROCESSING_FILE} and records its training data as "
            f"the relative path {prepared!r}, which the run alone cannot locate; pass mode= and "
            f"render_size= to Stage1Model.load, or retrain",
        )  # fmt: skip
    prepare_json = Path(prepared) / "prepare.json" if prepared else None
    if prepare_json is None or not prepare_json.is_file():
        raise CSpineDataError(
            run_dir, f"the run has no {runs.PREPROCESSING_FILE} and its training data "
            f"({prepared or 'unknown'}) is gone, so how its slices were rendered is unknown; "
            f"pass mode= and render_size= to Stage1Model.load, or retrain",
        )  # fmt: skip
    prep = json.loads(prepare_json.read_text(encoding="utf-8")).get("settings", {})
    warnings.warn(
        f"{run_dir}: no {runs.PREPROCESSING_FILE} (a run trained by an older keras_cspine); "
        f"its preprocessing is read from {prepare_json}, which a copy of the run will lack",
        UserWarning, stacklevel=3,
    )  # fmt: skip
    settings["mode"] = prep.get("mode", data.get("prepare_mode"))
    settings["render_size"] = prep.get("size")
    return {k: v for k, v in settings.items() if v is not None}


#: What a stage 1 model must be, in the words of the errors that refuse one.
EXPECTED = (f"a stage 1 classifier: inputs 'image' (N, S, S, 3) and/or 'metadata' (N, F), one "
            f"output of {len(VERTEBRAE)} sigmoids (C1..C7)")  # fmt: skip


def classifier_inputs(model) -> dict[str, Any]:
    """The named symbolic inputs of a stage 1 model; a ``ValueError`` saying what is expected
    when it is not one (a single unnamed input counts as ``image``)."""
    try:
        inputs = model.input
    except (AttributeError, ValueError):  # a subclassed or never-called model
        inputs = getattr(model, "inputs", None)
    if isinstance(inputs, list | tuple) and len(inputs) == 1:
        inputs = inputs[0]
    if isinstance(inputs, list | tuple):
        names = [getattr(t, "name", None) for t in inputs]
        if len(set(names)) != len(names) or not set(names) <= {"image", "metadata"}:
            raise ValueError(f"has inputs named {names}; expected {EXPECTED}")
        inputs = dict(zip(names, inputs))
    elif inputs is not None and not isinstance(inputs, dict):
        inputs = {"metadata" if getattr(inputs, "name", None) == "metadata" else "image": inputs}
    if not inputs:
        raise ValueError(f"has no symbolic inputs (not a functional Keras model); expected "
                         f"{EXPECTED}")  # fmt: skip
    unknown = sorted(set(inputs) - {"image", "metadata"})
    if unknown:
        raise ValueError(f"has unknown inputs {unknown}; expected {EXPECTED}")
    if "image" in inputs:
        shape = tuple(inputs["image"].shape)
        if len(shape) != 4 or shape[3] != 3 or shape[1] is None or shape[1] != shape[2]:
            raise ValueError(f"its 'image' input has shape {shape}; expected {EXPECTED}")
    if "metadata" in inputs and len(tuple(inputs["metadata"].shape)) != 2:
        raise ValueError(f"its 'metadata' input has shape {tuple(inputs['metadata'].shape)}; "
                         f"expected {EXPECTED}")  # fmt: skip
    return dict(inputs)


def check_classifier_output(model) -> None:
    """A ``ValueError`` unless the model has one output of 7 sigmoids."""
    outputs = list(getattr(model, "outputs", None) or [])
    if len(outputs) != 1:
        raise ValueError(f"has {len(outputs)} outputs; expected {EXPECTED}")
    shape = tuple(outputs[0].shape)
    if len(shape) != 2 or shape[1] != len(VERTEBRAE):
        raise ValueError(f"its output has shape {shape}; expected {EXPECTED}")
    history = getattr(outputs[0], "_keras_history", None)
    layer = getattr(history, "operation", None)
    activation = getattr(getattr(layer, "activation", None), "__name__", None)
    if activation != "sigmoid":
        name = getattr(layer, "name", "?")
        raise ValueError(f"its output layer {name!r} has activation {activation or 'none'}; "
                         f"expected {EXPECTED}")  # fmt: skip


class Stage1Model:
    """The stage 1 vertebrae classifier with the preprocessing it was trained with.

    Args:
        model: a loaded ``keras.Model`` (inputs ``image`` and/or ``metadata``, 7 sigmoids).
        mode: ``keras_cspine.data.preprocess`` mode of the training images.
        render_size: side at which slices were rendered (the prepare size); the model's own
            input size when None. Images are then resampled to the model's input size, exactly
            as ``CSpineSequence`` does.
        metadata_columns: features of the ``metadata`` input (``position_mm``, ``slice_ratio``
            or ``z_mm``), scaled as in ``keras_cspine.stage1.dataset.METADATA_SCALE``.
        source: where the model came from (for logs).
        metadata_scale: the factor of each metadata column (default
            ``keras_cspine.stage1.dataset.METADATA_SCALE``; a run records its own).
        roi_mm: the model sees the square window of this many mm around the study's cervical
            column (``prepare --roi-mm``, :mod:`keras_cspine.data.roi`); None: whole slices.
    """

    def __init__(self, model, mode: str = "bone", render_size: int | None = None,
                 metadata_columns: Sequence[str] = ("position_mm", "slice_ratio"),
                 source: str = "<in memory>", level_decoder=None,
                 sequence_model=None, metadata_scale: Mapping[str, float] | None = None,
                 roi_mm: float | None = None):  # fmt: skip
        from keras_cspine.data.preprocess import MODES, WINDOW_MODES

        if mode not in (*MODES, *WINDOW_MODES):
            raise ValueError(f"mode must be one of {sorted({*MODES, *WINDOW_MODES})}, got {mode!r}")
        self.model = model
        try:
            inputs = classifier_inputs(model)
            check_classifier_output(model)
        except ValueError as err:
            raise ValueError(f"stage 1 model {source} {err}") from None
        self.input_names = tuple(inputs)
        self.image_size = int(inputs["image"].shape[1]) if "image" in inputs else None
        self.render_size = int(render_size or self.image_size or 0) or None
        self.mode = mode
        self.roi_mm = None if roi_mm is None else float(roi_mm)
        self.metadata_columns = tuple(metadata_columns)
        if metadata_scale is None:
            from keras_cspine.stage1.dataset import METADATA_SCALE

            metadata_scale = METADATA_SCALE
        self.metadata_scale = {c: float(metadata_scale.get(c, 1.0)) for c in self.metadata_columns}
        if "metadata" in inputs and inputs["metadata"].shape[-1] != len(self.metadata_columns):
            raise ValueError(
                f"stage 1 model takes {inputs['metadata'].shape[-1]} metadata features, but "
                f"{len(self.metadata_columns)} columns are configured: {self.metadata_columns}"
            )
        self.source = source
        #: How the classifier runs (:mod:`keras_cspine.stage1.fast_inference`): plain Keras until
        #: :meth:`use_engine` picks another.
        self.runner = None
        self.engine: dict[str, Any] = {"engine": "keras"}
        #: The files the model was read from (``model``, ``preprocessing``, ``level_decoder``,
        #: ``sequence_model``: absolute paths), set by :meth:`load`; empty for a model in memory.
        self.files: dict[str, str] = {}
        self.level_decoder = level_decoder
        self.sequence_model = sequence_model
        self._feature_model = None
        if sequence_model is not None:
            from keras_cspine.stage1.sequence_model import feature_model

            self._feature_model = feature_model(model)
            got = int(self._feature_model.outputs[0].shape[-1])
            wants = int(sequence_model.input["features"].shape[-1])
            if got != wants:
                raise ValueError(f"the sequence model reads {wants} slice features, but stage 1 "
                                 f"model {source} gives {got}")  # fmt: skip

    @classmethod
    def load(cls, path: str | os.PathLike, mode: str | None = None,
             render_size: int | None = None) -> Stage1Model:  # fmt: skip
        """A training run directory (``model.keras`` + ``config.yaml``) or a ``.keras`` file.

        The preprocessing comes from the run folder alone (its ``preprocessing.json``);
        ``mode`` / ``render_size`` override it. A bare ``.keras`` file outside a run takes
        ``bone`` at the model's input size unless they are given.
        The run's ``level_decoder.json`` and ``sequence_model.keras`` (written by ``train``),
        when present beside the model, are loaded as :attr:`level_decoder` and
        :attr:`sequence_model`.
        """
        import keras

        import keras_cspine.stage1.models.factory  # noqa: F401 - registers every model, for loading
        from keras_cspine.stage1.level_decoding import LevelDecoder
        from keras_cspine.stage1.sequence_model import load_sequence_model

        path = Path(path).absolute()
        model_path = path / runs.MODEL_FILE if path.is_dir() else path
        if not model_path.is_file():
            raise CSpineDataError(model_path, "stage 1 model not found (a run directory with "
                                              "model.keras, or a .keras file)")  # fmt: skip
        settings = {} if mode and render_size else _stage1_settings(model_path.parent)
        try:
            model = keras.saving.load_model(model_path)
        except Exception as err:  # noqa: BLE001 - a damaged zip raises BadZipFile, KeyError...
            raise CSpineDataError(model_path, f"not a loadable Keras model: "
                                              f"{type(err).__name__}: {err}") from err  # fmt: skip
        try:
            inputs = classifier_inputs(model)
            check_classifier_output(model)
        except ValueError as err:
            raise CSpineDataError(model_path, f"not a stage 1 model: it {err}") from None
        recorded_size = settings.get("image_size")
        if recorded_size and "image" in inputs and int(inputs["image"].shape[1]) != recorded_size:
            raise CSpineDataError(model_path, f"takes {inputs['image'].shape[1]} px images but its "
                                  f"run recorded {recorded_size} px: the model was replaced "
                                  f"after training")  # fmt: skip
        decoder_path = model_path.parent / runs.LEVEL_DECODER_FILE
        sequence_path = model_path.parent / runs.SEQUENCE_MODEL_FILE
        preprocessing_path = model_path.parent / runs.PREPROCESSING_FILE
        try:
            loaded = cls(
                model, mode=mode or settings.get("mode", "bone"),
                render_size=render_size or settings.get("render_size"),
                metadata_columns=settings.get("metadata_columns", ("position_mm", "slice_ratio")),
                metadata_scale=settings.get("metadata_scale"), source=str(model_path),
                # the window is what the weights were trained on: kept when mode and size are
                # given for a run that recorded it
                roi_mm=settings.get("roi_mm") if settings else (
                    runs.read_preprocessing(model_path.parent) or {}).get("roi_mm"),
                level_decoder=LevelDecoder.load(decoder_path) if decoder_path.is_file() else None,
                sequence_model=(load_sequence_model(sequence_path) if sequence_path.is_file()
                                else None),
            )  # fmt: skip
        except CSpineDataError:
            raise
        except ValueError as err:  # the model and its run disagree (metadata, sequence model)
            raise CSpineDataError(model_path, str(err)) from None
        loaded.files = {"model": str(model_path)}
        for role, file in (("preprocessing", preprocessing_path),
                           ("level_decoder", decoder_path), ("sequence_model", sequence_path)):
            if file.is_file() and (role != "preprocessing" or settings):
                loaded.files[role] = str(file)
        return loaded

    def use_engine(self, engine: str = "auto", threads: int | None = None,
                   cache: str | os.PathLike | None = None) -> dict[str, Any]:  # fmt: skip
        """Run the classifier with ``engine`` (``auto``, ``keras``, ``xla``, ``onnx``,
        ``onnx_int8``, ``openvino``, ``openvino_bf16``;
        :func:`keras_cspine.stage1.fast_inference.make_runner`); returns the note
        of what is used (also :attr:`engine`)."""
        from keras_cspine.stage1.fast_inference import make_runner

        self.runner, self.engine = make_runner(self.model, engine, self.files.get("model"),
                                               threads=threads, cache=cache)  # fmt: skip
        return self.engine

    def describe(self) -> dict[str, Any]:
        """The settings, for logs and JSON."""
        from keras_cspine.stage1.fast_inference import REDUCED_PRECISION_ENGINES

        return {
            "source": self.source, "inputs": list(self.input_names), "mode": self.mode,
            "render_size": self.render_size, "image_size": self.image_size,
            **({"roi_mm": self.roi_mm} if self.roi_mm is not None else {}),
            "metadata_columns": list(self.metadata_columns),
            "metadata_scale": dict(self.metadata_scale),
            "level_decoder": self.level_decoder is not None,
            "sequence_model": self.sequence_model is not None,
            # reduced precision changes the results; the float engines agree with Keras
            **({"engine": self.engine["engine"]}
               if self.engine["engine"] in REDUCED_PRECISION_ENGINES else {}),
        }  # fmt: skip

    def metadata(self, positions_mm: np.ndarray, z_mm: np.ndarray) -> np.ndarray:
        """``(Z, F)`` metadata of a series, as ``prepare`` indexes it and ``CSpineSequence``
        scales it: ``position_mm`` below the first slice, ``slice_ratio``, ``z_mm``."""
        n = len(positions_mm)
        columns = {
            "position_mm": positions_mm[0] - positions_mm,
            "slice_ratio": np.arange(n) / (n - 1) if n > 1 else np.zeros(1),
            "z_mm": np.asarray(z_mm, dtype=np.float64),
        }
        unknown = [c for c in self.metadata_columns if c not in columns]
        if unknown:
            raise ValueError(f"unsupported metadata column(s) {unknown}; known {sorted(columns)}")
        out = np.stack([columns[c] * self.metadata_scale[c] for c in self.metadata_columns],
                       axis=1) if self.metadata_columns else np.zeros((n, 0))  # fmt: skip
        return out.astype(np.float32)

    def study_roi(self, hu: np.ndarray, slice_numbers: Sequence[int],
                  pixel_spacing: Sequence[float]):  # fmt: skip
        """The spine window of a study (``(Z, rows, columns)`` HU in series order, with its slice
        numbers), found from the same slices as ``prepare`` reads; None without :attr:`roi_mm`."""
        if self.roi_mm is None:
            return None
        from keras_cspine.data.roi import volume_roi

        return volume_roi(hu, slice_numbers, pixel_spacing, self.roi_mm)

    def _check_roi(self, roi) -> None:
        if (roi is None) != (self.roi_mm is None):
            raise ValueError(f"stage 1 model {self.source} was trained on "
                             + ("whole slices: pass no roi" if self.roi_mm is None
                                else f"{self.roi_mm:g} mm spine windows: pass its study_roi"))

    def images(self, hu: np.ndarray, roi=None) -> np.ndarray:
        """``(Z, S, S, 3)`` float32 model images of a HU volume (the training preprocessing);
        ``roi``: the study's :meth:`study_roi` when the model was trained on windows."""
        from keras_cspine.data.preprocess import to_model_image
        from keras_cspine.stage1.dataset import resample

        self._check_roi(roi)
        out = np.empty((len(hu), self.image_size, self.image_size, 3), np.float32)
        for i, slice_hu in enumerate(hu):
            if roi is not None:
                slice_hu = roi.crop(slice_hu)
            image = to_model_image(slice_hu, mode=self.mode, size=self.render_size)
            out[i] = resample(image, self.image_size)
        return out

    def predict(self, hu: np.ndarray, positions_mm: np.ndarray, z_mm: np.ndarray,
                batch_size: int = 32, return_features: bool = False, roi=None):  # fmt: skip
        """``(Z, 7)`` per-slice presence probabilities of C1..C7 for a HU volume in series order;
        with ``return_features`` also the ``(Z, F)`` slice features of
        :func:`keras_cspine.stage1.sequence_model.feature_model`. ``roi``: the study's
        :meth:`study_roi` when the model was trained on spine windows."""
        n = len(positions_mm)
        if "image" in self.input_names:
            self._check_roi(roi)
        metadata = self.metadata(np.asarray(positions_mm, np.float64), z_mm)
        if self.runner is None:
            from keras_cspine.stage1.fast_inference import KerasRunner

            self.runner = KerasRunner(self.model)
        pad_batches = self.runner.name in ("keras", "xla")  # traced graphs: one batch shape
        out = np.empty((n, len(VERTEBRAE)), np.float32)
        features = None
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            batch: dict[str, np.ndarray] = {}
            if "image" in self.input_names:
                batch["image"] = self.images(hu[start:stop], roi)
            if "metadata" in self.input_names:
                batch["metadata"] = metadata[start:stop]
            if pad_batches and stop - start < batch_size and n > batch_size:
                pad = batch_size - (stop - start)
                batch = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)])
                         for k, v in batch.items()}  # fmt: skip
            feats, scores = self.runner(batch, features=return_features)
            if return_features:
                if features is None:
                    features = np.empty((n, feats.shape[-1]), np.float32)
                features[start:stop] = np.asarray(feats)[: stop - start]
            out[start:stop] = np.asarray(scores, dtype=np.float32)[: stop - start]
        if not np.isfinite(out).all():
            raise ValueError(f"stage 1 model {self.source} gave non-finite scores")
        return (out, features) if return_features else out

    def study_probabilities(self, hu: np.ndarray, positions_mm: np.ndarray, z_mm: np.ndarray,
                            batch_size: int = 32, sequence_model: bool = True,
                            level_decoding: bool = True, roi=None) -> np.ndarray:  # fmt: skip
        """``(Z, 7)`` probabilities of C1..C7 for a study in series order, read along the study:
        by the run's sequence model when it has one (and ``sequence_model``), else by its level
        decoder (when ``level_decoding``), else the per-slice probabilities (the paper).
        ``roi``: the study's :meth:`study_roi` when the model was trained on spine windows."""
        positions_mm = np.asarray(positions_mm, np.float64)
        if sequence_model and self.sequence_model is not None:
            from keras_cspine.stage1.sequence_model import apply_sequence_model

            _, features = self.predict(hu, positions_mm, z_mm, batch_size, return_features=True,
                                       roi=roi)  # fmt: skip
            n = len(positions_mm)
            return apply_sequence_model(self.sequence_model, features, np.zeros(n), np.arange(n))
        probabilities = self.predict(hu, positions_mm, z_mm, batch_size, roi=roi)
        if level_decoding and self.level_decoder is not None:
            from keras_cspine.stage1.level_decoding import slice_spacing

            probabilities = self.level_decoder.decode(
                probabilities, slice_spacing(positions_mm)).astype(np.float32)  # fmt: skip
        return probabilities
