"""Multi-crop augmentation on batched tensors, on the training device (facebookresearch/dinov2
``dinov2/data/augmentations.py``).

DINOv2 builds, per image, 2 global crops and N local crops: RandomResizedCrop + horizontal flip, colour jitter
with p=0.8, Gaussian blur (kernel 9, sigma in [0.1, 2]) and, on the second global crop, solarisation. Here the
same recipe runs on a whole batch at once with torch ops (one grid_sample per view), driven by one explicit
torch.Generator, so it is reproducible and needs no CPU worker per crop.

Adaptations for radiographs (single channel):
- colour jitter keeps brightness and contrast (0.4 each, as torchvision's ColorJitter, random order per image);
  saturation, hue and RandomGrayscale do nothing on a grey image and are dropped;
- the output is normalised with the configured mean/std and replicated to 3 channels (as RAD-DINO's processor).

Blur probabilities are the INTENDED ones: global crop 1 always blurred, global crop 2 with p=0.1 (and solarised
with p=0.2), local crops with p=0.5. Upstream DINOv2 passes 1-p to RandomApply, so its global crop 1 is never
blurred and its global crop 2 is blurred with p=0.9 (dinov2 PR #411). The released DINOv2 (and probably
RAD-DINO) checkpoints were trained with that inverted behaviour; to reproduce it, construct with
global1_blur_p=0.0, global2_blur_p=0.9.

Resampling: each crop is sampled on a k-times finer grid (bilinear) and box-averaged k x k, i.e. the output
pixel is the mean over its footprint in the source. This antialiases downscaling like PIL's resize does in
torchvision's RandomResizedCrop; k is fixed from the largest possible crop, so there is no host sync.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class ViewSpec:
    """One kind of view: output size, RandomResizedCrop area range, blur and solarise probabilities."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


@dataclass
class CropParams:
    """The random choices for one view of n images (all tensors [n])."""
    boxes: Tensor            # [n, 4] float: top, left, height, width in source pixels (integers)
    flip: Tensor             # bool
    jitter: Tensor           # bool: brightness/contrast jitter applied
    brightness: Tensor       # factor in [1 - b, 1 + b]
    contrast: Tensor         # factor in [1 - c, 1 + c]
    contrast_first: Tensor   # bool: order of the two jitter operations
    blur: Tensor             # bool
    sigma: Tensor            # blur sigma
    solarize: Tensor         # bool


def _uniform(shape: tuple[int, ...], low: float, high: float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, device=generator.device)


def random_resized_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                         ratio: tuple[float, float], generator: torch.Generator, attempts: int = 10) -> Tensor:
    """torchvision RandomResizedCrop.get_params for n images at once -> [n, 4] (top, left, h, w), float.

    Area fraction U(scale), aspect ratio w/h log-uniform in `ratio`; the first of `attempts` draws that fits the
    image is used, otherwise the central crop with the aspect ratio clamped to `ratio` (as torchvision).
    """
    area = height * width
    target = area * _uniform((n, attempts), scale[0], scale[1], generator)
    aspect = torch.exp(_uniform((n, attempts), math.log(ratio[0]), math.log(ratio[1]), generator))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    u_top, u_left = _uniform((n,), 0, 1, generator), _uniform((n,), 0, 1, generator)
    top = torch.floor(u_top * (height - h + 1))
    left = torch.floor(u_left * (width - w + 1))

    # central-crop fallback for images where no attempt fitted
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=w.dtype, device=w.device)
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


