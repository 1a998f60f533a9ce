"""Report figures as small embedded PNGs (Pillow; no plotting library needed).

Rasters are shown as RGB / false-colour composites (or grey for one band), volumes as orthogonal
slices after reorienting to RAS+ (neurological view: the patient's right on the right, anterior
and superior up) with the physical aspect ratio. Colour bars are PNG strips labelled in the HTML.
"""
from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Anchors of a perceptually ordered black-purple-orange-yellow map (sampled from "inferno").
_HEAT = np.array([[0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
                  [245, 125, 21], [250, 193, 39], [252, 255, 164]], dtype=np.float64)
CLASS_COLOURS = {2: (0, 170, 80), 3: (60, 110, 255), 4: (235, 25, 25)}  # improved, omitted, hallucinated
VERDICT_COLOURS = {"fail": (235, 25, 25), "review": (255, 165, 0), "pass": (240, 240, 240)}
MAX_SIDE = 720  # display pixels on the longest side of an overview panel
TRUE_COLOUR = (("B04", "B03", "B02"), ("B4", "B3", "B2"), ("RED", "GREEN", "BLUE"))
FALSE_COLOUR = (("B08", "B04", "B03"), ("B8A", "B04", "B03"), ("B5", "B4", "B3"), ("NIR", "RED", "GREEN"))


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


def composite_bands(band_names: Sequence[str]) -> tuple[list[int], str] | None:
    """Indices of an RGB composite (true colour first, else false colour) or None."""
    upper = [b.upper() for b in band_names]
    for table, label in ((TRUE_COLOUR, "true colour"), (FALSE_COLOUR, "false colour")):
        for trio in table:
            if all(t in upper for t in trio):
                return [upper.index(t) for t in trio], f"{label} ({'/'.join(trio)})"
    return None


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


def encode(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")
