"""config.py: YAML + key=value overrides into frozen dataclasses, strictly typed."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from keras_cspine.config import ConfigError, dump_config, load_config, parse_overrides, save_config


@dataclass(frozen=True)
class Optim:
    lr: float = 1e-3
    patience: int = 2


@dataclass(frozen=True)
class Run:
    name: str = "run"
    sizes: tuple[int, ...] = (16, 16)
    optim: Optim = field(default_factory=Optim)
    weights: str | None = None
    mixed_precision: bool = False


def test_defaults_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: from_file\noptim:\n  lr: 0.1\n")
    cfg = load_config(Run, path, ["optim.patience=5", "sizes=[8, 4, 2]", "weights=w.keras"])
    assert cfg == Run(name="from_file", sizes=(8, 4, 2), optim=Optim(lr=0.1, patience=5),
                      weights="w.keras")  # fmt: skip


def test_int_is_accepted_for_float_and_null_for_optional():
    cfg = load_config(Run, None, ["optim.lr=1", "weights=null"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    assert cfg.weights is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lr=fast", "optim.lr"),
        ("optim.patience=2.5", "optim.patience"),
        ("mixed_precision=yes please", "mixed_precision"),
        ("nope=1", "unknown config key"),
        ("optim.nope=1", "optim.nope"),
        ("sizes=3", "sizes"),
        ("no_equals_sign", "key=value"),
        ("name=[unclosed", "not valid YAML"),
    ],
)
def test_illegal_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])


def test_no_code_execution_in_values(tmp_path):
    # YAML tags that construct Python objects are refused by safe_load.
    with pytest.raises(ConfigError):
        load_config(Run, None, ["name=!!python/object/apply:os.system ['echo hi']"])


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(Run, None, ["sizes=[1, 2]", "optim.lr=0.5"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Run, tmp_path / "resolved.yaml") == cfg
    assert dump_config(cfg)["sizes"] == [1, 2]


def test_parse_overrides_nests():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_missing_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="no_such.yaml"):
        load_config(Run, tmp_path / "no_such.yaml")
