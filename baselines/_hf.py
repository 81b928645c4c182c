"""Loading Hugging Face ``transformers`` folders offline, and turning their outputs into Features.

Offline is per call (``local_files_only=True`` on a local folder), never ``HF_HUB_OFFLINE`` in ``os.environ``: that
would change every other Hugging Face user in the process, and huggingface_hub reads it only once, at import."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from baselines._common import layer_indices, tokens_to_grid
from baselines.registry import Features


class ConfigMismatch(ValueError):
    """A weights folder whose ``config.json`` describes another architecture than the encoder's (another model type,
    patch size, input size or number of register tokens): loaded anyway, it would give another model's features
    under this encoder's name, or fail deep inside the forward pass."""


def from_folder(cls_name: str, folder: Path, config=None) -> torch.nn.Module:
    """``transformers.<cls_name>.from_pretrained(folder)`` from local files only, in eval mode, float32. A weight the
    architecture needs but the file lacks (or has in another shape) is an error: transformers would otherwise
    initialise it at random with only a log line."""
    import transformers

    cls = getattr(transformers, cls_name)
    kwargs = {"config": config} if config is not None else {}
    model, info = cls.from_pretrained(str(folder), local_files_only=True, use_safetensors=True,
                                      output_loading_info=True, **kwargs)
    bad = list(info.get("missing_keys", ())) + [str(m) for m in info.get("mismatched_keys", ())]
    if bad:
        raise ValueError(f"{folder}: weights missing or mis-shaped for {cls_name}: {sorted(bad)[:8]}")
    return model.float().eval()


def checked_config(folder: Path, model: str, config_cls: str, model_types: tuple[str, ...],
                   expected: Mapping[str, object]):
    """The transformers `config_cls` of `folder`, once its ``config.json`` is known to be of one of `model_types`
    (read as JSON first: transformers would load another type with a warning and this class's defaults) and each
    `expected` attribute, as transformers reads it (defaults included), has its value; else ConfigMismatch naming
    the folder and every field that differs."""
    import transformers

    raw = json.loads((folder / "config.json").read_text())
    if raw.get("model_type") not in model_types:
        raise ConfigMismatch(f"{model}: {folder / 'config.json'} is a {raw.get('model_type')!r} model, not "
                             f"{' or '.join(map(repr, model_types))}; put {model}'s own files in this folder")
    cls = getattr(transformers, config_cls, None)
    if cls is None:
        raise ConfigMismatch(f"{model}: transformers {transformers.__version__} has no {config_cls}; upgrade it "
                             "(pip install -U transformers)")
    config = cls.from_pretrained(str(folder), local_files_only=True)
    wrong = {k: getattr(config, k, None) for k, v in expected.items() if getattr(config, k, None) != v}
    if wrong:
        found = ", ".join(f"{k}={v!r} (expected {expected[k]!r})" for k, v in wrong.items())
        raise ConfigMismatch(f"{model}: {folder / 'config.json'} describes another architecture: {found}")
    return config


def _cls_prefix_features(model: torch.nn.Module, pixels: torch.Tensor, norm: torch.nn.Module) -> Features:
    """A transformers ViT whose sequence is [CLS, registers..., patches] and whose ``pooler_output`` is its
    final-normed CLS: global = that, patch = the final-normed patch tokens (register tokens dropped), layers = four
    intermediate blocks passed through the same final `norm` (as DINOv2's ``get_intermediate_layers(norm=True)``)."""
    p = model.config.patch_size
    h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
    first = 1 + getattr(model.config, "num_register_tokens", 0)  # a plain Dinov2Config has no registers
    out = model(pixel_values=pixels, output_hidden_states=True)
    # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i (before the final norm).
    layers = tuple(tokens_to_grid(norm(out.hidden_states[i + 1])[:, first:], h, w)
                   for i in layer_indices(model.config.num_hidden_layers))
    return Features(out.pooler_output, tokens_to_grid(out.last_hidden_state[:, first:], h, w), layers)


def dinov2_features(model: torch.nn.Module, pixels: torch.Tensor) -> Features:
    """transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel`` (`_cls_prefix_features`, norm ``layernorm``)."""
    return _cls_prefix_features(model, pixels, model.layernorm)


def dinov3_features(model: torch.nn.Module, pixels: torch.Tensor) -> Features:
    """transformers ``DINOv3ViTModel`` (`_cls_prefix_features`, norm ``norm``); its RoPE needs no position grid."""
    return _cls_prefix_features(model, pixels, model.norm)


def siglip_features(model: torch.nn.Module, pixels: torch.Tensor) -> Features:
    """transformers ``SiglipVisionModel``: global = ``pooler_output``, the multi-head attention pooling (MAP) head's
    embedding of the tokens (SigLIP has no CLS token); patch = ``last_hidden_state``, already after
    ``post_layernorm``; layers = four intermediate blocks through that same norm."""
    p = model.config.patch_size
    h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
    out = model(pixel_values=pixels, output_hidden_states=True)
    layers = tuple(tokens_to_grid(model.post_layernorm(out.hidden_states[i + 1]), h, w)
                   for i in layer_indices(model.config.num_hidden_layers))
    return Features(out.pooler_output, tokens_to_grid(out.last_hidden_state, h, w), layers)


def clip_features(model: torch.nn.Module, pixels: torch.Tensor) -> Features:
    """transformers ``CLIPVisionModelWithProjection``: global = ``image_embeds`` (projected, post-layernormed CLS,
    512-d for ViT-B/16, what CLIP compares with text). ``last_hidden_state`` is *before* ``post_layernorm``; the patch
    grid gets that norm applied so it matches open_clip's tokens and every other encoder's final-normed patches."""
    vm = model.vision_model
    p = vm.config.patch_size
    h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
    out = model(pixel_values=pixels, output_hidden_states=True)
    norm = vm.post_layernorm
    layers = tuple(tokens_to_grid(norm(out.hidden_states[i + 1])[:, 1:], h, w)
                   for i in layer_indices(vm.config.num_hidden_layers))
    return Features(out.image_embeds, tokens_to_grid(norm(out.last_hidden_state)[:, 1:], h, w), layers)
