"""Training configuration: typed dataclasses (the schema), YAML presets, and dotted ``key=value`` overrides.

Every value lives in one place, trainer/configs/rad-dino.yaml: the recipe, each key with its value and the source
of that value. The dataclasses below are the schema only: the keys and their types, none with a value of its own
(each is OmegaConf's MISSING, and tests/trainer/test_config.py fails on a key given a default here or left out of
rad-dino.yaml). OmegaConf builds a structured config from them and checks every value set on it: unknown keys
are rejected, an int is accepted for a float, a YAML list for a tuple.

Resolution order: rad-dino.yaml -> the preset or YAML file, which may name another ``base`` preset (without one,
it changes rad-dino) -> ``--steps`` -> ``key=value`` overrides. The resolved config is written beside the
checkpoints as ``config.yaml`` and is enough to rebuild the backbone.

Iteration counts are explicit: DINOv2 calls 1250 iterations an "epoch" (OFFICIAL_EPOCH_LENGTH in
facebookresearch/dinov2 ``dinov2/configs/ssl_default_config.yaml``),
which is not a pass over the data; here every schedule length is given in iterations.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from harness.common.atomic import atomic_write_text
from harness.common.errors import AT_LEAST_0, AT_LEAST_1, OPEN_UNIT, POSITIVE, UNIT, Interval
from trainer.vit import PRESETS as VIT_PRESETS


@dataclass
class ModelConfig:
    arch: str = MISSING                     # trainer.vit preset: vit_tiny | vit_small | vit_base
    patch_size: int = MISSING
    img_size: int = MISSING                 # the position-embedding grid is img_size / patch_size square
    depth: int | None = MISSING             # None: the arch's depth
    num_register_tokens: int = MISSING
    layerscale_init: float | None = MISSING  # None: no LayerScale
    drop_path_rate: float = MISSING         # uniform over the blocks
    interpolate_offset: float = MISSING     # position-embedding resampling (docs/pretraining.md, "Weights in and out")
    interpolate_antialias: bool = MISSING
    pretrained: str | None = MISSING        # DINOv2 backbone state dict / HF folder to continue from
    pretrained_head: str | None = MISSING   # DINO head safetensors file


@dataclass
class HeadConfig:
    out_dim: int = MISSING                  # K, the number of prototypes
    hidden_dim: int = MISSING
    bottleneck_dim: int = MISSING
    nlayers: int = MISSING
    freeze_prototype_gain: bool = MISSING   # keep the prototypes' weight-norm gains at 1


@dataclass
class LossConfig:
    dino_weight: float = MISSING
    ibot_weight: float = MISSING
    koleo_weight: float = MISSING
    centering: str = MISSING                # "centering" (softmax, EMA centre) | "sinkhorn_knopp"
    student_temp: float = MISSING
    center_momentum: float = MISSING
    mask_ratio_min_max: tuple[float, float] = MISSING
    mask_sample_probability: float = MISSING


@dataclass
class CropConfig:
    global_size: int = MISSING
    local_size: int = MISSING
    n_local: int = MISSING
    global_scale: tuple[float, float] = MISSING
    local_scale: tuple[float, float] = MISSING
    mean: float = MISSING                   # grey intensity statistics, replicated to 3 channels
    std: float = MISSING
    blur_p: tuple[float, float, float] = MISSING  # global crop 1, global crop 2, the locals


@dataclass
class OptimConfig:
    total_iters: int = MISSING
    batch_size_per_gpu: int = MISSING
    base_lr: float = MISSING                # per 1024 images under lr_scaling sqrt_wrt_1024
    lr_scaling: str = MISSING               # "sqrt_wrt_1024" | "none"
    min_lr: float = MISSING
    warmup_iters: int = MISSING
    weight_decay: float = MISSING
    weight_decay_end: float = MISSING
    layerwise_decay: float = MISSING
    patch_embed_lr_mult: float = MISSING
    clip_grad: float = MISSING              # 0: no clipping
    freeze_last_layer_iters: int = MISSING
    momentum_teacher: float = MISSING
    final_momentum_teacher: float = MISSING
    teacher_temp: float = MISSING
    warmup_teacher_temp: float = MISSING
    warmup_teacher_temp_iters: int = MISSING
    adamw_betas: tuple[float, float] = MISSING

    def scaled_lr(self, world_size: int) -> float:
        """The peak learning rate for this run's total batch (DINOv2's scaling rule, applied once)."""
        if self.lr_scaling == "none":
            return self.base_lr
        return self.base_lr * math.sqrt(self.batch_size_per_gpu * world_size / 1024.0)


@dataclass
class DataConfig:
    sources: list[str] = MISSING            # manifests, each "PATH" or "PATH@WEIGHT" (see trainer.data)
    load_size: int | None = MISSING         # the square images are resized to before cropping; None: global_size
    num_workers: int = MISSING
    skip_bad: bool = MISSING
    cache_images: bool = MISSING            # keep decoded images in memory


@dataclass
class RunConfig:
    seed: int = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_last: int = MISSING
    save_initial: bool = MISSING            # write the step-0 weights to RUN/init
    device: str = MISSING                   # "auto" | "cpu" | "cuda"
    bf16: bool = MISSING                    # bf16 autocast on CUDA; ignored on CPU
    collapse_window: int = MISSING          # the collapse watch (trainer.diagnostics)
    collapse_margin: float = MISSING
    stop_on_collapse: bool = MISSING


@dataclass
class EvalConfig:
    """The in-training probe (trainer.monitor): a labelled harness task the teacher is probed on while it trains."""
    task: str | None = MISSING              # a harness task spec; None: no probe
    every: int = MISSING                    # 0: only before the first and after the last iteration
    data_root: str | None = MISSING
    seed: int = MISSING
    test_fraction: float = MISSING
    val_fraction: float = MISSING
    pools: list[str] = MISSING              # harness --global-pool values


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    crops: CropConfig = field(default_factory=CropConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


CONFIG_DIR = Path(__file__).with_name("configs")  # the presets, one YAML file each
RECIPE = CONFIG_DIR / "rad-dino.yaml"  # every key's value and its source; every other file changes some of them


def preset_names() -> list[str]:
    """The presets --config accepts by name: the YAML files in trainer/configs/."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), steps: int | None = None) -> TrainConfig:
    """A preset name or a YAML file (optionally ``base: <preset>``), then ``steps``, then ``key=value`` overrides.

    ``steps`` lays the schedules out for that many iterations: the warm-ups and the last-layer freeze keep their
    share of the run (as the DINOv2 paper, arXiv 2304.07193 App. B.2, "compresses" its schedules for its short
    high-resolution phase; dinov2 issue #211). Overrides come last, so an explicit ``optim.warmup_iters=...``
    wins.
    """
    if name_or_path in preset_names():
        node = _load_yaml(CONFIG_DIR / f"{name_or_path}.yaml")
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"--config {name_or_path!r}: neither a preset ({', '.join(preset_names())}) "
                             "nor a YAML file")
        node = _load_yaml(path)
    if steps is not None:
        rescale_iterations(node.optim, steps)
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value, e.g. optim.base_lr=1e-4")
        with _reported(f"override {item!r}", key):
            node = OmegaConf.merge(node, OmegaConf.from_dotlist([item]))
    return _to_config(node, f"--config {name_or_path}")


