"""quiet.py: TensorFlow's CPU start-up notices are dropped, every other line of standard error
is kept, in order; a GPU machine keeps its CUDA lines."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from keras_cspine.quiet import filter_startup_output, is_noise

NOTICES = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    "I0000 00:00:1796237427.655710   27047 port.cc:153] oneDNN custom operations are on. You may "
    "see slightly different numerical results\n",
    "I0000 00:00:1796237427.707600   27047 cpu_feature_guard.cc:227] This TensorFlow binary is "
    "optimized to use available CPU instructions in performance-critical operations.\n",
    "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
    "TensorFlow with the appropriate compiler flags.\n",
]
CUDA = [
    "I0000 00:00:1796237427.656098   27047 cudart_stub.cc:31] Could not find cuda drivers on your "
    "machine, GPU will not be used.\n",
    "E0000 00:00:1796237431.686128   27047 cuda_platform.cc:52] failed call to cuInit: INTERNAL: "
    "CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)\n",
]
REAL = [
    "W0000 00:00:1796237431.7 1 op_kernel.cc:1] OUT_OF_RANGE: End of sequence\n",
    "/x/site-packages/keras/src/foo.py:12: UserWarning: a real warning\n",
]


@pytest.mark.parametrize("line", NOTICES)
def test_startup_notices_are_noise_on_any_machine(line):
    assert is_noise(line, gpu_found=False) and is_noise(line, gpu_found=True)


@pytest.mark.parametrize("line", CUDA)
def test_cuda_lines_are_noise_only_without_a_gpu(line):
    assert is_noise(line, gpu_found=False)
    assert not is_noise(line, gpu_found=True)  # a GPU machine whose driver fails keeps them


@pytest.mark.parametrize("line", REAL)
def test_real_warnings_are_kept(line):
    assert not is_noise(line, gpu_found=False)


def test_filter_keeps_other_lines_in_order():
    text = "".join([NOTICES[0], REAL[0], CUDA[1], NOTICES[1], REAL[1], "no newline at the end"])
    assert filter_startup_output(text, gpu_found=False) == REAL[0] + REAL[1] + "no newline at the end"


def _fake_tensorflow(root: Path) -> Path:
    """A package named tensorflow that writes TensorFlow's start-up lines and a real warning to
    file descriptor 2, as the C++ library does, and finds no GPU."""
    package = root / "tensorflow"
    package.mkdir()
    lines = "".join([NOTICES[0], NOTICES[1], REAL[0], CUDA[0]])
    (package / "__init__.py").write_text(textwrap.dedent(f"""
        import os
        os.write(2, {lines.encode()!r})

        class config:
            @staticmethod
            def list_physical_devices(kind=None):
                os.write(2, {CUDA[1].encode()!r})
                return []
        """))
    return root


def _run(code: str, env_extra: dict[str, str], pythonpath: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL",
                                                            "KERAS_CSPINE_TF_NOISE")}  # fmt: skip
    repo = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (pythonpath, repo) if p)
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


INSTALL_THEN_IMPORT = ("import keras_cspine.quiet as q; print(q.install()); import tensorflow; "
                       "import os; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")  # fmt: skip


def test_the_hook_filters_the_first_import_of_tensorflow(tmp_path):
    result = _run(INSTALL_THEN_IMPORT, {}, _fake_tensorflow(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "1"]  # installed; INFO lines off, warnings kept
    assert result.stderr == REAL[0]  # the real warning only, the cuInit line of discovery gone


def test_the_hook_can_be_turned_off_and_keeps_a_chosen_log_level(tmp_path):
    result = _run(INSTALL_THEN_IMPORT, {"KERAS_CSPINE_TF_NOISE": "1", "TF_CPP_MIN_LOG_LEVEL": "0"},
                  _fake_tensorflow(tmp_path))  # fmt: skip
    assert result.stdout.split() == ["False", "0"]
    assert "oneDNN" in result.stderr and "cuda drivers" in result.stderr  # unfiltered


@pytest.mark.slow
def test_real_tensorflow_starts_quietly_on_this_cpu():
    code = ("import keras_cspine.quiet as q; q.install(); import keras, tensorflow as tf; "
            "print(len(tf.config.list_physical_devices('GPU'))); "
            "print(float(keras.ops.sum(keras.ops.ones(3))))")  # fmt: skip
    result = _run(code, {})
    assert result.returncode == 0, result.stderr
    gpus, total = result.stdout.split()
    if gpus != "0":
        pytest.skip("a GPU machine: its CUDA lines are kept on purpose")
    assert total == "3.0"
    for noise in ("cuInit", "cuda drivers", "oneDNN", "absl::InitializeLog", "cpu_feature_guard"):
        assert noise not in result.stderr, result.stderr


@pytest.mark.slow
def test_the_sequence_model_runs_without_the_boolean_fallback_note():
    """A masked GRU transposes a boolean mask: on a CPU without AVX-512 TensorFlow's first such
    transpose logs ``oneDNN supports DT_BOOL only on platforms with AVX-512`` as an error line;
    building the sequence model absorbs it."""
    code = textwrap.dedent("""
        import keras_cspine.quiet as q; q.install()
        import sys, numpy as np, tensorflow as tf
        from keras_cspine.stage1.sequence_model import build_sequence_model
        model = build_sequence_model(8)
        model.predict({"features": np.ones((2, 5, 8), "float32"), "mask": np.ones((2, 5), bool)},
                      verbose=0)
        print("predicted", file=sys.stderr)
        tf.transpose(tf.constant([[True]]))  # the note comes once per process: not again
    """)
    result = _run(code, {})
    assert result.returncode == 0, result.stderr
    assert "predicted" in result.stderr
    assert "DT_BOOL" not in result.stderr, result.stderr
