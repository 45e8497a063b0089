"""Generate notebooks/0[1-4]_*.ipynb from the cells below.

Edit the cells here, then regenerate:

    python notebooks/make_notebooks.py             # code and markdown only, no outputs
    python notebooks/make_notebooks.py --execute   # also run them, saved with their outputs
    make notebooks                                 # the same as --execute, in the repository's venv

The committed notebooks carry the outputs of ``--execute`` on the synthetic default (not the
tests' SMALL sizes), so that readers on GitHub or Kaggle see the figures and tables before running
anything. ``--execute`` runs the four notebooks in order in a real Jupyter kernel (the Python that
runs this script) with ``notebooks/nb_work`` (git-ignored, emptied first) as their shared working
folder, then writes them atomically with volatile metadata stripped, TensorFlow's start-up notices
dropped from standard error and absolute paths replaced by neutral ones. Nothing is written when a
cell fails. ``tests/test_notebooks.py`` checks that the committed code cells equal
:func:`build_notebooks`.

Importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NAMES = (
    "01_data_and_preprocessing",
    "02_vertebrae_classification",
    "03_fracture_detection",
    "04_two_stage_inference",
)
#: The default working folder of ``--execute`` (listed in .gitignore).
DEFAULT_WORK = HERE / "nb_work"
#: The file that marks a folder as a working folder this script may empty.
WORK_MARKER = ".make_notebooks_work"
#: TensorFlow notices written at its first operations on a CPU without AVX-512, after the start-up
#: that keras_cspine.quiet filters (information, not problems): dropped from standard error.
RUNTIME_NOTICES = ("oneDNN supports DT_BOOL only on platforms with AVX-512",)
#: Code cells allowed to have no output in the committed notebooks (their first line).
SILENT_CELLS: frozenset[str] = frozenset()

SETTINGS = '''# Settings. SMALL=1 (the tests) shrinks every size; KERAS_CSPINE_NB_WORK is the working folder
# shared by the four notebooks (02 and 03 reuse what 01 prepared, 04 reuses their models).
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt

import keras_cspine.quiet

keras_cspine.quiet.install()  # before the first Keras import: no CPU start-up notices on stderr
%matplotlib inline
plt.rcParams["figure.dpi"] = 72  # inline figures stay light in the saved notebook
warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets

SMALL = os.environ.get("KERAS_CSPINE_NB_SMALL", "0") == "1"
WORK = Path(os.environ.get("KERAS_CSPINE_NB_WORK", "/kaggle/working" if Path("/kaggle/working").is_dir() else "nb_work"))
WORK.mkdir(parents=True, exist_ok=True)
KAGGLE_INPUT = Path("/kaggle/input/rsna-2022-cervical-spine-fracture-detection")
print("working folder:", WORK, "| small:", SMALL)'''

DATA = '''# Data: the ONE switch between the built-in synthetic dataset (default) and the Kaggle input.
# On Kaggle, add the competition data to the notebook and set USE_KAGGLE = True.
from keras_cspine.synthetic.dataset import generate_dataset

USE_KAGGLE = False

if USE_KAGGLE:
    DATA = KAGGLE_INPUT
    assert (DATA / "train.csv").is_file(), f"no Kaggle input at {DATA}"
else:
    DATA = WORK / "synthetic"
    if not (DATA / "synthetic_manifest.json").is_file():
        generate_dataset(DATA, n_studies=6 if SMALL else 60, seed=0,
                         preset="tiny" if SMALL else "demo", workers=1 if SMALL else 2,
                         progress=False)
print("data:", DATA)'''

INSTALL = ("On Kaggle, install the package first (internet on): "
           "`!pip install git+<keras_cspine repository>`, or attach it as a dataset. "
           "Everything below imports `keras_cspine`; no code is redefined here.")

PREPARE = '''# The slice index + image cache (shared with notebooks 02-04). On Kaggle only the 87 studies with
# a segmentation carry slice labels, so only those are prepared.
from keras_cspine.data.prepare import load_index, prepare_dataset
from keras_cspine.io.rsna import RsnaLayout

# The paper: whole 224 px slices, Algorithm 1. On the CPU: 64 px of the 100 mm window around the
# cervical column (beyond the paper), in bone and soft-tissue windows, so that a vertebra is not
# a few pixels of the image.
SIZE = 32 if SMALL else (224 if USE_KAGGLE else 64)
MODE, ROI_MM = ("paper", None) if USE_KAGGLE else ("multiwindow", 100.0)
PREPARED = WORK / f"prepared{SIZE}"
layout = RsnaLayout(DATA)
labelled = [u for u in layout.list_studies() if layout.segmentation_path(u) is not None]
prepare_dataset(DATA, PREPARED, size=SIZE, mode=MODE, roi_mm=ROI_MM, studies=labelled,
                workers=1 if SMALL else 2, progress=USE_KAGGLE)  # a progress bar on the real data
index = load_index(PREPARED)
print(f"{index.StudyInstanceUID.nunique()} studies, {len(index)} slices")'''


def md(text: str) -> tuple[str, str]:
    return "markdown", text.strip()


def code(text: str) -> tuple[str, str]:
    return "code", text.strip()


CELLS_01 = [
    md("""
