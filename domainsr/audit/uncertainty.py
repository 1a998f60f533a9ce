"""Reference-free uncertainty: spread of a model's answers under test-time augmentation (TTA) or
across a checkpoint ensemble.

A faithful model answers a flipped input with the flipped answer. Where its answers under flips
(and, for equal per-axis scale, axis swaps) disagree by more than the noise, it is guessing: the
per-pixel standard deviation over the de-augmented outputs is the uncertainty map (as MONAI's
``TestTimeAugmentation``; ESA's LDSR-S2 does the same over stochastic runs). A checkpoint
ensemble gives the same map from the spread across members.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from domainsr.image import GeoGeometry, Geometry, MedicalGeometry, SpatialImage

Enhancer = Callable[[SpatialImage], SpatialImage]


@dataclass(frozen=True)
class Augmentation:
    """Flip the listed spatial axes, then permute the spatial axes (``perm[i]`` = source axis)."""

    flips: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def name(self) -> str:
        parts = [f"flip{''.join(str(a) for a in self.flips)}" if self.flips else ""]
        if self.perm != tuple(sorted(self.perm)):
            parts.append("swap" + "".join(str(a) for a in self.perm))
        return "+".join(p for p in parts if p) or "identity"

    def forward(self, arr: np.ndarray) -> np.ndarray:
        out = np.flip(arr, axis=tuple(a + 1 for a in self.flips)) if self.flips else arr
        return np.ascontiguousarray(np.transpose(out, (0, *[p + 1 for p in self.perm])))

    def inverse(self, arr: np.ndarray) -> np.ndarray:
        inv = np.argsort(self.perm)
        out = np.transpose(arr, (0, *[int(p) + 1 for p in inv]))
        out = np.flip(out, axis=tuple(a + 1 for a in self.flips)) if self.flips else out
        return np.ascontiguousarray(out)


def augmentations(spatial_dims: int, scale: Sequence[int], mode: str = "flips",
                  max_count: int = 8) -> list[Augmentation]:
    """Identity first, then flips of single axes, pairs, ...; ``"dihedral"`` adds swaps of axes that
    share a scale factor. At most ``max_count`` (spread over the group, deterministic)."""
    ident = tuple(range(spatial_dims))
    if mode == "off" or max_count <= 1:
        return [Augmentation((), ident)]
    flips = [c for k in range(spatial_dims + 1) for c in itertools.combinations(range(spatial_dims), k)]
    perms = [ident]
    if mode == "dihedral":
        perms += [p for p in itertools.permutations(range(spatial_dims))
                  if p != ident and all(scale[a] == scale[p[a]] for a in range(spatial_dims))]
    group = [Augmentation(f, p) for p in perms for f in flips]
    if len(group) <= max_count:
        return group
    picks = np.unique(np.round(np.linspace(0, len(group) - 1, max_count)).astype(int))
    return [group[i] for i in picks]


def permuted_geometry(geometry: Geometry, perm: Sequence[int], shape: Sequence[int]) -> Geometry:
    """A geometry for the permuted array (only the shape matters to a model; kept consistent)."""
    if list(perm) == sorted(perm):
        return geometry
    if isinstance(geometry, MedicalGeometry):
        aff = geometry.affine.copy()
        aff[:3, : len(perm)] = geometry.affine[:3, list(perm)]
        return MedicalGeometry(aff, tuple(shape))
    if isinstance(geometry, GeoGeometry):
        from affine import Affine

        return GeoGeometry(geometry.crs, geometry.transform @ Affine(0, 1, 0, 1, 0, 0), tuple(shape))
    raise TypeError(f"unknown geometry {type(geometry).__name__}")


def tta_outputs(enhancer: Enhancer, lr: SpatialImage, augs: Sequence[Augmentation]) -> list[np.ndarray]:
    """De-augmented SR outputs of ``enhancer`` for each augmentation of ``lr`` (float32 arrays)."""
    outs = []
    for aug in augs:
        data = aug.forward(lr.data)
        mask = None if lr.mask is None else aug.forward(lr.mask[None])[0]
        geom = permuted_geometry(lr.geometry, aug.perm, data.shape[1:])
        img = lr.derive(data, geometry=geom, mask=mask)
        outs.append(aug.inverse(np.asarray(enhancer(img).data, dtype=np.float32)))
    return outs


def spread(outputs: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel mean and standard deviation (ddof=1) over ``outputs`` (TTA runs or ensemble members)."""
    if len(outputs) < 2:
        raise ValueError("an uncertainty map needs at least two outputs")
    stack = np.stack([np.asarray(o, np.float32) for o in outputs])
    return stack.mean(0), stack.std(0, ddof=1)


def tta_uncertainty(enhancer: Enhancer, lr: SpatialImage, scale: Sequence[int], mode: str = "flips",
                    max_count: int = 8) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Mean and standard deviation over test-time augmentations, and the augmentations' names."""
    augs = augmentations(lr.spatial_dims, scale, mode, max_count)
    mean, std = spread(tta_outputs(enhancer, lr, augs))
    return mean, std, [a.name for a in augs]


def unstable(std: np.ndarray, sigma: Sequence[float], mask: np.ndarray, window: Sequence[float],
             z: float) -> tuple[np.ndarray, np.ndarray]:
    """Spread in noise units and where it is significant.

    Returns ``u`` (max over bands of std / sigma, per pixel) and the unstable pixels: ``u > 1`` (the
    answers differ by more than the noise) where the window's mean ``u^2`` also exceeds the
    chi-square bound of pure noise, ``1 + z sqrt(2 sum w^2)``, with one-pixel gaps closed.
    """
    from domainsr.audit.hallucination import kernel_sq_sum, refine, smooth

    ratios = [np.asarray(s, np.float32) / np.float32(max(sg, 1e-12)) for s, sg in zip(std, sigma)]
    u = np.where(mask, np.max(ratios, axis=0), 0).astype(np.float32)
    u2 = np.max([smooth(r * r, window) for r in ratios], axis=0)
    bound = 1.0 + z * np.sqrt(2.0 * kernel_sq_sum(window))
    return u, refine((u2 > bound) & mask, (u > 1.0) & mask)


def ensemble_uncertainty(members: Sequence[Enhancer], lr: SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation across checkpoint ensemble members run on the same input."""
    return spread([np.asarray(m(lr).data, np.float32) for m in members])
