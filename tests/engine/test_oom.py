"""Out-of-memory recovery of the patch engine (issue 17: OOM-adaptive tile size on CUDA), simulated
on the CPU by a model that raises torch.OutOfMemoryError above a size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from engine_testmodels import ConvSR
from torch import nn

from domainsr.engine import PatchInferer
from domainsr.errors import ResourceLimitError


class Tight(nn.Module):
    """``model``, but out of memory for any batch of more than ``limit`` input pixels (the 16 px
    activation probe included)."""

    def __init__(self, model: nn.Module, limit: int) -> None:
        super().__init__()
        self.model, self.limit = model, limit
        for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius"):
            setattr(self, k, getattr(model, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[2:].numel() > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


@pytest.fixture
def image(rng: np.random.Generator) -> np.ndarray:
    return rng.random((3, 96, 80), dtype=np.float32)


def test_batches_split_then_windows_shrink_and_the_output_is_unchanged(image: np.ndarray) -> None:
    net = ConvSR(channels=3, scale=(2, 2), depth=3)
    ref = PatchInferer(net, tile=48, batch_size=4, device="cpu").run(image)
    tight = PatchInferer(Tight(net, limit=30 * 30), tile=48, batch_size=4, device="cpu")
    out = tight.run(image)
    # halo mode: nested windows give the same pixels, up to the float rounding of other conv sizes
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-4)
    assert tight.stats.oom_events >= 3  # 4 -> 2 -> 1 tiles per pass, then a smaller window
    assert tight._oom_batch == 1 and tight._oom_window is not None and max(tight._oom_window) <= 30
    again = tight.run(image)  # the learnt sizes are kept: no new failure
    np.testing.assert_allclose(again, ref, rtol=0, atol=2e-4)
    assert tight.stats.oom_events == 0


def test_a_batch_that_only_needs_splitting_keeps_its_windows(image: np.ndarray) -> None:
    net = ConvSR(channels=3, scale=(2, 2), depth=2)
    ref = PatchInferer(net, tile=40, batch_size=4, device="cpu").run(image)
    tight = PatchInferer(Tight(net, limit=2 * 40 * 40), tile=40, batch_size=4, device="cpu")
    np.testing.assert_array_equal(tight.run(image), ref)
    assert tight._oom_batch == 2 and tight._oom_window is None


def test_no_window_small_enough_is_a_clear_error(image: np.ndarray) -> None:
    tight = PatchInferer(Tight(ConvSR(channels=3, scale=(2, 2), depth=3), limit=4), tile=48, device="cpu")
    with pytest.raises(ResourceLimitError, match="out of cpu memory even for one window"):
        tight.run(image)
