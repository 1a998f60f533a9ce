"""Report figures as small embedded PNGs (Pillow; no plotting library needed).

Rasters are shown as RGB / false-colour composites (or grey for one band), volumes as orthogonal
slices after reorienting to RAS+ (neurological view: the patient's right on the right, anterior
and superior up) with the physical aspect ratio. Every panel carries a scale bar (``scale_bar``,
``decorate``) and, for volume slices, orientation letters at its edges; region boxes are drawn
with their numbers. Colour bars are PNG strips labelled in the HTML.
"""
from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of a perceptually ordered black-purple-orange-yellow map (sampled from "inferno").
_HEAT = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)
CLASS_COLOURS = {2: (0, 170, 80), 3: (60, 110, 255), 4: (235, 25, 25)}  # improved, omitted, hallucinated
VERDICT_COLOURS = {"fail": (235, 25, 25), "review": (255, 165, 0), "pass": (240, 240, 240)}
MAX_SIDE = 720  # display pixels on the longest side of an overview panel


def heat_lut() -> np.ndarray:
    x = np.linspace(0, 1, 256)
    pos = np.linspace(0, 1, len(_HEAT))
    return np.stack([np.interp(x, pos, _HEAT[:, c]) for c in range(3)], -1).astype(np.uint8)


HEAT_LUT = heat_lut()


def png_data_uri(rgb: np.ndarray) -> str:
    """``data:image/png;base64,...`` of an ``(H, W)`` grey or ``(H, W, 3)`` uint8 image."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def stretch(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of ``[lo, hi]`` to uint8 0..255 (clipped; NaN -> 0)."""
    y = (np.nan_to_num(np.asarray(x, np.float64), nan=lo) - lo) / max(hi - lo, 1e-12)
    return (np.clip(y, 0, 1) * 255 + 0.5).astype(np.uint8)