# 01 - Data and preprocessing (paper Section 2.4, Algorithm 1, Figures 3-4)

The RSNA 2022 Cervical Spine Fracture Detection layout, read with `keras_cspine.io`; the paper's
Algorithm 1 and the bone-window modes of `keras_cspine.data.preprocess`; vertebra labels per slice from
the NIfTI segmentations (aligned from the DICOM and NIfTI geometry); the Figure 3 counts of
fractured studies per vertebra and Figure 4-style slices.
Runs top to bottom on the built-in synthetic data; one cell switches to the Kaggle input.

""" + INSTALL),
    code(SETTINGS),
    code(DATA),
    md("## The layout: CSVs validated against their schemas"),
    code('''from keras_cspine.io.rsna import RsnaLayout

layout = RsnaLayout(DATA)
labels = layout.train_labels()
boxes = layout.bounding_boxes()
print(f"{len(labels)} training studies, {int(labels.patient_overall.sum())} with a fracture; "
      f"{len(boxes)} fracture boxes")
labels.head()'''),
    code("boxes.head()"),
    md("## Figure 3: fractured and non-fractured studies per vertebra"),
    code('''import matplotlib.pyplot as plt
from IPython.display import display

from keras_cspine.viz import figure_fracture_counts

fig, counts = figure_fracture_counts(labels)
display(fig)
plt.close(fig)
counts'''),
    md("## One study: geometry-aware reading (series order = head to feet)"),
    code('''from keras_cspine.io.dicom import read_series, transfer_syntax_name

uid = sorted(labels.StudyInstanceUID[labels.patient_overall == 1])[0]
volume, meta = read_series(layout.series_dir(uid))
print(f"{uid}: {volume.shape} (Z, Y, X) HU, spacing {meta.spacing_mm:.2f} mm, "
      f"head first: {meta.head_first}, pixels {meta.slices[0].pixel_spacing} mm, "
      f"{transfer_syntax_name(meta.slices[0].transfer_syntax_uid)}")
print("file numbers in series order:", meta.slice_numbers[:5], "...", meta.slice_numbers[-3:])'''),
    md("""
## Algorithm 1 (the paper's preprocessing) beside the window modes

