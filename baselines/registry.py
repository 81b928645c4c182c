"""The encoder contract and the encoder registry: one table line per model.

An encoder is a frozen image model with a name, its native preprocessing as data and one method,
``encode(pixels) -> Features``. Adding a model is a factory in a new file of ``baselines/`` plus one line in the
`ENCODERS` table at the end of this file (nothing else imports it: the file is loaded the first time the model is
built or its weights are looked up):

    # baselines/my_model.py
    WEIGHTS = WeightFiles((("config.json", "model.safetensors"),), "hf download org/my-model --local-dir ...")

    def my_model(spec: EncoderSpec) -> Encoder:
        folder = spec.require_weights()          # raises WeightsMissing naming the folder and files
        ...
        return MyEncoder(...)

    # the table below
    ENCODERS.register("my-model", "baselines.my_model:my_model", weights="baselines.my_model:WEIGHTS",
                      description="what it is")

A model published on the Hugging Face hub names its repo(s) in its `WeightFiles`: its weights are then also found
in the user's Hugging Face cache (read offline), so nothing already downloaded there is fetched twice.

A factory whose weights are absent raises `WeightsMissing`; ``--models all`` turns that into a listed skip
("put these files in that folder"), never a silently random model.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from baselines.pooling import GLOBAL_POOLS, pool_global

#: The pooling every encoder is read with unless --global-pool says otherwise: chosen on the validation patients of
#: the Kermany task, never on a test split (docs/evaluate.md#global-pooling). Here, not in baselines.pooling, because
#: it is a choice, not extraction code: the pooling a feature was made with is in its cache key either way, and
#: changing the default must not invalidate features made with an explicit --global-pool.
#: `avg`: on the Kermany validation patients the mean-pooled patch tokens beat the CLS token, and the two
#: concatenated, for every encoder probed there (the step-0 weights, the five sweep runs and the long run's
#: checkpoints, and random-vit), with both probes (docs/pretraining.md, issue 19).
DEFAULT_GLOBAL_POOL = "avg"
from baselines.preprocess import Preprocess
from harness.common.sources import closure, sources_digest
from harness.registry import Entry, Registry, resolve

WEIGHTS_ENV = "RADDINO_BENCH_WEIGHTS"
#: Libraries an encoder's forward pass may run through: their version is part of its code digest when its code
#: imports them (torch's is part of every feature-cache key already).
FORWARD_LIBRARIES = ("open_clip", "timm", "transformers", "xformers")


class Features(NamedTuple):
    """What every encoder returns. ``global_`` is the image-level embedding [B, D]; ``patch`` the last layer's
    patch tokens as a grid [B, C, h, w]; ``layers`` optional intermediate grids (each [B, C_i, h_i, w_i]) for
    multi-level segmentation decoders, shallow to deep."""

    global_: torch.Tensor
    patch: torch.Tensor
    layers: tuple[torch.Tensor, ...] = ()


class Encoder(ABC):
    """A frozen encoder. Subclasses set `name`, `preprocess` and `weights_digest` and implement `encode`."""

    name: str
    preprocess: Preprocess
    #: Hash of the weights actually loaded (sha256 of the files, or of the seed for weight-free encoders);
    #: part of the feature-cache key and written into every results file.
    weights_digest: str
    #: Modules, besides the class's own, whose code computes the features: the forward function's (set by
    #: `ModuleEncoder`) and the factory's, which builds the model from the weights (added by `build_encoder`). With
    #: every module of this project they import, their sources are part of the feature-cache key (`code_digest`),
    #: so an edit to the pooling, the architecture or a weight conversion recomputes the features: the weights
    #: digest cannot tell.
    code_modules: tuple[str, ...] = ()
    device: torch.device = torch.device("cpu")
    #: Where the weight files were read from (``--weights-dir/<model>`` or a Hugging Face cache snapshot), for the
    #: user; not part of `identity`, so the same bytes found in another folder still hit the feature cache.
    weights_folder: Path | None = None
    #: The `GLOBAL_POOLS` entry `pooled` applies (set by `build_encoder`); part of `identity`, so each pooling has
    #: its own cached features and results.
    global_pool: str = DEFAULT_GLOBAL_POOL
    #: For an encoder whose tokens are not a ViT's, what each pooling reads (the leaderboard header shows it).
    pooling_note: str = ""
    #: Whether the patch grid holds features the encoder computed (tokens, or a CNN's feature map). False for
    #: `pixels`, whose "grid" is raw pixel blocks: the attentive probe does not apply to it.
    patch_tokens: bool = True

    @abstractmethod
    def encode(self, pixels: torch.Tensor) -> Features:
        """[B, C, H, W] preprocessed pixels (already on `self.device`) -> Features, under inference mode."""

    def to(self, device: torch.device | str) -> "Encoder":
        """Move the underlying modules; subclasses holding an ``nn.Module`` as ``self.model`` need not override."""
        self.device = torch.device(device)
        model = getattr(self, "model", None)
        if isinstance(model, torch.nn.Module):
            model.to(self.device)
        return self

    def parameter_count(self) -> int:
        """Parameters of the model the features are computed with, as loaded (0 for a weight-free transform); like
        `to`, read from ``self.model``, so a subclass holding its modules elsewhere overrides both."""
        model = getattr(self, "model", None)
        return sum(p.numel() for p in model.parameters()) if isinstance(model, torch.nn.Module) else 0

    def pooled(self, f: Features) -> Features:
        """`f` with its global feature replaced by the `global_pool` of its tokens (what the cache stores)."""
        return f._replace(global_=pool_global(f, self.global_pool))

    def code_digest(self) -> str:
        """Digest of the sources that compute this encoder's features (`code_modules` and the class's module, with
        the project modules they import, `harness.common.sources`) and of the versions of the libraries among
        `FORWARD_LIBRARIES` they import."""
        modules, packages = closure((type(self).__module__, *self.code_modules))
        return sources_digest(modules, set(packages) & set(FORWARD_LIBRARIES))

    def identity(self) -> dict:
        """Everything that determines the features, for the cache key and the results files."""
        return {
            "encoder": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "weights_digest": self.weights_digest,
            "code": self.code_digest(),
            "preprocess": self.preprocess.as_dict(),
            "global_pool": self.global_pool,
        }


class WeightsMissing(RuntimeError):
    """The encoder's weight files are not where they should be. Carries the folder and the expected files, and for
    a hub-hosted model the Hugging Face cache and repo ids also searched."""

    def __init__(self, model: str, folder: Path, expected: tuple[str, ...], hint: str = "",
                 hub_cache: Path | None = None, repos: tuple[str, ...] = ()):
        self.model, self.folder, self.expected = model, folder, expected
        self.hub_cache, self.repos = hub_cache, repos
        files = ", ".join(expected) if expected else "the files docs/encoders.md lists for it"
        msg = f"{model}: weights not found in {folder}; expected {files}"
        if hub_cache is not None and repos:
            msg += (f". Not in the Hugging Face cache {hub_cache} ($HF_HUB_CACHE, else $HF_HOME/hub) either: no "
                    f"complete snapshot of {' or '.join(repos)}")
        super().__init__(msg + (f". {hint}" if hint else ""))


class HubRepo(NamedTuple):
    """A Hugging Face hub repo publishing an encoder's weights: its id, which of the encoder's file layouts its
    snapshots hold, the ref the documented download names (preferred over other cached revisions), and whether it
    is gated (its files download only for a logged-in account that accepted the licence on the repo's page)."""

    repo_id: str
    layouts: tuple[tuple[str, ...], ...]
    ref: str = "main"
    gated: bool = False

    @property
    def page(self) -> str:
        """The repo's page on the hub, where a gated repo's licence is accepted."""
        return f"https://huggingface.co/{self.repo_id}"


@dataclass(frozen=True)
class WeightFiles:
    """Where an encoder's weights may be: `layouts` are the accepted file sets in ``<weights-dir>/<model>``, the
    documented one first; `hub` the repos whose cached snapshots are searched when that folder lacks them;
    `download` the command that fetches them; `accepts(folder, layout)` vetoes a layout whose files are present
    but in another format (timm's hub repos ship a timm-format ``config.json`` + ``model.safetensors``)."""

    layouts: tuple[tuple[str, ...], ...]
    download: str = ""
    hub: tuple[HubRepo, ...] = ()
    accepts: Callable[[Path, tuple[str, ...]], bool] | None = None

    @property
    def gated(self) -> tuple[HubRepo, ...]:
        """The gated repos among `hub`: the download fails until their licence is accepted."""
        return tuple(r for r in self.hub if r.gated)

    def complete(self, folder: Path, layouts: tuple[tuple[str, ...], ...] | None = None) -> tuple[str, ...] | None:
        """The first of `layouts` (default: all) wholly present in `folder` and accepted, or None."""
        if not folder.is_dir():
            return None
        for files in self.layouts if layouts is None else layouts:
            if all((folder / f).is_file() for f in files) and (self.accepts is None or self.accepts(folder, files)):
                return files
        return None


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, with huggingface_hub's precedence (``$HF_HUB_CACHE``, the legacy
    ``$HUGGINGFACE_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``), read from the environment
    at each call: huggingface_hub's own constant is frozen when it is first imported."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expandvars(os.environ[var])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return xdg / "huggingface" / "hub"


