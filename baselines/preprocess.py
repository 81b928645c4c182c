"""Each encoder's native preprocessing, as data, and the one function that applies it.

Radiographs reach this module decoded once to float in [0, 1], single channel, at their own size. An encoder's
`Preprocess` says how to turn that into its input tensor: resize policy, target size, interpolation,
normalisation and channel replication. Keeping it as data (timm-style) means the harness never special-cases a
model, the cache key can include it, and the geometry can be inverted to map masks and predictions back.

Resize policies:
- ``resize_shortest_crop``: resize so the shortest edge equals ``size``, then centre-crop ``size`` x ``size``
  (the Hugging Face / CLIP default; it cuts the lateral chest on portrait radiographs).
- ``resize_stretch``: resize the whole image to ``size`` x ``size`` without cropping (the "harmonised" policy).
- ``resize_longest_pad``: resize so the longest edge equals ``size``, then pad with black to a centred square.
- ``pad_square_resize``: pad with black to a centred square at the image's own size, then resize that square to
  ``size`` x ``size`` (the same placement as ``resize_longest_pad`` up to sub-pixel rounding, but resampled as one
  image with its border, as MedSigLIP's authors do it).

An intensity step may come before the geometry: ``equalize`` applies global histogram equalisation to the image at its
own size (what CXformer's training and evaluation pipelines did with OpenCV's ``equalizeHist`` on 8-bit radiographs).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

ResizePolicy = Literal["resize_shortest_crop", "resize_stretch", "resize_longest_pad", "pad_square_resize"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "area"]


@dataclass(frozen=True)
class Preprocess:
    size: int
    policy: ResizePolicy = "resize_stretch"
    interpolation: Interpolation = "bicubic"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    channels: int = 3
    # Pillow-style rescale of the [0, 1] input before normalisation; 1.0 for every model we know (they all
    # normalise images already scaled to [0, 1]).
    scale: float = 1.0
    # resize_shortest_crop only: the shortest edge is resized to `resize` (default `size`) before the centre
    # crop of `size`, as torchvision's Resize(256) + CenterCrop(224) does.
    resize: int | None = None
    # Histogram equalisation of the radiograph at its own size, before any resize (`equalize_histogram`).
    equalize: bool = False

    def __post_init__(self) -> None:
        if len(self.mean) not in (1, self.channels) or len(self.std) not in (1, self.channels):
            raise ValueError(f"mean/std must have 1 or {self.channels} values, got {self.mean} / {self.std}")
        if self.size <= 0:
            raise ValueError(f"preprocessing size must be positive, got {self.size}")
        if self.resize is not None and self.resize < self.size:
            raise ValueError(f"resize ({self.resize}) must be at least the crop size ({self.size})")

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def harmonised(self) -> "Preprocess":
        """The same encoder input size and normalisation, but the whole radiograph resized without cropping."""
        return dataclasses.replace(self, policy="resize_stretch", resize=None)


#: Grey levels the equalisation works on: 8-bit, the depth of the radiographs the equalising models were trained on.
LEVELS = 256


def equalize_histogram(img: torch.Tensor) -> torch.Tensor:
    """Global histogram equalisation of a [..., H, W] image in [0, 1], as OpenCV's ``equalizeHist`` does it on 8-bit
    images: the image is quantised to 256 levels, each level is mapped to its cumulative count above the darkest
    level present, scaled so the brightest level present becomes 255 and rounded half to even, and the result is
    scaled back to [0, 1]. An image of one grey level is returned quantised but otherwise unchanged."""
    levels = (img.clamp(0.0, 1.0) * (LEVELS - 1)).round().long()
    hist = torch.bincount(levels.flatten(), minlength=LEVELS)
    darkest = int(torch.nonzero(hist)[0])
    total = levels.numel()
    if hist[darkest] == total:
        return levels.float() / (LEVELS - 1)
    # float32 arithmetic and round-half-to-even, as the 8-bit reference computes its lookup table; the darkest
    # level present maps to 0 and every level below it is absent.
    scale = torch.tensor((LEVELS - 1) / (total - int(hist[darkest])), dtype=torch.float32)
    above_darkest = (torch.cumsum(hist, 0) - hist[darkest]).clamp(min=0).float()
    lut = torch.round(above_darkest * scale).clamp(0, LEVELS - 1)
    return lut[levels] / (LEVELS - 1)


@dataclass(frozen=True)
class Geometry:
    """Where an (H, W) image lands inside the encoder's size x size input: resized to (rh, rw), then the
    window [top:top+size, left:left+size] of the resized image is taken (negative offsets mean padding). A nonzero
    `side` means the image was first padded with black to a side x side square, its top-left corner at
    (pad_top, pad_left), and that square is what is resized."""

    height: int
    width: int
    resized_h: int
    resized_w: int
    top: int
    left: int
    size: int
    side: int = 0
    pad_top: int = 0
    pad_left: int = 0


def geometry(height: int, width: int, pre: Preprocess) -> Geometry:
    s = pre.size
    if pre.policy == "resize_stretch":
        rh, rw = s, s
    elif pre.policy == "resize_shortest_crop":
        # Round like torchvision/HF: the short edge is exactly `r`, the long edge scaled and truncated.
        r = pre.resize or s
        if height <= width:
            rh, rw = r, max(r, int(r * width / height))
        else:
            rh, rw = max(r, int(r * height / width)), r
    elif pre.policy == "resize_longest_pad":
        if height >= width:
            rh, rw = s, max(1, round(s * width / height))
        else:
            rh, rw = max(1, round(s * height / width)), s
    elif pre.policy == "pad_square_resize":
        # The extra row or column of an odd difference goes to the bottom or right, as the reference pads.
        side = max(height, width)
        return Geometry(height, width, s, s, 0, 0, s, side, (side - height) // 2, (side - width) // 2)
    else:  # pragma: no cover - Literal guards this
        raise ValueError(f"unknown resize policy {pre.policy!r}")
    top = (rh - s) // 2 if rh >= s else -((s - rh) // 2)
    left = (rw - s) // 2 if rw >= s else -((s - rw) // 2)
    return Geometry(height, width, rh, rw, top, left, s)


def _resize(x: torch.Tensor, hw: tuple[int, int], interpolation: str) -> torch.Tensor:
    if tuple(x.shape[-2:]) == hw:
        return x
    kwargs = {} if interpolation in ("nearest", "area") else {"align_corners": False, "antialias": True}
    return F.interpolate(x, size=hw, mode=interpolation, **kwargs)


def place(x: torch.Tensor, geo: Geometry, interpolation: str, fill: float = 0.0) -> torch.Tensor:
    """Resize a [N, C, H, W] tensor and crop or pad it to [N, C, size, size] following `geo`."""
    if geo.side:
        x = F.pad(x, (geo.pad_left, geo.side - geo.width - geo.pad_left, geo.pad_top,
                      geo.side - geo.height - geo.pad_top), value=fill)
    x = _resize(x, (geo.resized_h, geo.resized_w), interpolation)
    s = geo.size
    out = x.new_full((*x.shape[:-2], s, s), fill)
    # Source and destination windows: a positive offset crops the source, a negative one pads the destination.
    sy, dy = max(geo.top, 0), max(-geo.top, 0)
    sx, dx = max(geo.left, 0), max(-geo.left, 0)
    h = min(geo.resized_h - sy, s - dy)
    w = min(geo.resized_w - sx, s - dx)
    out[..., dy:dy + h, dx:dx + w] = x[..., sy:sy + h, sx:sx + w]
    return out


def unplace(y: torch.Tensor, geo: Geometry, interpolation: str = "bilinear") -> torch.Tensor:
    """Inverse of `place` for a [N, C, size, size] map (e.g. segmentation logits): back to [N, C, H, W].
    Pixels cropped away by the preprocessing get the value 0 (they were never seen by the encoder)."""
    s = geo.size
    canvas = y.new_zeros((*y.shape[:-2], geo.resized_h, geo.resized_w))
    sy, dy = max(geo.top, 0), max(-geo.top, 0)
    sx, dx = max(geo.left, 0), max(-geo.left, 0)
    h = min(geo.resized_h - sy, s - dy)
    w = min(geo.resized_w - sx, s - dx)
    canvas[..., sy:sy + h, sx:sx + w] = y[..., dy:dy + h, dx:dx + w]
    if geo.side:
        square = _resize(canvas, (geo.side, geo.side), interpolation)
        return square[..., geo.pad_top:geo.pad_top + geo.height, geo.pad_left:geo.pad_left + geo.width]
    return _resize(canvas, (geo.height, geo.width), interpolation)


def preprocess_batch(images: list[torch.Tensor], pre: Preprocess) -> torch.Tensor:
    """List of [1, H, W] float images in [0, 1] (sizes may differ) -> [B, channels, size, size] encoder input."""
    if not images:
        raise ValueError("preprocess_batch needs at least one image")
    mean = torch.tensor(pre.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(pre.std, dtype=torch.float32).view(-1, 1, 1)
    out = []
    for img in images:
        if img.ndim != 3 or img.shape[0] != 1:
            raise ValueError(f"expected a [1, H, W] single-channel image, got shape {tuple(img.shape)}")
        geo = geometry(img.shape[-2], img.shape[-1], pre)
        x = (equalize_histogram(img.float()) if pre.equalize else img.float())[None] * pre.scale
        # Padding is black (0) before normalisation, so after it the border is the normalised black level.
        x = place(x, geo, pre.interpolation, fill=0.0)
        # Bicubic resampling overshoots; keep the input in the range the model was trained on.
        x = x.clamp(0.0, pre.scale)[0].expand(pre.channels, -1, -1)
        out.append((x - mean) / std)
    return torch.stack(out)