`paper_algorithm1` follows the paper exactly (YBR_FULL workaround, per-slice min-max, uint8,
grey -> RGB); `to_model_image` gives the same on HU (mode `"paper"`) and the bone and
three-window modes used by strong RSNA solutions.
"""),
    code('''import matplotlib.pyplot as plt
import numpy as np

from keras_cspine.data.preprocess import paper_algorithm1, to_model_image

box_slices = boxes[boxes.StudyInstanceUID == uid].slice_number.tolist()
number = int(box_slices[len(box_slices) // 2]) if box_slices else int(meta.slice_numbers[len(volume) // 2])
i = meta.slice_numbers.index(number)
images = {"Algorithm 1 (paper)": paper_algorithm1(meta.slices[i].path),
          "bone (400/1800)": to_model_image(volume[i], "bone", size=None),
          "multiwindow": to_model_image(volume[i], "multiwindow", size=None)}
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, (name, image) in zip(axes, images.items()):
    ax.imshow(image)
    ax.set_title(f"{name}, slice {number}")
    ax.axis("off")
display(fig)
plt.close(fig)
on_hu = to_model_image(volume[i], "paper", size=None).astype(int)
print("Algorithm 1 on the file vs mode 'paper' on HU: at most",
      np.abs(images["Algorithm 1 (paper)"].astype(int) - on_hu).max(), "grey level(s) apart")'''),
    md("## Vertebra labels per slice from the segmentation (aligned by geometry, not by rot90)"),
    code('''from keras_cspine.io.nifti import align_segmentation, vertebra_presence

seg_path = layout.segmentation_path(uid)
if seg_path is not None:
    seg = align_segmentation(seg_path, meta)
    presence = vertebra_presence(seg)
    fig, ax = plt.subplots(figsize=(8, 2.5))
    ax.imshow(presence.T, aspect="auto", cmap="Greens", interpolation="nearest")
    ax.set_yticks(range(7), [f"C{k}" for k in range(1, 8)])
    ax.set_xlabel("series index (head -> feet)")
    ax.set_title("C1..C7 present on each slice")
    display(fig)
    plt.close(fig)
else:
    print("no segmentation for", uid)'''),
    md("## Prepare: the slice index and the image cache"),
    code(PREPARE),
    code("index.head()"),
    md("## Figure 4 style: slices with their labels and fracture boxes"),
    code('''from keras_cspine.viz import figure_sagittal, figure_slices, pick_slices

fig = figure_slices(index, PREPARED, pick_slices(index, 8 if SMALL else 12, seed=0),
                    title="slices with their vertebrae (and fracture boxes in red)")
display(fig)
plt.close(fig)'''),
    code('''fig = figure_sagittal(index, PREPARED, index.StudyInstanceUID.iloc[0])
display(fig)
plt.close(fig)'''),
]

CELLS_02 = [
    md("""
# 02 - Vertebrae classification (paper Sections 2.5 and 3, Tables 1-2, Figure 6)

Stage 1: the two-input network (GCViT image branch + metadata branch -> 7 sigmoids for C1..C7)
trained on prepared slices with binary cross-entropy, macro F1 monitored and ReduceLROnPlateau on
validation F1, as in the paper; then the Table 1 metrics (macro F1, exact match ratio, coverage
error), the Table 2 per-class report and the Figure 6 loss curves. On the synthetic default the
model is GCViT-xxtiny at 64 px; on Kaggle the paper's GCViT-tiny at 224 px.

""" + INSTALL),
    code(SETTINGS),
    code(DATA),
    code(PREPARE),
    md("## The paper's model: exact Table 1 parameter counts"),
    code('''from keras_cspine.stage1.models.factory import PAPER_PARAMETERS, build_model, count_parameters

if SMALL:   # GCViT-tiny at 224 px takes a little while to build on a small CPU
    counts = count_parameters(build_model("gcvit_xxtiny", image_size=64, freeze="none"))
    print("GCViT-xxtiny at 64 px:", counts)
else:
    counts = count_parameters(build_model("gcvit_tiny", image_size=224))
    print("GCViT-tiny, levels 0-2 frozen:", counts, "| paper:", PAPER_PARAMETERS["Proposed (GCViT)"])'''),
    md("## Training (resumable run directory: config, log, best model, metrics, figures)"),
    code('''from keras_cspine.stage1.train import load_stage1_config, train_stage1

CONFIG = "stage1_gcvit_tiny" if USE_KAGGLE else "stage1_synthetic_small"
overrides = [f"data.image_size={SIZE}"]
if SMALL:
    overrides += ["train.epochs=1", "train.batch_size=16", "train.steps_per_epoch=4"]
elif not USE_KAGGLE:
    overrides += ["train.epochs=5"]
config = load_stage1_config(CONFIG, overrides)
if USE_KAGGLE:  # the paper's GCViT starts from timm's ImageNet weights (NVIDIA, CC-BY-NC-SA-4.0)
    from keras_cspine.stage1.models.pretrained import fetch, find

    if find("gcvit_tiny") is None:
        fetch("gcvit_tiny")  # needs the notebook's internet switch on, or `weights add FILE`
STAGE1 = WORK / "stage1"
summary = train_stage1(config, PREPARED, STAGE1, overwrite=True, verbose=2)
print("best validation macro F1:", round(summary["best_val_f1_score"], 4))'''),
    md("## Table 1 row (beside the paper's numbers) and Table 2"),
    code('''from IPython.display import Markdown, display

display(Markdown((STAGE1 / "table1_row.md").read_text()))
display(Markdown((STAGE1 / "table2.md").read_text()))'''),
    md("## Figure 6: training and validation loss"),
    code('''from IPython.display import Image

Image(filename=str(STAGE1 / "figures" / "loss_curves.png"))'''),
    md("## Predictions on the held-out slices"),
    code('''import pandas as pd

predictions = pd.read_csv(STAGE1 / "predictions.csv")
predictions.head(10)'''),
]

CELLS_03 = [
    md("""
