"""The encoder contract and the registry every encoder family adds itself to.

An encoder is a frozen image model with a name, its native preprocessing as data and one method,
``encode(pixels) -> Features``. Adding a model is one decorated factory in a new file of ``baselines/`` plus its
import line in ``baselines/__init__.py``:

    @register_encoder("my-model", weights=("config.json", "model.safetensors"))
    def my_model(spec: EncoderSpec) -> Encoder:
        folder = spec.require_weights()          # raises WeightsMissing naming the folder and files
        ...
        return MyEncoder(...)

A factory whose weights are absent raises `WeightsMissing`; ``--models all`` turns that into a listed skip
("put these files in that folder"), never a silently random model.
"""
from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from baselines.preprocess import Preprocess

WEIGHTS_ENV = "RADDINO_BENCH_WEIGHTS"


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
    #: Bump in a subclass whenever its `encode` changes what it computes (pooling, layers taken, a fix): cached
    #: features of the old code then stop matching, as the weights digest cannot tell.
    code_version: str = "1"
    device: torch.device = torch.device("cpu")

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

    def identity(self) -> dict:
        """Everything that determines the features, for the cache key and the results files."""
        return {
            "encoder": self.name,
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "weights_digest": self.weights_digest,
            "code_version": self.code_version,
            "preprocess": self.preprocess.as_dict(),
        }


class WeightsMissing(RuntimeError):
    """The encoder's weight files are not where they should be. Carries the folder and the expected files."""

    def __init__(self, model: str, folder: Path, expected: tuple[str, ...], hint: str = ""):
        self.model, self.folder, self.expected = model, folder, expected
        files = ", ".join(expected) if expected else "(see README)"
        msg = f"{model}: weights not found in {folder}; expected {files}"
        super().__init__(msg + (f". {hint}" if hint else ""))


@dataclass(frozen=True)
class EncoderSpec:
    """What a factory is given: the registered name, an optional argument (``ckpt:DIR`` -> ``DIR``), the
    weights root and the input policy (native or harmonised)."""

    name: str
    arg: str | None = None
    weights_dir: Path | None = None
    input_policy: str = "native"
    expected_files: tuple[str, ...] = ()
    folder_name: str = ""

    @property
    def folder(self) -> Path:
        root = self.weights_dir if self.weights_dir is not None else default_weights_dir()
        return root / (self.folder_name or self.name)

    def require_weights(self) -> Path:
        """The model's weight folder, after checking every expected file is present."""
        folder = self.folder
        missing = [f for f in self.expected_files if not (folder / f).exists()]
        if not folder.is_dir() or missing:
            raise WeightsMissing(self.name, folder, self.expected_files)
        return folder

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
class _Entry:
    factory: Callable[[EncoderSpec], Encoder]
    expected_files: tuple[str, ...]
    folder_name: str
    takes_arg: bool
    needs_weights: bool
    description: str = field(default="")


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(
    name: str,
    *,
    weights: tuple[str, ...] = (),
    folder: str = "",
    takes_arg: bool = False,
    description: str = "",
) -> Callable[[Callable[[EncoderSpec], Encoder]], Callable[[EncoderSpec], Encoder]]:
    """Register a factory under `name`. `weights` lists the files expected in ``<weights-dir>/<folder or name>``;
    `takes_arg` makes it a parametrised family spelled ``name:ARG`` (e.g. ``ckpt:/runs/exp1``), never part of
    ``--models all``."""

    def deco(factory: Callable[[EncoderSpec], Encoder]) -> Callable[[EncoderSpec], Encoder]:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} registered twice")
        doc = description or ((factory.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = _Entry(factory, tuple(weights), folder or name, takes_arg, bool(weights), doc)
        return factory

    return deco


def registered() -> dict[str, _Entry]:
    return dict(_REGISTRY)


def resolve_names(models: str) -> list[str]:
    """``all`` -> every registered non-parametrised encoder, in registration order; else the comma list."""
    names = [m.strip() for m in models.split(",") if m.strip()]
    out: list[str] = []
    for n in names:
        if n == "all":
            out += [k for k, e in _REGISTRY.items() if not e.takes_arg]
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def build_encoder(name: str, weights_dir: Path | None = None, input_policy: str = "native") -> Encoder:
    """Instantiate a registered encoder by its spelled name (``rad-dino``, ``ckpt:DIR``)."""
    base, _, arg = name.partition(":")
    entry = _REGISTRY.get(base)
    if entry is None:
        known = ", ".join(sorted(_REGISTRY))
        raise KeyError(f"unknown encoder {name!r}; registered: {known}")
    if entry.takes_arg and not arg:
        raise ValueError(f"encoder {base!r} needs an argument: spell it {base}:ARG")
    if arg and not entry.takes_arg:
        raise ValueError(f"encoder {base!r} takes no argument (got {name!r})")
    spec = EncoderSpec(name=name, arg=arg or None, weights_dir=weights_dir, input_policy=input_policy,
                       expected_files=entry.expected_files, folder_name=entry.folder_name)
    return entry.factory(spec)


def sha256_files(paths: list[Path], chunk: int = 1 << 20) -> str:
    """Digest of several files' bytes, in the order given (file names are not part of it)."""
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return h.hexdigest()
