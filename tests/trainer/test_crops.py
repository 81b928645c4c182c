"""Batched multi-crop augmentation (facebookresearch/dinov2 dinov2/data/augmentations.py): shapes, ranges,
determinism, crop geometry, probabilities."""
from __future__ import annotations

import math

import pytest
import torch

from trainer.crops import (MultiCropAugmentation, adjust_contrast, gaussian_blur, random_resized_boxes,
                           resized_crop, solarize)

MEAN, STD = 0.5307, 0.2583


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_crop_major_order_and_value_range():
    aug = MultiCropAugmentation(global_size=32, local_size=16, n_local=3, mean=MEAN, std=STD)
    images = torch.rand(4, 1, 48, 40)
    globals_, locals_ = aug(images, gen())
    assert globals_.shape == (8, 3, 32, 32) and locals_.shape == (12, 3, 16, 16)
    assert globals_.dtype == torch.float32
    for out in (globals_, locals_):
        assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # grey replicated
        pixels = out * STD + MEAN
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_deterministic_given_the_generator():
    aug = MultiCropAugmentation(global_size=24, local_size=12, n_local=2)
    images = torch.rand(3, 1, 40, 40)
    a, b, c = aug(images, gen(1)), aug(images, gen(1)), aug(images, gen(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_rejects_non_grey_input():
    aug = MultiCropAugmentation(global_size=24, local_size=12, n_local=2)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        aug(torch.rand(2, 3, 32, 32), gen())


@pytest.mark.parametrize("height,width,scale", [(64, 64, (0.32, 1.0)), (64, 64, (0.05, 0.32)), (80, 50, (0.32, 1.0))])
def test_crop_boxes_have_area_in_scale_and_aspect_in_ratio(height, width, scale):
    ratio = (3 / 4, 4 / 3)
    boxes = random_resized_boxes(2000, height, width, scale, ratio, gen())
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    drawn = (h < height) | (w < width)  # full-image boxes may come from the central fallback
    frac = (h * w / (height * width))[drawn]
    # h and w are rounded to whole pixels: allow that rounding on the area and the aspect ratio
    slack = ((h + w) / 2 + 0.25)[drawn] / (height * width)
    assert (frac >= scale[0] - slack).all() and (frac <= scale[1] + slack).all()
    aspect = (w / h)[drawn]
    assert (aspect >= ratio[0] * (1 - 1 / h[drawn])).all() and (aspect <= ratio[1] * (1 + 1 / w[drawn])).all()
    # the whole range is used, up to the largest box of an allowed aspect that fits (0.83 for 80 x 50)
    reachable = min(scale[1], width * min(height, width / ratio[0]) / (height * width))
    assert frac.min() < scale[0] + 0.05 and frac.max() > reachable - 0.08


def test_box_fallback_is_a_central_crop_with_clamped_aspect():
    # an aspect of at least 3 never fits a square at >= 90% area: torchvision falls back to the centre crop
    boxes = random_resized_boxes(5, 60, 60, (0.9, 1.0), (3.0, 4.0), gen())
    assert torch.equal(boxes, torch.tensor([[20.0, 0.0, 20.0, 60.0]]).expand(5, 4))


def test_resized_crop_samples_the_box_and_flips():
    height, width = 40, 50
    ramp_x = ((torch.arange(width) + 0.5) / width).expand(height, width)        # value = x position
    ramp_y = ((torch.arange(height) + 0.5) / height)[:, None].expand(height, width)
    images = torch.stack([ramp_x, ramp_x, ramp_y])[:, None]                    # x, x (flipped), y
    boxes = torch.tensor([[10.0, 5.0, 20.0, 30.0], [10.0, 5.0, 20.0, 30.0], [8.0, 0.0, 16.0, 50.0]])
    flip = torch.tensor([False, True, False])
    out = resized_crop(images, boxes, size=10, flip=flip, supersample=3)
    # output column u of box [5, 35) covers x in [5 + 3u, 8 + 3u): its mean x-position is 6.5 + 3u
    expected_x = (5 + 3 * torch.arange(10) + 1.5) / width
    torch.testing.assert_close(out[0, 0, 4], expected_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1, 0, 4], expected_x.flip(0), atol=1e-5, rtol=0)
    expected_y = (8 + 1.6 * torch.arange(10) + 0.8) / height
    torch.testing.assert_close(out[2, 0, :, 3], expected_y, atol=1e-5, rtol=0)


def test_supersampling_antialiases_a_downscale():
    # a 1-pixel checkerboard downscaled 4x: plain bilinear sampling aliases, footprint averaging gives ~0.5
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[None, None]
    box = torch.tensor([[0.0, 0.0, 64.0, 64.0]])
    no_flip = torch.tensor([False])
    smooth = resized_crop(checker, box, 16, no_flip, supersample=4)
    torch.testing.assert_close(smooth, torch.full_like(smooth, 0.5), atol=1e-5, rtol=0)


def test_blur_matches_a_direct_gaussian_convolution():
    x = torch.rand(2, 1, 12, 12)
    sigma = torch.tensor([0.7, 1.9])
    out = gaussian_blur(x, sigma, kernel_size=9)
    for n in range(2):
        t = torch.arange(-4, 5, dtype=torch.float64)
        k1 = torch.exp(-t ** 2 / (2 * sigma[n].double() ** 2))
        k1 = k1 / k1.sum()
        padded = torch.nn.functional.pad(x[n:n + 1].double(), (4, 4, 4, 4), mode="reflect")[0, 0]
        for i, j in [(0, 0), (5, 7), (11, 3)]:
            value = sum(k1[a] * k1[b] * padded[i + a, j + b] for a in range(9) for b in range(9))
            assert abs(out[n, 0, i, j].item() - value.item()) < 1e-5


def test_contrast_and_solarize_formulas():
    x = torch.tensor([0.2, 0.4, 0.9]).view(1, 1, 1, 3)
    torch.testing.assert_close(adjust_contrast(x, torch.tensor([1.4])).flatten(),
                               torch.tensor([0.5 + 1.4 * (0.2 - 0.5), 0.5 + 1.4 * (0.4 - 0.5), 1.0]))
    torch.testing.assert_close(solarize(x).flatten(), torch.tensor([0.2, 0.4, 0.1]))


def test_sampled_probabilities_are_the_intended_ones():
    aug = MultiCropAugmentation(global_size=16, local_size=8, n_local=1)
    n = 600
    g = gen(3)
    g1 = aug.sample_params(n, 32, 32, aug.global1, g)
    g2 = aug.sample_params(n, 32, 32, aug.global2, g)
    lo = aug.sample_params(n, 32, 32, aug.local, g)
    rate = lambda m: m.float().mean().item()
    assert rate(g1.blur) == 1.0 and rate(g1.solarize) == 0.0          # the fixed upstream bug: always blurred
    assert abs(rate(g2.blur) - 0.1) < 0.04 and abs(rate(g2.solarize) - 0.2) < 0.05
    assert abs(rate(lo.blur) - 0.5) < 0.07 and rate(lo.solarize) == 0.0
    assert abs(rate(lo.jitter) - 0.8) < 0.06 and abs(rate(lo.flip) - 0.5) < 0.07
    assert 0.6 <= g2.brightness.min() and g2.brightness.max() <= 1.4 and 0.1 <= lo.sigma.min() and lo.sigma.max() <= 2


def test_blur_and_solarise_rates_in_the_rendered_output():
    # identity crops of white noise with no flip or jitter: a blurred output loses its pixel-to-pixel differences,
    # a solarised one (mid-grey 0.8 patch -> 0.2) shows it directly
    size, n = 32, 300
    aug = MultiCropAugmentation(global_size=size, local_size=size, n_local=1, global_scale=(1.0, 1.0),
                                local_scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0,
                                blur_sigma=(1.5, 2.0),
                                mean=0.0, std=1.0, out_channels=1)
    images = torch.rand(n, 1, size, size)
    images[:, :, :4, :4] = 0.8  # a flat patch that solarisation turns into 0.2 (blur leaves its centre ~0.8)
    globals_, locals_ = aug(images, gen(5))

    def blurred(x):
        return (x[:, 0, 8:, 8:].diff(dim=-1).abs().mean(dim=(1, 2)) < 0.15)

    def solarised(x):
        return x[:, 0, 1, 1] < 0.5

    g1, g2 = globals_[:n], globals_[n:]
    assert blurred(g1).all() and not solarised(g1).any()
    assert abs(blurred(g2).float().mean().item() - 0.1) < 0.05
    assert abs(solarised(g2).float().mean().item() - 0.2) < 0.06
    assert abs(blurred(locals_).float().mean().item() - 0.5) < 0.08 and not solarised(locals_).any()
    assert math.isclose(blurred(images).float().mean().item(), 0.0)  # the detector itself is not trivially true