# 03 - Fracture detection (paper Sections 2.6 and 3, Table 3, Figures 7-8)

Stage 2: the fracture boxes of `train_bounding_boxes.csv` (plus slices without fracture as
negatives) exported as a YOLO dataset, a YOLO detector trained with Ultralytics (offline: nothing
is downloaded), validated with Ultralytics' metrics cross-checked by our own mAP and pycocotools
(Table 3, training curves as in Figures 7-8), and exported to ONNX for the two-stage pipeline. This notebook never imports
TensorFlow, so torch can run in its kernel. On Kaggle, the paper's YOLOv8s for 100 epochs on
whole slices, at Ultralytics' default 640 px (a GPU is advised). On the synthetic data, beyond
the paper, each image is a 100 mm window around the cervical column (`roi_mm`,
`keras_cspine.data.roi`): the bone fills the image as a bigger image would, at a fraction of
its cost.

""" + INSTALL),
    code(SETTINGS),
    code(DATA),
    md("## The YOLO dataset (split by study, negatives added)"),
    code('''from keras_cspine.config import load_config
from keras_cspine.stage2.yolo_dataset import ExportConfig, export_yolo_dataset, load_manifest

if USE_KAGGLE:
    export_config = ExportConfig(size=512, seed=0)  # the paper: whole slices
elif SMALL:
    export_config = ExportConfig(size=64, roi_mm=100, seed=0)
else:
    export_config = load_config(ExportConfig, "detect_export_synthetic")  # 100 mm windows, 128 px
YOLO_DATA = WORK / f"yolo{export_config.size}"
export = export_yolo_dataset(DATA, YOLO_DATA, export_config, progress=False)
export["counts"]'''),
    code('''import matplotlib.pyplot as plt
from IPython.display import display
from matplotlib.patches import Rectangle
from PIL import Image as PILImage

from keras_cspine.stage2.yolo_dataset import label_boxes_xyxy

manifest = load_manifest(YOLO_DATA)
shown = manifest[manifest.kind == "positive"].head(4)
fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.4), squeeze=False)
for ax, row in zip(axes[0], shown.itertuples()):
    image = PILImage.open(YOLO_DATA / row.image)
    ax.imshow(image)
    ax.axis("off")
    ax.set_title(f"slice {row.slice_number}", fontsize=8)
    for x1, y1, x2, y2 in label_boxes_xyxy(YOLO_DATA / row.label, image.height, image.width):
        ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="lime"))
display(fig)
plt.close(fig)'''),
    md("## Training (Ultralytics, offline; resumable) and validation"),
    code('''from keras_cspine.stage2.ultralytics_train import DetectTrainConfig, train_detector

if USE_KAGGLE:
    detect_config = DetectTrainConfig(model="yolov8s", epochs=100, imgsz=640, batch=16, device="0")
elif SMALL:
    detect_config = DetectTrainConfig(model="yolov8n", epochs=1, imgsz=64, batch=8, workers=0,
                                      plots=False, extra={"mosaic": 0.0})
else:
    detect_config = load_config(DetectTrainConfig, "detect_train_synthetic")  # yolov8n, 15 epochs
STAGE2 = WORK / "stage2"
metrics = train_detector(YOLO_DATA, STAGE2, detect_config, overwrite=True)
{k: metrics[k] for k in ("model", "images", "instances", "precision", "recall", "mAP50", "mAP50-95")}'''),
    md("## Table 3 (beside the paper's rows; mAP cross-checked by our code and pycocotools)"),
    code('''from IPython.display import Markdown, display

from keras_cspine.stage2.metrics import table3_row, write_table3

rows = [table3_row("yolov8s" if USE_KAGGLE else detect_config.model, metrics)]
csv_path, md_path = write_table3(rows, STAGE2)
display(Markdown(open(md_path).read()))
metrics["cross_check"]'''),
    md("## Figures 7-8 (training curves), the confusion matrix and predictions on validation"),
    code('''from IPython.display import Image, display

for figure in sorted((STAGE2).rglob("fig*.png")):
    print(figure.relative_to(STAGE2))
    display(Image(filename=str(figure)))'''),
    md("## The ONNX export used by the two-stage pipeline (no torch needed there)"),
    code('''import numpy as np

from keras_cspine.stage2.onnx_predictor import OnnxDetector

detector = OnnxDetector(STAGE2 / "weights" / "best.onnx", conf=0.05)
image = np.asarray(PILImage.open(YOLO_DATA / shown.iloc[0].image).convert("RGB")) if len(shown) else None
found = detector.predict(image) if image is not None else None
print(detector.imgsz, "input;", 0 if found is None else len(found), "boxes on the first positive slice")'''),
    md("The same slice read from its DICOM file: the study's window (as in the export's manifest), "
       "boxes back in the slice's own pixels, as in `train_bounding_boxes.csv`."),
    code('''from keras_cspine.io.dicom import read_slice
from keras_cspine.data.roi import SpineRoi

if len(shown):
    row = shown.iloc[0]
    hu, _ = read_slice(row.source)
    roi = SpineRoi.from_json(row.roi) if row.roi else None
    on_slice = detector.predict_slice(hu, mode=export_config.mode, size=export_config.size, roi=roi)
    print("window", roi, "| truth", row.boxes, "| found", on_slice.xywh().round(1).tolist()[:3])'''),
]

CELLS_04 = [
    md("""
# 04 - Two-stage inference on a study (the paper's two stages, Sections 2.5-2.6)

The paper's two stages end to end: stage 1 gives each slice its C1..C7 probabilities and stage 2
finds fracture boxes. Joining them is this package's own (not the paper's): stage 2 looks only on
slices where a cervical vertebra is present (gating), each box is assigned to the vertebrae on
its slice, and the findings become per-vertebra and patient fracture probabilities: the RSNA
submission, a JSON per study and a report (shown inline below).
Stage 1 runs in TensorFlow and stage 2 through ONNX in the same kernel; when notebooks 02 and 03
have not been run, small models are trained here (stage 2 in a subprocess: torch must not be
imported after TensorFlow).

""" + INSTALL),
    code(SETTINGS),
    code(DATA),
    md("## Models: the ones of notebooks 02 and 03, or quick ones trained here"),
    code('''import subprocess
import sys

from keras_cspine.pipeline.predict import find_latest_stage1, find_latest_stage2

STAGE1, STAGE2 = WORK / "stage1", WORK / "stage2"
if not (STAGE2 / "weights" / "best.onnx").is_file():
    # the synthetic recipe: 100 mm spine windows (64 px in the quick SMALL run, else 128 px)
    size = ["--size", "64"] if SMALL else []
    subprocess.run([sys.executable, "-m", "keras_cspine", "detect", "export", str(DATA),
                    str(WORK / "yolo_windows"), "--config", "detect_export_synthetic", *size,
                    "--quiet"], check=True)
    subprocess.run([sys.executable, "-m", "keras_cspine", "detect", "train", str(WORK / "yolo_windows"),
                    "--out", str(STAGE2), "--config", "detect_train_synthetic",
                    *(["--epochs", "1", "--imgsz", "64"] if SMALL else []), "--overwrite"], check=True)
if not (STAGE1 / "model.keras").is_file():
    from keras_cspine.data.prepare import prepare_dataset
    from keras_cspine.io.rsna import RsnaLayout
    from keras_cspine.stage1.train import load_stage1_config, train_stage1

    size = 32 if SMALL else 64
    layout = RsnaLayout(DATA)
    labelled = [u for u in layout.list_studies() if layout.segmentation_path(u) is not None]
    prepare_dataset(DATA, WORK / f"prepared{size}", size=size, mode="multiwindow", roi_mm=100.0,
                    studies=labelled, workers=1, progress=False)  # as notebook 01 prepares it
    config = load_stage1_config("stage1_synthetic_small", [f"data.image_size={size}",
                                *(["train.epochs=1", "train.steps_per_epoch=4"] if SMALL else ["train.epochs=5"])])
    train_stage1(config, WORK / f"prepared{size}", STAGE1, overwrite=True, verbose=2)
print("stage 1:", find_latest_stage1(WORK), "| stage 2:", find_latest_stage2(WORK))'''),
    md("## One study, step by step"),
    code('''from keras_cspine.io.rsna import RsnaLayout
from keras_cspine.pipeline.predict import PredictConfig, Stage1Model, Stage2Model, predict_study

config = PredictConfig(box_conf=0.05 if SMALL else 0.1)
stage1 = Stage1Model.load(STAGE1)
stage2 = Stage2Model.load(STAGE2, conf=config.box_conf)
print(stage1.describe())
print(stage2.describe())

layout = RsnaLayout(DATA)
labels = layout.train_labels()
uid = sorted(labels.StudyInstanceUID[labels.patient_overall == 1])[-1]
result = predict_study(layout.series_dir(uid), stage1, stage2, config)
print(f"{len(result.slice_numbers)} slices, stage 2 on {int(result.gated.sum())}, "
      f"{len(result.boxes)} boxes; seconds {dict((k, round(v, 2)) for k, v in result.timings.items())}")
result.fracture'''),
    md("## The report, inline"),
    code('''from IPython.display import HTML

from keras_cspine.pipeline.report import FIGURES, render_html, write_study_report

truth = labels.set_index("StudyInstanceUID").loc[uid].to_dict()
report = write_study_report(result, WORK / "report" / uid, truth=truth)
figures = {name: report.parent / f"{name}.png" for name in FIGURES}
HTML(render_html(result, figures, report.parent, embed=True))'''),
    md("The report's fracture probabilities per vertebra (against the study's labels), as an image "
       "for viewers that do not show images inside HTML:"),
    code('''from IPython.display import Image

Image(filename=str(figures["vertebrae"]))'''),
    md("""
