"""Display planes and figure panels of the audit report.

``Display`` turns SR-grid arrays into 2D planes (volumes reoriented to RAS+, neurological view:
the patient's right on the right, anterior/superior up; true physical aspect) and knows what a
plane shows: its orientation letters (from the affine), its slice index on the SR file's array
axis and world position, the physical size of a display pixel (scale bars), and how overview
arrays decimated by ``result.stride`` map back to the file's indices. ``Painter`` renders the
panels of a plane (LR | baseline | SR | HR | error | correctness classes | risk with region boxes |
LR-consistency residual | TTA uncertainty) with intensity windows taken from the LR input and the
HR reference only (no SR value can move them) and colour bars; ``region_crop`` is the window of a
region's close-up.

Size: one class per concern of a figure (plane geometry, orientation and scale, panel painting)
that all read the same reoriented arrays; split, they would pass those arrays and index maps around.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from domainsr.audit import figures as fg
from domainsr.audit.protocol import AuditResult
from domainsr.audit.results import Region
from domainsr.image import GeoGeometry, MedicalGeometry

Plane = tuple[str, int, int]  # (name, fixed canonical axis or -1 for a raster, canonical index)
RAS_LETTERS = (("R", "L"), ("A", "P"), ("S", "I"))  # (+, -) letters of RAS+ x, y, z
LETTER_NAMES = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}


def ras_letter(vec: Sequence[float]) -> str:
    """The letter (R/L, A/P, S/I) of the RAS+ direction ``vec`` points most along."""
    v = np.asarray(vec, np.float64)
    k = int(np.argmax(np.abs(v)))
    return RAS_LETTERS[k][0 if v[k] > 0 else 1]


def _compass(dx: float, dy: float) -> str:
    """The compass direction of a map vector (x east, y north), its dominant component."""
    if abs(dx) >= abs(dy):
        return "east" if dx > 0 else "west"
    return "north" if dy > 0 else "south"


def resample_nearest(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``arr`` (C, *spatial) on a grid of ``shape`` by nearest neighbour (any ratio; LR -> SR grid
    and LR -> an overview alike)."""
    out = arr
    lead = arr.ndim - len(shape)
    for ax, n in enumerate(shape):
        m = out.shape[lead + ax]
        if m != n:
            idx = np.minimum(((np.arange(n) + 0.5) * m / n).astype(np.int64), m - 1)
            out = np.take(out, idx, axis=lead + ax)
    return out


# ---------------------------------------------------------------------------------------------
# display planes


