"""The command line: every command listed and documented; light imports; the `look` figures."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers_cli import run_cli

from keras_cspine.cli import COMMANDS, _available

AVAILABLE = [name for name, (module, _) in COMMANDS.items() if _available(module)]


def test_help_lists_every_available_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in AVAILABLE:
        assert name in result.stdout
    assert {"synth", "prepare", "look", "demo"} <= set(AVAILABLE)


@pytest.mark.parametrize("command", AVAILABLE)
def test_each_command_has_help(command):
    result = run_cli(command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: python -m keras_cspine" in result.stdout


def test_package_import_is_light():
    code = (
        "import sys, keras_cspine, keras_cspine.__main__, keras_cspine.io.rsna, "
        "keras_cspine.data.prepare, keras_cspine.config; "
        "heavy = [m for m in ('tensorflow', 'torch', 'keras', 'ultralytics') if m in sys.modules]; "
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_prepare_and_look_from_the_command_line(synthetic_data, tmp_path):
    out = tmp_path / "prep"
    result = run_cli("prepare", str(synthetic_data), str(out), "--size", "24", "--workers", "1",
                     "--limit", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "prepared 2 studies" in result.stdout
    figures = tmp_path / "figures"
    result = run_cli("look", str(out), str(figures), "--slices", "4", "--studies", "1")
    assert result.returncode == 0, result.stderr
    from PIL import Image

    slices = Image.open(figures / "slices.png")
    assert slices.size[0] > 300 and slices.size[1] > 200
    assert len(list(figures.glob("sagittal_*.png"))) == 1


def test_bad_dataset_folder_is_named(tmp_path):
    result = run_cli("prepare", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "nowhere" in result.stderr and "dataset folder not found" in result.stderr
