"""BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224): a CLIP trained on PubMed figure-caption
pairs. Only its image tower is built.

open_clip would build the text tower too, and that fetches the PubMedBERT config from the Hub; instead the
``visual.trunk.*`` weights (a timm ``vit_base_patch16_224``: CLS token, final norm, ``global_pool='token'``) go into
our trainer's ViT (`trainer.vit`, which uses timm's parameter names) and ``visual.head.proj.weight`` into the 768->512
projection, so no text config is ever read and neither open_clip nor torchvision is imported. The parity test checks
this against open_clip's ``TimmModel``.

Global = ``encode_image``: the projected final-normed CLS (512); patch = final-normed patch tokens (768, 14x14 at
224). Native preprocessing (``open_clip_config.json``): shortest edge 224 bicubic, centre-crop 224, OpenAI mean/std.
"""
from __future__ import annotations

import json
from pathlib import Path

from baselines._common import (CLIP_MEAN, CLIP_STD, ModuleEncoder, ProjectedViT, load_exact, projected_vit_features,
                               read_state_dict, timm_vit_config)
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=224, policy="resize_shortest_crop", interpolation="bicubic", mean=CLIP_MEAN, std=CLIP_STD,
                    channels=3)
FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin")
DOWNLOAD = ("hf download microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 open_clip_config.json "
            "open_clip_pytorch_model.bin --local-dir <weights-dir>/biomedclip")
WEIGHTS = WeightFiles((FILES,), DOWNLOAD,
                      hub=(HubRepo("microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", (FILES,)),))


def check_config(path: Path) -> None:
    """Refuse an open_clip config whose image tower is not the one this loader re-implements."""
    vision = json.loads(path.read_text()).get("model_cfg", {}).get("vision_cfg", {})
    name, pool, proj = vision.get("timm_model_name", ""), vision.get("timm_pool", ""), vision.get("timm_proj", "")
    if not name.startswith("vit_") or pool not in ("", "token") or proj != "linear" or vision.get("timm_proj_bias"):
        raise ValueError(f"{path}: expected a timm ViT tower with token pooling and a bias-free linear projection "
                         f"(BiomedCLIP), got timm_model_name={name!r} timm_pool={pool!r} timm_proj={proj!r}")


def load_biomedclip(folder: Path) -> ProjectedViT:
    check_config(folder / FILES[0])
    path = folder / FILES[1]
    state = read_state_dict(path)
    trunk_state = {k[len("visual.trunk."):]: v for k, v in state.items() if k.startswith("visual.trunk.")}
    if not trunk_state or "visual.head.proj.weight" not in state:
        raise ValueError(f"{path}: no visual.trunk.* / visual.head.proj.weight keys (not a BiomedCLIP checkpoint?)")
    proj = state["visual.head.proj.weight"]
    model = ProjectedViT(timm_vit_config(trunk_state), proj.shape[0])
    ours = {"vit." + k: v for k, v in trunk_state.items()} | {"proj.weight": proj}
    load_exact(model, ours, ignored_prefixes=(), source=str(path))
    return model.eval()


def biomedclip(spec: EncoderSpec) -> Encoder:
    """BiomedCLIP ViT-B/16 image tower (open_clip folder, vision tower only)."""
    folder = spec.require_weights()
    return ModuleEncoder(spec.name, load_biomedclip(folder), spec.apply_policy(NATIVE), [folder / f for f in FILES],
                         projected_vit_features)
