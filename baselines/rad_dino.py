"""RAD-DINO (microsoft/rad-dino): a DINOv2 ViT-B/14 trained on chest X-rays, shipped as a transformers Dinov2Model.

The transformers model is the reference implementation, so it is used as is. Native preprocessing follows the
folder's ``preprocessor_config.json`` (a BitImageProcessor): shortest edge to 518 px bicubic, centre-crop 518, rescale
to [0, 1], normalise with the single CXR mean/std replicated over 3 channels.

The factory serves every checkpoint of this architecture (RAD-DINO-MAIRA-2 too, `baselines.rad_dino_maira_2`): the
weights come from the table line's `WeightFiles`, and a folder whose config is not a plain DINOv2 with patch 14 is
refused by name (`ConfigMismatch`).
"""
from __future__ import annotations

from baselines._hf import checked_config, dinov2_features, from_folder
from baselines._common import ModuleEncoder
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=518, policy="resize_shortest_crop", interpolation="bicubic", mean=(0.5307,), std=(0.2583,),
                    channels=3)
FILES = ("config.json", "model.safetensors")
# The folder layout docs/encoders.md documents; preprocessor_config.json is fetched too, for reference, but not read.
DOWNLOAD = ("hf download microsoft/rad-dino config.json model.safetensors preprocessor_config.json "
            "--local-dir <weights-dir>/rad-dino")
WEIGHTS = WeightFiles((FILES,), DOWNLOAD, hub=(HubRepo("microsoft/rad-dino", (FILES,)),))


#: What a RAD-DINO folder's config must say: no register tokens is the model type itself (``dinov2``).
ARCHITECTURE = {"patch_size": 14}


def rad_dino(spec: EncoderSpec) -> Encoder:
    """RAD-DINO ViT-B/14 (transformers Dinov2Model folder)."""
    folder, files = spec.locate()
    config = checked_config(folder, spec.name, "Dinov2Config", ("dinov2",), ARCHITECTURE)
    model = from_folder("Dinov2Model", folder, config)
    return ModuleEncoder(spec.name, model, spec.apply_policy(NATIVE), [folder / f for f in files], dinov2_features)
