"""notebooks/: each runs top to bottom in a real Jupyter kernel on small synthetic settings.

The four notebooks share one working folder, in order, as a user would run them (02 and 03 reuse
the data of 01, 04 reuses the models of 02 and 03); ``KERAS_CSPINE_NB_SMALL=1`` shrinks every
size. Each execution fails on any cell error, and the files each notebook must leave behind are
checked.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NAMES = (
    "01_data_and_preprocessing",
    "02_vertebrae_classification",
    "03_fracture_detection",
    "04_two_stage_inference",
)


def _code_cells(name: str) -> list[str]:
    import nbformat

    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_the_four_notebooks_are_there():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_import_the_package_and_switch_data_in_one_cell(name):
    cells = _code_cells(name)
    switches = [c for c in cells if "USE_KAGGLE = False" in c]
    assert len(switches) == 1, "exactly one cell switches to the Kaggle input"
    assert "KAGGLE_INPUT" in switches[0]
    source = "\n".join(cells)
    assert "keras_cspine" in source
    for cell in cells:  # valid Python, and no code redefined in the notebook
        tree = ast.parse("\n".join(line for line in cell.splitlines()
                                   if not line.startswith(("!", "%"))))
        defined = [n.name for n in ast.walk(tree)
                   if isinstance(n, ast.FunctionDef | ast.ClassDef | ast.AsyncFunctionDef)]  # fmt: skip
        assert not defined, f"{name} defines {defined}: import it from keras_cspine instead"
    if name == "03_fracture_detection":
        assert "tensorflow" not in source and "keras_cspine.stage1.train" not in source


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("notebooks")


def _execute(name: str, work: Path, monkeypatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("KERAS_CSPINE_NB_SMALL", "1")
    monkeypatch.setenv("KERAS_CSPINE_NB_WORK", str(work))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(work)}})  # fmt: skip
    client.execute()  # raises CellExecutionError on the first failing cell
    nbformat.write(nb, work / f"{name}.executed.ipynb")


def _outputs_text(work: Path, name: str) -> str:
    import nbformat

    nb = nbformat.read(work / f"{name}.executed.ipynb", as_version=4)
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            texts.append(output.get("text", ""))
            texts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text"))
    return "\n".join(texts)


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_01_data(work, monkeypatch):
    _execute(NAMES[0], work, monkeypatch)
    assert (work / "synthetic" / "train.csv").is_file()
    assert (work / "prepared32" / "index.csv").is_file()
    text = _outputs_text(work, NAMES[0])
    assert "grey level(s) apart" in text and "studies," in text


@pytest.mark.slow
@pytest.mark.notebook
def test_notebook_02_classification(work, monkeypatch):
    _execute(NAMES[1], work, monkeypatch)
    for name in ("model.keras", "table1_row.md", "table2.md", "figures/loss_curves.png"):
        assert (work / "stage1" / name).is_file(), name
    assert "macro" in _outputs_text(work, NAMES[1]).lower()


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.detect
def test_notebook_03_detection(work, monkeypatch):
    _execute(NAMES[2], work, monkeypatch)
    assert (work / "stage2" / "weights" / "best.onnx").is_file()
    assert "Table 3" in (work / "stage2" / "table3.md").read_text()


@pytest.mark.slow
@pytest.mark.notebook
@pytest.mark.detect
def test_notebook_04_two_stage(work, monkeypatch):
    from keras_cspine.io.rsna import read_submission

    _execute(NAMES[3], work, monkeypatch)
    test_studies = sorted(p.name for p in (work / "synthetic" / "test_images").iterdir())
    submission = read_submission(work / "predict_test" / "submission.csv")
    assert len(submission) == 8 * len(test_studies)
    evaluation = json.loads((work / "predict_eval" / "evaluation.json").read_text())
    assert evaluation["n_studies"] >= 1 and evaluation["rsna_weighted_log_loss"] > 0
    assert "data:image/png;base64" in _outputs_text(work, NAMES[3])  # the inline report
