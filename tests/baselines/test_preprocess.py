import pytest
import torch

from baselines.preprocess import Preprocess, geometry, place, preprocess_batch, unplace


@pytest.mark.parametrize("policy", ["resize_shortest_crop", "resize_stretch", "resize_longest_pad"])
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


@pytest.mark.parametrize("policy", ["resize_stretch", "resize_longest_pad"])
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
