"""guided_rescnn: shapes, the cubic start, packing, the receptive radius, the card wrapper and refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from guided_testdata import GUIDE, TARGET, TINY, card_for, scene, tiny_net

from domainsr.errors import ModelCardMismatch, ModelError
from domainsr.models import build_model
from domainsr.models.checkpoints import Architecture, load_checkpoint, save_checkpoint
from domainsr.models.guided import (
    GuidedCardModel,
    PackedGuided,
    check_guided_input,
    guided_bands,
    is_guided,
    load_guided_checkpoint,
    pack,
    pixel_unshuffle_nd,
)
from domainsr.models.layers import chain_radius, conv, interp, pixel_shuffle_nd, up


@pytest.mark.parametrize("scale", [(2, 2), (1, 3), (2, 2, 2), (1, 1, 4)])
def test_shapes_are_kept_on_the_hr_grid(scale):
    d = len(scale)
    net = build_model("guided_rescnn", spatial_dims=d, in_channels=4, scale=scale, guide_channels=1,
                      n_blocks=1, n_feats=4)
    sp = (5, 6) if d == 2 else (3, 4, 5)
    hr = tuple(n * f for n, f in zip(sp, scale))
    y = net(torch.rand(2, 3, *sp), torch.rand(2, 1, *hr))
    assert tuple(y.shape) == (2, 3, *hr) and torch.isfinite(y).all()
    assert (net.in_channels, net.out_channels, net.target_channels, net.guide_channels) == (4, 3, 3, 1)
    assert net.scale == scale and len(net.receptive_radius) == d


def test_an_untrained_net_is_the_cubic_baseline_of_the_target_bands():
    net = tiny_net()
    lr, guide = torch.rand(2, 3, 9, 11) * 1000, torch.rand(2, 2, 18, 22) * 1000
    cubic = build_model("cubic", spatial_dims=2, in_channels=3, scale=2)
    with torch.no_grad():
        torch.testing.assert_close(net(lr, guide), cubic(lr), rtol=0, atol=1e-4)
        assert not torch.equal(tiny_net(jitter=0.05)(lr, guide), cubic(lr))  # the guide matters once trained


def test_the_guide_is_required_and_checked():
    net = tiny_net()
    with pytest.raises(ModelError, match="needs 2 guide band"):
        net(torch.rand(1, 3, 4, 4))
    with pytest.raises(ModelError, match="guide bands of shape"):
        net(torch.rand(1, 3, 4, 4), torch.rand(1, 2, 4, 4))  # guide on the LR grid
    with pytest.raises(ModelError, match="out_channels"):
        build_model("guided_rescnn", spatial_dims=2, in_channels=5, scale=2, guide_channels=2, out_channels=5)
    with pytest.raises(ModelError, match="guide_channels"):
        build_model("guided_rescnn", spatial_dims=2, in_channels=2, scale=2, guide_channels=2)


@pytest.mark.parametrize("scale", [(2, 2), (1, 3), (2, 1, 3)])
def test_unshuffle_inverts_the_pixel_shuffle(scale):
    x = torch.randn(2, 3, *(n * f for n, f in zip((4, 5, 3)[: len(scale)], scale)))
    packed = pixel_unshuffle_nd(x, scale)
    assert packed.shape[1] == 3 * int(np.prod(scale))
    assert torch.equal(pixel_shuffle_nd(packed, scale), x)


def test_packed_view_equals_the_two_input_net():
    net = tiny_net(jitter=0.05)
    lr, guide = torch.rand(2, 3, 7, 8), torch.rand(2, 2, 14, 16)
    packed = PackedGuided(net)
    assert packed.in_channels == 3 + 2 * 4 and packed.out_channels == 3
    with torch.no_grad():
        torch.testing.assert_close(packed(pack(lr, guide, (2, 2))), net(lr, guide), rtol=0, atol=0)


def test_receptive_radius_is_exact_for_both_inputs():
    """Gradient probe on the packed view: the LR pixels (either input) that reach the output block
    of the centre LR pixel lie exactly within the radius."""
    net = tiny_net(jitter=0.05).double()
    packed = PackedGuided(net)
    r = net.receptive_radius
    size = [2 * v + 7 for v in r]
    c = [n // 2 for n in size]
    x = torch.randn(1, packed.in_channels, *size, dtype=torch.float64, requires_grad=True)
    packed(x)[(0, 0, slice(2 * c[0], 2 * c[0] + 2), slice(2 * c[1], 2 * c[1] + 2))].sum().backward()
    extent = {}
    for name, part in (("lr", slice(0, 3)), ("guide", slice(3, None))):
        nz = (x.grad[0, part].abs().sum(0) > 0).nonzero()
        extent[name] = tuple((nz - torch.tensor(c)).abs().max(0).values.tolist())
    convs = [conv(1)] * (2 + 2 * TINY["n_blocks"])  # 6 HR convs of radius 1
    assert extent["lr"] == chain_radius([interp((2, 2), 2), *convs], 2) == (5, 5)  # cubic, then the convs
    assert extent["guide"] == chain_radius([up((2, 2)), *convs], 2) == (3, 3)
    assert r == tuple(max(a, b) for a, b in zip(extent["lr"], extent["guide"]))


def _images(lr_names=TARGET, guide_names=GUIDE, guide_geometry=None):
    s = scene(rows=24, cols=20)
    lr, g = s.groups["20m"], s.groups["10m"]
    lr = lr.derive(lr.data, band_names=tuple(lr_names))
    g = g.derive(g.data, geometry=guide_geometry or g.geometry, band_names=tuple(guide_names))
    return lr, g


def test_card_model_works_in_image_units_and_starts_as_cubic():
    net = tiny_net()
    model = GuidedCardModel(net, card_for(net))
    lr, g = _images()
    model.check(lr, g)
    x, gx = torch.from_numpy(lr.data)[None], torch.from_numpy(g.data)[None]
    cubic = build_model("cubic", spatial_dims=2, in_channels=3, scale=2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, gx), cubic(x), rtol=0, atol=1e-3)


def test_inputs_that_do_not_match_the_card_are_refused():
    net = tiny_net()
    card = card_for(net)
    assert is_guided(card) and guided_bands(card) == (list(TARGET), list(GUIDE))
    with pytest.raises(ModelCardMismatch, match="differ from the model's"):
        check_guided_input(card, *_images(lr_names=("T1", "T2", "G1")))
    with pytest.raises(ModelCardMismatch, match="differ from the model's"):
        check_guided_input(card, *_images(guide_names=("G2", "G1")))
    lr, g = _images()
    shifted = g.geometry.cropped((1, 0), g.geometry.shape)  # one guide pixel off
    with pytest.raises(ModelCardMismatch, match="not on the LR bands' grid"):
        check_guided_input(card, lr, g.derive(g.data, geometry=shifted))
    with pytest.raises(ModelCardMismatch, match="reflectance"):
        check_guided_input(card, lr.derive(lr.data / 10000.0, units=""), g)
    with pytest.raises(ModelCardMismatch, match="4 bands"):
        four = lr.derive(np.concatenate([lr.data, lr.data[:1]]), band_names=("a", "b", "c", "d"))
        check_guided_input(card, four, g)


def test_checkpoint_round_trip(tmp_path):
    net = tiny_net(jitter=0.05)
    card = card_for(net)
    path = save_checkpoint(net, card, tmp_path)
    model, loaded = load_guided_checkpoint(str(path))
    assert loaded.bands == [*TARGET, *GUIDE] and loaded.output_bands == list(TARGET)
    lr, g = torch.rand(1, 3, 6, 6) * 3000, torch.rand(1, 2, 12, 12) * 3000
    with torch.no_grad():
        torch.testing.assert_close(model(lr, g), GuidedCardModel(net, card)(lr, g), rtol=0, atol=1e-3)
    plain, _ = load_checkpoint(path)  # the generic loader builds it, but refuses to run without a guide
    with pytest.raises(ModelError, match="needs 2 guide band"):
        plain(torch.rand(1, 5, 6, 6))
    rescnn = card.model_copy(update={"architecture": Architecture(name="rescnn")})
    assert not is_guided(rescnn)
