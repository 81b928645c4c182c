"""trainer.config (the YAML presets, OmegaConf underneath) and the trainer's --print-config and config/data errors.

The golden file holds what each preset resolved to when the presets were Python functions.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING

import trainer.config
import trainer.train
from trainer.config import RECIPE, TrainConfig, config_from_dict, load_config, plain, preset_names, save_config
from trainer.train import main

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


def test_presets_are_yaml_files_and_a_file_without_base_starts_from_rad_dino(tmp_path):
    assert preset_names() == ["rad-dino", "small", "smoke"]
    plain_file = tmp_path / "mine.yaml"
    plain_file.write_text("# no base: the recipe, rad-dino\n")
    assert load_config(str(plain_file)) == load_config("rad-dino")
    for preset in ("smoke", "small"):  # each preset says which one it changes
        assert yaml.safe_load((RECIPE.parent / f"{preset}.yaml").read_text())["base"] == "rad-dino"


def schema_fields(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """Every leaf key of the schema, dotted, with its dataclass field, in the schema's order."""
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        out += schema_fields(hint, f"{prefix}{f.name}.") if dataclasses.is_dataclass(hint) else [(prefix + f.name, f)]
    return out


def flat_keys(mapping: dict, prefix: str = "") -> list[str]:
    return [k for key, v in mapping.items()
            for k in (flat_keys(v, f"{prefix}{key}.") if isinstance(v, dict) else [prefix + key])]


def test_the_recipe_is_the_one_place_of_every_value():
    """rad-dino.yaml gives every key of the schema its value, in the schema's order (the order --print-config
    prints), and the dataclasses give none: a key added to one without the other fails here."""
    fields = schema_fields()
    assert flat_keys(yaml.safe_load(RECIPE.read_text())) == [key for key, _ in fields]
    with_values = [key for key, f in fields if f.default is not MISSING or f.default_factory is not dataclasses.MISSING]
    assert with_values == [], f"the schema gives these keys values; give them in {RECIPE.name} instead"


def test_every_value_of_the_recipe_says_where_it_comes_from():
    """Each key of rad-dino.yaml has a comment: on its line, or the comment lines right above it."""
    lines = RECIPE.read_text().splitlines()
    bare = [line.strip() for n, line in enumerate(lines)
            if line.startswith("  ") and not line.lstrip().startswith("#") and "#" not in line
            and not lines[n - 1].lstrip().startswith("#")]
    assert bare == []


def test_a_recipe_without_a_key_names_it(tmp_path, monkeypatch):
    recipe = tmp_path / "rad-dino.yaml"
    recipe.write_text(RECIPE.read_text().replace("  seed: 0                         # dinov2 default train.seed\n", ""))
    monkeypatch.setattr(trainer.config, "RECIPE", recipe)
    monkeypatch.setattr(trainer.config, "CONFIG_DIR", tmp_path)
    with pytest.raises(ValueError, match=r"run.seed has no value; .*rad-dino.yaml must give every key"):
        load_config("rad-dino")


def test_yaml_values_are_checked_and_converted_by_the_schema(tmp_path):
    path = tmp_path / "run.yaml"
    # 1e-4 without a dot is a string to PyYAML; a YAML list becomes a tuple; an int is accepted for a float.
    path.write_text("base: small\noptim:\n  base_lr: 1e-4\n  weight_decay: 0\ncrops.blur_p: [0, 0.9, 0.5]\n")
    cfg = load_config(str(path))
    assert cfg.optim.base_lr == 1e-4 and type(cfg.optim.base_lr) is float
    assert type(cfg.optim.weight_decay) is float
    assert cfg.crops.blur_p == (0.0, 0.9, 0.5) and type(cfg.crops.blur_p) is tuple
    assert cfg.head.out_dim == 256  # the small preset underneath
    for text, message in [("optim:\n  lr: 1\n", "unknown key 'optim.lr'; known here: total_iters"),
                          ("optim:\n  base_lr: fast\n", "optim.base_lr: expected float"),
                          ("crops.global_scale: [0.5]\n", r"crops.global_scale: expected tuple\[float, float\]"),
                          ("optim: 3\n", "'optim' is a section; give a mapping"),
                          ("base: tiny\n", r"base 'tiny' is not a preset \(rad-dino, small, smoke\)"),
                          ("- 1\n", "expected a mapping at the top level"),
                          ("optim: [1,\n", "not a valid YAML config")]:
        path.write_text(text)
        with pytest.raises(ValueError, match=message) as e:
            load_config(str(path))
        assert str(path) in str(e.value)  # the file is named


