"""The command line: ``python -m keras_cspine <command>`` (or ``keras-cspine <command>``), one
module per command in this package, each with ``configure_parser(parser)``, ``run(args)`` and
``main(argv)``.

Commands are imported lazily, so ``--help`` is instant and the detection commands never load
TensorFlow (TensorFlow imported before torch crashes the process).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence

from keras_cspine import quiet
from keras_cspine.config import ConfigError
from keras_cspine.errors import CSpineDataError, MissingDependencyError

# command -> (module, one-line help). Each module has configure_parser(parser) and run(args).
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("keras_cspine.cli.synth", "write a synthetic dataset in the RSNA 2022 layout"),
    "prepare": ("keras_cspine.cli.prepare", "build the slice index and the model-ready image cache"),
    "look": ("keras_cspine.cli.look", "figures of prepared slices, their labels and boxes; Figure 3"),
    "train": ("keras_cspine.cli.train", "stage 1: train the vertebrae classifier (GCViT or baseline)"),
    "evaluate": ("keras_cspine.cli.evaluate", "stage 1: Tables 1-2 metrics and Figure 6 for a run"),
    "detect": ("keras_cspine.cli.detect", "stage 2: YOLO export / train / val / onnx"),
    "predict": ("keras_cspine.cli.predict", "two-stage inference: studies in, findings out"),
    "report": ("keras_cspine.cli.report", "draw the reports of a `predict --report none` output"),
    "merge": ("keras_cspine.cli.merge", "join the shards of `prepare/predict --shard i/n` into one output"),
    "reproduce": ("keras_cspine.cli.reproduce", "reproduce a paper table (table1, table3)"),
    "demo": ("keras_cspine.cli.demo", "the whole pipeline on a small synthetic dataset"),
    "weights": ("keras_cspine.cli.weights", "pretrained weights: list, fetch (the only download), add"),
}


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser; only ``command``'s module is imported to configure its arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m keras_cspine",
        description="Cervical spine fracture detection in CT with Keras 3 (RSNA 2022 layout). "
        "Errors print as one line; --debug (or KERAS_CSPINE_DEBUG=1) shows the traceback.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also KERAS_CSPINE_DEBUG=1)")  # fmt: skip
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if not _available(module):
            continue
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).configure_parser(sub_parser)
    return parser


def run_command(command: str, argv: Sequence[str] | None = None) -> int:
    """Run one command with its own arguments (the ``main`` of ``python -m
    keras_cspine.cli.<command>`` and of the old ``python -m keras_cspine.train`` paths)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return main([command, *argv])


def data_header(path, studies: int | None, count: int | None, unit: str) -> str:
    """The first line of every scoring command (``evaluate --data``, ``detect val``,
    ``predict --labels``): ``data: <path>  studies: N  <unit>: M``, so results can be compared."""

    def number(value: int | None) -> str:
        return "?" if value is None else str(int(value))

    return f"data: {path}  studies: {number(studies)}  {unit}: {number(count)}"


#: Errors a user meets (bad input, bad settings, missing files or packages): one line, exit 2.
#: Anything else is a bug in keras_cspine and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (
    CSpineDataError, ConfigError, MissingDependencyError, FileNotFoundError, FileExistsError,
    IsADirectoryError, NotADirectoryError, PermissionError,
)  # fmt: skip
DEBUG_ENV = "KERAS_CSPINE_DEBUG"


def error_line(err: BaseException) -> str:
    """``error: <file>: <problem>``: one line saying what is wrong and where."""
    if isinstance(err, OSError) and not isinstance(err, CSpineDataError) and err.filename:
        return f"error: {err.filename}: {err.strerror or err}"
    text = " ".join(str(err).split()) or type(err).__name__
    return f"error: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine [--debug] <command> ...``: 0 on success, 2 on a user error
    (printed as one line, the traceback only with ``--debug`` or ``KERAS_CSPINE_DEBUG=1``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # onnxruntime's built-in telemetry (1DS: DNS lookups of mobile.events.data.microsoft.com)
    # reads this when it starts, in this process and in every one it runs: off before any import
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    quiet.install()  # no CUDA / oneDNN start-up notices from TensorFlow on a CPU-only machine
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        command = next((a for a in argv if not a.startswith("-")), None)
        if command not in COMMANDS:
            command = None
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        module = importlib.import_module(COMMANDS[args.command][0])
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(error_line(err), file=sys.stderr)
        return 2