def hub_snapshot(repo: HubRepo, weights: WeightFiles, cache: Path) -> tuple[Path, tuple[str, ...]] | None:
    """A cached snapshot of `repo` holding one of its layouts completely, found by huggingface_hub from disk only
    (``snapshot_download(local_files_only=True)`` never reaches the network): the snapshot `repo.ref` points to if
    complete, else the newest complete one (a download of a newer revision that was cut short leaves the ref on an
    incomplete snapshot). None when there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    for revision in (repo.ref, *cached_commits(repo.repo_id, cache)):
        for files in repo.layouts:
            try:
                folder = Path(snapshot_download(repo.repo_id, revision=revision, cache_dir=cache,
                                                local_files_only=True, allow_patterns=list(files)))
            except LocalEntryNotFoundError:  # no such snapshot, or one huggingface_hub knows to lack a file
                continue
            # A file whose blob is gone is a dangling link, which `complete` does not count.
            if weights.complete(folder, (files,)):
                return folder, files
    return None


def cached_commits(repo_id: str, cache: Path) -> list[str]:
    """The commits of model `repo_id` that have a snapshot in the hub cache, newest first. Read from that repo's
    own folder: huggingface_hub's `scan_cache_dir` would stat every file of every repo in the cache, once per
    hub-hosted model of ``ls`` or ``--models all`` (measured in a fake cache on the project's 2-core machine at load
    average 11: 0.13 s for 20 small models, 1.4 s beside one 2,000-file dataset, against 0.16 ms for one
    `snapshot_download` lookup), and it leaves out a whole repo as corrupted when one of its files is a dangling
    link."""
    from huggingface_hub.file_download import repo_folder_name

    snapshots = cache / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots"
    if not snapshots.is_dir():
        return []
    folders = sorted((d for d in snapshots.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime, reverse=True)
    return [d.name for d in folders]


@dataclass(frozen=True)
class EncoderSpec:
    """What a factory is given: the registered name, an optional argument (``ckpt:DIR`` -> ``DIR``), the
    weights root, the input policy (native or harmonised) and where the weights may be."""

    name: str
    arg: str | None = None
    weights_dir: Path | None = None
    input_policy: str = "native"
    weights: WeightFiles | None = None
    folder_name: str = ""

    @property
    def folder(self) -> Path:
        """``<weights-dir>/<model>``: the folder the user fills by hand, searched first."""
        root = self.weights_dir if self.weights_dir is not None else default_weights_dir()
        return root / (self.folder_name or self.name)

    def locate(self) -> tuple[Path, tuple[str, ...]]:
        """The folder to load from and the layout found there: `folder` when it holds an accepted layout, else a
        complete snapshot of one of the hub repos in the Hugging Face cache; else WeightsMissing naming both places
        and the fetch command."""
        if self.weights is None:
            raise ValueError(f"encoder {self.name!r} was registered without weight files")
        w = self.weights
        files = w.complete(self.folder)
        if files is not None:
            return self.folder, files
        cache = hub_cache_dir()
        for repo in w.hub:
            hit = hub_snapshot(repo, w, cache)
            if hit is not None:
                return hit
        others = " | ".join(" + ".join(f) for f in w.layouts[1:])
        hint = f"Or instead: {others}. " if others else ""
        if w.gated:
            hint += (f"{self.name} is gated: accept its licence at {' or '.join(r.page for r in w.gated)}, logged in "
                     "to Hugging Face (hf auth login), before fetching. ")
        if w.download:
            hint += f"To fetch them (with internet access): {w.download}"
            if w.hub:
                hint += " (without --local-dir they land in the Hugging Face cache, which is searched too)"
        raise WeightsMissing(self.name, self.folder, w.layouts[0], hint=hint.strip(),
                             hub_cache=cache if w.hub else None, repos=tuple(r.repo_id for r in w.hub))

    def require_weights(self) -> Path:
        """The folder holding the model's weights (see `locate`)."""
        return self.locate()[0]

    def apply_policy(self, pre: Preprocess) -> Preprocess:
        if self.input_policy == "native":
            return pre
        if self.input_policy == "harmonised":
            return pre.harmonised()
        raise ValueError(f"unknown input policy {self.input_policy!r}; use 'native' or 'harmonised'")


