"""Training configuration: typed dataclasses, two presets, YAML files and dotted ``key=value`` overrides.

Resolution order: preset (or YAML file, which may name a ``base`` preset) -> ``key=value`` overrides -> ``--steps``.
The resolved config is written beside the checkpoints as ``config.yaml`` and is enough to rebuild the backbone.

Iteration counts are explicit: DINOv2 calls 1250 iterations an "epoch" (reference §1.7, OFFICIAL_EPOCH_LENGTH),
which is not a pass over the data; here every schedule length is given in iterations.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class ModelConfig:
    arch: str = "vit_base"                  # trainer.vit preset: vit_tiny | vit_small | vit_base
    patch_size: int = 14
    img_size: int = 518                     # position-embedding grid size (37x37 at 518/14, as RAD-DINO)
    depth: int | None = None                # None: the preset's depth (tests shrink it)
    num_register_tokens: int = 0            # RAD-DINO has none (reference §3)
    layerscale_init: float | None = 1e-5
    drop_path_rate: float = 0.3             # uniform over blocks (reference §1.7)
    interpolate_offset: float = 0.1         # 0.1 for the register-free DINOv2/RAD-DINO checkpoints (§1.2)
    interpolate_antialias: bool = False
    pretrained: str | None = None           # DINOv2 backbone state dict / HF folder to continue from
    pretrained_head: str | None = None      # DINO head safetensors (e.g. RAD-DINO's dino_head.safetensors)


@dataclass
class HeadConfig:
    out_dim: int = 65536                    # K; RAD-DINO's released head has 65 536 prototypes (§2.2)
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3
    # Keep the prototypes' weight-norm gains at 1 (DINO v1's norm_last_layer); DINOv2 trains and decays them.
    freeze_prototype_gain: bool = False


@dataclass
class LossConfig:
    dino_weight: float = 1.0                # reference §1.4: dino 1.0, ibot 1.0, koleo 0.1
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    centering: str = "centering"            # "centering" (softmax, EMA centre) | "sinkhorn_knopp"
    student_temp: float = 0.1
    center_momentum: float = 0.9
    mask_ratio_min_max: tuple[float, float] = (0.1, 0.5)
    mask_sample_probability: float = 0.5


@dataclass
class CropConfig:
    global_size: int = 518
    local_size: int = 98                    # a multiple of patch 14 (reference §1.6: 98 rather than 96)
    n_local: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    mean: float = 0.5307                    # RAD-DINO's processor statistics (reference §3), grey -> 3 channels
    std: float = 0.2583
    # Blur probabilities (global 1, global 2, locals) as DINOv2 intended. Upstream inverts them (reference §1.6,
    # dinov2 PR #411), so DINOv2/RAD-DINO were trained with (0.0, 0.9, 0.5): set that to reproduce them.
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)


@dataclass
class OptimConfig:
    total_iters: int = 125_000              # 100 DINOv2 "epochs" of 1250 iterations
    batch_size_per_gpu: int = 64
    base_lr: float = 4e-3                   # per 1024 images, sqrt-scaled by the total batch (§1.7)
    lr_scaling: str = "sqrt_wrt_1024"       # "sqrt_wrt_1024" | "none"
    min_lr: float = 1e-6
    warmup_iters: int = 12_500
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    clip_grad: float = 3.0
    freeze_last_layer_iters: int = 1250
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 37_500  # 30 "epochs"
    adamw_betas: tuple[float, float] = (0.9, 0.999)

    def scaled_lr(self, world_size: int) -> float:
        """The peak learning rate for this run's total batch (DINOv2's scaling rule, applied once)."""
        if self.lr_scaling == "none":
            return self.base_lr
        return self.base_lr * math.sqrt(self.batch_size_per_gpu * world_size / 1024.0)


@dataclass
class DataConfig:
    sources: list[str] = field(default_factory=list)  # manifests, each "PATH" or "PATH@WEIGHT" (see trainer.data)
    load_size: int | None = None            # images are resized to this square before cropping;
                                            # None: the global crop size
    num_workers: int = 4
    skip_bad: bool = False
    cache_images: bool = False              # keep decoded images in memory (small data sets only)


@dataclass
class RunConfig:
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 1250
    keep_last: int = 3
    save_initial: bool = True               # write the step-0 weights to RUN/init (the "did it learn?" baseline)
    device: str = "auto"                    # "auto" | "cpu" | "cuda"
    bf16: bool = True                       # bf16 autocast on CUDA (no grad scaler needed); ignored on CPU
    # Collapse watch (trainer.diagnostics): warn when the teacher's CLS target entropy stays within
    # collapse_margin * ln K of ln K (uniform) or of 0 (one prototype) for collapse_window logged steps.
    collapse_window: int = 10
    collapse_margin: float = 0.01
    stop_on_collapse: bool = False          # opt-in: checkpoint and stop a collapsed run instead of warning


@dataclass
class EvalConfig:
    """The in-training probe (trainer.monitor): a labelled harness task the teacher is probed on while it trains."""
    task: str | None = None                 # a harness task spec: csv:PATH/labels.csv, demo, vindr, ...
    every: int = 0                          # probe every N iterations (and before the first and after the last);
                                            # 0: only before the first and after the last
    data_root: str | None = None            # harness --data-root for registered datasets (DIR or NAME=DIR)
    seed: int = 0                           # the harness's split seed and probe seed (its default)
    test_fraction: float = 0.3              # the harness's default


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


def smoke() -> TrainConfig:
    """A tiny run for CPUs: vit_tiny width with 4 blocks, 112 px globals, two 56 px locals, a small head.

    Measured: about 3 steps/s (24 images/s) on one busy core of a 2-core machine (OMP_NUM_THREADS=1).
    """
    cfg = TrainConfig()
    cfg.model = ModelConfig(arch="vit_tiny", depth=4, img_size=112, drop_path_rate=0.0)
    cfg.head = HeadConfig(out_dim=1024, hidden_dim=256, bottleneck_dim=64)
    cfg.crops = CropConfig(global_size=112, local_size=56, n_local=2)
    cfg.optim = OptimConfig(total_iters=1000, batch_size_per_gpu=8, base_lr=1e-3, lr_scaling="none",
                            warmup_iters=100, freeze_last_layer_iters=20, warmup_teacher_temp_iters=300)
    cfg.loss = LossConfig(centering="sinkhorn_knopp")  # balanced targets even for small batches (§5.2)
    cfg.data = DataConfig(num_workers=1, cache_images=True)
    cfg.run = RunConfig(log_every=10, checkpoint_every=200, keep_last=2)
    return cfg


def small() -> TrainConfig:
    """A recipe that learns from about 1k-20k radiographs on a CPU box or one GPU (README "Does it learn?").

    The smoke geometry (vit_tiny width, 4 blocks, 112 px globals, 56 px locals) with the changes the sweep on the
    shared radiographs points to. The first two are each necessary (runs s01 and s06 of the README's table: either
    one alone leaves the teacher's targets uniform); the third is DINO v1's advice for small runs, not ablated:
    - no LayerScale: with DINOv2's 1e-5 every block starts as the identity, the normed CLS token is the same for
      every image (teacher feature std 0.0000 at step 1), and the DINO targets are uniform from the first step;
    - K = 256 prototypes for 32 images a step: Sinkhorn-Knopp spreads each image over at least K / (2 x batch)
      prototypes, so K = 1024 with batch 8 forces targets within a nat of ln K whatever the features say;
    - a sharper, constant teacher temperature (0.04), a slower teacher (momentum 0.996 -> 1) and prototypes of unit
      norm (their gains cannot decay), as DINO v1 recommends for small, unstable runs.
    On a GPU scale the geometry, not the recipe: model.arch=vit_small model.depth=12 model.img_size=224
    crops.global_size=224 crops.local_size=98 (and keep K / batch near 256 / 32, or raise the batch with K).
    """
    cfg = smoke()
    cfg.model.layerscale_init = None
    cfg.head = HeadConfig(out_dim=256, hidden_dim=256, bottleneck_dim=64, freeze_prototype_gain=True)
    cfg.optim = OptimConfig(total_iters=3000, batch_size_per_gpu=32, base_lr=1e-3, lr_scaling="none",
                            warmup_iters=300, freeze_last_layer_iters=60, momentum_teacher=0.996,
                            teacher_temp=0.04, warmup_teacher_temp=0.04, warmup_teacher_temp_iters=0)
    cfg.run = RunConfig(log_every=10, checkpoint_every=500, keep_last=2)
    cfg.eval = EvalConfig(every=500)
    return cfg


def rad_dino() -> TrainConfig:
    """ViT-B/14 at 518 px with the DINOv2 default recipe (reference §1.7) and RAD-DINO's geometry/statistics.

    RAD-DINO's own override file (vitb14_cxr.yaml) is not readable here (reference §2.2), so the optimiser values
    are DINOv2's defaults; override them on the command line when the paper's values are known.
    """
    return TrainConfig()


PRESETS = {"smoke": smoke, "small": small, "rad-dino": rad_dino}


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), steps: int | None = None) -> TrainConfig:
    """A preset name or a YAML file (optionally ``base: <preset>``), then ``steps``, then ``key=value`` overrides.

    ``steps`` lays the schedules out for that many iterations: the warm-ups and the last-layer freeze keep their
    share of the run (as DINOv2 "compresses" its schedules for a short phase, reference §1.7). Overrides come
    last, so an explicit ``optim.warmup_iters=...`` wins.
    """
    if name_or_path in PRESETS:
        cfg = PRESETS[name_or_path]()
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise ValueError(f"--config {name_or_path!r}: neither a preset ({', '.join(PRESETS)}) nor a YAML file")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
        base = raw.pop("base", "rad-dino")
        if base not in PRESETS:
            raise ValueError(f"{path}: base {base!r} is not a preset ({', '.join(PRESETS)})")
        cfg = PRESETS[base]()
        _merge(cfg, raw, where=str(path))
    if steps is not None:
        rescale_iterations(cfg.optim, steps)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value, e.g. optim.base_lr=1e-4")
        _set_dotted(cfg, key.strip(), yaml.safe_load(value), where=f"override {item!r}")
    validate(cfg)
    return cfg


def rescale_iterations(optim: OptimConfig, steps: int) -> None:
    if steps < 1:
        raise ValueError(f"--steps {steps}: must be >= 1")
    share = steps / optim.total_iters
    optim.warmup_iters = round(optim.warmup_iters * share)
    optim.freeze_last_layer_iters = round(optim.freeze_last_layer_iters * share)
    optim.warmup_teacher_temp_iters = round(optim.warmup_teacher_temp_iters * share)
    optim.total_iters = steps


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig from its ``to_dict()`` form (e.g. a saved config.yaml)."""
    cfg = TrainConfig()
    _merge(cfg, raw, where="config dict")
    validate(cfg)
    return cfg


def save_config(cfg: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(plain(cfg.to_dict()), sort_keys=False))
    tmp.replace(path)


def validate(cfg: TrainConfig) -> None:
    """Reject settings that would fail later, deep inside the loop, with a less helpful message."""
    c, o, l = cfg.crops, cfg.optim, cfg.loss
    for name, size in (("crops.global_size", c.global_size), ("crops.local_size", c.local_size)):
        if size % cfg.model.patch_size:
            raise ValueError(f"{name}={size} is not a multiple of model.patch_size={cfg.model.patch_size}")
    if l.centering not in ("centering", "sinkhorn_knopp"):
        raise ValueError(f"loss.centering={l.centering!r}: use 'centering' or 'sinkhorn_knopp'")
    if o.lr_scaling not in ("sqrt_wrt_1024", "none"):
        raise ValueError(f"optim.lr_scaling={o.lr_scaling!r}: use 'sqrt_wrt_1024' or 'none'")
    if o.total_iters < 1:
        raise ValueError(f"optim.total_iters={o.total_iters} must be >= 1")
    if l.koleo_weight > 0 and o.batch_size_per_gpu < 2:
        # KoLeo's nearest neighbour is undefined for one image per device (reference §1.4, dinov2 issue #314).
        raise ValueError("optim.batch_size_per_gpu=1 makes KoLeo undefined: use >= 2 or set loss.koleo_weight=0")
    if cfg.run.collapse_window < 1 or not 0 < cfg.run.collapse_margin < 1:
        raise ValueError(f"run.collapse_window={cfg.run.collapse_window} must be >= 1 and run.collapse_margin="
                         f"{cfg.run.collapse_margin} in (0, 1)")
    if cfg.eval.every < 0 or not 0 < cfg.eval.test_fraction < 1:
        raise ValueError(f"eval.every={cfg.eval.every} must be >= 0 and eval.test_fraction="
                         f"{cfg.eval.test_fraction} in (0, 1)")
    if cfg.run.keep_last < 1:
        raise ValueError(f"run.keep_last={cfg.run.keep_last} must be >= 1")


def _merge(obj: Any, raw: dict[str, Any], where: str) -> None:
    for key, value in raw.items():
        _set_dotted(obj, key, value, where)


def _set_dotted(obj: Any, dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        obj = _field_value(obj, part, dotted, where)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if leaf not in fields:
        raise ValueError(f"{where}: unknown key {dotted!r}; known here: {', '.join(fields)}")
    current = getattr(obj, leaf)
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: {dotted!r} is a section; give a mapping or set its keys with dots")
        _merge(current, value, where)
        return
    hint = typing.get_type_hints(type(obj))[leaf]
    setattr(obj, leaf, _coerce(value, hint, f"{where}: {dotted}"))


def _field_value(obj: Any, part: str, dotted: str, where: str) -> Any:
    if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"{where}: unknown key {dotted!r}")
    return getattr(obj, part)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert: int -> float, list -> tuple) a YAML value against a field's type hint."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a path that YAML read as a number
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ValueError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")
    return value


def plain(obj: Any) -> Any:
    """Tuples -> lists so that yaml.safe_dump writes plain YAML (and safe_load reads it back)."""
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj
