"""Readers of the RSNA 2022 data (the paper's dataset): DICOM slices and series (``io.dicom``),
NIfTI vertebra segmentations aligned to them (``io.nifti``) and the CSV/folder layout
(``io.rsna``).

Submodules are imported on demand so that ``import keras_cspine.io`` stays light.
"""
