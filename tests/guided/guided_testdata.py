"""A small synthetic two-grid scene and a tiny guided net for the guided tests (not a test module)."""
from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from domainsr.image import GeoGeometry, MultiResolutionImage, SpatialImage
from domainsr.models import build_model
from domainsr.models.checkpoints import Architecture, FixedNormalization, ModelCard

TARGET, GUIDE = ("T1", "T2", "T3"), ("G1", "G2")
TINY = {"n_blocks": 2, "n_feats": 8}


def scene(rows: int = 200, cols: int = 64, seed: int = 0) -> MultiResolutionImage:
    """Target bands on a 20 m grid that share the guide bands' structure (a linear mix of it plus a
    smooth component of their own), guides on the 10 m grid nested in it; values in DN."""
    rng = np.random.default_rng(seed)
    fine = np.stack([ndimage.gaussian_filter(rng.normal(size=(2 * rows, 2 * cols)), s) for s in (1.5, 2.5)])
    fine /= fine.std(axis=(1, 2), keepdims=True)
    own = ndimage.gaussian_filter(rng.normal(size=(3, 2 * rows, 2 * cols)), (0, 8, 8))
    mix = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, -0.5]])
    t_fine = np.tensordot(mix, fine, 1) + 20 * own
    target = t_fine.reshape(3, rows, 2, cols, 2).mean(axis=(2, 4))
    geo = GeoGeometry("EPSG:32618", (20, 0, 500000, 0, -20, 4e6), (rows, cols))
    t_img = SpatialImage((1500 + 300 * target).astype(np.float32), "optical", geo, TARGET, units="DN",
                         nodata=0)
    g_img = SpatialImage((1200 + 250 * fine).astype(np.float32), "optical", geo.scaled((2, 2)), GUIDE,
                         units="DN", nodata=0)
    for img in (t_img, g_img):
        img.provenance["source"] = "synthetic-two-grid"
    return MultiResolutionImage({"10m": g_img, "20m": t_img}, provenance={"source": "synthetic-two-grid"})


def tiny_net(seed: int = 0, jitter: float = 0.0, **kw) -> torch.nn.Module:
    """guided_rescnn for 3 target + 2 guide bands, x2; ``jitter`` perturbs every weight (the tail
    starts at zero otherwise)."""
    torch.manual_seed(seed)
    net = build_model("guided_rescnn", spatial_dims=2, in_channels=5, scale=(2, 2), guide_channels=2,
                      **{**TINY, **kw})
    if jitter:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * jitter)
    return net.eval()


def card_for(net: torch.nn.Module, **kw) -> ModelCard:
    spec = {"name": "tiny-guided", "architecture": Architecture(name="guided_rescnn",
                                                                 kwargs={**TINY, "guide_channels": 2}),
            "domain": "optical", "spatial_dims": 2, "scale": (2, 2), "in_channels": 5, "out_channels": 3,
            "bands": [*TARGET, *GUIDE], "output_bands": list(TARGET), "units": "DN", "input_range": (0, 4000),
            "normalization": FixedNormalization(offset=[1500, 1500, 1500, 1200, 1200],
                                                scale=[300, 300, 300, 250, 250]),
            "receptive_radius": net.receptive_radius}
    spec.update(kw)
    return ModelCard(**spec)
