"""The processes of ``prepare``: its workers, and how they and the job itself live and die.

Kept apart from ``keras_cspine.data.prepare`` so that the workers import only the DICOM and
preprocessing stack (no pandas, no tqdm): they start faster, and a forkserver preloads exactly this.

- :func:`render_chunk`: the work of a worker;
- :func:`run_jobs` (:func:`start_pool`, :func:`submit`, :func:`stop_pool`): the worker pool
  (none for one worker);
- :func:`init_worker`: workers die with the job. A pool's workers otherwise outlive a killed
  parent (they wait forever on their task queue, whose write end they hold themselves), and with
  them the forkserver (alive while any of its children is) and the resource tracker (alive while
  anyone holds its pipe): about 200 MB left behind by every killed ``prepare``;
- :func:`exclusive_folder`: one ``prepare`` writes into a folder at a time;
- :func:`sigterm_exits`: SIGTERM stops the job in good order (workers killed, partial files
  removed) instead of ending it on the spot.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keras_cspine.data.preprocess import to_model_image
from keras_cspine.data.roi import SpineRoi
from keras_cspine.errors import CSpineDataError
from keras_cspine.io.dicom import read_slice

PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 0.5
LOCK_NAME = ".prepare.lock"


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Ask Linux to send ``sig`` to this process when its parent dies (``prctl(PR_SET_PDEATHSIG)``).

    Returns whether the request was made (False off Linux or without a usable libc).
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False
    except OSError:
        pass
    else:
        state = stat[stat.rfind(b")") + 2 :][:1]  # the field after "(comm)"
        return state not in (b"Z", b"X", b"x")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(main_pid: int, parent: int, seconds: float) -> None:
    while True:
        time.sleep(seconds)
        if os.getppid() != parent or not process_alive(main_pid):
            os._exit(1)  # the job is gone: nothing to report to, nothing to clean


def init_worker(main_pid: int, seconds: float = WATCH_SECONDS) -> None:
    """Initializer of a ``prepare`` worker: it dies with its parent and with the job's process.

    - ``PR_SET_PDEATHSIG`` (Linux): SIGKILL when the parent (the forkserver, or ``main_pid``
      under spawn) dies;
    - a daemon thread that exits the process within ``seconds`` of the parent changing or of
      ``main_pid`` (the process running ``prepare``) dying or becoming a zombie;
    - SIGINT is ignored: Ctrl-C reaches the whole process group, and the parent stops the
      workers itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent or not process_alive(main_pid):  # died before prctl took hold
        os._exit(1)
    threading.Thread(target=_watch, args=(main_pid, parent, seconds), daemon=True,
                     name="prepare-watchdog").start()  # fmt: skip


def render_chunk(
    paths: Sequence[str], start: int, cache_tmp: str, mode: str, size: int, decoder: str,
    roi: Sequence[int] | None = None,
) -> list:
    """Decode, preprocess and store files ``start .. start+len(paths)`` (file order) of a study;
    with ``roi`` (``SpineRoi.to_json()``) only that window of each slice.

    Returns the files' SliceMeta: each file is parsed once, here, and the series is ordered from
    these headers afterwards (``keras_cspine.io.dicom.series_from_slices``).
    """
    window = None if roi is None else SpineRoi.from_json(roi)
    cache = np.load(cache_tmp, mmap_mode="r+")
    metas = []
    for offset, path in enumerate(paths):
        hu, meta = read_slice(path, decoder=decoder)
        if window is not None:
            hu = window.crop(hu)
        cache[start + offset] = to_model_image(hu, mode=mode, size=size)
        metas.append(meta)
    cache.flush()
    del cache
    return metas


# -- the job's own process --------------------------------------------------------------------
@contextlib.contextmanager
def exclusive_folder(out: Path) -> Iterator[None]:
    """Hold ``OUT/.prepare.lock`` (flock) for the run: one prepare writes into a folder at a time.

    The kernel releases the lock when the process dies, however it dies.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise CSpineDataError(
                out, f"another prepare (pid {holder}) is writing into this folder; wait for it "
                "to finish or choose another output folder",
            ) from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """Turn SIGTERM into SystemExit(143) during the run, so that the workers are stopped and the
    partial files removed (only in the main thread, and only over the default handler)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):  # fmt: skip
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


