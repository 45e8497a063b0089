"""The two stages together (not in the paper): a CT study in; per-vertebra and patient fracture
probabilities, boxes, an RSNA submission and a report out.

- :mod:`~keras_cspine.pipeline.config`: :class:`PredictConfig`, the settings;
- :mod:`~keras_cspine.pipeline.studies`: study folders and the newest runs;
- :mod:`~keras_cspine.pipeline.results`: boxes, the gate, assignment, aggregation, StudyResult;
- :mod:`~keras_cspine.pipeline.predict`: :func:`predict_study` and :func:`predict`;
- :mod:`~keras_cspine.pipeline.evaluate`: the study-level evaluation of a submission;
- :mod:`~keras_cspine.pipeline.report`: per-study figures and the HTML/Markdown report.

The stage wrappers are :class:`keras_cspine.stage1.inference.Stage1Model` and
:class:`keras_cspine.stage2.inference.Stage2Model`.
"""

from keras_cspine.pipeline.config import AGGREGATIONS, PredictConfig
from keras_cspine.pipeline.evaluate import evaluate_predictions, evaluation_markdown
from keras_cspine.pipeline.predict import predict, predict_study
from keras_cspine.pipeline.results import (
    Box,
    StudyResult,
    aggregate_study,
    assign_boxes,
    gate_slices,
)
from keras_cspine.pipeline.studies import find_latest_stage1, find_latest_stage2, find_studies
from keras_cspine.stage1.inference import Stage1Model
from keras_cspine.stage2.inference import Stage2Model, pt_to_onnx

__all__ = [
    "AGGREGATIONS",
    "Box",
    "PredictConfig",
    "Stage1Model",
    "Stage2Model",
    "StudyResult",
    "aggregate_study",
    "assign_boxes",
    "evaluate_predictions",
    "evaluation_markdown",
    "find_latest_stage1",
    "find_latest_stage2",
    "find_studies",
    "gate_slices",
    "predict",
    "predict_study",
    "pt_to_onnx",
]
