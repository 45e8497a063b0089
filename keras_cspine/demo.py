"""``python -m keras_cspine demo``: the whole pipeline on a small synthetic dataset, in one run folder.

Steps (each shows progress; a finished step is not redone when the demo is run again on the same
folder):
1. synth: a small synthetic dataset in the RSNA 2022 layout (or ``--data`` for the Kaggle folder);
2. prepare: the slice index and image cache;
3. look: figures of slices with their labels and fracture boxes, and sagittal overviews.

A summary of where everything is, with the figures measured, is printed at the end and written to
``OUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from keras_cspine.utils import write_json


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo run (small enough for 2 CPU cores)."""

    studies: int = 12
    seed: int = 0
    preset: str = "small"
    image_size: int = 64
    mode: str = "bone"
    workers: int | None = None


class Demo:
    """Runs named steps in order, records their time and results, and skips finished ones."""

    def __init__(self, out: Path):
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.state_path = out / "demo_state.json"
        self.state: dict[str, Any] = (
            json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        )

    def step(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        if name in self.state:
            print(f"[demo] {name}: done earlier, kept ({self.state[name]['seconds']} s then)")
            return self.state[name]["result"]
        print(f"[demo] {name} ...", flush=True)
        started = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - started, 1)
        self.state[name] = {"seconds": seconds, "result": result}
        write_json(self.state_path, self.state)
        print(f"[demo] {name}: {seconds} s")
        return result


def run_demo(out: str | Path, settings: DemoSettings = DemoSettings(),
             data: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the demo into ``out`` and return the summary."""
    from keras_cspine.prepare import prepare_dataset
    from keras_cspine.viz import look

    out = Path(out)
    demo = Demo(out)
    data_dir = Path(data) if data else out / "data"
    if data is None:
        from keras_cspine.synthetic import generate_dataset

        demo.step("synth", lambda: {"data": str(generate_dataset(
            data_dir, n_studies=settings.studies, seed=settings.seed, preset=settings.preset))})  # fmt: skip
    prepared = out / "prepared"
    demo.step("prepare", lambda: prepare_dataset(
        data_dir, prepared, size=settings.image_size, mode=settings.mode,
        workers=settings.workers))  # fmt: skip
    demo.step("look", lambda: {"figures": [str(p) for p in look(prepared, out / "figures")]})

    summary = {
        "run_dir": str(out.resolve()),
        "data": str(data_dir),
        "prepared": str(prepared),
        "steps": {name: entry["seconds"] for name, entry in demo.state.items()},
        "results": {name: entry["result"] for name, entry in demo.state.items()},
    }
    write_json(out / "summary.json", summary)
    _print_summary(summary)
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    print("\n== keras_cspine demo: summary ==")
    print(f"run folder : {summary['run_dir']}")
    print(f"data       : {summary['data']}")
    prep = summary["results"].get("prepare", {})
    if prep:
        print(f"prepared   : {summary['prepared']} ({prep.get('studies')} studies, "
              f"{prep.get('settings', {}).get('mode')} {prep.get('settings', {}).get('size')} px)")  # fmt: skip
    for figure in summary["results"].get("look", {}).get("figures", []):
        print(f"figure     : {figure}")
    print("time (s)   : " + ", ".join(f"{k} {v}" for k, v in summary["steps"].items()))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/demo", help="run folder (default runs/demo)")
    parser.add_argument("--data", help="an RSNA-layout folder to use instead of synthetic data")
    parser.add_argument("--studies", type=int, default=DemoSettings.studies)
    parser.add_argument("--seed", type=int, default=DemoSettings.seed)
    parser.add_argument("--preset", default=DemoSettings.preset, choices=["tiny", "small", "full"])
    parser.add_argument("--image-size", type=int, default=DemoSettings.image_size)
    parser.add_argument("--workers", type=int, default=None)


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings(studies=args.studies, seed=args.seed, preset=args.preset,
                            image_size=args.image_size, workers=args.workers)  # fmt: skip
    run_demo(args.out, settings, data=args.data)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_cspine.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