def _load_yaml(path: Path) -> DictConfig:
    """A YAML file on top of its ``base`` preset (without one, rad-dino); the recipe itself on the bare schema."""
    try:
        # OmegaConf's YAML loader, unlike PyYAML's, reads 1e-4 (no dot) as a float.
        raw = OmegaConf.to_container(OmegaConf.load(path))
    except (yaml.YAMLError, OmegaConfBaseException) as e:
        raise ValueError(f"{path}: not a valid YAML config: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    if path.resolve() == RECIPE.resolve():
        node = OmegaConf.structured(TrainConfig)  # every value MISSING until the recipe sets it
    else:
        base = raw.pop("base", RECIPE.stem)
        if base not in preset_names():
            raise ValueError(f"{path}: base {base!r} is not a preset ({', '.join(preset_names())})")
        node = _load_yaml(CONFIG_DIR / f"{base}.yaml")
    _update(node, raw, str(path))
    return node


def rescale_iterations(optim: OptimConfig, steps: int) -> None:
    """Lay the schedules out for ``steps`` iterations. ``optim`` may be the structured config's node (typed as
    OptimConfig), which checks each assignment."""
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    share = steps / optim.total_iters
    optim.warmup_iters = round(optim.warmup_iters * share)
    optim.freeze_last_layer_iters = round(optim.freeze_last_layer_iters * share)
    optim.warmup_teacher_temp_iters = round(optim.warmup_teacher_temp_iters * share)
    optim.total_iters = steps


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its ``to_dict()`` form (e.g. a saved config.yaml). It is read on top of the
    recipe, so that a key added since the file was written takes the recipe's value."""
    node = _load_yaml(RECIPE)
    _update(node, raw, "config dict")
    return _to_config(node, "config dict")


def to_yaml(cfg: TrainConfig) -> str:
    """The config as YAML (tuples as lists), as config.yaml holds it and --print-config prints it."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, to_yaml(cfg))


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """``key: old -> new`` for every setting of ``cfg`` that differs from a checkpoint's config.yaml."""
    if not saved.is_file():
        return []
    old = _flatten(yaml.safe_load(saved.read_text()) or {})
    new = _flatten(yaml.safe_load(to_yaml(cfg)))  # the form config.yaml holds: tuples as lists
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k) and k != "data.sources"]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


