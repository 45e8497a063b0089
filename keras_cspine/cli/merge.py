"""``python -m keras_cspine merge OUT``: join the parts of a sharded ``prepare`` or ``predict``.

``prepare DATA OUT --shard i/n`` and ``predict INPUT --out OUT --shard i/n`` (0-based ``i``,
``0 <= i < n``; the study with UID ``u`` goes to shard ``sha256(u) mod n``) each write
``OUT/shards/<i>-of-<n>/``. The last shard to finish merges them by itself; ``merge OUT`` does it
by hand (again, after a shard was rerun): ``OUT`` then holds what one unsharded run writes
(``index.csv`` or ``submission.csv`` byte for byte). A missing, unfinished or failed shard is
named, and shards run with different settings are refused naming the setting.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from keras_cspine.cli import run_command

SHARD_HELP = ("0-based shard i of n (0 <= i < n, e.g. $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT): "
              "only the studies whose StudyInstanceUID hashes to i, into OUT/shards/<i>-of-<n>/; "
              "the last shard to finish merges the parts (or `keras-cspine merge OUT`)")  # fmt: skip


def shard_arg(text: str):
    """An argparse type: ``i/n`` -> :class:`keras_cspine.data.shards.Shard`."""
    from keras_cspine.data.shards import Shard

    try:
        return Shard.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``python -m keras_cspine merge``."""
    parser.description = __doc__
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("out", help="the OUT folder given to every shard")
    parser.add_argument("--shards", type=_count, metavar="N",
                        help="the number of shards n (default: the only one under OUT/shards)")  # fmt: skip


def part_kind(out: Path, count: int | None) -> str:
    """``prepare`` or ``predict``: the kind of the finished parts under ``OUT/shards``."""
    from keras_cspine.data.shards import PART_FILE, SHARDS_DIR, choose_count
    from keras_cspine.errors import CSpineDataError

    n = choose_count(out, count)
    kinds = set()
    for record in (out / SHARDS_DIR).glob(f"*-of-{n}/{PART_FILE}"):
        try:
            kinds.add(json.loads(record.read_text(encoding="utf-8")).get("kind"))
        except (OSError, ValueError, AttributeError):
            continue
    kinds.discard(None)
    if len(kinds) > 1:
        raise CSpineDataError(out / SHARDS_DIR, "holds parts of both prepare and predict "
                              "shards: one OUT folder for each")  # fmt: skip
    if kinds:
        return kinds.pop()
    # no part has finished: the prepare parts are prepare folders, the predict ones are not
    return "prepare" if any((out / SHARDS_DIR).glob(f"*-of-{n}/prepare.json")) else "predict"


def run(args: argparse.Namespace) -> int:
    """Merge the parts under ``OUT/shards``; prints what the merged folder holds."""
    out = Path(args.out)
    if part_kind(out, args.shards) == "prepare":
        from keras_cspine.data.prepare_shards import merge_prepared_shards

        summary = merge_prepared_shards(out, args.shards)
        print(f"merged {summary['shards']['count']} prepare shards into {out}: "
              f"{summary['studies']} studies, index.csv, {summary['errors']} errors")  # fmt: skip
    else:
        from keras_cspine.pipeline.shards import merge_predicted_shards

        summary = merge_predicted_shards(out, args.shards)
        print(f"merged {summary['shards']['count']} predict shards into {out}: "
              f"{summary['n_ok']}/{summary['n_studies']} studies, {summary['files']['submission']}")  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keras_cspine merge`` (also ``python -m keras_cspine.cli.merge``)."""
    return run_command("merge", argv)


if __name__ == "__main__":
    raise SystemExit(main())
