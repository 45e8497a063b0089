"""io/rsna.py and data_spec/: the RSNA layout, its CSV schemas and a table of bad CSVs."""

from __future__ import annotations

import json

import jsonschema
import pandas as pd
import pytest

from keras_cspine.errors import CSpineDataError, CsvSchemaError
from keras_cspine.io import rsna

UID = "1.2.826.0.1.3680043.10001"
UID2 = "1.2.826.0.1.3680043.10002"
TRAIN_HEADER = "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7\n"
BOX_HEADER = "StudyInstanceUID,x,y,width,height,slice_number\n"


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["train", "train_bounding_boxes", "test", "sample_submission",
                                  "slice_index"])  # fmt: skip
def test_schemas_are_valid_json_schema(name):
    schema = rsna.load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["required"]) <= set(schema["properties"])


def test_layout_names_every_schema():
    layout = rsna.load_layout()
    for spec in layout["files"].values():
        assert (rsna.DATA_SPEC_DIR / spec["schema"]).is_file()


def test_good_train_csv_is_typed(tmp_path):
    path = write(tmp_path, "train.csv", TRAIN_HEADER + f"{UID},1,0,1,0,0,0,0,0\n{UID2},0,0,0,0,0,0,0,0\n")
    frame = rsna.read_train_csv(path)
    assert list(frame.columns) == ["StudyInstanceUID", "patient_overall", *rsna.VERTEBRAE]
    assert frame.C2.tolist() == [1, 0] and frame.C2.dtype == "int64"


BAD_CSVS = [
    # (file name, reader, content, expected message fragment)
    ("train.csv", rsna.read_train_csv, "StudyInstanceUID,patient_overall,C1\n1.2.3,0,0\n", "missing column"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + f"{UID},1,0,2,0,0,0,0,0\n", "column 'C2'"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + f"{UID},1,0,yes,0,0,0,0,0\n", "not a number"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + f"{UID},0,0,1,0,0,0,0,0\n", "patient_overall"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + f"{UID},0,0,0,0,0,0,0,0\n{UID},0,0,0,0,0,0,0,0\n", "more than once"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + "not-a-uid,0,0,0,0,0,0,0,0\n", "StudyInstanceUID"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + f"{UID},0,0,,0,0,0,0,0\n", "missing value"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER.strip() + ",extra\n" + f"{UID},0,0,0,0,0,0,0,0,1\n", "unexpected column"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},10,10,0,5,3\n", "column 'width'"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},-4,10,5,5,3\n", "column 'x'"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},1,1,5,5,2.5\n", "not an integer"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},1,1,5,5,0\n", "slice_number"),
    ("test.csv", rsna.read_test_csv, f"row_id,StudyInstanceUID,prediction_type\n{UID}_C1,{UID},C2\n", "row_id"),
    ("test.csv", rsna.read_test_csv, f"row_id,StudyInstanceUID,prediction_type\n{UID}_C8,{UID},C8\n", "prediction_type|row_id"),
    ("sample_submission.csv", rsna.read_submission, f"row_id,fractured\n{UID}_C1,1.5\n", "maximum"),
    ("sample_submission.csv", rsna.read_submission, "", "not a readable CSV"),
    # found by tests/test_fuzz_readers.py: non-finite and out-of-range numbers
    ("sample_submission.csv", rsna.read_submission, f"row_id,fractured\n{UID}_C1,nan\n", "missing value"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},inf,10,5,5,3\n", "'x'.*not a finite number"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},1,1,5,5,1e400\n", "'slice_number'.*not a finite number"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},1,1,5,5,1e19\n", "'slice_number'.*too large"),
    ("train_bounding_boxes.csv", rsna.read_bounding_boxes, BOX_HEADER + f"{UID},1,1,5,5,9223372036854775808\n", "too large"),
    ("train.csv", rsna.read_train_csv, TRAIN_HEADER + f"{UID},-inf,0,0,0,0,0,0,0\n", "'patient_overall'.*not a finite number"),
]  # fmt: skip


@pytest.mark.parametrize("name, reader, content, message", BAD_CSVS)
def test_bad_csvs_are_named(tmp_path, name, reader, content, message):
    path = write(tmp_path, name, content)
    with pytest.raises(CsvSchemaError, match=message) as info:
        reader(path)
    assert str(path) in str(info.value)