#: The values every number of the schema may take (a tuple's: each of its elements); NaN and infinity never pass.
#: `validate` checks them all, so an out-of-range value stops the run before anything is built, naming its key,
#: instead of hanging or failing steps later (a NaN lr, a batch of 0 images). The tests hold this table to every
#: numeric key of the schema.
RANGES: dict[str, Interval] = {
    "model.patch_size": AT_LEAST_1, "model.img_size": AT_LEAST_1, "model.depth": AT_LEAST_1,
    "model.num_register_tokens": AT_LEAST_0, "model.layerscale_init": AT_LEAST_0,
    "model.drop_path_rate": Interval(0, 1, high_open=True), "model.interpolate_offset": AT_LEAST_0,
    "head.out_dim": AT_LEAST_1, "head.hidden_dim": AT_LEAST_1, "head.bottleneck_dim": AT_LEAST_1,
    "head.nlayers": AT_LEAST_1,
    "loss.dino_weight": AT_LEAST_0, "loss.ibot_weight": AT_LEAST_0, "loss.koleo_weight": AT_LEAST_0,
    "loss.student_temp": POSITIVE, "loss.center_momentum": UNIT, "loss.mask_ratio_min_max": UNIT,
    "loss.mask_sample_probability": UNIT,
    "crops.global_size": AT_LEAST_1, "crops.local_size": AT_LEAST_1, "crops.n_local": AT_LEAST_0,
    "crops.global_scale": Interval(0, 1, low_open=True), "crops.local_scale": Interval(0, 1, low_open=True),
    "crops.mean": Interval(), "crops.std": POSITIVE, "crops.blur_p": UNIT,
    "optim.total_iters": AT_LEAST_1, "optim.batch_size_per_gpu": AT_LEAST_1, "optim.base_lr": POSITIVE,
    "optim.min_lr": AT_LEAST_0, "optim.warmup_iters": AT_LEAST_0, "optim.weight_decay": AT_LEAST_0,
    "optim.weight_decay_end": AT_LEAST_0, "optim.layerwise_decay": Interval(0, 1, low_open=True),
    "optim.patch_embed_lr_mult": AT_LEAST_0, "optim.clip_grad": AT_LEAST_0,
    "optim.freeze_last_layer_iters": AT_LEAST_0, "optim.momentum_teacher": UNIT,
    "optim.final_momentum_teacher": UNIT, "optim.teacher_temp": POSITIVE, "optim.warmup_teacher_temp": POSITIVE,
    "optim.warmup_teacher_temp_iters": AT_LEAST_0, "optim.adamw_betas": Interval(0, 1, high_open=True),
    "data.load_size": AT_LEAST_1, "data.num_workers": AT_LEAST_0,
    "run.seed": AT_LEAST_0, "run.log_every": AT_LEAST_1, "run.checkpoint_every": AT_LEAST_1,
    "run.keep_last": AT_LEAST_1, "run.collapse_window": AT_LEAST_1, "run.collapse_margin": OPEN_UNIT,
    "eval.every": AT_LEAST_0, "eval.seed": AT_LEAST_0, "eval.test_fraction": OPEN_UNIT,
    "eval.val_fraction": OPEN_UNIT,
}


def check_ranges(cfg: TrainConfig) -> None:
    """Every number of `cfg` within its RANGES entry (None, where the schema allows it, means "unset")."""
    for key, allowed in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        for x in value if isinstance(value, tuple) else (value,):
            if x is not None and (why := allowed.problem(x)):
                shown, each = (list(value), " (each value)") if isinstance(value, tuple) else (value, "")
                raise ValueError(f"{key}={shown}: {why}{each}")