def default_weights_dir() -> Path:
    """``$RADDINO_BENCH_WEIGHTS``, else ``$HF_HOME/raddino-bench``, else ``~/.cache/huggingface/raddino-bench``."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return hf_home / "raddino-bench"


@dataclass(frozen=True)
class EncoderEntry(Entry):
    """An encoder's table line. `weights`: where its files may be, either the lazy target of a `WeightFiles`
    (``"baselines.clip:WEIGHTS"``, read without building the model) or simply the files expected in
    ``<weights-dir>/<folder or name>``; empty for a weight-free encoder. `takes_arg` makes it a parametrised
    family spelled ``name:ARG`` (e.g. ``ckpt:/runs/exp1``), never part of ``--models all``. `licence`: the terms
    the weights are published under, as ``ls`` shows them (docs/encoders.md links each)."""

    weights: str | tuple[str, ...] = ()
    folder: str = ""
    takes_arg: bool = False
    licence: str = ""

    @property
    def weight_files(self) -> WeightFiles | None:
        if isinstance(self.weights, str):
            return resolve(self.weights)
        return WeightFiles((tuple(self.weights),)) if self.weights else None

    @property
    def expected_files(self) -> tuple[str, ...]:
        """The documented layout (what ``--list`` shows)."""
        files = self.weight_files
        return files.layouts[0] if files is not None else ()


ENCODERS: Registry[EncoderEntry] = Registry("encoder", EncoderEntry)


def resolve_names(models: str) -> list[str]:
    """``all`` -> every registered non-parametrised encoder, in table order; else the comma list."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    out: list[str] = []
    for n in names:
        if n == "all":
            out += [k for k, e in ENCODERS.entries.items() if not e.takes_arg]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def build_encoder(name: str, weights_dir: Path | None = None, input_policy: str = "native",
                  global_pool: str = DEFAULT_GLOBAL_POOL) -> Encoder:
    """Instantiate a registered encoder by its spelled name (``rad-dino``, ``ckpt:DIR``), reading its global feature
    through `global_pool`."""
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"unknown global pooling {global_pool!r}; choose one of {', '.join(GLOBAL_POOLS)}")
    base, _, arg = name.partition(":")
    entry = ENCODERS.get(base)
    if entry.takes_arg and not arg:
        raise ValueError(f"encoder {base!r} needs an argument: spell it {base}:ARG")
    if arg and not entry.takes_arg:
        raise ValueError(f"encoder {base!r} takes no argument (got {name!r})")
    spec = EncoderSpec(name=name, arg=arg or None, weights_dir=weights_dir, input_policy=input_policy,
                       weights=entry.weight_files, folder_name=entry.folder)
    encoder = entry.load()(spec)
    encoder.global_pool = global_pool
    # The factory's module builds the model from the weight files (key renames, configs): part of the code digest.
    encoder.code_modules = tuple(dict.fromkeys((*encoder.code_modules, entry.target.partition(":")[0])))
    return encoder


