"""DICOM and NIfTI writing of a synthetic study: one CT Image Storage file per slice (the
varying elements patched into a pre-encoded template, JPEG-lossless through python-gdcm for
some studies; each file decoded back and checked) and the RSNA-style segmentation."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from keras_cspine.errors import CSpineDataError
from keras_cspine.synthetic.study import JPEG_LOSSLESS, StudySpec, _ds
from keras_cspine.utils import atomic_path


def _dicom_dataset(spec: StudySpec, s: int, stored: np.ndarray):
    """The pydicom Dataset of series slice ``s`` (uncompressed, explicit VR little endian)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        PYDICOM_IMPLEMENTATION_UID,
        UID,
        CTImageStorage,
        ExplicitVRLittleEndian,
    )

    g, number = spec.grid, spec.file_number(s)
    dtype = "<i2" if spec.pixel_representation else "<u2"
    sop = UID(f"{spec.uid}.1.{number}")
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    patient = spec.uid.rsplit(".", 1)[-1]
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20220724"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "keras_cspine synthetic phantom"
    ds.ReferringPhysicianName = ""
    ds.PatientName = patient
    ds.PatientID = patient
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.BodyPartExamined = "CSPINE"
    ds.SliceThickness = _ds(spec.slice_thickness)
    ds.KVP = "120"
    ds.XRayTubeCurrent = 200
    ds.ConvolutionKernel = "BONE"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = UID(spec.uid)
    ds.SeriesInstanceUID = UID(f"{spec.uid}.1")
    ds.StudyID = patient
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in g.ipps[s]]
    ds.ImageOrientationPatient = [_ds(v) for v in spec.iop]
    ds.FrameOfReferenceUID = UID(f"{spec.uid}.2")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(g.ipps[s][2])
    if spec.spacing_tag:
        ds.SpacingBetweenSlices = _ds(spec.spacing)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = g.rows, g.columns
    ds.PixelSpacing = [_ds(g.dr), _ds(g.dc)]
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = spec.pixel_representation
    if spec.padding_hu is not None:
        padding = int(spec.padding_hu - spec.rescale_intercept)
        ds.add_new(0x00280120, "SS" if spec.pixel_representation else "US", padding)
    ds.WindowCenter = ["400", "40"]
    ds.WindowWidth = ["1800", "400"]
    ds.RescaleIntercept = _ds(spec.rescale_intercept)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype=dtype).tobytes())
    return ds


_VARYING = (0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)
"""SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation, PixelData."""
_PIXEL_DATA_OB_UNDEFINED = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"


