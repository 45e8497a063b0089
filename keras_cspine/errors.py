"""Errors raised for bad input: every one names the file and the problem."""

from __future__ import annotations

import os


class CSpineDataError(ValueError):
    """Bad or unreadable input data.

    Args:
        path: the file (or folder) at fault.
        problem: what is wrong with it, in words a user can act on.
    """

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{problem}")

    def __reduce__(self):  # picklable across process pools
        return (type(self), (self.path, self.problem))


class DicomReadError(CSpineDataError):
    """A DICOM file that cannot be read, decoded or understood."""


class SegmentationError(CSpineDataError):
    """A NIfTI segmentation that cannot be read or aligned to its series."""


class CsvSchemaError(CSpineDataError):
    """A CSV of the RSNA layout that does not match its schema in data_spec/."""


class BoxError(CSpineDataError):
    """A bounding box that does not fit its slice."""


class MissingDependencyError(ImportError):
    """An optional dependency is needed; the message says how to install it."""

    def __init__(self, package: str, extra: str, purpose: str):
        super().__init__(
            f"{purpose} needs the optional package '{package}'. "
            f"Install it with: pip install 'keras_cspine[{extra}]'"
        )