class Display:
    """Turns SR-grid arrays into 2D display planes (volumes reoriented to RAS+) and says what they show.

    The arrays cover the audited box of the SR file (``coverage.box``; its start is ``offset``),
    at full resolution or as an overview of blocks of ``stride`` pixels; the geometry describes the
    arrays. Region boxes are on the file's axes: ``(index - offset) // stride`` on the arrays.
    ``offset`` overrides the box start (a crop whose coverage does not say where it lies).
    """

    def __init__(self, result: AuditResult, offset: Sequence[int] | None = None) -> None:
        self.result = result
        geom = result.sr.geometry
        self.geom = geom
        self.stride = max(1, int(getattr(result, "stride", 1) or 1))
        self.array_shape = tuple(int(n) for n in result.mask.shape)
        box = getattr(getattr(result, "coverage", None), "box", None)
        if offset is None:
            offset = [int(a) for a, _ in box] if box else [0] * len(self.array_shape)
        self.offset = [int(o) for o in offset]
        self.volume = len(self.array_shape) == 3
        self.ornt: np.ndarray | None = None
        # size of one array pixel (the geometry describes the arrays; scaled if it does not)
        ratio = [g / a for g, a in zip(geom.shape, self.array_shape)]
        self.spacing = [float(s) * r for s, r in zip(geom.spacing, ratio)]
        if self.volume and isinstance(geom, MedicalGeometry):
            import nibabel.orientations as no

            self.ornt = no.io_orientation(geom.affine)
            sp = [0.0, 0.0, 0.0]
            for ax, (new_ax, _) in enumerate(self.ornt):
                sp[int(new_ax)] = self.spacing[ax]
            self.spacing = sp
        self.shape = self.canon(np.zeros(self.array_shape, bool)).shape
        self.unit, self.unit_factor, self.scale_note = self._units()
        self.file_shape: list[int] | None = None  # the SR file's shape, where the caller knows it

    # ---- reorientation

    def canon(self, arr: np.ndarray) -> np.ndarray:
        """Reorient the trailing spatial axes of ``arr`` to RAS+ (volumes); rasters unchanged."""
        if self.ornt is None:
            return arr
        import nibabel.orientations as no

        if arr.ndim == 3:
            return no.apply_orientation(arr, self.ornt)
        return np.stack([no.apply_orientation(a, self.ornt) for a in arr])

    def canon_index(self, idx: Sequence[float]) -> list[float]:
        """Array (overview) indices -> canonical (RAS+) indices."""
        if self.ornt is None:
            return list(idx)
        out = [0.0] * len(idx)
        for ax, (new_ax, flip) in enumerate(self.ornt):
            out[int(new_ax)] = (self.array_shape[ax] - 1 - idx[ax]) if flip < 0 else idx[ax]
        return out

    def array_index(self, canon_idx: Sequence[float]) -> list[float]:
        """Canonical (RAS+) indices -> array (overview) indices (the inverse of :meth:`canon_index`)."""
        if self.ornt is None:
            return list(canon_idx)
        out = [0.0] * len(canon_idx)
        for ax, (new_ax, flip) in enumerate(self.ornt):
            c = canon_idx[int(new_ax)]
            out[ax] = (self.array_shape[ax] - 1 - c) if flip < 0 else c
        return out

    def source_axis(self, k: int) -> tuple[int, int]:
        """``(array axis, flip)`` of canonical axis ``k``."""
        if self.ornt is None:
            return k, 1
        for ax, (new_ax, flip) in enumerate(self.ornt):
            if int(new_ax) == k:
                return ax, int(flip)
        raise ValueError(k)

    # ---- regions on the display grid

    def region_box(self, region: Region) -> tuple[list[int], list[int]]:
        """Canonical (lo, hi) indices of ``region``'s box on the display arrays (file indices / stride)."""
        s, off, shape = self.stride, self.offset, self.array_shape
        lo = self.canon_index([min(n - 1, (b[0] - o) // s) for b, o, n in zip(region.bbox_index, off, shape)])
        hi = self.canon_index([min(n - 1, (b[1] - o) // s) for b, o, n in zip(region.bbox_index, off, shape)])
        return ([int(min(a, b)) for a, b in zip(lo, hi)], [int(max(a, b)) for a, b in zip(lo, hi)])

    def region_centre(self, region: Region) -> list[float]:
        """Canonical index of ``region``'s centroid on the display arrays."""
        s = self.stride
        c = [min(n - 1.0, max(0.0, (v - o - (s - 1) / 2) / s))
             for v, o, n in zip(region.centroid_index, self.offset, self.array_shape)]
        return self.canon_index(c)

    def planes(self, centre: Sequence[float]) -> list[Plane]:
        """``(name, fixed axis, index)`` of the planes through ``centre`` (canonical indices)."""
        if not self.volume:
            return [("image", -1, 0)]
        c = [int(min(n - 1, max(0, round(v)))) for v, n in zip(centre, self.shape)]
        return [("axial", 2, c[2]), ("coronal", 1, c[1]), ("sagittal", 0, c[0])]

    @staticmethod
    def _uv(axis: int) -> tuple[int, int]:
        u, v = [a for a in range(3) if a != axis]
        return u, v

    def take(self, arr: np.ndarray, plane: Plane) -> np.ndarray:
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

    def pixel_size(self, plane: Plane) -> tuple[float, float]:
        """Physical size of one display-array pixel along the plane's (columns, rows)."""
        _, axis, _ = plane
        if axis < 0:
            return self.spacing[1], self.spacing[0]
        u, v = self._uv(axis)
        return self.spacing[u], self.spacing[v]

    def aspect(self, plane: Plane) -> float:
        """Physical height / width of one display-array pixel."""
        w, h = self.pixel_size(plane)
        return h / w

    def box_2d(self, region: Region, plane: Plane) -> tuple[float, float, float, float] | None:
        """The region's box in plane array coordinates ``(c0, r0, c1, r1)``, or None if it misses."""
        lo, hi = self.region_box(region)
        _, axis, index = plane
        if axis < 0:
            return lo[1], lo[0], hi[1], hi[0]
        if not lo[axis] <= index <= hi[axis]:
            return None
        u, v = self._uv(axis)
        n_rows = self.shape[v]
        return lo[u], n_rows - 1 - hi[v], hi[u], n_rows - 1 - lo[v]

    # ---- what a plane shows: orientation, position, scale

    def axis_world(self, k: int) -> np.ndarray:
        """Unit RAS+ direction in which canonical axis ``k`` increases."""
        ax, flip = self.source_axis(k)
        assert isinstance(self.geom, MedicalGeometry)
        return flip * self.geom.direction[:, ax]

    def letters(self, plane: Plane) -> dict[str, str] | None:
        """Orientation letters at the plane's ``left``/``right``/``top``/``bottom`` edges, from the
        affine (the letter of the direction each edge faces); None for rasters."""
        _, axis, _ = plane
        if self.ornt is None or axis < 0:
            return None
        u, v = self._uv(axis)
        du, dv = self.axis_world(u), self.axis_world(v)
        return {"left": ras_letter(-du), "right": ras_letter(du), "top": ras_letter(dv), "bottom": ras_letter(-dv)}

    def obliquity_deg(self) -> float:
        """Largest angle (degrees) between a displayed axis and the RAS+ axis it is labelled with."""
        if self.ornt is None:
            return 0.0
        cos = [abs(float(self.axis_world(k)[k])) for k in range(3)]
        return float(np.degrees(np.arccos(min(1.0, min(cos)))))

    def slice_info(self, plane: Plane) -> dict[str, Any] | None:
        """Where a volume slice lies: its array axis, index range on the SR file (an overview pixel
        covers ``stride`` file slices), and the RAS+ world coordinate of the slice plane (its centre)."""
        _, axis, index = plane
        if axis < 0 or not self.volume:
            return None
        ax, flip = self.source_axis(axis)
        n = self.array_shape[ax]
        ov = index if flip > 0 else n - 1 - index
        s, first = self.stride, self.offset[ax] + ov * self.stride
        centre = [(m - 1) / 2 for m in self.shape]
        centre[axis] = index
        file_n = self.file_shape[ax] if self.file_shape else self.offset[ax] + n * s
        info: dict[str, Any] = {"axis": ax, "first": first, "last": first + s - 1, "count": file_n}
        if isinstance(self.geom, MedicalGeometry):
            world = self.geom.index_to_world(self.array_index(centre))
            info.update(coord="xyz"[axis], world=float(world[axis]))
        return info

    def slice_title(self, plane: Plane) -> str:
        """e.g. ``axial · slice index 37 (of 0–63) on array axis 2 · z = +12.0 mm (RAS+)``."""
        info = self.slice_info(plane)
        if info is None:
            return plane[0]
        where = (f"slice index {info['first']}" if info["first"] == info["last"]
                 else f"slice indices {info['first']}–{info['last']}")
        text = f"{plane[0]} · {where} (of 0–{info['count'] - 1}) on array axis {info['axis']}"
        if "world" in info:
            text += f" · {info['coord']} = {info['world']:+.1f} mm (RAS+)"
        return text

    def _units(self) -> tuple[str | None, float, str]:
        """The scale bars' unit ('mm' or 'm'), the size of a geometry unit in it, and a note
        (why there is no bar)."""
        geom = self.geom
        if isinstance(geom, MedicalGeometry):
            return "mm", 1.0, ""
        if isinstance(geom, GeoGeometry):
            crs = geom.crs
            if crs.is_geographic:
                return None, 1.0, "no scale bar: the map CRS is geographic (degrees)"
            try:
                factor = float(crs.linear_units_factor[1])
            except Exception:  # noqa: BLE001 - rasterio raises CRSError or ValueError for unknown units
                return None, 1.0, f"no scale bar: unknown units of {crs.to_string()}"
            return "m", factor, ""
        return None, 1.0, "no scale bar: unknown geometry"

    def scale_bar(self, plane: Plane, display_px_per_col: float, width_px: int) -> fg.ScaleBar | None:
        """The scale bar of a panel ``width_px`` wide showing ``display_px_per_col`` display pixels
        per display-array column."""
        if self.unit is None or display_px_per_col <= 0:
            return None
        per_px = self.pixel_size(plane)[0] * self.unit_factor / display_px_per_col
        return fg.scale_bar(per_px, width_px, self.unit)

    def axes_text(self, file_shape: Sequence[int] | None = None) -> list[str]:
        """One line per array axis of the SR file: its name, size, spacing and the direction its
        index increases towards (from the affine / geotransform)."""
        geom, s = self.geom, self.stride
        shape = list(file_shape) if file_shape else [n * s for n in self.array_shape]
        ratio = [g / a for g, a in zip(geom.shape, self.array_shape)]
        spacing = [float(sp) * r / s for sp, r in zip(geom.spacing, ratio)]
        out = []
        if isinstance(geom, MedicalGeometry):
            names = "ijk"
            for ax in range(len(shape)):
                d = geom.direction[:, ax]
                letter = ras_letter(d)
                off = float(np.degrees(np.arccos(min(1.0, abs(float(np.max(np.abs(d))))))))
                skew = f", {off:.0f}° oblique" if off >= 1 else ""
                out.append(f"axis {ax} ({names[ax]}): {shape[ax]} {'voxels' if len(shape) == 3 else 'px'} × "
                           f"{spacing[ax]:.3g} mm, index increases "
                           f"towards {LETTER_NAMES[letter]} ({letter}){skew}")
        elif isinstance(geom, GeoGeometry):
            t = geom.transform
            unit = ("°" if geom.crs.is_geographic else "m" if self.unit == "m" and self.unit_factor == 1.0
                    else str(geom.crs.linear_units or "units"))
            for ax, (name, (dx, dy)) in enumerate((("rows, y", (t.b, t.e)), ("columns, x", (t.a, t.d)))):
                out.append(f"axis {ax} ({name}): {shape[ax]} px × {spacing[ax]:.4g} {unit}, index increases "
                           f"towards {_compass(dx, dy)}")
        else:
            out = [f"axis {ax}: {n} px" for ax, n in enumerate(shape)]
        return out


# ---------------------------------------------------------------------------------------------
# panel arrays


@dataclass
class Layers:
    """Canonical SR-grid arrays for the panels."""

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
    """The canonical panel arrays of ``result`` (the LR input resampled to the SR/overview grid)."""
    sr = np.asarray(result.sr.data, np.float32)
    ref = None if result.reference is None else np.asarray(result.reference.data, np.float32)
    base = np.asarray(result.baseline.data, np.float32)
    if ref is not None:
        err, label = np.mean(np.abs(sr - ref), axis=0), "|SR − HR|"
    else:
        err, label = np.mean(np.abs(sr - base), axis=0), "|SR − baseline| (what the model added)"
    lr_up = resample_nearest(np.asarray(result.lr.data, np.float32), disp.array_shape)
    return Layers(lr=disp.canon(lr_up), base=disp.canon(base), sr=disp.canon(sr),
                  ref=None if ref is None else disp.canon(ref), err=disp.canon(np.where(result.mask, err, 0)),
                  err_label=label, classes=None if result.classes is None else disp.canon(result.classes),
                  risk=disp.canon(result.risk), resid=disp.canon(result.lr_residual),
                  unc=None if result.uncertainty is None else disp.canon(result.uncertainty),
                  mask=disp.canon(result.mask))


def display_windows(result: AuditResult, bands: Sequence[int], lo: float, hi: float) -> list[tuple[float, float]]:
    """Per shown band, the intensity window (percentiles ``lo``/``hi``) of the LR input's valid
    pixels and the HR reference's (when there is one): the same window for LR, baseline, SR and
    HR, which no SR value can move."""
    lr = np.asarray(result.lr.data)
    lr_ok = result.lr.valid_mask()
    if lr.dtype.kind == "f":
        lr_ok = lr_ok & np.all(np.isfinite(lr), axis=0)
    out = []
    for b in bands:
        vals = [lr[b][lr_ok]]
        if result.reference is not None:
            vals.append(np.asarray(result.reference.data)[b][result.mask])
        out.append(fg.percentiles(np.concatenate(vals), lo, hi))
    return out


def outside_share(values: np.ndarray, window: tuple[float, float]) -> float:
    """Share of finite ``values`` more than one window width outside ``window`` (or non-finite)."""
    v = np.asarray(values, np.float64).ravel()
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000]
    if not v.size:
        return 0.0
    lo, hi = window
    w = hi - lo
    bad = ~np.isfinite(v) | (v < lo - w) | (v > hi + w)
    return float(bad.mean())


class Painter:
    """Renders the panels of a plane: windows, colour bars, region boxes, orientation letters and scale bars."""

    def __init__(self, result: AuditResult, layers: Layers, windows: list[tuple[float, float]] | None = None,
                 ranges: dict[str, float] | None = None) -> None:
        self.r, self.L = result, layers
        bands = result.sr.band_names
        comp = fg.composite_for(result.sr) if result.sr.channels >= 3 else None
        self.bands, self.band_label = (comp if comp else ([0], bands[0]))
        rgb = len(self.bands) == 3
        self.windows = windows or display_windows(result, self.bands, 1.0 if rgb else 0.5, 99.0 if rgb else 99.5)
        m = layers.mask
        sr_out = max(outside_share(layers.sr[b][m], w) for b, w in zip(self.bands, self.windows))
        self.sr_note = (f"{100 * sr_out:.2g} % of SR pixels far outside the LR/HR window (clipped)"
                        if sr_out >= 1e-3 else "")
        if ranges is None:
            th = result.thresholds
            sig_hi = max(5.0, fg.percentiles(layers.resid[m], 0, 99.5)[1])
            if layers.unc is not None:
                sig_hi = max(sig_hi, fg.percentiles(layers.unc[m], 0, 99.5)[1])
            ranges = {"err": max(fg.percentiles(layers.err[m], 0, 99.5)[1], 1e-6), "risk": 1.5 * th.fail_risk,
                      "sigma": sig_hi}
        self.ranges = ranges

    def intensity(self, arr: np.ndarray) -> np.ndarray:
        """RGB uint8 of a 2D plane ``(rows, cols, C)``."""
        chans = [fg.stretch(arr[..., b], lo, hi) for b, (lo, hi) in zip(self.bands, self.windows)]
        return np.stack(chans, -1) if len(chans) == 3 else np.repeat(chans[0][..., None], 3, -1)

    def panels(self, disp: Display, plane: Plane, regions: Sequence[Region],
               crop: tuple[slice, slice] | None = None, min_side: int = 200, max_side: int = fg.MAX_SIDE
               ) -> list[dict[str, Any]]:
        """The panels of ``plane`` (dicts: ``title``, ``img`` data URI, optional ``note``/``bar``/
        ``legend``, ``scale`` (the scale bar) and ``orient`` (edge letters))."""
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
        letters = disp.letters(plane)
        bar = disp.scale_bar(plane, sx, view.size[0])

        def flat(arr: np.ndarray, how: str = "mean") -> np.ndarray:
            """The display plane, block-reduced before any colour mapping (bounded memory)."""
            return view.reduce(np.asarray(cut(take(arr)), np.float32), how)

        def img(rgb: np.ndarray, draw: bool = False, palette: bool = False) -> str:
            im = view.render(rgb, nearest=nearest)
            if draw:
                im = fg.draw_boxes(im, boxes)
            return fg.encode(fg.decorate(im, letters, bar), palette=palette)

        sr_rgb = self.intensity(flat(L.sr))
        dim = fg.grey_rgb(np.mean(sr_rgb, -1), 0, 255)  # the SR as a grey backdrop for overlays
        unit = self.r.sr.units or "a.u."
        win = ", ".join(f"{lo:.4g}–{hi:.4g}" for lo, hi in self.windows)
        rng = self.ranges
        out = [
            {"title": "LR input", "img": img(self.intensity(flat(L.lr))),
             "note": f"{self.band_label}; window {win} {unit} (from LR{' + HR' if L.ref is not None else ''})"},
            {"title": f"Baseline ({self.r.thresholds.baseline})", "img": img(self.intensity(flat(L.base)))},
            {"title": "SR (model)", "img": img(sr_rgb), "note": self.sr_note},
        ]
        if L.ref is not None:
            out.append({"title": "HR reference", "img": img(self.intensity(flat(L.ref)))})
        out.append({"title": L.err_label, "img": img(fg.heat(flat(L.err, "max"), 0, rng["err"]), palette=True),
                    "bar": (0, rng["err"], unit + " (mean over bands)")})
        if L.classes is not None:
            rgb = fg.overlay_classes(dim, np.rint(flat(L.classes, "max")).astype(np.uint8))
            out.append({"title": "Correctness vs HR", "img": img(rgb, draw=True), "legend": True})
        rgb = fg.overlay_heat(dim, flat(L.risk, "max"), 0, rng["risk"])
        th = self.r.thresholds
        out.append({"title": "Risk (calibrated)", "img": img(rgb, draw=True),
                    "bar": (0, rng["risk"], f"risk ({th.review_risk:g} review, {th.fail_risk:g} fail)")})
        out.append({"title": "LR-consistency residual", "img": img(fg.heat(flat(L.resid, "max"), 0, rng["sigma"]), palette=True),
                    "bar": (0, rng["sigma"], "noise σ")})
        if L.unc is not None:
            out.append({"title": "TTA uncertainty" if self.r.noise.uncertainty.method.startswith("tta")
                        else "Ensemble spread", "img": img(fg.heat(flat(L.unc, "max"), 0, rng["sigma"]), palette=True),
                        "bar": (0, rng["sigma"], "noise σ")})
        for p in out:
            p["scale"], p["orient"] = bar, letters
        return out


def region_crop(disp: Display, region: Region, plane: Plane, shape: tuple[int, int]) -> tuple[slice, slice]:
    """The window (rows, cols) of ``region``'s close-up in a plane of ``shape``: a square about its
    box (its centroid where the box misses the plane), half-width at least 16 px, clipped to the plane."""
    b = disp.box_2d(region, plane)
    if b is None:
        c = disp.region_centre(region)
        _, axis, _ = plane
        u, v = Display._uv(axis)
        b = (c[u], shape[0] - 1 - c[v], c[u], shape[0] - 1 - c[v])
    c0, r0, c1, r1 = b
    half = max(16, int(max(c1 - c0, r1 - r0)))
    rc, cc = (r0 + r1) / 2, (c0 + c1) / 2
    r_lo = int(max(0, min(shape[0] - 1, rc - half)))
    c_lo = int(max(0, min(shape[1] - 1, cc - half)))
    return slice(r_lo, int(min(shape[0], rc + half + 1))), slice(c_lo, int(min(shape[1], cc + half + 1)))


def crop_offset(full: Any, sub: Any) -> list[int] | None:
    """Index (on the full-resolution grid ``full``) of the first pixel of the grid ``sub``, from
    their geometries; None when they are not comparable."""
    if isinstance(full, MedicalGeometry) and isinstance(sub, MedicalGeometry):
        idx = np.linalg.solve(full.affine, np.append(sub.affine[:3, 3], 1.0))[:3]
        return [round(float(v)) for v in idx[: full.ndim]]
    if isinstance(full, GeoGeometry) and isinstance(sub, GeoGeometry):
        col, row = ~full.transform * (sub.transform.c, sub.transform.f)
        return [round(float(row)), round(float(col))]
    return None


def full_geometry(disp: Display) -> Any:
    """The SR file's full-resolution grid (the overview grid scaled back by the stride)."""
    return disp.geom if disp.stride == 1 else disp.geom.scaled(disp.stride)


def crop_margin(region: Region) -> int:
    """The margin (SR px) of a region's close-up: its own extent, at least 16 px."""
    return int(max(16, *(b - a + 1 for a, b in region.bbox_index)))


def is_small(region: Region, limit_px: int = 1024, limit_total: int = 8_000_000) -> bool:
    """Whether a full-resolution crop about ``region`` stays small enough to recompute and show."""
    sides = [b - a + 1 + 2 * crop_margin(region) for a, b in region.bbox_index]
    return max(sides) <= limit_px and math.prod(sides) <= limit_total


__all__ = ["Display", "Layers", "Painter", "crop_margin", "crop_offset", "display_windows", "full_geometry",
           "is_small", "layers_of", "outside_share", "ras_letter", "region_crop",
           "resample_nearest"]
