"""Which pixels training may use: valid / foreground masks, the leak-free split of a config,
normalisation fixed on the train region, and the maps between two nested grids (guided training).

Both pairing strategies (:mod:`domainsr.train.single_grid`, :mod:`domainsr.train.guided`) and the
quality benchmark use these, so held-out figures are measured on the same pixels everywhere.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from domainsr.errors import ConfigError
from domainsr.image import SpatialImage
from domainsr.models.checkpoints import InputNormalization
from domainsr.train.config import FixedNormSpec, TrainConfig
from domainsr.train.datasets import Region, split_regions


def foreground(img: SpatialImage, data: np.ndarray, background: float | None) -> tuple[np.ndarray, np.ndarray]:
    """``(valid, foreground)`` masks over the spatial grid of ``data`` (``(C, *spatial)``): valid =
    inside the image's mask, finite in every band and not ``nodata`` in all bands; foreground =
    valid and above ``background`` in some band (``None``: every valid pixel)."""
    valid = img.valid_mask() & np.all(np.isfinite(data), axis=0)
    if img.nodata is not None and not np.isnan(img.nodata):
        valid &= ~np.all(data == img.nodata, axis=0)
    fg = valid if background is None else valid & np.any(data > background, axis=0)
    return valid, fg


def split(config: TrainConfig, spatial_shape: Sequence[int], receptive_radius: Sequence[int],
          source: str = "") -> tuple[dict[str, Region], int]:
    """The config's train / val / test regions along ``data.split.axis`` and the gap between train
    and each held-out region: at least the receptive radius (in source pixels) plus a training
    patch's extent with its margins along the axis, so no held-out pixel is ever a training pixel
    or context of one. ``receptive_radius`` is per network axis (LR pixels)."""
    d = config.data
    nd = len(spatial_shape)
    axis = d.split.axis
    if not 0 <= axis < nd:
        raise ConfigError(f"data.split.axis {axis} not in 0..{nd - 1}", source or None)
    full = [p + 2 * d.margin * s for p, s in zip(config.patch_size, config.scale)]
    ext_axis, rr_axis = 1, 0
    for axes in d.planes or [tuple(range(nd))]:
        if axis in axes:
            i = list(axes).index(axis)
            ext_axis = max(ext_axis, full[i])
            rr_axis = max(rr_axis, receptive_radius[i] * config.scale[i])
    gap = max(d.split.gap or 0, rr_axis + ext_axis)
    need_eval = max(config.scale) * 4
    regions = split_regions(spatial_shape[axis], axis=axis,
                            fractions={"train": d.split.train, "val": d.split.val, "test": d.split.test},
                            order=d.split.order, gap=gap,
                            min_sizes={"train": ext_axis, "val": need_eval, "test": need_eval}, source=source)
    return regions, gap


def fixed_normalization(spec: FixedNormSpec, data: np.ndarray, fg: np.ndarray, train: Region,
                        source: str = "") -> InputNormalization:
    """The config's offsets / scales, or the mean / std of the train region's foreground per band."""
    if spec.offset is None or spec.scale is None:
        box = train.slices(data.shape[1:])
        vals = [data[c][box][fg[box]] for c in range(data.shape[0])]
        offset = spec.offset or [float(v.mean()) for v in vals]
        scale = spec.scale or [max(float(v.std()), 1e-6) for v in vals]
    else:
        offset, scale = spec.offset, spec.scale
    if len(offset) != data.shape[0] or len(scale) != data.shape[0]:
        raise ConfigError(f"normalization needs {data.shape[0]} offsets/scales", source or None)
    return InputNormalization(np.asarray(offset, np.float32), np.asarray(scale, np.float32))


# ---------------------------------------------------------------------------------------------
# two nested grids: the fine grid is ``scale`` times the coarse one, origins aligned


def hr_box(box: tuple[slice, ...], scale: Sequence[int]) -> tuple[slice, ...]:
    """The fine-grid box covering the same ground as coarse-grid ``box``."""
    return tuple(slice(b.start * f, b.stop * f) for b, f in zip(box, scale))


def on_lr_grid(mask: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """A fine mask on the coarse grid: a coarse pixel is set where all of its fine block is."""
    shape = [v for n, f in zip(mask.shape, scale) for v in (n // f, f)]
    return mask.reshape(shape).all(axis=tuple(range(1, 2 * len(scale), 2)))


def on_hr_grid(mask: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """A coarse mask on the fine grid (nearest upsampling)."""
    for a, f in enumerate(scale):
        mask = np.repeat(mask, f, axis=a)
    return mask


__all__ = ["fixed_normalization", "foreground", "hr_box", "on_hr_grid", "on_lr_grid", "split"]