def resized_crop(images: Tensor, boxes: Tensor, size: int, flip: Tensor, supersample: int = 1) -> Tensor:
    """Crop each image [n, C, H, W] to its box, resize to size x size, flip horizontally where `flip`.

    Sample positions are pixel-centre based (align_corners=False): output pixel u of a box [left, left + w)
    covers [left + u*w/size, left + (u+1)*w/size) and is the mean of `supersample`^2 bilinear samples in it.
    """
    n, _, height, width = images.shape
    steps = size * supersample
    frac = (torch.arange(steps, device=images.device, dtype=images.dtype) + 0.5) / steps  # [steps]
    boxes = boxes.to(images.device, images.dtype)
    top, left, h, w = boxes.unbind(dim=1)
    flip = flip.to(images.device)
    frac_x = torch.where(flip[:, None], 1 - frac, frac)                                    # [n, steps]
    xs = (left[:, None] + frac_x * w[:, None]) * (2 / width) - 1
    ys = (top[:, None] + frac[None, :] * h[:, None]) * (2 / height) - 1
    grid = torch.stack([xs[:, None, :].expand(n, steps, steps), ys[:, :, None].expand(n, steps, steps)], dim=-1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return F.avg_pool2d(out, supersample) if supersample > 1 else out


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the image's mean grey level (torchvision's adjust_contrast)."""
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int = 9) -> Tensor:
    """Separable Gaussian blur with a per-image sigma and reflect padding (torchvision's GaussianBlur)."""
    n, c, height, width = x.shape
    r = kernel_size // 2
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma.to(x.device, x.dtype)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)     # [n*c, k]
    y = F.pad(x.reshape(1, n * c, height, width), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return y.reshape(n, c, height, width)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert pixels at or above the threshold (torchvision's RandomSolarize(128) on [0, 1] images)."""
    return torch.where(x >= threshold, 1 - x, x)


class MultiCropAugmentation:
    """images [B, 1, H, W] in [0, 1] -> (globals [2B, C, G, G], locals [n_local*B, C, L, L]), normalised.

    Outputs are crop-major, like DINOv2's collate: rows 0..B-1 are global crop 1 of every image,
    rows B..2B-1 global crop 2; local crop j of image i is row j*B + i.
    """

    def __init__(self, global_size: int, local_size: int, n_local: int,
                 global_scale: tuple[float, float] = (0.32, 1.0), local_scale: tuple[float, float] = (0.05, 0.32),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), flip_p: float = 0.5, jitter_p: float = 0.8,
                 brightness: float = 0.4, contrast: float = 0.4, blur_sigma: tuple[float, float] = (0.1, 2.0),
                 blur_kernel_size: int = 9, global1_blur_p: float = 1.0, global2_blur_p: float = 0.1,
                 global2_solarize_p: float = 0.2, local_blur_p: float = 0.5, solarize_threshold: float = 0.5,
                 mean: float | tuple[float, ...] = 0.5307, std: float | tuple[float, ...] = 0.2583,
                 out_channels: int = 3, max_supersample: int = 4):
        self.global1 = ViewSpec(global_size, global_scale, global1_blur_p)
        self.global2 = ViewSpec(global_size, global_scale, global2_blur_p, global2_solarize_p)
        self.local = ViewSpec(local_size, local_scale, local_blur_p)
        self.n_local = n_local
        self.ratio = ratio
        self.flip_p, self.jitter_p = flip_p, jitter_p
        self.brightness, self.contrast = brightness, contrast
        self.blur_sigma, self.blur_kernel_size = blur_sigma, blur_kernel_size
        self.solarize_threshold = solarize_threshold
        # defaults: RAD-DINO's grey-level statistics (microsoft/rad-dino preprocessor_config.json); a 3-tuple
        # (e.g. ImageNet's) also works
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.out_channels = out_channels
        self.max_supersample = max_supersample

    def sample_params(self, n: int, height: int, width: int, view: ViewSpec, generator: torch.Generator) -> CropParams:
        """Draw every random choice of one view for n images (a fixed number of draws, so seeds line up)."""
        def coin(p: float) -> Tensor:
            return _uniform((n,), 0, 1, generator) < p

        return CropParams(
            boxes=random_resized_boxes(n, height, width, view.scale, self.ratio, generator),
            flip=coin(self.flip_p),
            jitter=coin(self.jitter_p),
            brightness=_uniform((n,), 1 - self.brightness, 1 + self.brightness, generator),
            contrast=_uniform((n,), 1 - self.contrast, 1 + self.contrast, generator),
            contrast_first=coin(0.5),
            blur=coin(view.blur_p),  # p is the probability of APPLYING the blur (upstream inverts it, dinov2 PR #411)
            sigma=_uniform((n,), self.blur_sigma[0], self.blur_sigma[1], generator),
            solarize=coin(view.solarize_p),
        )

    def supersample_factor(self, height: int, width: int, view: ViewSpec) -> int:
        """Sampling density that covers the largest possible downscale of this view (capped)."""
        max_area = view.scale[1] * height * width
        max_w = min(width, math.sqrt(max_area * self.ratio[1]))
        max_h = min(height, math.sqrt(max_area / self.ratio[0]))
        return max(1, min(self.max_supersample, math.ceil(max(max_w, max_h) / view.size)))

    def render(self, images: Tensor, params: CropParams, view: ViewSpec) -> Tensor:
        """Apply one view's choices: crop + flip, jitter, blur, solarise (DINOv2's order), in [0, 1]."""
        k = self.supersample_factor(images.shape[2], images.shape[3], view)
        x = resized_crop(images, params.boxes, view.size, params.flip, supersample=k)
        p = {name: getattr(params, name).to(x.device) for name in vars(params)}

        def per_image(mask: Tensor) -> Tensor:
            return mask.view(-1, 1, 1, 1)

        brightness_then_contrast = adjust_contrast(adjust_brightness(x, p["brightness"]), p["contrast"])
        contrast_then_brightness = adjust_brightness(adjust_contrast(x, p["contrast"]), p["brightness"])
        jittered = torch.where(per_image(p["contrast_first"]), contrast_then_brightness, brightness_then_contrast)
        x = torch.where(per_image(p["jitter"]), jittered, x)
        x = torch.where(per_image(p["blur"]), gaussian_blur(x, p["sigma"], self.blur_kernel_size), x)
        x = torch.where(per_image(p["solarize"]), solarize(x, self.solarize_threshold), x)
        return x

    def normalize(self, x: Tensor) -> Tensor:
        x = x.expand(-1, self.out_channels, -1, -1)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def __call__(self, images: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        if images.ndim != 4 or images.shape[1] != 1 or not images.is_floating_point():
            raise ValueError(f"MultiCropAugmentation expects float images [B, 1, H, W] in [0, 1], got "
                             f"{tuple(images.shape)} {images.dtype}; decode with "
                             "harness.common.imaging.load_radiograph")
        images = images.float()  # sample positions need fp32: bf16 cannot tell pixel 300 from 301
        n, _, height, width = images.shape
        views = [self.global1, self.global2] + [self.local] * self.n_local
        crops = [self.render(images, self.sample_params(n, height, width, v, generator), v) for v in views]
        globals_ = self.normalize(torch.cat(crops[:2]))
        locals_ = self.normalize(torch.cat(crops[2:])) if self.n_local else images.new_zeros(
            0, self.out_channels, self.local.size, self.local.size)
        return globals_, locals_
