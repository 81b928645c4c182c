"""BioViL-T (Bannur et al., CVPR 2023): hi-ml-multimodal's ResNet-50 multi-image encoder, used on single images.

``biovil_t_image_model_proj_size_128.pt`` is the state dict of ``health_multimodal``'s ``ImageModel`` (ResNet-50
trunk ``encoder.encoder.*``, a 1x1 conv ``encoder.backbone_to_vit`` 2048->256, a ViT pooler over current/prior patch
grids, a learnt ``missing_previous_emb`` and a projector). With no prior image the pooler is never run: the library's
patch embedding is ``[backbone_to_vit(resnet(x)) | missing_previous_emb broadcast]`` and its ``img_embedding`` the mean
of that, so its last 256 channels are the same constant for every image. We keep the 256 informative channels:
global = the spatial mean of ``backbone_to_vit(resnet(x))`` (= ``img_embedding[:, :256]``), patch = that grid (14x14
at 448); layers = the four ResNet stages. The trunk is re-implemented here with torchvision's parameter names
because hi-ml-multimodal imports torchvision and timm, which do not load beside the CPU torch; the parity test runs
hi-ml-multimodal itself. Its ``ImageModel`` constructor leaves the model in *training* mode (BatchNorm on batch
statistics); ours is always in eval mode.

Native preprocessing (``health_multimodal/image/data/transforms.py``): ``Resize(512)`` (bilinear) ->
``CenterCrop(448)`` -> ``ToTensor`` ([0, 1], no mean/std) -> 3 channels.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from baselines._common import ModuleEncoder, load_exact, read_state_dict
from baselines.preprocess import Preprocess
from baselines.registry import Encoder, EncoderSpec, Features, HubRepo, WeightFiles

# The reference resizes the short side to 512 and crops 448; `Preprocess` has one size, so the short side goes to
# 448 and the crop keeps all of it (a slightly wider field of view than the reference's 87.5%).
NATIVE = Preprocess(size=448, resize=512, policy="resize_shortest_crop", interpolation="bilinear", mean=(0.0,), std=(1.0,),
                    channels=3)
FILES = ("biovil_t_image_model_proj_size_128.pt",)
DOWNLOAD = ("hf download microsoft/BiomedVLP-BioViL-T biovil_t_image_model_proj_size_128.pt --revision v1.0 "
            "--local-dir <weights-dir>/biovil-t")
# The documented download pins the v1.0 tag, so a cached v1.0 snapshot is preferred over other revisions.
WEIGHTS = WeightFiles((FILES,), DOWNLOAD, hub=(HubRepo("microsoft/BiomedVLP-BioViL-T", (FILES,), ref="v1.0"),))
# Weights of the parts a single-image encoder never runs.
UNUSED = ("encoder.vit_pooler.", "encoder.missing_previous_emb", "encoder.encoder.fc.", "projector.")


class Bottleneck(nn.Module):
    """ResNet-50 v1.5 bottleneck (stride on the 3x3 conv), torchvision's parameter names."""

    def __init__(self, inplanes: int, width: int, stride: int):
        super().__init__()
        out = width * 4
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3)):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (n, width) in enumerate(zip(blocks, (64, 128, 256, 512))):
            stage = [Bottleneck(inplanes, width, 1 if i == 0 else 2)]
            stage += [Bottleneck(width * 4, width, 1) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            inplanes = width * 4

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four stage outputs (strides 4, 8, 16, 32)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        stages = []
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
            stages.append(x)
        return stages


class _Trunk(nn.Module):
    """Mirrors ``MultiImageEncoder``'s names: ``encoder`` (the ResNet) and ``backbone_to_vit``."""

    def __init__(self, patch_dim: int):
        super().__init__()
        self.encoder = ResNet50()
        self.backbone_to_vit = nn.Conv2d(2048, patch_dim, 1, bias=False)


class BioViLTImage(nn.Module):
    def __init__(self, patch_dim: int = 256):
        super().__init__()
        self.encoder = _Trunk(patch_dim)


def load_biovil_t(path: Path) -> BioViLTImage:
    state = read_state_dict(path)
    if "encoder.backbone_to_vit.weight" not in state:
        raise ValueError(f"{path}: no encoder.backbone_to_vit.weight; not a BioViL-T image model "
                         "(the BioViL v1 file biovil_image_resnet50_proj_size_128.pt is a different model)")
    model = BioViLTImage(state["encoder.backbone_to_vit.weight"].shape[0])
    load_exact(model, state, ignored_prefixes=UNUSED, source=str(path))
    return model.eval()


def biovil_t_features(model: BioViLTImage, pixels: torch.Tensor) -> Features:
    stages = model.encoder.encoder(pixels)
    patch = model.encoder.backbone_to_vit(stages[-1])
    return Features(patch.mean(dim=(2, 3)), patch, tuple(stages))


def biovil_t(spec: EncoderSpec) -> Encoder:
    """BioViL-T ResNet-50 image encoder (hi-ml-multimodal checkpoint), single-image path."""
    folder = spec.require_weights()
    return ModuleEncoder(spec.name, load_biovil_t(folder / FILES[0]), spec.apply_policy(NATIVE),
                         [folder / FILES[0]], biovil_t_features)
