"""Patch-wise inference: tile plans (tiling), batched device-aware inference (inferer), windowed
raster streaming (streaming) and progress callbacks (progress)."""
from __future__ import annotations

from domainsr.engine.images import enhance_image
from domainsr.engine.inferer import PatchInferer
from domainsr.engine.progress import Progress, log_progress, rich_progress
from domainsr.engine.tiling import TilePlan

__all__ = ["PatchInferer", "Progress", "TilePlan", "enhance_image", "enhance_raster_file", "log_progress",
           "rich_progress"]


def __getattr__(name: str):  # streaming pulls in rasterio and the raster writer only when used
    if name == "enhance_raster_file":
        from domainsr.engine.streaming import enhance_raster_file

        return enhance_raster_file
    raise AttributeError(name)
