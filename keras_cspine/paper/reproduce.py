"""Reproduce a paper table: ``python -m keras_cspine reproduce {table1,table3} --data DIR``.

- ``table1`` (paper Section 3, Table 1): trains and evaluates every stage 1 model of the table
  (one bundled config per row, ``stage1_<model>``) with :func:`keras_cspine.stage1.train.train_stage1`,
  then writes ``OUT/table1.csv`` and ``OUT/table1.md``: macro F1, exact match ratio, coverage
  error, trainable / non-trainable parameters, beside the paper's numbers. Each row runs in
  ``OUT/<config name>``; a finished row is reused and an interrupted one resumes, so the command
  can be rerun after a kill. ``--set`` overrides apply to every row (e.g. a smaller
  ``data.image_size`` or fewer ``train.epochs`` for a CPU run on synthetic data).
- ``table3`` (Section 3, Table 3): dispatched to
  :func:`keras_cspine.stage2.reproduce_table3` (YOLOv8s/m, YOLOv5s/m; Ultralytics runs in
  subprocesses, so TensorFlow is never imported first here).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keras_cspine.config import CONFIG_DIR
from keras_cspine.stage1 import runs

#: Table 1 rows in the paper's order: registry model names (config ``stage1_<name>``).
TABLE1_MODELS = ("gcvit_tiny", "vit", "convnext_small", "inceptionv3", "resnet152v2", "swin")


def _row_settings(model: str, overrides: Sequence[str]) -> tuple[str, list[str]]:
    """(config name, overrides) of one row."""
    if (CONFIG_DIR / f"stage1_{model}.yaml").is_file():
        return f"stage1_{model}", list(overrides)
    # a registry model without a bundled config (e.g. metadata_only): the small config
    return "stage1_synthetic_small", [f"model.name={model}", f"name=stage1_{model}", *overrides]


def reproduce_table1(
    data: str | Path,
    out: str | Path,
    models: Sequence[str] = TABLE1_MODELS,
    overrides: Sequence[str] = (),
    verbose: int | str = 2,
) -> list[dict[str, Any]]:
    """Train and evaluate each model; write ``OUT/table1.{csv,md,json}``; return the rows.

    Args:
        data: a prepare folder or an RSNA-layout folder (prepared once, see ``train``).
        out: output folder (one run directory per row inside).
        models: registry names (default: the paper's six rows); others use the small config.
        overrides: ``key=value`` config overrides applied to every row.
        verbose: Keras fit verbosity.
    """
    import keras

    from keras_cspine.stage1.evaluate import table1_frame, write_table
    from keras_cspine.stage1.models.factory import get_spec
    from keras_cspine.stage1.train import (
        check_weights,
        load_stage1_config,
        resolve_prepared,
        train_stage1,
    )
    from keras_cspine.utils import write_json

    if not models:
        raise ValueError("models must name at least one registry model")
    for model in models:
        get_spec(model)  # unknown names fail before any training
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = [_row_settings(model, overrides) for model in models]
    configs = [load_stage1_config(name, sets) for name, sets in settings]
    for config in configs:  # every row's weights are here before the first row trains
        check_weights(config)
    prepared = resolve_prepared(data, configs[0], out / "prepared")
    rows = []
    for config, (config_name, sets) in zip(configs, settings):
        run_dir = out / config.name
        metrics_path = run_dir / runs.METRICS_FILE
        if (run_dir / runs.SUMMARY_FILE).is_file() and metrics_path.is_file():
            print(f"[reproduce] {config.name}: finished earlier, reusing", file=sys.stderr)
        else:
            print(f"[reproduce] {config.name}: training {config.model.name}", file=sys.stderr)
            train_stage1(config, prepared, run_dir, verbose=verbose)
            keras.backend.clear_session()
        with open(metrics_path, encoding="utf-8") as handle:
            row = json.load(handle)["table1_row"]
        rows.append({**row, "command": _command(config_name, data, sets)})
        frame = table1_frame(rows)  # rewritten after every row: partial tables survive a kill
        write_table(frame, out / "table1")
        write_json(out / "table1.json", rows)
    return rows


def table1_plan(
    models: Sequence[str] = TABLE1_MODELS, overrides: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """What ``reproduce table1`` would run, row by row, without data or training.

    Each row's network is built (random weights: the counts do not depend on them) at the
    config's image size to count its parameters beside Table 1's; the weights the config asks for
    are looked up in the local caches (never downloaded).
    """
    import keras

    from keras_cspine.stage1.models.factory import build_model, count_parameters, get_spec
    from keras_cspine.stage1.models.pretrained import weights_status
    from keras_cspine.stage1.train import load_stage1_config

    plan = []
    for model in models:
        spec = get_spec(model)
        config_name, sets = _row_settings(model, overrides)
        config = load_stage1_config(config_name, sets)
        size = config.data.image_size or config.data.prepare_size
        built = count_parameters(build_model(
            config.model.name, image_size=size, freeze=config.model.freeze,
            **dict(config.model.options),
        ))  # fmt: skip
        keras.backend.clear_session()
        paper = spec.paper_parameters
        plan.append({
            "row": spec.paper or model,
            "config": config_name,
            "network": spec.description,
            "image_size": size,
            "freeze": config.model.freeze or spec.default_freeze,
            "trainable": built["trainable"],
            "non_trainable": built["non_trainable"],
            "paper_trainable": paper[0] if paper else None,
            "paper_non_trainable": paper[1] if paper else None,
            "weights": config.model.weights,
            **weights_status(config.model.name, config.model.weights),
            "prepare_mode": config.data.prepare_mode,
            "epochs": config.train.epochs,
            "augment": config.data.augment.enabled,
            "early_stopping_patience": config.train.early_stopping_patience,
        })  # fmt: skip
    return plan


def format_plan(plan: Sequence[dict[str, Any]]) -> str:
    """The dry-run table: one block of lines per row."""
    lines = []
    for row in plan:
        def pair(a, b):
            return "-" if a is None else f"{a:,} / {b:,}"

        paper = pair(row["paper_trainable"], row["paper_non_trainable"])
        built = pair(row["trainable"], row["non_trainable"])
        match = ""
        if row["paper_trainable"] is not None:
            dt = row["trainable"] - row["paper_trainable"]
            dn = row["non_trainable"] - row["paper_non_trainable"]
            match = "  exact" if dt == dn == 0 else f"  residual {dt:+,} / {dn:+,}"
        present = {True: "present", False: "MISSING"}.get(row["weights_present"], "-")
        lines += [
            f"{row['row']} ({row['config']})",
            f"  network     : {row['network']}, {row['image_size']} px, freeze {row['freeze']}",
            f"  parameters  : paper {paper}; built {built}{match}",
            f"  weights     : {row['weights'] or 'random'} <- {row['weights_source']} "
            f"[{present}]",
            f"  recipe      : prepare --mode {row['prepare_mode']}, {row['epochs']} epochs, "
            f"augmentation {'on' if row['augment'] else 'off'}, early stopping "
            f"{row['early_stopping_patience'] or 'off'}",
        ]  # fmt: skip
        if row["weights_present"] is False:
            lines.append(f"  get weights : {row['weights_command']}")
    return "\n".join(lines)


def _command(config_name: str, data: str | Path, overrides: Sequence[str]) -> str:
    sets = " ".join(f"--set {o}" for o in overrides)  # values with spaces need shell quotes
    return f"python -m keras_cspine train {data} --config {config_name} {sets}".strip()
