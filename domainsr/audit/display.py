"""Display planes and figure panels of the audit report.

``Display`` turns SR-grid arrays into 2D planes (volumes reoriented to RAS+, true aspect);
``Painter`` renders the panels of a plane (LR | baseline | SR | HR | error | correctness classes |
risk with region boxes | LR-consistency residual | TTA uncertainty) with consistent windows and
colour bars; ``region_crop`` is the window of a region's close-up.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from domainsr.audit import figures as fg
from domainsr.audit.hallucination import upsample_nearest
from domainsr.audit.protocol import AuditResult
from domainsr.audit.results import Region
from domainsr.image import MedicalGeometry

# ---------------------------------------------------------------------------------------------
# display planes


class Display:
    """Turns SR-grid arrays into 2D display planes (volumes reoriented to RAS+)."""

    def __init__(self, result: AuditResult) -> None:
        self.result = result
        geom = result.sr.geometry
        self.volume = result.sr.spatial_dims == 3
        self.ornt = None
        self.spacing = list(geom.spacing)
        if self.volume and isinstance(geom, MedicalGeometry):
            import nibabel.orientations as no

            self.ornt = no.io_orientation(geom.affine)
            sp = [0.0, 0.0, 0.0]
            for ax, (new_ax, _) in enumerate(self.ornt):
                sp[int(new_ax)] = self.spacing[ax]
            self.spacing = sp
        self.shape = self.canon(np.zeros(result.sr.spatial_shape, bool)).shape

    def canon(self, arr: np.ndarray) -> np.ndarray:
        """Reorient the trailing spatial axes of ``arr`` to RAS+ (volumes); rasters unchanged."""
        if self.ornt is None:
            return arr
        import nibabel.orientations as no

        if arr.ndim == 3:
            return no.apply_orientation(arr, self.ornt)
        return np.stack([no.apply_orientation(a, self.ornt) for a in arr])

    def canon_index(self, idx: Sequence[float]) -> list[float]:
        if self.ornt is None:
            return list(idx)
        shape = self.result.sr.spatial_shape
        out = [0.0] * len(idx)
        for ax, (new_ax, flip) in enumerate(self.ornt):
            out[int(new_ax)] = (shape[ax] - 1 - idx[ax]) if flip < 0 else idx[ax]
        return out

    def planes(self, centre: Sequence[float]) -> list[tuple[str, int, int]]:
        """``(name, fixed axis, index)`` of the planes through ``centre`` (canonical indices)."""
        if not self.volume:
            return [("image", -1, 0)]
        c = [round(v) for v in centre]
        return [("axial", 2, c[2]), ("coronal", 1, c[1]), ("sagittal", 0, c[0])]

    def take(self, arr: np.ndarray, plane: tuple[str, int, int]) -> np.ndarray:
        """2D (rows, cols[, channels]) display plane of a canonical array ``(C?, *spatial)``."""
        _, axis, index = plane
        if axis < 0:
            return np.moveaxis(arr, 0, -1) if arr.ndim == 3 else arr
        lead = arr.ndim - 3
        sl = [slice(None)] * arr.ndim
        sl[lead + axis] = index
        a = arr[tuple(sl)]  # (C?, u, v) with u, v the two remaining axes in RAS order
        a = np.swapaxes(a, -1, -2)[..., ::-1, :]  # rows = second axis (up = anterior/superior)
        return np.moveaxis(a, 0, -1) if lead else a

    def aspect(self, plane: tuple[str, int, int]) -> float:
        _, axis, _ = plane
        if axis < 0:
            return self.spacing[0] / self.spacing[1]
        u, v = [a for a in range(3) if a != axis]
        return self.spacing[v] / self.spacing[u]

    def box_2d(self, region: Region, plane: tuple[str, int, int]) -> tuple[float, float, float, float] | None:
        """The region's box in plane array coordinates ``(c0, r0, c1, r1)``, or None if it misses."""
        lo = self.canon_index([b[0] for b in region.bbox_index])
        hi = self.canon_index([b[1] for b in region.bbox_index])
        lo, hi = [min(a, b) for a, b in zip(lo, hi)], [max(a, b) for a, b in zip(lo, hi)]
        _, axis, index = plane
        if axis < 0:
            return lo[1], lo[0], hi[1], hi[0]
        if not lo[axis] <= index <= hi[axis]:
            return None
        u, v = [a for a in range(3) if a != axis]
        n_rows = self.shape[v]
        return lo[u], n_rows - 1 - hi[v], hi[u], n_rows - 1 - lo[v]


