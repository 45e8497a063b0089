"""Running the command line in a fresh interpreter, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_cli(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m keras_cspine ARGS`` in a fresh interpreter; fail with its output."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(
        [sys.executable, "-m", "keras_cspine", *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO,
    )  # fmt: skip
    return result
