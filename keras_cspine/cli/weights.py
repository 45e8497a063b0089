"""``python -m keras_cspine weights``: pretrained weights: list, fetch (the only download), add.

The command line of :mod:`keras_cspine.stage1.models.pretrained` (its docstring is the command's description).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from keras_cspine.cli import run_command
from keras_cspine.stage1.models import pretrained
from keras_cspine.stage1.models.pretrained import (
    WeightsEntry,
    add_report,
    configs_for,
    entry,
    fetch_report,
    status,
)
from keras_cspine.stage1.models.weights import WeightsFileError


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine weights``."""
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    p = sub.add_parser("list", help="every known weights entry: models, licence, path, status")
    p.add_argument("--no-hash", action="store_true",
                   help="do not hash present files (size and structure checks only)")  # fmt: skip
    p = sub.add_parser("fetch", help="download an entry into its cache (the only network access)")
    p.add_argument("name", help="entry name (see `weights list`)")
    p.add_argument("--url", help="download from this URL instead (a mirror)")
    p.add_argument("--force", action="store_true", help="download even if already present")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p = sub.add_parser("add", help="verify a file brought by hand and copy it into the cache")
    p.add_argument("file", help="the weights file (or a preset folder / its .tar.gz)")
    p.add_argument("--name", help="entry name (default: found by hash, file name or structure)")


def _list_rows(verify_hash: bool) -> list[tuple[str, ...]]:
    rows = [("NAME", "STATUS", "MODELS (CONFIGS)", "LICENCE", "PATH")]
    for e in pretrained.ENTRIES:  # looked up on each call (tests add entries)
        state, path = status(e, verify_hash=verify_hash)
        configs = configs_for(e)
        used = ", ".join(e.models) + (f" ({', '.join(configs)})" if configs else "")
        rows.append((e.name, state, used or "-", e.licence, str(path)))
    return rows


def _format_rows(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths)) + "  " + row[-1]
        for row in rows
    )


def run(args: argparse.Namespace) -> int:
    """Run ``weights`` from parsed arguments; errors are one line ``error: <where>: <problem>``."""
    action = getattr(args, "action", None) or "list"
    try:
        if action == "list":
            print(_format_rows(_list_rows(not getattr(args, "no_hash", False))))
            return 0
        if action == "fetch":
            result = fetch_report(args.name, args.url, force=args.force, progress=not args.quiet)
            e = entry(args.name)
            verb = "downloaded" if result["downloaded"] else "already present"
            print(f"{e.name}: {verb}: {result['path']}")
            _print_pin(e, result)
            print(f"{e.name}: licence: {e.licence}")
            return 0
        if action == "add":
            result = add_report(args.file, args.name)
            e = result["entry"]
            print(f"{e.name}: {args.file} -> {result['path']}")
            _print_pin(e, result)
            print(f"{e.name}: licence: {e.licence}")
            return 0
    except (WeightsFileError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2  # a user error, as keras_cspine.cli prints them
    print(f"error: unknown action {action!r}", file=sys.stderr)  # pragma: no cover
    return 2  # pragma: no cover


def _print_pin(e: WeightsEntry, result: dict[str, Any]) -> None:
    if e.kind == "folder":
        return
    if e.hash is not None:
        print(f"{e.name}: {e.hash_algorithm} ok ({e.hash})")
    elif result.get("sha256"):
        print(f"{e.name}: structure ok; sha256 {result['sha256']} (not pinned: add "
              f"hash=\"{result['sha256']}\" to its entry in keras_cspine/pretrained.py)")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine weights`` (also ``python -m keras_cspine.cli.weights``)."""
    return run_command("weights", argv)

if __name__ == "__main__":
    raise SystemExit(main())