def test_whole_numbers_up_to_2_53_are_exact_integers(tmp_path):
    path = write(tmp_path, "train_bounding_boxes.csv",
                 BOX_HEADER + f"{UID},1,1,5,5,{2**53}\n{UID},1,1,5,5,3.0\n")  # fmt: skip
    frame = rsna.read_bounding_boxes(path)
    assert frame.slice_number.tolist() == [2**53, 3] and frame.slice_number.dtype == "int64"


def test_missing_csv_is_named(tmp_path):
    with pytest.raises(CsvSchemaError, match="file not found"):
        rsna.read_train_csv(tmp_path / "train.csv")


def test_boxes_of_unknown_study_are_refused(tmp_path):
    (tmp_path / "train_images").mkdir()
    write(tmp_path, "train.csv", TRAIN_HEADER + f"{UID},0,0,0,0,0,0,0,0\n")
    write(tmp_path, "train_bounding_boxes.csv", BOX_HEADER + f"{UID2},1,1,5,5,3\n")
    with pytest.raises(CsvSchemaError, match=f"study {UID2} has boxes"):
        rsna.RsnaLayout(tmp_path).bounding_boxes()


def test_layout_paths_and_errors(tmp_path):
    with pytest.raises(CSpineDataError, match="dataset folder not found"):
        rsna.RsnaLayout(tmp_path / "nowhere")
    (tmp_path / "train_images" / UID).mkdir(parents=True)
    (tmp_path / "segmentations").mkdir()
    (tmp_path / "segmentations" / f"{UID}.nii").write_bytes(b"")
    layout = rsna.RsnaLayout(tmp_path)
    assert layout.list_studies() == [UID]
    assert layout.series_dir(UID) == tmp_path / "train_images" / UID
    assert layout.segmentation_path(UID).name == f"{UID}.nii"
    assert layout.segmentation_path(UID2) is None
    with pytest.raises(CSpineDataError, match=UID2):
        layout.series_dir(UID2)
    assert layout.bounding_boxes().empty


def test_submission_rows_and_writer(tmp_path):
    probs = {t: 0.25 for t in rsna.TARGETS}
    rows = rsna.submission_rows(UID, probs)
    assert [r["row_id"] for r in rows][-1] == f"{UID}_patient_overall" and len(rows) == 8
    rsna.write_submission(pd.DataFrame(rows), tmp_path / "submission.csv")
    assert rsna.read_submission(tmp_path / "submission.csv").fractured.tolist() == [0.25] * 8
    with pytest.raises(CsvSchemaError):
        rsna.write_submission(pd.DataFrame([{"row_id": f"{UID}_C1", "fractured": 2.0}]),
                              tmp_path / "bad.csv")  # fmt: skip
    assert not (tmp_path / "bad.csv").exists()


# -- the synthetic dataset follows the layout -------------------------------------------------
def test_synthetic_dataset_matches_data_spec(synthetic_data):
    layout = rsna.RsnaLayout(synthetic_data)
    spec = rsna.load_layout()
    for name, _file_spec in spec["files"].items():
        assert (synthetic_data / name).is_file(), name
    for folder in spec["folders"]:
        assert (synthetic_data / folder).is_dir(), folder
    labels = layout.train_labels()
    boxes = layout.bounding_boxes()
    tests = layout.test_rows()
    sub = rsna.read_submission(synthetic_data / "sample_submission.csv")
    assert set(labels.StudyInstanceUID) == set(layout.list_studies("train"))
    assert set(tests.StudyInstanceUID) == set(layout.list_studies("test"))
    assert set(sub.row_id) == set(tests.row_id)
    # Every study has a segmentation and file numbers 1..N.
    for uid in labels.StudyInstanceUID:
        assert layout.segmentation_path(uid) is not None
        numbers = sorted(int(p.stem) for p in layout.series_dir(uid).glob("*.dcm"))
        assert numbers == list(range(1, len(numbers) + 1))
    # Fractured studies have boxes; the others have none.
    fractured = set(labels.StudyInstanceUID[labels.patient_overall == 1])
    assert set(boxes.StudyInstanceUID) == fractured
    # Row-wise, through a real JSON Schema validator as well.
    for name, frame in [("train", labels), ("train_bounding_boxes", boxes), ("test", tests)]:
        validator = jsonschema.Draft202012Validator(rsna.load_schema(name))
        for record in json.loads(frame.to_json(orient="records")):
            validator.validate(record)