@pytest.mark.parametrize("override, message", [
    ("model.depth=true", r"override 'model.depth=true': model.depth: expected int \| None"),
    ("model=3", "'model' is a section"),
    ("model.foo.bar=1", "unknown key 'model.foo'; known here: arch"),
    ("optim.base_lr", "expected key=value"),
    ("model.arch=vit_huge", "model.arch='vit_huge': use one of vit_tiny, vit_small, vit_base"),  # at load, not at build
])
def test_override_errors_name_the_override_key_and_type(override, message):
    with pytest.raises(ValueError, match=message):
        load_config("smoke", [override])


def test_saved_yaml_reads_back_with_pyyaml_and_rebuilds_the_config(tmp_path):
    cfg = load_config("small", ["model.pretrained=/weights/rad-dino", "data.sources=[a.csv@0.5, b.csv@0.5]"])
    save_config(cfg, tmp_path / "config.yaml")
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())  # checkpoints and slurm.pretrain read it so
    assert raw == plain(cfg.to_dict())
    assert config_from_dict(raw) == cfg
    with pytest.raises(ValueError, match="config dict: unknown key 'optim.lr'"):
        config_from_dict({**raw, "optim": {**raw["optim"], "lr": 1}})


# ----------------------------------------------------------------------------------------------------------------
# The command line: --print-config, and config/data errors before any model is built


@pytest.fixture
def no_models(monkeypatch):
    def never(cfg):
        raise AssertionError("a model was built")

    monkeypatch.setattr(trainer.train, "SSLMetaArch", never)


def test_print_config_prints_the_resolved_yaml_and_builds_nothing(tmp_path, capsys, no_models):
    argv = ["--config", "smoke", "--steps", "100", "--data", str(tmp_path / "not-read"), "--print-config",
            "optim.base_lr=2e-4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no run directory, and the data were not read
    printed = yaml.safe_load(out)
    assert printed["optim"]["warmup_iters"] == 10 and printed["optim"]["base_lr"] == 2e-4
    expected = load_config("smoke", ["optim.base_lr=2e-4"], steps=100)
    expected.data.sources = [str(tmp_path / "not-read")]
    assert config_from_dict(printed) == expected
    (tmp_path / "mine.yaml").write_text(out)  # docs/pretraining.md: the printed config is a file to start from
    assert load_config(str(tmp_path / "mine.yaml")) == expected


@pytest.mark.parametrize("preset", ["smoke", "small", "rad-dino"])
def test_print_config_of_each_preset_is_the_text_it_printed_before_the_recipe_moved_into_yaml(preset, capsys):
    """golden/print-config/NAME.yaml is what `--print-config` printed when the recipe was the dataclasses'
    defaults: the same keys, in the same order, with the same values."""
    assert main(["--config", preset, "--print-config"]) == 0
    assert capsys.readouterr().out == (GOLDEN.with_name("print-config") / f"{preset}.yaml").read_text()


def test_output_is_required_unless_printing(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "smoke"])
    assert e.value.code == 2 and "--output" in capsys.readouterr().err


def test_config_error_in_a_yaml_file_exits_2(tmp_path, capsys, no_models):
    path = tmp_path / "run.yaml"
    path.write_text("base: smoke\noptim:\n  lr: 1\n")
    assert main(["--config", str(path), "--output", str(tmp_path / "run"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: unknown key 'optim.lr'") and err.count("\n") == 1


@pytest.mark.parametrize("case", ["no --data", "missing", "empty folder", "empty list"])
def test_missing_or_empty_data_exits_2_before_any_model_is_built(tmp_path, capsys, no_models, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("# nothing yet\n")
    data, message = {"no --data": ([], "no data: pass --data MANIFEST"),
                     "missing": ([str(tmp_path / "nope")], f"{tmp_path / 'nope'} does not exist: pass --data"),
                     "empty folder": ([str(tmp_path / "empty")], "lists no images: a folder is searched"),
                     "empty list": ([str(tmp_path / "notes.txt")], "lists no images")}[case]
    argv = ["--config", "smoke", *[a for d in data for a in ("--data", d)], "--output", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]
    assert not list((tmp_path / "run").glob("**/*.safetensors"))