def weights_status(name: str, weights_dir: Path | None = None) -> str:
    """Where a registered encoder's weights would be loaded from, found without loading them (for ``--list``):
    ``present in FOLDER``, ``missing: MESSAGE`` (the WeightsMissing text: places searched, the fetch command), or
    why the question does not apply."""
    entry = ENCODERS.get(name)
    if entry.takes_arg:
        return f"given as {name}:ARG"
    weights = entry.weight_files
    if weights is None:
        return "none needed"
    spec = EncoderSpec(name=name, weights_dir=weights_dir, weights=weights, folder_name=entry.folder)
    try:
        folder, _ = spec.locate()
    except WeightsMissing as e:
        return f"missing: {e}"
    return f"present in {folder}"


# --- the table: one line per encoder, in the order of --list and --models all ------------------------------------
# `licence` is what ``ls`` shows; docs/encoders.md links each one.
ENCODERS.register("pixels", "baselines.floors:pixels", description="the downsampled image itself (weight-free floor)")
ENCODERS.register("random-vit", "baselines.floors:random_vit",
                  description="ViT-S/14, fixed seed, random weights (weight-free floor)")
ENCODERS.register("rad-dino", "baselines.rad_dino:rad_dino", weights="baselines.rad_dino:WEIGHTS", licence="MIT",
                  description="RAD-DINO ViT-B/14 (transformers Dinov2Model folder).")
