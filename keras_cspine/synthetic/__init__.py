"""The built-in synthetic dataset in the RSNA 2022 layout (the default of the demo, notebooks and
tests): :mod:`~keras_cspine.synthetic.anatomy` (the phantom neck in patient coordinates),
:mod:`~keras_cspine.synthetic.study` (drawing and rendering a study),
:mod:`~keras_cspine.synthetic.dicom_writer` (DICOM and NIfTI files) and
:mod:`~keras_cspine.synthetic.dataset` (:func:`generate_dataset`, the whole folder).
"""

from keras_cspine.synthetic.dataset import generate_dataset, generate_study, load_manifest
from keras_cspine.synthetic.study import PRESETS, Preset, get_preset

__all__ = ["PRESETS", "Preset", "generate_dataset", "generate_study", "get_preset", "load_manifest"]
