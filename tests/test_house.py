"""The house by stage: imports flow one way (io -> data -> stage1 / stage2 -> pipeline -> paper ->
cli), no import cycle (module- or function-level), and the old module paths still work for one
release, with a DeprecationWarning."""

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

import keras_cspine

PACKAGE = Path(keras_cspine.__file__).parent

#: Layers, bottom to top: a module may import its own layer or lower ones only.
LAYERS = {
    "errors": 0, "utils": 0, "config": 0, "quiet": 0, "_deprecated": 0, "__init__": 0,
    "io": 1,
    "data": 2, "synthetic": 2, "viz": 2,
    "stage1": 3, "stage2": 3,
    "pipeline": 4,
    "paper": 5,
    "cli": 6, "__main__": 6,
}  # fmt: skip
#: The old paths, kept as deprecated aliases (they point up to their new homes by design).
SHIMS = {"train", "evaluate", "prepare", "preprocess", "splits", "metrics", "level_decoding",
         "sequence_model", "report", "reproduce", "demo", "synthetic_anatomy", "models",
         "detection"}  # fmt: skip


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in modules and t != name)
    return found


def _top(name: str) -> str:
    if name.endswith(".__main__"):  # `python -m keras_cspine.<package>` entry points
        return "__main__"
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph():
    modules = {m: p for m, p in _modules().items() if _top(m) not in SHIMS}
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_every_module_has_a_layer():
    assert {_top(m) for m in _graph()} <= set(LAYERS)


def test_imports_flow_one_way():
    upward = [
        f"{module} -> {target}"
        for module, targets in _graph().items()
        for target in targets
        if LAYERS[_top(target)] > LAYERS[_top(module)]
    ]
    assert upward == []


def test_stage1_and_stage2_do_not_import_each_other():
    crossing = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
                if {_top(m), _top(t)} == {"stage1", "stage2"}]  # fmt: skip
    assert crossing == []


def test_no_import_cycle():
    graph = _graph()

    def parent(a, b):  # a package importing its own modules (re-exports) is not a cycle
        return a.startswith(b + ".") or b.startswith(a + ".")

    cycles = set()

    def visit(start, node, path):
        for target in graph[node]:
            if parent(node, target):
                continue
            if target == start:
                cycles.add(" -> ".join(path + [target]))
            elif target not in path and len(path) < 8:
                visit(start, target, path + [target])

    for module in graph:
        visit(module, module, [module])
    assert sorted(cycles) == []


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("keras_cspine.train", "keras_cspine.stage1.train", "train_stage1"),
        ("keras_cspine.preprocess", "keras_cspine.data.preprocess", "paper_algorithm1"),
        ("keras_cspine.prepare", "keras_cspine.data.prepare", "prepare_dataset"),
        ("keras_cspine.models.baselines", "keras_cspine.stage1.models.factory", "build_model"),
        ("keras_cspine.models.gcvit", "keras_cspine.stage1.models.gcvit", "build_gcvit"),
        ("keras_cspine.detection.onnx_predictor", "keras_cspine.stage2.onnx_predictor",
         "OnnxDetector"),
        ("keras_cspine.report", "keras_cspine.pipeline.report", "write_study_report"),
    ],
)  # fmt: skip
def test_old_paths_warn_and_give_the_same_objects(old, new, name):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_old_data_names_warn():
    import keras_cspine.data as data
    from keras_cspine.stage1.dataset import CSpineSequence

    with pytest.warns(DeprecationWarning, match="keras_cspine.stage1.dataset.CSpineSequence"):
        assert data.CSpineSequence is CSpineSequence


def test_new_paths_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in ("keras_cspine.stage1.train", "keras_cspine.pipeline", "keras_cspine.cli",
                     "keras_cspine.synthetic", "keras_cspine.stage1.models.factory"):  # fmt: skip
            importlib.import_module(name)


def test_modules_stay_readable():
    """No module over ~600 lines unless it is one topic (the GCViT model, the DICOM reader, the
    synthetic anatomy, the weights store)."""
    one_topic = {"keras_cspine.stage1.models.gcvit", "keras_cspine.io.dicom",
                 "keras_cspine.synthetic.anatomy", "keras_cspine.stage1.models.pretrained",
                 "keras_cspine.stage2.yolo_dataset"}  # fmt: skip
    long = {m: n for m, p in _modules().items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 650 and m not in one_topic}
    assert long == {}