ENCODERS.register("dinov2-base", "baselines.dinov2:dinov2_base", weights="baselines.dinov2:WEIGHTS",
                  licence="Apache-2.0",
                  description="DINOv2 ViT-B/14, ImageNet-domain (transformers folder or official .pth).")
ENCODERS.register("clip", "baselines.clip:clip", weights="baselines.clip:WEIGHTS", licence="MIT",
                  description="OpenAI CLIP ViT-B/16 image tower (transformers folder or open_clip checkpoint).")
ENCODERS.register("biomedclip", "baselines.biomedclip:biomedclip", weights="baselines.biomedclip:WEIGHTS",
                  licence="MIT", description="BiomedCLIP ViT-B/16 image tower (open_clip folder, vision tower only).")
ENCODERS.register("biovil-t", "baselines.biovil_t:biovil_t", weights="baselines.biovil_t:WEIGHTS", licence="MIT",
                  description="BioViL-T ResNet-50 image encoder (hi-ml-multimodal checkpoint), single-image path.")
ENCODERS.register("mrm", "baselines.mrm:mrm", weights="baselines.mrm:WEIGHTS", licence="MIT (code repository)",
                  description="MRM ViT-B/16 (MRM.pth), CLS after the pretrained final norm.")
ENCODERS.register("rad-dino-maira-2", "baselines.rad_dino:rad_dino", weights="baselines.rad_dino_maira_2:WEIGHTS",
                  licence="MSRLA", description="RAD-DINO-MAIRA-2 ViT-B/14, RAD-DINO trained on more data.")
ENCODERS.register("cxformer-base", "baselines.cxformer:cxformer", weights="baselines.cxformer:WEIGHTS_BASE",
                  licence="CC-BY-NC-4.0", description="CXformer-B: DINOv2 ViT-B/14 + 4 registers on CXR, 518 px.")
ENCODERS.register("cxformer-small", "baselines.cxformer:cxformer", weights="baselines.cxformer:WEIGHTS_SMALL",
                  licence="CC-BY-NC-4.0", description="CXformer-S: DINOv2 ViT-S/14 + 4 registers on CXR, 518 px.")
ENCODERS.register("medsiglip-448", "baselines.medsiglip:medsiglip", weights="baselines.medsiglip:WEIGHTS",
                  licence="HAI-DEF terms", description="MedSigLIP-448 SigLIP-400M vision tower, MAP-pooled global.")
ENCODERS.register("dinov2-base-reg4", "baselines.dinov2_reg4:dinov2_base_reg4", weights="baselines.dinov2_reg4:WEIGHTS",
                  licence="Apache-2.0", description="DINOv2 ViT-B/14 + 4 registers, ImageNet-domain control.")
ENCODERS.register("dinov3-vitb16", "baselines.dinov3:dinov3_vitb16", weights="baselines.dinov3:WEIGHTS",
                  licence="DINOv3 License", description="DINOv3 ViT-B/16 + 4 registers, RoPE, natural-image control.")
ENCODERS.register("ckpt", "baselines.ckpt:ckpt", takes_arg=True,
                  description="teacher of a raddino-bench training run: ckpt:RUN_OR_CKPT_DIR")
