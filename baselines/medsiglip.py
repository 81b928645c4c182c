"""MedSigLIP-448 (google/medsiglip-448): the SigLIP-400M vision tower of Google's medical image-text model, at 448 px.

The hub repo is a full transformers ``SiglipModel`` (vision and text towers); only the vision tower is built, by
transformers' ``SiglipVisionModel`` (the reference implementation, used as is), so the text weights are never read.
SigLIP has no CLS token: its image embedding is the multi-head attention pooling (MAP) head over the final-normed
tokens, which is this encoder's global feature (``--global-pool cls``); the 32 x 32 grid of those tokens is its
dense feature.

Native preprocessing is what the model's authors run before the image processor (Google-Health/medsiglip on GitHub,
``python/serving/predictor.py``, "method performed in training"): the radiograph, scaled to [0, 1], is padded with
black to a centred square at its own size (the odd row or column at the bottom or right), then the SiglipImageProcessor
resizes that square to 448 x 448 bicubic and normalises it with mean 0.5 and std 0.5. The hub repo's
``preprocessor_config.json`` alone would stretch a non-square radiograph instead; ``--input-policy harmonised``
gives that. The position embeddings are trained for 448 px and SigLIP does not resample them, so a config with
another input size is refused.

The repo is gated under the Health AI Developer Foundations terms: the download works once they are accepted on the
repo's page by the logged-in account.
"""
from __future__ import annotations

from baselines._common import ModuleEncoder
from baselines._hf import checked_config, from_folder, siglip_features
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=448, policy="pad_square_resize", interpolation="bicubic", mean=(0.5,), std=(0.5,),
                    channels=3)
FILES = ("config.json", "model.safetensors")
REPO = "google/medsiglip-448"
DOWNLOAD = f"hf download {REPO} config.json model.safetensors --local-dir <weights-dir>/medsiglip-448"
WEIGHTS = WeightFiles((FILES,), DOWNLOAD, hub=(HubRepo(REPO, (FILES,), gated=True),))
#: The vision tower's shape that the features depend on: SigLIP-400M's patch 14 at 448 px, with its MAP head.
ARCHITECTURE = {"patch_size": 14, "image_size": 448, "vision_use_head": True}


def medsiglip(spec: EncoderSpec) -> Encoder:
    """MedSigLIP-448 vision tower (transformers SiglipModel folder): MAP-pooled global, 32 x 32 patch grid."""
    folder, files = spec.locate()
    config = checked_config(folder, spec.name, "SiglipVisionConfig", ("siglip", "siglip_vision_model"), ARCHITECTURE)
    return ModuleEncoder(spec.name, from_folder("SiglipVisionModel", folder, config), spec.apply_policy(NATIVE),
                         [folder / f for f in files], siglip_features)