@dataclass
class Layers:
    """Canonical SR-grid arrays for the panels, and their display ranges."""

    lr: np.ndarray
    base: np.ndarray
    sr: np.ndarray
    ref: np.ndarray | None
    err: np.ndarray
    err_label: str
    classes: np.ndarray | None
    risk: np.ndarray
    resid: np.ndarray
    unc: np.ndarray | None
    mask: np.ndarray


def layers_of(result: AuditResult, disp: Display) -> Layers:
    """The canonical panel arrays of ``result``."""
    sr = np.asarray(result.sr.data, np.float32)
    ref = None if result.reference is None else np.asarray(result.reference.data, np.float32)
    base = np.asarray(result.baseline.data, np.float32)
    if ref is not None:
        err, label = np.mean(np.abs(sr - ref), axis=0), "|SR − HR|"
    else:
        err, label = np.mean(np.abs(sr - base), axis=0), "|SR − baseline| (what the model added)"
    lr_up = upsample_nearest(np.asarray(result.lr.data, np.float32), (1, *result.scale))
    return Layers(lr=disp.canon(lr_up), base=disp.canon(base), sr=disp.canon(sr),
                  ref=None if ref is None else disp.canon(ref), err=disp.canon(np.where(result.mask, err, 0)),
                  err_label=label, classes=None if result.classes is None else disp.canon(result.classes),
                  risk=disp.canon(result.risk), resid=disp.canon(result.lr_residual),
                  unc=None if result.uncertainty is None else disp.canon(result.uncertainty),
                  mask=disp.canon(result.mask))


