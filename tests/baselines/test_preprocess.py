import dataclasses

import pytest
import torch

from baselines.preprocess import (Preprocess, equalize_histogram, geometry, place, preprocess_batch,
                                 unplace)


@pytest.mark.parametrize("policy", ["resize_shortest_crop", "resize_stretch", "resize_longest_pad",
                                    "pad_square_resize"])
@pytest.mark.parametrize("hw", [(64, 64), (80, 56), (50, 72)])
def test_output_shape_and_normalisation(policy, hw):
    pre = Preprocess(size=32, policy=policy, mean=(0.5,), std=(0.25,), channels=3)
    img = torch.rand(1, *hw)
    x = preprocess_batch([img, torch.zeros(1, 40, 40)], pre)
    assert x.shape == (2, 3, 32, 32)
    assert torch.equal(x[:, 0], x[:, 1])  # channel replication
    assert torch.allclose(x[1], torch.full_like(x[1], -2.0))  # black -> (0 - 0.5) / 0.25


def test_shortest_crop_keeps_short_edge_and_centres():
    g = geometry(100, 50, Preprocess(size=20, policy="resize_shortest_crop"))
    assert (g.resized_h, g.resized_w) == (40, 20) and g.top == 10 and g.left == 0


def test_longest_pad_pads_black():
    pre = Preprocess(size=20, policy="resize_longest_pad", channels=1)
    x = preprocess_batch([torch.ones(1, 40, 20)], pre)
    assert x[0, 0, :, :5].abs().max() == 0 and x[0, 0, :, 5:15].min() == 1


def test_pad_square_pads_at_native_size_then_resizes():
    """A 3 x 6 white image: padded to 6 x 6 with the odd row at the bottom (rows 1..3 white), then resized to 6 x 6,
    which is the identity, so the padding is seen exactly; and the whole is one resize of the padded square."""
    pre = Preprocess(size=6, policy="pad_square_resize", interpolation="bilinear", mean=(0.0,), std=(1.0,),
                     channels=1)
    g = geometry(3, 6, pre)
    assert (g.side, g.pad_top, g.pad_left) == (6, 1, 0)
    x = preprocess_batch([torch.ones(1, 3, 6)], pre)[0, 0]
    assert x[1:4].min() == 1 and x[0].max() == 0 and x[4:].max() == 0
    img = torch.rand(1, 30, 20)
    square = torch.nn.functional.pad(img, (5, 5, 0, 0))
    stretched = dataclasses.replace(pre, size=12, policy="resize_stretch")
    assert torch.equal(preprocess_batch([img], dataclasses.replace(pre, size=12)), preprocess_batch([square], stretched))


@pytest.mark.parametrize("policy", ["resize_stretch", "resize_longest_pad", "pad_square_resize"])
@pytest.mark.parametrize("hw", [(60, 60), (90, 60)])
def test_place_unplace_round_trip(policy, hw):
    """A mask put through an encoder's geometry and back lands on itself up to resampling error."""
    pre = Preprocess(size=48, policy=policy)
    mask = torch.zeros(1, 1, *hw)
    mask[..., hw[0] // 4: 3 * hw[0] // 4, hw[1] // 5: hw[1] // 2] = 1
    g = geometry(*hw, pre)
    back = unplace(place(mask, g, "bilinear"), g, "bilinear") > 0.5
    agree = (back == mask.bool()).float().mean()
    assert agree > 0.97


def test_crop_loses_what_it_cuts():
    pre = Preprocess(size=40, policy="resize_shortest_crop")
    hw = (100, 40)  # portrait: the crop drops the top and bottom 30 rows
    g = geometry(*hw, pre)
    y = unplace(place(torch.ones(1, 1, *hw), g, "nearest"), g, "nearest")
    assert y[0, 0, :25].sum() == 0 and y[0, 0, 35:65].min() == 1


def test_resize_then_crop_like_torchvision():
    g = geometry(300, 400, Preprocess(size=224, policy="resize_shortest_crop", resize=256))
    assert (g.resized_h, g.resized_w, g.top, g.left) == (256, 341, 16, 58)
    with pytest.raises(ValueError, match="resize"):
        Preprocess(size=224, resize=200)


def test_equalize_maps_each_level_to_its_cumulative_share_above_the_darkest():
    """Worked by hand: levels 10, 20, 30, 40 with counts 1, 2, 3, 2 (8 pixels, 7 above the darkest). Level j goes to
    255 * (pixels at levels in (10, j]) / 7, rounded: 0, 255*2/7, 255*5/7, 255."""
    levels = torch.tensor([10, 20, 20, 30, 30, 30, 40, 40], dtype=torch.float32).view(2, 4)
    out = equalize_histogram(levels / 255) * 255
    want = torch.tensor([0, 73, 73, 182, 182, 182, 255, 255], dtype=torch.float32).view(2, 4)
    assert torch.allclose(out, want, atol=1e-4), out


def test_equalize_rounds_half_to_even_and_leaves_a_flat_image_alone():
    # Two levels: the darker goes to 0, the brighter to 255.
    assert (equalize_histogram(torch.tensor([0.0, 0.0, 1.0])) * 255).round().tolist() == [0, 0, 255]
    # Six pixels above the darkest: a step of 255 / 6 = 42.5 exactly, so 42.5 rounds to 42 and 127.5 to 128 (even).
    six = torch.tensor([0, 5, 9, 9, 12, 12, 12], dtype=torch.float32) / 255
    assert (equalize_histogram(six) * 255).round().tolist() == [0, 42, 128, 128, 255, 255, 255]
    flat = torch.full((3, 3), 0.4)
    assert torch.equal(equalize_histogram(flat), torch.full((3, 3), round(0.4 * 255) / 255))


def test_equalize_runs_before_the_resize_and_only_when_asked():
    """Equalising at the image's own size, then resizing, is not the same as resizing first: the histogram of the
    resized image has other counts (bicubic mixes levels), so the order is observable and fixed."""
    g = torch.Generator().manual_seed(0)
    img = (torch.rand(1, 60, 50, generator=g) ** 3 * 255).round() / 255  # dark-skewed 8-bit levels
    plain = Preprocess(size=32, policy="resize_stretch", mean=(0.0,), std=(1.0,), channels=1)
    eq = dataclasses.replace(plain, equalize=True)
    ours = preprocess_batch([img], eq)
    assert torch.allclose(ours, preprocess_batch([equalize_histogram(img)], plain), atol=1e-6)
    assert not torch.allclose(ours, equalize_histogram(preprocess_batch([img], plain)), atol=1e-2)
    assert eq.harmonised().equalize and eq.as_dict()["equalize"] and not plain.as_dict()["equalize"]
