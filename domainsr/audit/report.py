"""One self-contained HTML report and a JSON file with the same numbers.

The HTML embeds every figure as a base64 PNG and its CSS inline; it references no URL, so it opens
offline and can be mailed or archived as one file. Figures (``display``): LR | baseline | SR | HR |
error | correctness classes | risk with region boxes | LR-consistency residual | TTA uncertainty,
for a raster as an RGB or false-colour composite, for a volume as three orthogonal slices; then a
crop (raster) or orthogonal slices (volume) through each of the worst flagged regions. The JSON
file is :meth:`AuditSummary.to_json <domainsr.audit.results.AuditSummary.to_json>`.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domainsr.audit import figures as fg
from domainsr.audit.display import Display, Painter, layers_of, region_crop
from domainsr.audit.hallucination import HALLUCINATED
from domainsr.audit.protocol import AuditResult
from domainsr.audit.results import MapBox, MetricGain, RegionEvidence, jsonable
from domainsr.io.atomic import atomic_path

TEMPLATE = "report.html.j2"
MAX_TABLE_REGIONS = 60  # worst first; the JSON lists every region
MAX_DRAWN_REGIONS = 30
METRIC_LABELS = {
    "psnr": ("PSNR", "dB"), "ssim": ("SSIM", ""), "hfen": ("HFEN", "relative"),
    "gradient_error": ("Gradient error", "relative"), "sam": ("SAM", "degrees"), "ergas": ("ERGAS", ""),
    "lr_psnr": ("LR-consistency PSNR", "dB"), "lr_rmse_sigma": ("LR-consistency RMSE", "noise sigma"),
}


# ---------------------------------------------------------------------------------------------
# tables


def fmt(v: Any, digits: int = 4) -> str:
    """A number for the report: ``digits`` significant digits, ``n/a`` for NaN, ``∞``, ``–`` for none."""
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞"
        return f"{v:.{digits}g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def _metric_row(group: str, name: str, e: MetricGain, bands: Sequence[str]) -> dict[str, Any]:
    label, unit = METRIC_LABELS.get(name, (name, ""))
    means = e.means()
    gain = means.gain_mean if means.gain_mean is not None else float("nan")
    per_band = []
    if isinstance(e.model, list) and isinstance(e.baseline, list) and isinstance(e.gain, list) and len(bands) > 1:
        per_band = [{"band": b, "model": fmt(m), "baseline": fmt(x), "gain": f"{g:+.4g}"}
                    for b, m, x, g in zip(bands, e.model, e.baseline, e.gain)]
    return {
        "group": group, "name": label, "unit": unit, "better": "higher" if e.higher_is_better else "lower",
        "model": fmt(means.model_mean), "baseline": fmt(means.baseline_mean),
        "gain": (f"{gain:+.4g}" if np.isfinite(gain) else "n/a"),
        "good": bool(np.isfinite(gain) and gain > 0), "bad": bool(np.isfinite(gain) and gain < 0), "bands": per_band,
    }


def metric_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The metrics table: full-reference metrics (with a reference), then LR consistency."""
    bands = list(result.sr.band_names)
    rows = []
    if result.metrics.reference is not None:
        rows += [_metric_row("vs HR reference", name, e, bands) for name, e in result.metrics.reference.per_metric.items()]
    rows += [_metric_row("no reference needed", name, e, bands) for name, e in result.metrics.lr_consistency.items()]
    return rows


def region_rows(result: AuditResult) -> list[dict[str, Any]]:
    """The flagged-regions table, worst first (at most ``MAX_TABLE_REGIONS``)."""
    rows = []
    for r in result.regions[:MAX_TABLE_REGIONS]:
        w = r.world
        world = ""
        if w is not None:
            world = f"{w.space}: min {_coord(w.min)}, max {_coord(w.max)}; centre {_coord(w.centroid)}"
            if isinstance(w, MapBox) and w.lonlat_centroid:
                world += f"; lon/lat {w.lonlat_centroid[0]:.6f}, {w.lonlat_centroid[1]:.6f}"
        rows.append({"id": r.id, "kind": r.kind, "verdict": r.verdict, "size": r.size,
                     "physical": (f"{r.physical_size:,.0f}" if r.physical_size >= 1000 else fmt(r.physical_size, 4))
                     + f" {r.physical_unit}",
                     "bbox": " × ".join(f"{a}–{b}" for a, b in r.bbox_index), "world": world,
                     "peak": fmt(r.peak_risk, 3), "mean": fmt(r.mean_risk, 3), "evidence": evidence_text(r.evidence)})
    return rows


