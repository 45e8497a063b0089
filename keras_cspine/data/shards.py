"""Shards of a study set for job arrays: ``prepare ... --shard i/n``, ``predict ... --shard i/n``.

Not in the paper: the RSNA training set has 2,019 studies, and one machine prepares or predicts
them in hours; ``n`` machines (a SLURM job array) each take a stable ``1/n`` of them and a merge
joins the parts into exactly what one run writes.

- A shard is ``i/n`` with a **0-based** index, ``0 <= i < n`` (as ``SLURM_ARRAY_TASK_ID`` of
  ``--array=0-(n-1)``). Study ``uid`` belongs to shard ``int(sha256(uid)) mod n``: the same
  shard on every machine and every rerun, whatever order the studies are listed in.
- Shard ``i/n`` writes a complete output folder of its own, ``OUT/shards/<i>-of-<n>/``, with
  ``shard.json`` (:data:`PART_FILE`) written last: what it holds, the settings it ran with and
  the digest of the whole study selection. A shard removes its ``shard.json`` when it starts,
  so a killed or failed shard is never taken for a finished one.
- The merge (:func:`finished_parts`) names every missing or unfinished shard and every setting
  on which two shards disagree; it never leaves one out.

This module holds what prepare and predict share; the merges themselves are
:func:`keras_cspine.data.prepare_shards.merge_prepared_shards` and
:func:`keras_cspine.pipeline.shards.merge_predicted_shards`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keras_cspine.errors import CSpineDataError

SHARDS_DIR = "shards"
PART_FILE = "shard.json"
MERGE_LOCK = ".merge.lock"
PART_FORMAT = 1
_PART_NAME = re.compile(r"(\d+)-of-(\d+)")
_SPEC = re.compile(r"\s*(-?\d+)\s*/\s*(-?\d+)\s*")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based: ``0 <= index < count``).

    Example:
        >>> shard = Shard.parse("1/3")
        >>> shard.name, shard.takes("1.2.826.0.1.3680043.10001")
        ('1-of-3', False)
    """

    index: int
    count: int

    def __post_init__(self):
        for name in ("index", "count"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"shard {name} must be a whole number, got {value!r}")
        if self.count < 1:
            raise ValueError(f"the number of shards must be >= 1, got {self.count}")
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard index {self.index} is out of range for {self.count} "
                             f"shard{'s' if self.count > 1 else ''}: give i/n with 0 <= i < n "
                             "(0-based, as SLURM_ARRAY_TASK_ID)")  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"i/n"`` -> ``Shard(i, n)``; ValueError saying what is wrong otherwise."""
        match = _SPEC.fullmatch(str(text))
        if match is None:
            raise ValueError(f"{text!r} is not i/n (two whole numbers, e.g. 0/4 for the first of "
                             "4 shards)")  # fmt: skip
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def name(self) -> str:
        """The part folder's name, ``<i>-of-<n>``."""
        return f"{self.index}-of-{self.count}"

    def takes(self, uid: str) -> bool:
        """Whether study ``uid`` belongs to this shard."""
        return shard_of(uid, self.count) == self.index

    def select(self, uids: Iterable[str]) -> list[str]:
        """The UIDs of ``uids`` that belong to this shard, in their order."""
        return [uid for uid in uids if self.takes(uid)]


def shard_of(uid: str, count: int) -> int:
    """The shard (0-based) of study ``uid`` among ``count``: the SHA-256 of the UID modulo
    ``count`` (stable across machines, Python versions and runs)."""
    return int.from_bytes(hashlib.sha256(str(uid).encode("utf-8")).digest(), "big") % int(count)


