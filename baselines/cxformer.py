"""CXformer-B and CXformer-S (m42-health/CXformer-base, -small): DINOv2 ViT-B/14 and ViT-S/14 with 4 register tokens,
continually pretrained on chest X-rays by M42 (MIDL 2025), shipped as transformers ``Dinov2WithRegistersModel``
folders (the reference implementation, used as is). Global = the final-normed CLS; the register tokens are dropped
from the patch grid (37 x 37 at 518 px).

Native preprocessing, as data. The hub's image processor is custom code (``custom_processor.py``, a
``CustomBitImageProcessor`` importing OpenCV, run with ``trust_remote_code``) that no public source holds a copy of.
It is rebuilt here from the two public sources that fix it: the GitHub repository m42-health/CXformer, whose
pretraining, linear-probe and segmentation datasets all read the 8-bit radiograph as greyscale, apply OpenCV's global
histogram equalisation (``hist_equalize: True`` in every config) and then the evaluation transform ``Resize(518,
bicubic) + CenterCrop(518) + ImageNet mean/std`` (``dinov2/eval/linear_cxr.py``); and the model card, whose processor
returns 3 x 518 x 518. So: equalise, shortest edge to 518 bicubic, centre-crop 518, ImageNet mean/std. Licence
CC-BY-NC-4.0 (non-commercial, research use).
"""
from __future__ import annotations

from baselines._common import IMAGENET_MEAN, IMAGENET_STD
from baselines.dinov2_reg4 import registers_vit
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, HubRepo, WeightFiles

NATIVE = Preprocess(size=518, policy="resize_shortest_crop", interpolation="bicubic", mean=IMAGENET_MEAN,
                    std=IMAGENET_STD, channels=3, equalize=True)
FILES = ("config.json", "model.safetensors")


def _weights(size: str) -> WeightFiles:
    repo = f"m42-health/CXformer-{size}"
    download = f"hf download {repo} config.json model.safetensors --local-dir <weights-dir>/cxformer-{size}"
    return WeightFiles((FILES,), download, hub=(HubRepo(repo, (FILES,)),))


WEIGHTS_BASE = _weights("base")
WEIGHTS_SMALL = _weights("small")


def cxformer(spec: EncoderSpec) -> Encoder:
    """CXformer (transformers Dinov2WithRegistersModel folder, the same architecture check as DINOv2-reg4's), its
    size given by the table line's weights."""
    return registers_vit(spec, NATIVE)
