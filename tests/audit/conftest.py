"""Real-data crops and simple models for the audit tests."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.audit import interpolation_enhancer
from domainsr.degrade import build_degradation
from domainsr.image import SpatialImage


def OpticalDegradation(noise_sd: float = 4.0):
    """Sentinel-2-like: Gaussian PSF (MTF 0.25 at LR Nyquist), point sampling, read noise in DN."""
    return build_degradation({"kind": "optical", "scale": [2, 2], "mtf": 0.25, "noise_sigma": noise_sd})


def VolumeDegradation(noise_sd: float = 1.0):
    """MRI x2 isotropic: 2x2x2 block mean, then Rician noise in grey levels."""
    return build_degradation({"kind": "compose", "steps": [
        {"kind": "gaussian_mean", "scale": [2, 2, 2], "sigma": 0.0},
        {"kind": "rician", "sigma": noise_sd, "relative": False}]})


def planted(base, box: tuple[slice, ...], amplitude: np.ndarray):
    """A wrapper 'model': ``base``'s output with a bright block pasted at ``box`` (SR indices)."""

    def run(lr: SpatialImage) -> SpatialImage:
        out = base(lr)
        data = np.array(out.data, np.float32, copy=True)
        data[(slice(None), *box)] += np.asarray(amplitude, np.float32).reshape((-1,) + (1,) * len(box))
        return out.derive(data, step={"step": "planted hallucination"})

    return run


def oracle(reference: SpatialImage):
    """An identity-consistent model: returns the truth, which re-degrades exactly to the LR input."""

    def run(lr: SpatialImage) -> SpatialImage:
        return reference.derive(np.asarray(reference.data, np.float32), step={"step": "oracle"})

    return run


@pytest.fixture(scope="session")
def s2_crop(sample_data) -> SpatialImage:
    """A real 10 m Sentinel-2 crop (B02, B03, B04, B08; 128 x 128 px, coast and fields)."""
    from domainsr.io import read_image

    img = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    r0, c0, n = 1264, 640, 128
    mask = None if img.mask is None else img.mask[r0:r0 + n, c0:c0 + n]
    return img.derive(np.ascontiguousarray(img.data[:, r0:r0 + n, c0:c0 + n]),
                      geometry=img.geometry.cropped((r0, c0), (n, n)), mask=mask)


@pytest.fixture(scope="session")
def mni_block(sample_data) -> SpatialImage:
    """A real 64^3 block of the MNI152 T1 template (1 mm) through the ventricles."""
    from domainsr.io import read_image

    img = read_image(sample_data["mni152"])
    start, n = (66, 88, 70), 64
    sl = tuple(slice(s, s + n) for s in start)
    return img.derive(np.ascontiguousarray(img.data[(slice(None), *sl)]),
                      geometry=img.geometry.cropped(start, (n, n, n)), mask=None)


@pytest.fixture()
def cubic2d():
    return interpolation_enhancer("cubic", 4, (2, 2))


@pytest.fixture()
def cubic3d():
    return interpolation_enhancer("cubic", 1, (2, 2, 2))