def validate(cfg: TrainConfig) -> None:
    """Reject settings that would fail later, deep inside the loop, with a less helpful message."""
    check_ranges(cfg)
    c, o, l = cfg.crops, cfg.optim, cfg.loss
    if cfg.model.arch not in VIT_PRESETS:
        raise ValueError(f"model.arch={cfg.model.arch!r}: use one of {', '.join(VIT_PRESETS)}")
    for name, size in (("crops.global_size", c.global_size), ("crops.local_size", c.local_size)):
        if size % cfg.model.patch_size:
            raise ValueError(f"{name}={size} is not a multiple of model.patch_size={cfg.model.patch_size}")
    if l.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError(f"loss.centering={l.centering!r}: use 'centering' or 'sinkhorn_knopp'")
    if o.lr_scaling not in ("sqrt_wrt_1024", "none"):
        raise ValueError(f"optim.lr_scaling={o.lr_scaling!r}: use 'sqrt_wrt_1024' or 'none'")
    for name, (low, high) in (("loss.mask_ratio_min_max", l.mask_ratio_min_max),
                              ("crops.global_scale", c.global_scale), ("crops.local_scale", c.local_scale)):
        if low > high:
            raise ValueError(f"{name}=[{low}, {high}]: the first value must not exceed the second")
    if o.warmup_iters > o.total_iters:
        raise ValueError(f"optim.warmup_iters={o.warmup_iters} exceeds optim.total_iters={o.total_iters}; lower it "
                         "(e.g. to 10% of the run)")
    if l.koleo_weight > 0 and o.batch_size_per_gpu < 2:
        # KoLeo's nearest neighbour is undefined for one image per device (dinov2 koleo_loss.py, issue #314).
        raise ValueError("optim.batch_size_per_gpu=1 makes KoLeo undefined: use >= 2 or set loss.koleo_weight=0")
    # The harness's --global-pool values (baselines.registry.GLOBAL_POOLS), spelled out: the trainer does not
    # import the harness's side of the house to validate a config.
    bad = [p for p in cfg.eval.pools if p not in ("cls", "avg", "cls+avg")]
    if bad or not cfg.eval.pools:
        raise ValueError(f"eval.pools={list(cfg.eval.pools)}: a non-empty list of cls, avg, cls+avg")


def _update(node: DictConfig, raw: dict[str, Any], where: str) -> None:
    """Set each key of a mapping (a section's mapping, or a dotted key as in an override) on a structured config."""
    for key, value in raw.items():
        with _reported(where, str(key)):
            OmegaConf.update(node, str(key), value, merge=True)


def _to_config(node: DictConfig, where: str) -> TrainConfig:
    with _reported(where):
        cfg = typing.cast(TrainConfig, OmegaConf.to_object(node))  # the dataclasses, tuples as tuples
    validate(cfg)
    return cfg


@contextlib.contextmanager
def _reported(where: str, key: str | None = None) -> Iterator[None]:
    """OmegaConf's errors as a ValueError naming the file or override, the key, and what it expects."""
    try:
        yield
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or key
        if isinstance(e, MissingMandatoryValue):
            raise ValueError(f"{where}: {key} has no value; {RECIPE} must give every key of the schema one") \
                from None
        if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
            section = getattr(e, "object_type", None)
            known = (f"; known here: {', '.join(f.name for f in dataclasses.fields(section))}"
                     if dataclasses.is_dataclass(section) else "")
            raise ValueError(f"{where}: unknown key {key!r}{known}") from None
        hint = _field_type(key) if key and isinstance(e, ValidationError) else None
        if dataclasses.is_dataclass(hint):
            raise ValueError(f"{where}: {key!r} is a section; give a mapping or set its keys with dots") from None
        if hint is not None:
            raise ValueError(f"{where}: {key}: expected {hint.__name__ if isinstance(hint, type) else hint}") from None
        raise ValueError(f"{where}: {key + ': ' if key else ''}{str(e).splitlines()[0]}") from None


def _field_type(dotted: str) -> Any:
    """The declared type of a dotted key of TrainConfig; None when there is no such field."""
    hint: Any = TrainConfig
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(hint):
            return None
        hint = typing.get_type_hints(hint).get(part)
    return hint


def plain(obj: Any) -> Any:
    """Tuples -> lists so that yaml.safe_dump writes plain YAML (and safe_load reads it back)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