def selection_digest(uids: Sequence[str | None]) -> str:
    """A digest of a study selection (order kept): shards of one run all record the same."""
    payload = json.dumps(list(uids), separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def part_dir(out: str | os.PathLike, shard: Shard) -> Path:
    """``OUT/shards/<i>-of-<n>``: where shard ``i/n`` writes its part."""
    return Path(out) / SHARDS_DIR / shard.name


def start_part(folder: Path) -> None:
    """Mark a part as unfinished (its ``shard.json`` removed) before a shard works in it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / PART_FILE).unlink(missing_ok=True)


def write_part(folder: Path, record: Mapping[str, Any]) -> None:
    """``shard.json``: written last, when the part is complete."""
    from keras_cspine.utils import write_json

    write_json(folder / PART_FILE, {"format": PART_FORMAT, **record})


def _read_part(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CSpineDataError(path, f"not readable ({err}): run that shard again") from None
    if not isinstance(record, dict) or "shard" not in record:
        raise CSpineDataError(path, "not a shard record: run that shard again")
    return record


def shard_counts(out: str | os.PathLike) -> list[int]:
    """The shard counts ``n`` of the part folders under ``OUT/shards`` (sorted)."""
    root = Path(out) / SHARDS_DIR
    if not root.is_dir():
        return []
    found = {int(m.group(2)) for p in root.iterdir()
             if p.is_dir() and (m := _PART_NAME.fullmatch(p.name))}  # fmt: skip
    return sorted(found)


def choose_count(out: str | os.PathLike, count: int | None = None) -> int:
    """The shard count to merge: ``count``, or the only one found under ``OUT/shards``."""
    out = Path(out)
    if count is not None:
        return int(count)
    counts = shard_counts(out)
    if not counts:
        raise CSpineDataError(out / SHARDS_DIR, "no shard parts to merge: run `prepare ... "
                              "--shard i/n` or `predict ... --shard i/n` first")  # fmt: skip
    if len(counts) > 1:
        raise CSpineDataError(out / SHARDS_DIR, "holds parts of different shard counts ("
                              + ", ".join(f"n={n}" for n in counts) + "): give --shards N, or "
                              "remove the stale part folders")  # fmt: skip
    return counts[0]


def _running(lock: Path) -> str | None:
    """The pid holding the lock file ``lock`` (a shard still at work), or None."""
    try:
        import fcntl
    except ImportError:
        return None
    if not lock.is_file():
        return None
    fd = os.open(lock, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def finished_parts(out: str | os.PathLike, count: int, kind: str, *,
                   lock: Callable[[Path], Path] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """The ``shard.json`` of every part ``0..count-1`` of ``OUT``, in order (``lock``: the lock
    file a shard holds while it works, given its part folder).

    Raises:
        CSpineDataError: naming every shard that is missing (never run), unfinished (failed,
            killed, or still running) or of another kind (a predict part among prepare parts).
    """
    out = Path(out)
    problems, parts = [], []
    for i in range(count):
        shard = Shard(i, count)
        folder = part_dir(out, shard)
        if not folder.is_dir():
            problems.append(f"{shard.name} (never run)")
            continue
        pid = _running(lock(folder)) if lock else None
        if not (folder / PART_FILE).is_file():
            why = f"still running, pid {pid}" if pid else "failed or killed: run it again"
            problems.append(f"{shard.name} (unfinished: {why})")
            continue
        record = _read_part(folder / PART_FILE)
        if record.get("kind") != kind:
            problems.append(f"{shard.name} (a {record.get('kind')} part, not {kind})")
            continue
        parts.append({**record, "folder": str(folder)})
    if problems:
        raise CSpineDataError(out / SHARDS_DIR, f"cannot merge {count} shard{'s' * (count > 1)}: "
                              f"missing {len(problems)}: {', '.join(problems)}; run "
                              f"`--shard i/{count}` for each, then `keras-cspine merge {out}`")  # fmt: skip
    return parts


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key in sorted(value):
            flat.update(_flatten(value[key], f"{prefix}.{key}" if prefix else str(key)))
        return flat or {prefix: {}}
    return {prefix: value}


def check_same(parts: Sequence[Mapping[str, Any]], field: str, what: str) -> None:
    """Refuse parts whose ``field`` (a dict of settings) differ, naming the first differing
    setting and the two shards."""
    first = parts[0]
    base = _flatten(first.get(field))
    for part in parts[1:]:
        other = _flatten(part.get(field))
        for key in sorted(set(base) | set(other)):
            if base.get(key) != other.get(key):
                name = f"{field}.{key}" if key else field
                raise CSpineDataError(
                    Path(part["folder"]).parent,
                    f"shards {what} with different settings cannot be merged: {name} is "
                    f"{other.get(key)!r} in shard {part['shard']} but {base.get(key)!r} in shard "
                    f"{first['shard']}; run every shard with the same settings")  # fmt: skip


@contextlib.contextmanager
def merge_lock(out: Path, wait: bool = True) -> Iterator[bool]:
    """Hold ``OUT/.merge.lock`` while merging; yields False (without waiting) when ``wait`` is
    False and another process merges."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / MERGE_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def all_finished(out: str | os.PathLike, count: int) -> bool:
    """Whether every part ``0..count-1`` has its ``shard.json`` (then the last shard merges)."""
    return all((part_dir(out, Shard(i, count)) / PART_FILE).is_file() for i in range(count))


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` becomes a hard link to ``source`` (no second copy of a large cache), a copy
    where links are not possible; replaced atomically."""
    import shutil

    from keras_cspine.utils import atomic_path

    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        Path(tmp).unlink(missing_ok=True)
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