# -- the pool ---------------------------------------------------------------------------------
def start_pool(workers: int) -> cf.ProcessPoolExecutor | None:
    """``workers`` processes that die with this one (None for a single worker: work in here)."""
    if workers <= 1:
        return None
    return cf.ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=init_worker,
                                  initargs=(os.getpid(),))  # fmt: skip


def run_jobs(jobs: Iterator[tuple[Any, Callable, tuple]], workers: int,
             done: Callable[[Any, cf.Future], None]) -> None:  # fmt: skip
    """Run each job ``(key, fn, args)`` in ``workers`` processes (in this one for 1) and call
    ``done(key, future)`` here as each finishes.

    Jobs are drawn lazily, at most ``2 * workers`` in flight (one at a time in this process), so
    work done in ``done`` (committing a finished study) happens as the run goes, not at its end.
    An exception, Ctrl-C or SIGTERM (see :func:`sigterm_exits`) kills the workers at once.
    """
    pool = start_pool(workers)
    window = 2 * workers if pool is not None else 1
    pending: dict[cf.Future, Any] = {}
    finished = False
    try:
        while True:
            while len(pending) < window and (job := next(jobs, None)) is not None:
                key, fn, args = job
                pending[submit(pool, fn, *args)] = key
            if not pending:
                break
            ready, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for future in ready:
                done(pending.pop(future), future)
        finished = True
    finally:
        if pool is not None:
            stop_pool(pool, kill=not finished)


def submit(pool: cf.Executor | None, fn, *args) -> cf.Future:
    """``pool.submit``, or run now in this process (a finished future) when there is no pool."""
    if pool is not None:
        return pool.submit(fn, *args)
    future: cf.Future = cf.Future()
    try:
        future.set_result(fn(*args))
    except Exception as err:  # noqa: BLE001 - handed to the caller through the future
        future.set_exception(err)
    return future


def stop_pool(pool: cf.ProcessPoolExecutor, kill: bool) -> None:
    """Wait for the workers after a finished run; kill them at once after an error or signal."""
    if not kill:
        pool.shutdown(wait=True)
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        with contextlib.suppress(Exception):
            process.kill()
    for process in processes:
        with contextlib.suppress(Exception):
            process.join(5)


def _worker_context() -> multiprocessing.context.BaseContext:
    """Worker processes that start fast and are safe beside TensorFlow or torch.

    Plain fork is not safe once TensorFlow runs threads in the parent; spawn re-imports everything
    in every worker (seconds each). A forkserver imports the decoding stack once and forks workers
    from that clean process. The forkserver lives while any worker does; the workers die with
    this process (:func:`init_worker`), so the forkserver and the resource tracker follow them.
    """
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        preload = ["keras_cspine.data.prepare_worker", "pydicom", "PIL.Image"]
        from keras_cspine.io.dicom import dicomsdl_available

        if dicomsdl_available():
            preload.append("dicomsdl")
        context.set_forkserver_preload(preload)
        return context
    return multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------------------------
# The shared files of a prepare folder (one run, or the merge of its shards)
# --------------------------------------------------------------------------------------------
def write_index(out: Path, rows_paths: Sequence[Path], columns: Sequence[str]) -> None:
    """``out/index.csv``: the per-study rows files (``studies/<uid>.csv``), in the order given."""
    import pandas as pd

    from keras_cspine.utils import atomic_write

    parts = [pd.read_csv(path, dtype=str, keep_default_na=False) for path in rows_paths]
    index = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=list(columns))
    with atomic_write(out / "index.csv", newline="") as handle:
        index[list(columns)].to_csv(handle, index=False)


def write_errors(out: Path, errors_in: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """``out/errors.csv``: the errors given, each once (rewritten atomically; removed when none)."""
    from keras_cspine.utils import write_csv

    errors: list[dict[str, str]] = []
    for error in errors_in:
        row = {"path": str(error.get("path", "")), "problem": str(error.get("problem", ""))}
        errors += [row] if row not in errors else []
    if errors:
        write_csv(out / "errors.csv", errors, ["path", "problem"])
    else:
        (out / "errors.csv").unlink(missing_ok=True)
    return errors
