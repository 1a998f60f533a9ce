import numpy as np

from domainsr.degrade import build_degradation


def test_mtf_jitter_varies_blur_and_round_trips():
    spec = {"kind": "optical", "scale": [2, 2], "mtf": 0.25, "mtf_jitter": 0.15}
    deg = build_degradation(spec)
    x = np.zeros((1, 64, 64), np.float32)
    x[0, 32, 32] = 1.0
    peaks = {float(deg(x, np.random.default_rng(s)).max()) for s in range(6)}
    assert len(peaks) > 3  # a different PSF width per draw
    assert build_degradation(deg.describe()) == deg
    fixed = build_degradation({**spec, "mtf_jitter": 0.0})
    assert len({float(fixed(x, np.random.default_rng(s)).max()) for s in range(3)}) == 1
