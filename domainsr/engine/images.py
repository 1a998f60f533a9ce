"""Enhancing a whole :class:`~domainsr.image.SpatialImage` with a :class:`PatchInferer`: the output
grid, the valid mask, nodata, the storage dtype and the provenance step."""
from __future__ import annotations

import numpy as np

from domainsr.engine.inferer import PatchInferer
from domainsr.engine.sources import upsample_nearest
from domainsr.errors import ModelCardMismatch
from domainsr.image import SpatialImage


def enhance_image(img: SpatialImage, inferer: PatchInferer) -> SpatialImage:
    """Enhance a :class:`SpatialImage`: float32 data on ``img.geometry.scaled(scale)``, the valid
    mask upsampled (nearest; non-finite input pixels become invalid), ``nodata`` (or NaN) over
    invalid pixels, ``meta["storage_dtype"]`` kept so writers round and clip to the source dtype,
    and a provenance step naming the model (its descriptor's name, kind and checksum) and the tiling."""
    nd = img.spatial_dims
    if inferer.spatial_dims is not None and inferer.spatial_dims != nd:
        raise ModelCardMismatch(f"model is {inferer.spatial_dims}D but the image has {nd} spatial axes",
                                img.source or None)
    if inferer.in_channels is not None and inferer.in_channels != img.channels:
        raise ModelCardMismatch(f"model expects {inferer.in_channels} channels ({img.channels} given: "
                                f"{', '.join(img.band_names)})", img.source or None)
    scale = inferer.scale_for(nd)
    fill = float(img.nodata) if img.nodata is not None else float("nan")
    out = inferer.run(img.data, mask=img.mask, fill=fill)
    valid = img.valid_mask()
    if img.data.dtype.kind in "fc":
        valid = valid & np.all(np.isfinite(img.data), axis=0)
    mask = None if img.mask is None and valid.all() else upsample_nearest(valid, scale)
    step = {
        "step": "enhance",
        **inferer.descriptor.history_fields(),
        "scale": list(scale),
        "device": str(inferer.device),
        "amp": inferer.amp,
        "tiles": {"computed": inferer.stats.computed, "skipped": inferer.stats.skipped,
                  **inferer.stats.plan},
    }
    names = (img.band_names if out.shape[0] == img.channels
             else tuple(f"band{i + 1}" for i in range(out.shape[0])))
    new = img.derive(out, geometry=img.geometry.scaled(scale), mask=mask, step=step, band_names=names)
    new.meta["storage_dtype"] = img.meta.get("storage_dtype", str(img.data.dtype))
    return new