def _encode(elements) -> bytes:
    """Explicit VR little endian bytes of data elements (pydicom's own element writer)."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    part = Dataset()
    for elem in elements:
        part.add(elem)
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, part)
    return fp.getvalue()


def _element(tag: int, vr: str, value: str | bytes) -> bytes:
    """One explicit VR little endian data element (UI, IS, DS or OW), padded to even length."""
    data = value.encode("ascii") if isinstance(value, str) else value
    if len(data) % 2:
        data += b"\x00" if vr in ("UI", "OW") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("ascii")
    if vr == "OW":
        return head + b"\x00\x00" + struct.pack("<I", len(data)) + data
    return head + struct.pack("<H", len(data)) + data


class _SliceWriter:
    """Writes a study's slices fast: the constant header is encoded once by pydicom, and only the
    per-slice elements (:data:`_VARYING`: UIDs, numbers, positions, pixels) are encoded for each
    slice. The bytes equal ``Dataset.save_as(enforce_file_format=True)`` of the same dataset
    (tested), at a tenth of the cost.

    For a compressed study, python-gdcm encodes the pixels as JPEG lossless SV1 (transfer syntax
    1.2.840.10008.1.2.4.70; pydicom cannot encode it). GDCM would also fill missing type-2
    attributes with the current time, so only its encapsulated PixelData element is kept, verbatim:
    the files stay byte-identical for a seed.
    """

    def __init__(self, spec: StudySpec, scratch: Path):
        template = _dicom_dataset(spec, 0, np.zeros((spec.grid.rows, spec.grid.columns)))
        self.spec, self.scratch = spec, scratch
        self._meta_cache: dict[tuple[int, bool], bytes] = {}
        self.runs: list[bytes | int] = []  # encoded constant runs and varying tags, in tag order
        constant: list = []
        for elem in template:
            if int(elem.tag) in _VARYING:
                if constant:
                    self.runs.append(_encode(constant))
                    constant = []
                self.runs.append(int(elem.tag))
            else:
                constant.append(elem)
        if constant:
            self.runs.append(_encode(constant))

    def dataset(self, s: int, stored: np.ndarray):
        """The full pydicom Dataset of a slice (uncompressed), for reference and tests."""
        return _dicom_dataset(self.spec, s, stored)


    def write(self, s: int, stored: np.ndarray, path: Path) -> None:
        """Write series slice ``s`` with stored pixel values ``stored`` to ``path``."""
        g, number = self.spec.grid, self.spec.file_number(s)
        sop = f"{self.spec.uid}.1.{number}"
        dtype = "<i2" if self.spec.pixel_representation else "<u2"
        varying = {
            0x00080018: _element(0x00080018, "UI", sop),
            0x00200013: _element(0x00200013, "IS", str(number)),
            0x00200032: _element(0x00200032, "DS", "\\".join(_ds(v) for v in g.ipps[s])),
            0x00201041: _element(0x00201041, "DS", _ds(g.ipps[s][2])),
            0x7FE00010: _element(0x7FE00010, "OW", np.ascontiguousarray(stored, dtype).tobytes()),
        }
        if self.spec.compressed:
            plain = self.scratch / "plain.dcm"
            plain.write_bytes(self._assemble(sop, varying, compressed=False))
            varying[0x7FE00010] = self._jpeg_lossless(plain, path)
        path.write_bytes(self._assemble(sop, varying, compressed=self.spec.compressed))

    def _assemble(self, sop: str, varying: dict[int, bytes], compressed: bool) -> bytes:
        parts = [b"\x00" * 128 + b"DICM", self._meta(sop, compressed)]
        parts += [run if isinstance(run, bytes) else varying[run] for run in self.runs]
        return b"".join(parts)

    def _meta(self, sop: str, compressed: bool) -> bytes:
        """File meta bytes, encoded by pydicom once per UID length (the UID is then swapped in)."""
        key = (len(sop), compressed)
        if key not in self._meta_cache:
            from pydicom.dataset import FileMetaDataset
            from pydicom.filebase import DicomBytesIO
            from pydicom.filewriter import write_file_meta_info
            from pydicom.uid import (
                PYDICOM_IMPLEMENTATION_UID,
                UID,
                CTImageStorage,
                ExplicitVRLittleEndian,
            )

            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CTImageStorage
            meta.MediaStorageSOPInstanceUID = UID("9" * len(sop))
            meta.TransferSyntaxUID = UID(JPEG_LOSSLESS) if compressed else ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_file_meta_info(fp, meta, enforce_standard=True)
            self._meta_cache[key] = fp.getvalue()
        template = self._meta_cache[key]
        marker = _element(0x00020003, "UI", "9" * len(sop))
        at = template.index(marker)
        return template[:at] + _element(0x00020003, "UI", sop) + template[at + len(marker) :]

    def _jpeg_lossless(self, plain: Path, path: Path) -> bytes:
        """The encapsulated PixelData element (tag to end of file) of the slice, from GDCM."""
        try:
            import gdcm
        except ImportError as exc:  # pragma: no cover - python-gdcm is a core dependency
            raise ImportError("JPEG-lossless studies need python-gdcm: pip install python-gdcm") from exc
        packed = self.scratch / "packed.dcm"
        reader = gdcm.ImageReader()
        reader.SetFileName(str(plain))
        if not reader.Read():
            raise CSpineDataError(plain, "GDCM could not read the slice it was given to compress")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise CSpineDataError(path, "GDCM could not encode the slice as JPEG lossless")
        writer = gdcm.ImageWriter()
        writer.SetFileName(str(packed))
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        if not writer.Write():
            raise CSpineDataError(packed, "GDCM could not write the JPEG-lossless slice")
        data = packed.read_bytes()
        start = data.find(_PIXEL_DATA_OB_UNDEFINED)
        if start < 0 or not data.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"):
            raise CSpineDataError(packed, "GDCM output has no encapsulated PixelData at its end")
        return data[start:]


def _check_decodes(path: Path, expected: np.ndarray) -> None:
    """Decode a written slice with pydicom (+ pylibjpeg) and compare with what was meant."""
    import pydicom

    decoded = pydicom.dcmread(path).pixel_array
    if not np.array_equal(decoded, expected):
        raise CSpineDataError(path, "the written slice does not decode to the pixels it was given")


def _write_nifti(spec: StudySpec, seg: np.ndarray, path: Path) -> None:
    """The RSNA-style segmentation: data[i, j, k] = seg[Z-1-k, rows-1-j, i], RAS affine."""
    import nibabel as nib

    data = np.ascontiguousarray(seg[::-1, ::-1, :].transpose(2, 1, 0), dtype=np.uint8)
    affine = spec.nifti_affine()
    image = nib.Nifti1Image(data, affine)
    image.set_data_dtype(np.uint8)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(image, tmp)