def heat(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return HEAT_LUT[stretch(x, lo, hi)]


def colourbar(lut: np.ndarray = HEAT_LUT, width: int = 200, height: int = 10) -> str:
    strip = np.repeat(lut[np.linspace(0, 255, width).astype(int)][None], height, axis=0)
    return png_data_uri(strip)


def percentiles(values: np.ndarray, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if v.size > 2_000_000:
        v = v[:: v.size // 2_000_000]
    if not v.size:
        return 0.0, 1.0
    a, b = np.percentile(v, [lo, hi])
    return float(a), float(b if b > a else a + 1.0)


@dataclass(frozen=True)
class Sensor:
    """A multispectral sensor's band names for red, green, blue and near infrared."""

    name: str
    red: str
    green: str
    blue: str
    nir: str


SENTINEL2 = Sensor("Sentinel-2 MSI", "B04", "B03", "B02", "B08")
LANDSAT_OLI = Sensor("Landsat 8/9 OLI", "B4", "B3", "B2", "B5")
LANDSAT_TM = Sensor("Landsat 4-7 TM/ETM+", "B3", "B2", "B1", "B4")
_A, _Z, _I = r"(?<![A-Za-z0-9])", r"(?![A-Za-z0-9])", re.IGNORECASE
# Platform tokens in file names, item ids, collections and tags (case-insensitive), checked in order.
_PLATFORM_HINTS = (
    (LANDSAT_TM, re.compile(rf"{_A}L[ET]0[4-7]|LANDSAT[-_ ]?0?[4-7]{_Z}|{_A}ETM\+?{_Z}", _I)),
    (LANDSAT_OLI, re.compile(rf"{_A}L[CO]0[89]|LANDSAT[-_ ]?0?[89]{_Z}|{_A}OLI(?:[-_]TIRS)?{_Z}", _I)),
    (SENTINEL2, re.compile(rf"{_A}S2[A-D]?_|SENTINEL[-_ ]?2", _I)),
)
_PREFIX = re.compile(r"^(?:SR|TOA|DN)_", _I)  # Landsat Collection 2 product prefixes
_ROLES = {"red": "red", "green": "green", "blue": "blue", "nir": "nir", "nir08": "nir"}
_TRUE, _FALSE = ("red", "green", "blue"), ("nir", "red", "green")
_SENSOR_TAGS = ("SPACECRAFT_ID", "SPACECRAFT", "SENSOR_ID", "PLATFORM", "SATELLITE")


def _key(name: str) -> str:
    return _PREFIX.sub("", name.strip()).upper()


def sensor_from_names(band_names: Sequence[str]) -> Sensor | None:
    """The sensor that band names alone identify: Sentinel-2's two-digit names, Landsat 4-7's
    split thermal band (B6_VCID_1/2), Landsat 8/9's B9-B11; None when they are ambiguous."""
    keys = {_key(b) for b in band_names}
    if keys & {"B02", "B03", "B04", "B08", "B8A"}:
        return SENTINEL2
    if keys & {"B6_VCID_1", "B6_VCID_2", "ST_B6"}:
        return LANDSAT_TM
    if keys & {"B9", "B10", "B11", "ST_B10"}:
        return LANDSAT_OLI
    return None


def sensor_from_hints(hints: Sequence[Any]) -> Sensor | None:
    """The sensor a platform token in ``hints`` (file names, item ids, tags) names, if one does."""
    text = " ".join(str(h) for h in hints if h)
    return next((sensor for sensor, pattern in _PLATFORM_HINTS if pattern.search(text)), None)


def _find(keys: Sequence[str], trio: Sequence[str]) -> list[int] | None:
    return [list(keys).index(k) for k in trio] if all(k in keys for k in trio) else None


def _label(kind: str, names: Sequence[str], idx: list[int], sensor: Sensor | None = None) -> tuple[list[int], str]:
    where = f", {sensor.name}" if sensor is not None else ""
    return idx, f"{kind} ({'/'.join(names[i] for i in idx)}){where}"


def composite_bands(band_names: Sequence[str], sensor: Sensor | None = None,
                    common_names: Sequence[str | None] | None = None) -> tuple[list[int], str] | None:
    """Indices of an RGB composite and its label, from what the bands are.

    ``common_names`` (STAC ``eo:common_name`` per band) decide first; then the sensor the names
    identify (:func:`sensor_from_names`), else ``sensor`` (e.g. from the file name): red/green/blue
    is "true colour", NIR/red/green "false colour", labelled with the actual band names. Bands
    named RED/GREEN/BLUE (NIR/RED/GREEN) speak for themselves. Names a sensor does not settle
    (B4/B3/B2 is true colour on Landsat 8 but NIR/red/green on Landsat 7) get a neutral "bands
    X/Y/Z as R/G/B" label; None when nothing suggests a composite.
    """
    names = list(band_names)
    if common_names is not None and len(common_names) == len(names):
        roles = [_ROLES.get(str(c or "").lower(), "") for c in common_names]
        for trio, kind in ((_TRUE, "true colour"), (_FALSE, "false colour NIR/red/green")):
            if (idx := _find(roles, trio)) is not None:
                return _label(kind, names, idx)
    keys = [_key(b) for b in names]
    sensor = sensor_from_names(names) or sensor
    if sensor is not None:
        for trio, kind in (((sensor.red, sensor.green, sensor.blue), "true colour"),
                           ((sensor.nir, sensor.red, sensor.green), "false colour NIR/red/green")):
            if (idx := _find(keys, trio)) is not None:
                return _label(kind, names, idx, sensor)
    for trio, kind in ((("RED", "GREEN", "BLUE"), "true colour"), (("NIR", "RED", "GREEN"), "false colour")):
        if (idx := _find(keys, trio)) is not None:
            return _label(kind, names, idx)
    for trio in (("B4", "B3", "B2"), ("B3", "B2", "B1")):
        if (idx := _find(keys, trio)) is not None:
            return idx, f"bands {'/'.join(names[i] for i in idx)} as R/G/B (sensor unknown: not necessarily true colour)"
    return None


def composite_for(image: Any) -> tuple[list[int], str] | None:
    """:func:`composite_bands` of a SpatialImage with what it knows of its bands: STAC common names,
    and the sensor its reader, source, item id, collection or platform tags name."""
    meta, prov = image.meta or {}, image.provenance or {}
    stac = meta.get("stac") or {}
    band_info = stac.get("bands") or {}
    common = [(band_info.get(b) or {}).get("eo:common_name") for b in image.band_names]
    tags = (meta.get("raster") or {}).get("tags") or {}
    reader = str(prov.get("sensor") or prov.get("reader") or "").lower()
    sensor = {"sentinel2": SENTINEL2, "landsat8": LANDSAT_OLI}.get(reader) or sensor_from_hints(
        [prov.get("source"), prov.get("item_id"), stac.get("stac_id"), stac.get("collection"),
         *(v for k, v in tags.items() if k.upper() in _SENSOR_TAGS)])
    return composite_bands(image.band_names, sensor, common if any(common) else None)


# ---------------------------------------------------------------------------------------------
# 2D geometry of the display


@dataclass(frozen=True)
class View:
    """How a 2D array is shown: block-reduced by ``step`` then resized to ``size`` (W, H)."""

    step: int
    size: tuple[int, int]

    @staticmethod
    def fit(shape: Sequence[int], aspect: float = 1.0, max_side: int = MAX_SIDE, min_side: int = 200) -> View:
        """``aspect`` = physical height/width of one pixel."""
        h, w = shape[0] * aspect, shape[1]
        step = max(1, int(np.ceil(max(shape) / (2 * max_side))))
        scale = min(max_side / max(h, w), max(1.0, min_side / max(h, w)))
        return View(step, (max(1, round(w * scale)), max(1, round(h * scale))))

    def reduce(self, a: np.ndarray, how: str = "mean") -> np.ndarray:
        if self.step == 1:
            return a
        s = self.step
        h, w = (a.shape[0] // s) * s, (a.shape[1] // s) * s
        blocks = a[:h, :w].reshape(h // s, s, w // s, s, *a.shape[2:])
        return blocks.max(axis=(1, 3)) if how == "max" else blocks.mean(axis=(1, 3))

    def render(self, rgb: np.ndarray, nearest: bool = False) -> Image.Image:
        img = Image.fromarray(np.ascontiguousarray(rgb))
        resample = Image.Resampling.NEAREST if nearest else Image.Resampling.LANCZOS
        return img if img.size == self.size else img.resize(self.size, resample)


def grey_rgb(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = stretch(x, lo, hi)
    return np.repeat(g[..., None], 3, -1)


def overlay_classes(base_rgb: np.ndarray, classes: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    out = base_rgb.astype(np.float64)
    for k, colour in CLASS_COLOURS.items():
        m = classes == k
        a = alpha if k != 4 else 0.8
        out[m] = (1 - a) * out[m] + a * np.asarray(colour, np.float64)
    return out.astype(np.uint8)


def overlay_heat(base_rgb: np.ndarray, value: np.ndarray, lo: float, hi: float, floor: float = 0.0) -> np.ndarray:
    """Heat colours over a dimmed base wherever ``value > floor``."""
    out = (base_rgb.astype(np.float64) * 0.55)
    m = value > floor
    out[m] = heat(value[m], lo, hi)
    return out.astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 without sized default font
        return ImageFont.load_default()


def draw_boxes(img: Image.Image, boxes: Sequence[tuple[int, Sequence[float], str]]) -> Image.Image:
    """Outline ``(label, (x0, y0, x1, y1) in display pixels, verdict)`` boxes with their labels."""
    if not boxes:
        return img
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    font = _font(max(13, img.size[0] // 32))
    for label, (x0, y0, x1, y1), verdict in boxes:
        colour = VERDICT_COLOURS.get(verdict, (255, 255, 255))
        x0, y0 = max(0, x0 - 2), max(0, y0 - 2)
        x1, y1 = min(img.size[0] - 1, x1 + 2), min(img.size[1] - 1, y1 + 2)
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=2)
        ty = y0 - font.size - 3 if y0 > font.size + 4 else y1 + 2
        draw.text((x0, ty), str(label), fill=colour, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return img


@dataclass(frozen=True)
class ScaleBar:
    """A scale bar: ``length`` in ``unit`` drawn ``px`` display pixels long, with its ``label``."""

    length: float
    unit: str
    px: int
    label: str


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 times a power of ten that is at most ``target`` (> 0)."""
    e = math.floor(math.log10(target))
    for m in (5, 2, 1):
        v = m * 10.0 ** e
        if v <= target * (1 + 1e-9):
            return float(f"{v:.12g}")
    return float(f"{10.0 ** (e - 1) * 5:.12g}")


def scale_bar(per_px: float, width_px: int, unit: str, fraction: float = 0.25, min_px: int = 12) -> ScaleBar | None:
    """A bar about ``fraction`` of a panel ``width_px`` wide whose display pixels measure ``per_px``
    ``unit`` ('mm', or 'm': labelled in km from 1000 m); None when it would be under ``min_px``."""
    if not (per_px > 0 and math.isfinite(per_px)) or width_px <= 0:
        return None
    length = nice_length(fraction * width_px * per_px)
    px = round(length / per_px)
    if px < min_px:
        return None
    if unit == "m" and length >= 1000:
        label = f"{length / 1000:g} km"
    elif unit == "mm" and length < 1:
        label = f"{length * 1000:g} µm"
    else:
        label = f"{length:g} {unit}"
    return ScaleBar(length, unit, px, label)


BAR_COLOUR = (255, 255, 255)
LETTER_COLOUR = (255, 230, 60)


def decorate(img: Image.Image, letters: dict[str, str] | None, bar: ScaleBar | None) -> Image.Image:
    """Draw orientation ``letters`` (``left``/``right``/``top``/``bottom``) at the panel's edges
    and the scale ``bar`` at its bottom left (white with a black outline, label above)."""
    if not letters and bar is None:
        return img
    img = img.convert("RGB")
    draw = ImageDraw.Draw(img)
    w, h = img.size
    font = _font(max(11, min(w, h) // 18))
    if letters:
        for edge, text in letters.items():
            tw, th = draw.textbbox((0, 0), text, font=font)[2:]
            x = {"left": 3, "right": w - tw - 3}.get(edge, (w - tw) // 2)
            y = {"top": 2, "bottom": h - th - 4}.get(edge, (h - th) // 2)
            draw.text((x, y), text, fill=LETTER_COLOUR, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    if bar is not None:
        x0, y1 = 6, h - 7
        x1, y0 = x0 + bar.px - 1, y1 - 3
        draw.rectangle([x0 - 1, y0 - 1, x1 + 1, y1 + 1], fill=(0, 0, 0))
        draw.rectangle([x0, y0, x1, y1], fill=BAR_COLOUR)
        th = draw.textbbox((0, 0), bar.label, font=font)[3]
        draw.text((x0, y0 - th - 4), bar.label, fill=BAR_COLOUR, font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return img


def encode(img: Image.Image, palette: bool = False) -> str:
    """``data:image/png;base64,...`` of ``img``; ``palette``: as a 256-colour palette PNG (for
    panels drawn through one colour map, where it is visually lossless and a third the size)."""
    buf = io.BytesIO()
    if palette:
        img = img.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