def evidence_text(ev: RegionEvidence) -> str:
    """The evidence column: what share of the region is LR-inconsistent / unstable, the spread."""
    parts = []
    if ev.lr_inconsistent is not None:
        parts.append(f"{100 * ev.lr_inconsistent:.0f} % LR-inconsistent")
    if ev.uncertainty_sigma is not None:
        parts.append(f"spread {ev.uncertainty_sigma:.3g} σ")
    if ev.unstable is not None:
        parts.append(f"{100 * ev.unstable:.0f} % unstable")
    if ev.agreement is not None:
        parts.append("LR-inconsistent and unstable agree" if ev.agreement else "")
    return ", ".join(parts)


def _coord(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in v) + ")"


def card_rows(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The model table: the caller's model record, then the card's fields that are set."""
    card = model.get("card") or {}
    rows = [(k, str(v)) for k, v in model.items() if k != "card"]
    keys = ("name", "version", "architecture", "domain", "spatial_dims", "scale", "bands", "units", "input_range",
            "normalization", "receptive_radius", "application", "degradation", "training_data", "training",
            "metrics", "weights_sha256", "license", "intended_use", "limitations", "created", "domainsr_version")
    for k in keys:
        if k in card and card[k] not in (None, "", [], {}):
            v = card[k]
            rows.append((k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v)))
    return rows


# ---------------------------------------------------------------------------------------------
# writing


def render_html(result: AuditResult) -> str:
    """The report as one HTML string (figures embedded)."""
    import jinja2

    disp = Display(result)
    layers = layers_of(result, disp)
    painter = Painter(result, layers)
    worst = [r for r in result.regions if r.verdict != "pass"] or result.regions
    if disp.volume:
        centre = (disp.canon_index(worst[0].centroid_index) if worst
                  else [float(np.mean(np.nonzero(np.any(layers.mask, axis=tuple(a for a in range(3) if a != ax)))))
                        for ax in range(3)])
    else:
        centre = [0, 0]
    drawn = result.regions[:MAX_DRAWN_REGIONS]
    overview = [{"plane": p[0], "panels": painter.panels(disp, p, drawn, max_side=420 if disp.volume else 480)}
                for p in disp.planes(centre)]
    region_figs = []
    for reg in result.regions[: result.thresholds.max_figure_regions]:
        rows = []
        for p in disp.planes(disp.canon_index(reg.centroid_index)):
            crop = region_crop(disp, reg, p, disp.take(layers.mask, p).shape)
            rows.append({"plane": p[0], "panels": painter.panels(disp, p, [reg], crop=crop, min_side=150, max_side=190)})
        region_figs.append({"id": reg.id, "verdict": reg.verdict, "kind": reg.kind, "rows": rows})
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    return env.get_template(TEMPLATE).render(
        s=result.summary(), r=result, overview=overview, region_figs=region_figs, metric_rows=metric_rows(result),
        region_rows=region_rows(result), card_rows=card_rows(result.model), frac=result.fractions.headline,
        heat_bar=fg.colourbar(), class_colours={k: "#{:02x}{:02x}{:02x}".format(*c) for k, c in fg.CLASS_COLOURS.items()},
        fmt=fmt, json=lambda v: json.dumps(jsonable(v), indent=1, default=str),
        n_halluc=int(np.sum(result.classes == HALLUCINATED)) if result.classes is not None else None,
        is_volume=disp.volume)


def write_report(result: AuditResult, out_dir: str | Path, stem: str = "audit") -> tuple[Path, Path]:
    """Write ``<stem>.html`` and ``<stem>.json`` into ``out_dir`` (atomically); return both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / f"{stem}.html", out / f"{stem}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(result.summary().to_json(), encoding="utf-8")
    html = render_html(result)
    with atomic_path(html_path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return html_path, json_path


__all__ = ["METRIC_LABELS", "card_rows", "evidence_text", "fmt", "metric_rows", "region_rows", "render_html",
           "write_report"]
