"""Loading Hugging Face ``transformers`` folders offline, and turning their outputs into Features.

Offline is per call (``local_files_only=True`` on a local folder), never ``HF_HUB_OFFLINE`` in ``os.environ``: that
would change every other Hugging Face user in the process, and huggingface_hub reads it only once, at import."""
from __future__ import annotations

from pathlib import Path

import torch

from baselines._common import layer_indices, tokens_to_grid
from baselines.registry import Features


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


def dinov2_features(model: torch.nn.Module, pixels: torch.Tensor) -> Features:
    """transformers ``Dinov2Model``: global = ``pooler_output`` (the final-normed CLS), patch = final-normed patch
    tokens; layers = four intermediate blocks passed through the same final norm (as DINOv2's
    ``get_intermediate_layers(norm=True)``)."""
    p = model.config.patch_size
    h, w = pixels.shape[-2] // p, pixels.shape[-1] // p
    out = model(pixel_values=pixels, output_hidden_states=True)
    # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of block i (before the final norm).
    layers = tuple(tokens_to_grid(model.layernorm(out.hidden_states[i + 1])[:, 1:], h, w)
                   for i in layer_indices(model.config.num_hidden_layers))
    return Features(out.pooler_output, tokens_to_grid(out.last_hidden_state[:, 1:], h, w), layers)


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
