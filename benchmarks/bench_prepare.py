"""Benchmark: `prepare` against a naive per-slice loop of the paper's Algorithm 1.

In one run, on one synthetic JPEG-lossless study (600 slices of 512 x 512 by default):
- naive: for each file, pydicom read + Algorithm 1 (YBR_FULL workaround, min-max, uint8, RGB) +
  resize to the model size, one slice at a time in one process (Algorithm 1 as the paper writes
  it, Section 2.4);
- ours: `keras_cspine.data.prepare.prepare_dataset(mode="paper")`, chunks of slices over all cores,
  dicomsdl decoding when installed, writing the memory-mapped cache.
Prints slices per second for both, their ratio, and the peak memory (RSS of the whole process
tree, workers included). Targets on 2 cores: ratio >= 3, peak < 1 GB.

    python benchmarks/bench_prepare.py [--slices 600] [--size 224] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import psutil


class ProcessTreeMonitor:
    """Samples this process and all its descendants every 50 ms: the peak of their
    summed RSS, and the CPU seconds they used (user + system) while the block ran.

    CPU time is reported beside wall time because on a shared, loaded machine the wall time of a
    run depends on the share of the cores it gets; CPU seconds do not.
    """

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._cpu: dict[int, float] = {}
        self._cpu_start = 0.0

    @staticmethod
    def _cpu_of(proc: psutil.Process) -> float:
        times = proc.cpu_times()
        return times.user + times.system

    def _sample(self):
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                    self._cpu[proc.pid] = max(self._cpu.get(proc.pid, 0.0), self._cpu_of(proc))
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)

    @property
    def cpu_seconds(self) -> float:
        return sum(self._cpu.values()) - self._cpu_start

    def __enter__(self):
        me = psutil.Process()
        self.peak = me.memory_info().rss
        self._cpu_start = self._cpu_of(me)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        me = psutil.Process()
        self._cpu[me.pid] = self._cpu_of(me)


def make_study(root: Path, n_slices: int) -> Path:
    from keras_cspine.synthetic.dataset import PRESETS, Preset, generate_study

    full = PRESETS["full"]
    preset = Preset("bench", (512,), full.fov_mm, (0.15, 0.3), (n_slices, n_slices), full.noise_hu,
                    0.0, full.chunk_slices)  # fmt: skip
    study = generate_study(root, seed=0, preset=preset, keep_volumes=False, compressed=True,
                           segmentation=False, head_first=True)  # fmt: skip
    return study.folder


def naive_loop(folder: Path, size: int):
    from keras_cspine.data.preprocess import paper_algorithm1, resize_square

    files = sorted(folder.glob("*.dcm"), key=lambda p: int(p.stem))
    out = []
    for path in files:
        grey = paper_algorithm1(path)[..., 0].astype("float32")
        out.append(resize_square(grey, size, 0.0).astype("uint8"))
    return len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--slices", type=int, default=600)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--keep", help="folder for the study (reused when it exists)")
    args = parser.parse_args()

    from keras_cspine.data.prepare import prepare_dataset
    from keras_cspine.io.dicom import dicomsdl_available

    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_prepare."))
    data = work / "data"
    if not (data / "train_images").is_dir():
        t0 = time.perf_counter()
        make_study(data, args.slices)
        print(f"synthetic study: {args.slices} slices 512x512, JPEG lossless "
              f"({time.perf_counter() - t0:.1f} s to write)")  # fmt: skip
    folder = next((data / "train_images").iterdir())
    n = len(list(folder.glob("*.dcm")))

    with ProcessTreeMonitor() as naive_mem:
        t0 = time.perf_counter()
        naive_loop(folder, args.size)
        naive_s = time.perf_counter() - t0
    out = work / "prepared"
    shutil.rmtree(out, ignore_errors=True)
    with ProcessTreeMonitor() as ours_mem:
        t0 = time.perf_counter()
        prepare_dataset(data, out, size=args.size, mode="paper", workers=args.workers,
                        progress=False)  # fmt: skip
        ours_s = time.perf_counter() - t0

    mb = 1024 * 1024
    print(f"slices: {n}, model size {args.size}, workers {args.workers}, "
          f"dicomsdl {'on' if dicomsdl_available() else 'off'}, "
          f"load average before {psutil.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    for name, seconds, mon in (("naive Algorithm 1 loop", naive_s, naive_mem),
                               ("keras_cspine prepare  ", ours_s, ours_mem)):  # fmt: skip
        print(f"{name} : {n / seconds:7.1f} slices/s  ({seconds:.1f} s wall, "
              f"{mon.cpu_seconds:.1f} s CPU, peak {mon.peak / mb:.0f} MB)")  # fmt: skip
    print(f"speed-up (wall)        : {naive_s / ours_s:.2f}x  (target >= 3x)")
    print(f"CPU work ratio         : {naive_mem.cpu_seconds / ours_mem.cpu_seconds:.2f}x "
          "(naive CPU s / ours; wall speed-up on an idle machine ~ this x cores used)")
    print(f"peak memory            : {ours_mem.peak / mb:.0f} MB  (target < 1024 MB)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