## The Kaggle submission for every test study, and the study-level evaluation

`predict` writes `submission.csv` in the competition's format. For a score, the same command runs on
labelled studies with `labels=train.csv`: the competition metric (weighted multi-label log loss)
and per-vertebra and patient AUC. The stage 1 run's own test studies are used here (unseen by
stage 1; on the synthetic default the detector may have seen some of them).
"""),
    code('''import json

import pandas as pd

from keras_cspine.pipeline.predict import predict

test_summary = predict(DATA, WORK / "predict_test", stage1=stage1, stage2=stage2, config=config,
                       progress=False)
print(test_summary["n_studies"], "test studies ->", test_summary["files"]["submission"])
pd.read_csv(test_summary["files"]["submission"]).head(8)'''),
    code('''import os

from IPython.display import Markdown

from keras_cspine.pipeline.predict import evaluation_markdown

splits = json.loads((STAGE1 / "splits.json").read_text())
held = splits.get("test") or splits["val"]
EVAL = WORK / "eval_studies"
EVAL.mkdir(exist_ok=True)
for u in held:
    if not (EVAL / u).exists():
        os.symlink(layout.series_dir(u).resolve(), EVAL / u)
evaluation = predict(EVAL, WORK / "predict_eval", stage1=stage1, stage2=stage2, config=config,
                     labels=DATA / "train.csv", progress=False)["evaluation"]
Markdown(evaluation_markdown(evaluation))'''),
]

CELLS = {NAMES[0]: CELLS_01, NAMES[1]: CELLS_02, NAMES[2]: CELLS_03, NAMES[3]: CELLS_04}
METADATA = {
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
}


def notebook(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    """A notebook of ``(kind, source)`` cells, with cell ids that do not change between builds."""
    made = []
    for number, (kind, source) in enumerate(cells, start=1):
        cell = new_code_cell(source) if kind == "code" else new_markdown_cell(source)
        cell.id = f"cell-{number:02d}"
        made.append(cell)
    nb = new_notebook(cells=made)
    nb.metadata.update(nbformat.from_dict(METADATA))
    nbformat.validate(nb)
    return nb


def build_notebooks() -> dict[str, nbformat.NotebookNode]:
    """The four notebooks, without outputs, by name (in the order they run)."""
    return {name: notebook(cells) for name, cells in CELLS.items()}


def path_replacements(work: Path) -> list[tuple[str, str]]:
    """``(absolute path, neutral form)`` pairs for the outputs, the most specific first."""
    pairs = [(str(work.resolve()), "nb_work"), (str(work), "nb_work"), (str(REPO), "."),
             (str(Path.home()), "~"), (tempfile.gettempdir().rstrip("/") + "/", "$TMPDIR/")]  # fmt: skip
    seen, unique = set(), []
    for old, new in pairs:
        if old not in seen and len(old) > 1:
            seen.add(old)
            unique.append((old, new))
    return unique


def neutral_paths(text: str, replacements: list[tuple[str, str]]) -> str:
    for old, new in replacements:
        text = text.replace(old, new)
    return text


def clean_notebook(nb: nbformat.NotebookNode, work: Path) -> nbformat.NotebookNode:
    """Make an executed notebook reviewable and reproducible, in place: notebook metadata as built
    (no kernel or Python version details), no execution timing in the cells, TensorFlow's start-up
    and runtime notices dropped from standard error, absolute paths of this machine replaced by
    neutral ones. Running it again changes nothing."""
    from keras_cspine.quiet import filter_startup_output

    replacements = path_replacements(work)
    nb.metadata = nbformat.from_dict(METADATA)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.output_type == "stream":
                text = neutral_paths(output.text, replacements)
                if output.name == "stderr":
                    text = filter_startup_output(text, gpu_found=False)
                    text = "".join(line for line in text.splitlines(keepends=True)
                                   if not any(notice in line for notice in RUNTIME_NOTICES))  # fmt: skip
                if not text.strip():
                    continue
                output.text = text
            elif output.output_type in ("display_data", "execute_result"):
                for key, value in output.data.items():
                    if key.startswith("text/") and isinstance(value, str):
                        output.data[key] = neutral_paths(value, replacements)
            kept.append(output)
        cell.outputs = kept
    nbformat.validate(nb)
    return nb


def prepare_work(work: Path, keep: bool) -> Path:
    """Create (or, unless ``keep``, empty) the working folder; refuse to empty a folder that this
    script did not create."""
    import shutil

    work = work.resolve()
    if work.exists() and any(work.iterdir()) and not keep:
        if not (work / WORK_MARKER).is_file():
            raise SystemExit(f"{work} is not empty and was not made by this script: "
                             "choose another --work or pass --keep-work")  # fmt: skip
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    (work / WORK_MARKER).write_text("working folder of notebooks/make_notebooks.py --execute\n")
    return work


def execute_notebooks(notebooks: dict[str, nbformat.NotebookNode], work: Path, timeout: int = 3600,
                      log: Callable[[str], object] = print) -> dict[str, float]:  # fmt: skip
    """Execute the notebooks in order in a real kernel of this Python, in place, with ``work`` as
    their working folder and ``KERAS_CSPINE_NB_WORK``; the synthetic default sizes (SMALL unset).
    Raises ``nbclient.exceptions.CellExecutionError`` on the first failing cell. Returns the
    seconds each notebook took."""
    from nbclient import NotebookClient

    env = dict(os.environ, KERAS_CSPINE_NB_WORK=str(work), PYTHONUNBUFFERED="1")
    for name in ("KERAS_CSPINE_NB_SMALL", "MPLBACKEND", "KERAS_CSPINE_TF_NOISE"):
        env.pop(name, None)  # the default sizes; inline figures; the start-up filter on
    seconds = {}
    for name, nb in notebooks.items():
        started = time.monotonic()
        log(f"executing {name} ...")
        client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                                coalesce_streams=True, resources={"metadata": {"path": str(work)}})  # fmt: skip
        client.execute(env=env)
        clean_notebook(nb, work)
        seconds[name] = round(time.monotonic() - started, 1)
        write_notebook(nb, work / f"{name}.executed.ipynb")
        log(f"executed {name} in {seconds[name]:.0f} s")
    return seconds


def write_notebook(nb: nbformat.NotebookNode, path: Path) -> Path:
    """Validate and write ``nb`` to ``path`` atomically (a temporary file, then a rename)."""
    nbformat.validate(nb)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            nbformat.write(nb, stream)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("out", nargs="?", type=Path, default=HERE,
                        help="folder of the .ipynb files (default: this script's folder)")  # fmt: skip
    parser.add_argument("--execute", action="store_true",
                        help="run the notebooks in order and save them with their outputs")  # fmt: skip
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK,
                        help="working folder of the executed notebooks (default: notebooks/nb_work)")  # fmt: skip
    parser.add_argument("--keep-work", action="store_true",
                        help="reuse the working folder as it is instead of emptying it first")  # fmt: skip
    parser.add_argument("--timeout", type=int, default=3600, help="seconds one cell may run")
    args = parser.parse_args(argv)

    notebooks = build_notebooks()
    if args.execute:
        work = prepare_work(args.work, args.keep_work)
        started = time.monotonic()
        execute_notebooks(notebooks, work, timeout=args.timeout)
        print(f"all four executed in {time.monotonic() - started:.0f} s")
    for name, nb in notebooks.items():
        path = write_notebook(nb, args.out / f"{name}.ipynb")
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
