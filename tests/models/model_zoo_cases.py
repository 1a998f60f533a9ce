"""Tiny widths per registry model so the shape and probe tests stay fast (names must be unique
across test folders, hence the long module name)."""
from __future__ import annotations

import torch

TINY = {
    "rescnn": {"n_blocks": 2, "n_feats": 8, "zero_init_tail": False},
    "span": {"n_blocks": 2, "n_feats": 8, "zero_init_tail": False},
    "srcnn": {"features": (8, 4)},
    "vdsr": {"depth": 4, "n_feats": 8},
    "espcn": {"features": (8, 8)},
    "fsrcnn": {"d": 8, "s": 4, "m": 2},
    "edsr": {"n_resblocks": 2, "n_feats": 8},
    "mdsr": {"n_resblocks": 2, "n_feats": 8},
    "rcan": {"n_resgroups": 2, "n_resblocks": 2, "n_feats": 8, "reduction": 1, "ca_radius": 2},
    "srresnet": {"n_blocks": 2, "n_feats": 8},
    "rrdbnet": {"n_blocks": 1, "n_feats": 8, "growth": 4},
    "repsr": {"n_blocks": 2, "n_feats": 8},
    "vgg_discriminator": {"n_feats": 4, "n_stages": 3},
    "unet_discriminator": {"n_feats": 4},
}


def jitter(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter so no branch is trivially zero (e.g. zero-initialised tails)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return model