class Painter:
    """Renders panels of a plane, with consistent windows and colour bars."""

    def __init__(self, result: AuditResult, layers: Layers) -> None:
        self.r, self.L = result, layers
        bands = result.sr.band_names
        comp = fg.composite_for(result.sr) if result.sr.channels >= 3 else None
        self.bands, self.band_label = (comp if comp else ([0], bands[0]))
        src = layers.ref if layers.ref is not None else layers.sr
        m = layers.mask
        self.windows = [fg.percentiles(src[b][m], 1.0 if len(self.bands) == 3 else 0.5,
                                       99.0 if len(self.bands) == 3 else 99.5) for b in self.bands]
        self.err_hi = max(fg.percentiles(layers.err[m], 0, 99.5)[1], 1e-6)
        th = result.thresholds
        self.risk_hi = 1.5 * th.fail_risk
        self.sig_hi = max(5.0, fg.percentiles(layers.resid[m], 0, 99.5)[1])
        if layers.unc is not None:
            self.sig_hi = max(self.sig_hi, fg.percentiles(layers.unc[m], 0, 99.5)[1])

    def intensity(self, arr: np.ndarray) -> np.ndarray:
        """RGB uint8 of a 2D plane ``(rows, cols, C)``."""
        chans = [fg.stretch(arr[..., b], lo, hi) for b, (lo, hi) in zip(self.bands, self.windows)]
        return np.stack(chans, -1) if len(chans) == 3 else np.repeat(chans[0][..., None], 3, -1)

    def panels(self, disp: Display, plane: tuple[str, int, int], regions: Sequence[Region],
               crop: tuple[slice, slice] | None = None, min_side: int = 200, max_side: int = fg.MAX_SIDE
               ) -> list[dict[str, Any]]:
        L = self.L
        take = lambda a: disp.take(a, plane)
        cut = (lambda a: a[crop]) if crop is not None else (lambda a: a)
        base_shape = cut(take(L.mask)).shape
        view = fg.View.fit(base_shape, disp.aspect(plane), max_side=max_side, min_side=min_side)
        nearest = crop is not None
        sx = view.size[0] / max(1, base_shape[1] // view.step * view.step)  # display px per array px
        sy = view.size[1] / max(1, base_shape[0] // view.step * view.step)
        off = (crop[1].start, crop[0].start) if crop is not None else (0, 0)
        boxes = []
        for reg in regions:
            b = disp.box_2d(reg, plane)
            if b is None:
                continue
            c0, r0, c1, r1 = b[0] - off[0], b[1] - off[1], b[2] - off[0], b[3] - off[1]
            if c1 < 0 or r1 < 0 or c0 >= base_shape[1] or r0 >= base_shape[0]:
                continue
            boxes.append((reg.id, (c0 * sx, r0 * sy, (c1 + 1) * sx - 1, (r1 + 1) * sy - 1), reg.verdict))

        def flat(arr: np.ndarray, how: str = "mean") -> np.ndarray:
            """The display plane, block-reduced before any colour mapping (bounded memory)."""
            return view.reduce(np.asarray(cut(take(arr)), np.float32), how)

        def img(rgb: np.ndarray, draw: bool = False) -> str:
            im = view.render(rgb, nearest=nearest)
            return fg.encode(fg.draw_boxes(im, boxes) if draw else im)

        sr_rgb = self.intensity(flat(L.sr))
        dim = fg.grey_rgb(np.mean(sr_rgb, -1), 0, 255)  # the SR as a grey backdrop for overlays
        unit = self.r.sr.units or "a.u."
        win = ", ".join(f"{lo:.4g}–{hi:.4g}" for lo, hi in self.windows)
        out = [
            {"title": "LR input", "img": img(self.intensity(flat(L.lr))), "note": f"{self.band_label}; {win} {unit}"},
            {"title": f"Baseline ({self.r.thresholds.baseline})", "img": img(self.intensity(flat(L.base)))},
            {"title": "SR (model)", "img": img(sr_rgb)},
        ]
        if L.ref is not None:
            out.append({"title": "HR reference", "img": img(self.intensity(flat(L.ref)))})
        out.append({"title": L.err_label, "img": img(fg.heat(flat(L.err, "max"), 0, self.err_hi)),
                    "bar": (0, self.err_hi, unit + " (mean over bands)")})
        if L.classes is not None:
            rgb = fg.overlay_classes(dim, np.rint(flat(L.classes, "max")).astype(np.uint8))
            out.append({"title": "Correctness vs HR", "img": img(rgb, draw=True), "legend": True})
        rgb = fg.overlay_heat(dim, flat(L.risk, "max"), 0, self.risk_hi)
        out.append({"title": "Hallucination risk" if L.classes is not None else "Risk (LR-inconsistency)",
                    "img": img(rgb, draw=True), "bar": (0, self.risk_hi, "relative excess error")})
        out.append({"title": "LR-consistency residual", "img": img(fg.heat(flat(L.resid, "max"), 0, self.sig_hi)),
                    "bar": (0, self.sig_hi, "noise σ")})
        if L.unc is not None:
            out.append({"title": "TTA uncertainty" if self.r.noise.uncertainty.method.startswith("tta")
                        else "Ensemble spread", "img": img(fg.heat(flat(L.unc, "max"), 0, self.sig_hi)),
                        "bar": (0, self.sig_hi, "noise σ")})
        return out


def region_crop(disp: Display, region: Region, plane: tuple[str, int, int], shape: tuple[int, int]
                ) -> tuple[slice, slice]:
    """The window (rows, cols) of ``region``'s close-up in a plane of ``shape``: a square about its
    box (its centroid where the box misses the plane), half-width at least 16 px, clipped to the plane."""
    b = disp.box_2d(region, plane)
    if b is None:
        c = disp.canon_index(region.centroid_index)
        _, axis, _ = plane
        u, v = [a for a in range(3) if a != axis]
        b = (c[u], shape[0] - 1 - c[v], c[u], shape[0] - 1 - c[v])
    c0, r0, c1, r1 = b
    half = max(16, int(max(c1 - c0, r1 - r0)))
    rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
    r_lo = int(max(0, min(shape[0] - 1, rc - half)))
    c_lo = int(max(0, min(shape[1] - 1, cc - half)))
    return slice(r_lo, int(min(shape[0], rc + half + 1))), slice(c_lo, int(min(shape[1], cc + half + 1)))


__all__ = ["Display", "Layers", "Painter", "layers_of", "region_crop"]
