"""CPU bf16 (issue 17): ``amp="auto"`` uses it only where the model card vouches for it (a measured
held-out loss within CPU_BF16_MAX_LOSS_DB) and the CPU runs bf16 natively; the residual network keeps
its interpolation base and output in float32, so the loss stays tiny."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from domainsr.engine import PatchInferer
from domainsr.engine import inferer as inferer_mod
from domainsr.models.card import PrecisionCheck
from domainsr.models.checkpoints import load_checkpoint
from domainsr.models.registry import build_model


def _card_model(loss: float | None):
    module, card = load_checkpoint("sentinel2-rgbn-x2")
    precision = {} if loss is None else {"bf16": PrecisionCheck(psnr_loss_db=loss, speedup=2.0)}
    module.card = card.model_copy(update={"precision": precision})
    return module


@pytest.mark.parametrize(("loss", "native", "want"), [(0.01, True, "bf16"), (0.2, True, "off"),
                                                       (None, True, "off"), (0.01, False, "off")])
def test_auto_precision_on_cpu_follows_the_card_and_the_cpu(monkeypatch, loss, native, want) -> None:
    monkeypatch.setattr(inferer_mod, "cpu_bf16_native", lambda: native)
    inf = PatchInferer(_card_model(loss), device="cpu")
    assert inf.amp == want


def test_bf16_keeps_the_base_in_float32() -> None:
    torch.manual_seed(0)
    net = build_model("rescnn", spatial_dims=2, in_channels=2, scale=2, n_blocks=2, n_feats=8).eval()
    x = torch.rand(1, 2, 24, 24) * 3000 + 500  # 16-bit-like values: a bf16 base would round them to 8 bits
    with torch.inference_mode():
        ref = net(x)  # tail starts at zero: the output is the base alone
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), ref.numpy())


def test_explicit_bf16_runs_on_cpu_and_is_recorded() -> None:
    rng = np.random.default_rng(0)
    module = _card_model(None)
    x = (rng.random((4, 48, 48), dtype=np.float32) * 2000 + 500).astype(np.float32)
    ref = PatchInferer(module, device="cpu", amp="off").run(x)
    inf = PatchInferer(module, device="cpu", amp="bf16")
    out = inf.run(x)
    assert inf.stats.plan["precision"] == "bf16" and inf.stats.plan["device"] == "cpu"
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert 0 < rel < 0.03  # random noise input: the worst case; real scenes lose ~0.01 dB (backends.md)
