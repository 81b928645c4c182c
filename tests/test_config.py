"""trainer.config: every preset resolves to the config it gave when the presets were Python functions."""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest

from trainer.config import TrainConfig, load_config

GOLDEN = Path(__file__).with_name("golden") / "presets.json"

# (preset, --steps, overrides): each preset alone, with --steps (the schedules rescaled), and --steps followed by
# an override that must win over the rescaling.
CASES: list[tuple[str, int | None, tuple[str, ...]]] = [
    ("smoke", None, ()), ("small", None, ()), ("rad-dino", None, ()),
    ("smoke", 100, ()), ("small", 600, ()), ("rad-dino", 5000, ()),
    ("smoke", 100, ("optim.warmup_iters=7",)),
]


def case_id(preset: str, steps: int | None, overrides: tuple[str, ...]) -> str:
    return " ".join([preset, *([f"--steps {steps}"] if steps else []), *overrides])


def assert_tuples_stay_tuples(obj: object, where: str = "cfg") -> None:
    """JSON cannot tell a tuple from a list: check the types on the dataclasses themselves."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            assert_tuples_stay_tuples(value, f"{where}.{f.name}")
        elif typing.get_origin(hints[f.name]) is tuple:
            assert type(value) is tuple, f"{where}.{f.name} is a {type(value).__name__}, not a tuple"


@pytest.mark.parametrize("preset,steps,overrides", CASES, ids=[case_id(*c) for c in CASES])
def test_presets_resolve_to_the_golden_configs(preset, steps, overrides):
    cfg = load_config(preset, list(overrides), steps=steps)
    golden = json.loads(GOLDEN.read_text())[case_id(preset, steps, overrides)]
    # Compared as JSON text so that 1 and 1.0 differ (a float field must stay a float).
    assert json.dumps(cfg.to_dict(), sort_keys=True, indent=1) == json.dumps(golden, sort_keys=True, indent=1), (
        f"preset {case_id(preset, steps, overrides)!r} changed; if that is intended, update {GOLDEN}")
    assert isinstance(cfg, TrainConfig)
    assert_tuples_stay_tuples(cfg)
