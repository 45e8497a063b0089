"""notebooks/: committed with their outputs, and each runs top to bottom in a real Jupyter kernel.

The committed notebooks are what ``python notebooks/make_notebooks.py --execute`` (``make
notebooks``) writes: their cells must equal the builder's, cell for cell, and their outputs (from a
run on the synthetic default) must be there, show figures and be free of tracebacks, TensorFlow's
start-up notices and the absolute paths of the machine that made them.

The execution tests run copies of the four notebooks in one shared working folder, in order, as a
user would run them (02 and 03 reuse the data of 01, 04 reuses the models of 02 and 03);
``KERAS_CSPINE_NB_SMALL=1`` shrinks every size. Each execution fails on any cell error, and the
files each notebook must leave behind are checked. The committed notebooks are never written.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import tempfile
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


#: What no committed output may contain (lower case): tracebacks, TensorFlow's CPU start-up notices.
FORBIDDEN = ("traceback", "cuinit", "cuda drivers", "absl::initializelog")
#: Absolute paths of a machine (the one that made the notebooks, or this one).
MACHINE_PATHS = ("/tmp/", "/work/", "/home/", "/root/", "/var/folders/", "/kaggle/working/")
MAX_BYTES = 1_500_000
_DATA_URI = re.compile(r"data:image/[a-z+]+;base64,[A-Za-z0-9+/=\s]+")


def _make_notebooks():
    """notebooks/make_notebooks.py as a module (importing it writes nothing)."""
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOK_DIR / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _committed(name: str):
    import nbformat

    nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    return nb


def _output_texts(output) -> list[str]:
    """The text of one output: stream text, ``text/*`` data (embedded images taken out), errors."""
    if output.output_type == "stream":
        return [output.text]
    if output.output_type == "error":
        return [output.ename, output.evalue, *output.traceback]
    return [_DATA_URI.sub("", value) for key, value in output.get("data", {}).items()
            if key.startswith("text/") and isinstance(value, str)]  # fmt: skip


def test_the_four_notebooks_are_there():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == list(NAMES)
    assert tuple(_make_notebooks().NAMES) == NAMES


def test_importing_the_builder_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in NOTEBOOK_DIR.iterdir()}
    module = _make_notebooks()
    assert module.HERE == NOTEBOOK_DIR  # the default output folder is the script's own
    assert list(tmp_path.iterdir()) == []
    assert {p: p.stat().st_mtime_ns for p in NOTEBOOK_DIR.iterdir()} == before


@pytest.mark.parametrize("name", NAMES)
def test_committed_cells_are_the_builders(name):
    """Edit notebooks/make_notebooks.py, then run `make notebooks`: never the .ipynb by hand."""
    built = _make_notebooks().build_notebooks()[name]
    committed = _committed(name)
    want = [(cell.cell_type, cell.source) for cell in built.cells]
    have = [(cell.cell_type, cell.source) for cell in committed.cells]
    assert [s for k, s in have if k == "code"] == [s for k, s in want if k == "code"], (
        f"{name}.ipynb: code cells differ from make_notebooks.py; run `make notebooks`")
    assert have == want, f"{name}.ipynb: markdown differs from make_notebooks.py; run `make notebooks`"
    assert [cell.id for cell in committed.cells] == [cell.id for cell in built.cells]
    assert committed.metadata == built.metadata  # no kernel or Python version details


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_show_their_outputs(name):
    silent = _make_notebooks().SILENT_CELLS
    committed = _committed(name)
    assert (NOTEBOOK_DIR / f"{name}.ipynb").stat().st_size < MAX_BYTES
    images = 0
    for number, cell in enumerate(committed.cells, start=1):
        assert "execution" not in cell.metadata, f"cell {number}: execution timing was saved"
        if cell.cell_type != "code":
            continue
        first_line = cell.source.splitlines()[0]
        if first_line not in silent:
            assert cell.outputs, f"{name} cell {number} ({first_line!r}) has no output"
        assert cell.execution_count is not None, f"{name} cell {number} was not executed"
        for output in cell.outputs:
            assert output.output_type != "error", f"{name} cell {number} failed"
            images += "image/png" in output.get("data", {})
            for text in _output_texts(output):
                lower = text.lower()
                for word in FORBIDDEN:
                    assert word not in lower, f"{name} cell {number}: {word!r} in {text[:300]!r}"
                for path in (*MACHINE_PATHS, str(REPO) + "/", tempfile.gettempdir() + "/"):
                    assert path not in text, f"{name} cell {number}: {path!r} in {text[:300]!r}"
    assert images >= 1, f"{name} shows no figure"
    counts = [cell.execution_count for cell in committed.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), "not run top to bottom in one kernel"


def test_committed_outputs_carry_the_paper_tables():
    texts = {name: "\n".join(text for cell in _committed(name).cells if cell.cell_type == "code"
                              for output in cell.outputs for text in _output_texts(output))
             for name in NAMES}  # fmt: skip
    assert "grey level(s) apart" in texts[NAMES[0]] and "studies," in texts[NAMES[0]]
    for column in ("macro_f1", "exact_match_ratio", "coverage_error", "| C7 |"):  # Tables 1 and 2
        assert column in texts[NAMES[1]], column
    assert "Table 3" in texts[NAMES[2]]
    assert "data:image/png;base64" in "".join(
        value for cell in _committed(NAMES[3]).cells if cell.cell_type == "code"
        for output in cell.outputs for value in output.get("data", {}).values()
        if isinstance(value, str))  # fmt: skip


def test_clean_notebook_strips_what_changes_between_runs(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    make = _make_notebooks()
    work = tmp_path / "nb_work"
    work.mkdir()
    cell = new_code_cell("print(1)", execution_count=1)
    cell.metadata["execution"] = {"iopub.execute_input": "2024-01-01T00:00:00Z"}
    cell.outputs = [
        new_output("stream", name="stdout", text=f"working folder: {work} | small: False\n"),
        new_output("stream", name="stderr", text=(
            "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
            "E0000 00:00:1 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
            "a warning that stays\n"
            "E0000 00:00:2 util.cc:131] oneDNN supports DT_BOOL only on platforms with AVX-512.\n")),
        new_output("stream", name="stderr", text=(
            "I0000 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will not be used.\n")),
        new_output("display_data", data={"text/plain": f"{REPO}/runs/x", "image/png": "iVBORw0KGgo="}),
    ]
    nb = new_notebook(cells=[cell], metadata={"kernelspec": {"name": "python3", "display_name": "venv"},
                                                  "vscode": {"interpreter": "/x"}})  # fmt: skip
    make.clean_notebook(nb, work)
    assert nb.metadata == make.METADATA
    assert "execution" not in nb.cells[0].metadata
    outputs = nb.cells[0].outputs
    assert len(outputs) == 3  # the stream of start-up notices only is gone
    assert outputs[0].text == "working folder: nb_work | small: False\n"
    assert outputs[1].text == "a warning that stays\n"
    assert outputs[2].data["text/plain"] == "./runs/x" and outputs[2].data["image/png"]
    path = make.write_notebook(nb, tmp_path / "out" / "x.ipynb")
    assert nbformat.read(path, as_version=4).cells[0].outputs == outputs
    assert [p.name for p in path.parent.iterdir()] == ["x.ipynb"]  # no temporary file left


def test_prepare_work_empties_only_its_own_folder(tmp_path):
    make = _make_notebooks()
    work = make.prepare_work(tmp_path / "w", keep=False)
    (work / "old.txt").write_text("x")
    assert list(make.prepare_work(work, keep=True).glob("old.txt"))
    assert not list(make.prepare_work(work, keep=False).glob("old.txt"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("x")
    with pytest.raises(SystemExit):
        make.prepare_work(other, keep=False)
    assert (other / "precious.txt").is_file()


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
