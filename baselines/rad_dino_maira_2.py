"""RAD-DINO-MAIRA-2 (microsoft/rad-dino-maira-2): the RAD-DINO checkpoint used as MAIRA-2's image encoder, trained on
more data than RAD-DINO, with the same architecture (DINOv2 ViT-B/14, no registers) and the same image processor
(shortest edge 518 bicubic, centre-crop 518, CXR mean/std). It is built by RAD-DINO's own factory
(`baselines.rad_dino.rad_dino`, config check included); this module only says where its weights are.
Licence MSRLA (research use).
"""
from __future__ import annotations

from baselines.rad_dino import FILES
from baselines.registry import HubRepo, WeightFiles

REPO = "microsoft/rad-dino-maira-2"
DOWNLOAD = (f"hf download {REPO} config.json model.safetensors preprocessor_config.json "
            "--local-dir <weights-dir>/rad-dino-maira-2")
WEIGHTS = WeightFiles((FILES,), DOWNLOAD, hub=(HubRepo(REPO, (FILES,)),))
