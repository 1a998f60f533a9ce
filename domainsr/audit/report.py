"""One self-contained HTML report and a JSON file with the same numbers.

The HTML embeds every figure as a base64 PNG and its CSS inline; it references no URL, so it opens
offline and can be mailed or archived as one file (it links the caller's exported files, such as
the risk map, by relative path). What a reader acts on comes first: the verdict, what was audited
(coverage), the ranked regions (each linked to its close-up and back). Figures (``display``): LR |
baseline | SR | HR | error | correctness classes | risk with region boxes | LR-consistency residual |
TTA uncertainty, for a raster as an RGB or false-colour composite, for a volume as three
orthogonal slices with orientation letters and slice positions, every panel with a scale bar;
then zoomed crops through each of the worst regions, at full resolution (``result.crop`` where the
arrays are an overview). Model, provenance, degradation and calibration are key/value tables.
The JSON file is :meth:`AuditSummary.to_json <domainsr.audit.results.AuditSummary.to_json>`.

Size: the report's tables (flattening of nested records, coverage, calibration, links) and the
assembly of its figures belong together: each table row says how a figure or number was made.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from domainsr.audit import figures as fg
from domainsr.audit.display import (
    Display,
    Painter,
    crop_margin,
    crop_offset,
    full_geometry,
    is_small,
    layers_of,
    region_crop,
)
from domainsr.audit.hallucination import HALLUCINATED
from domainsr.audit.protocol import AuditResult
from domainsr.audit.results import AuditSummary, MapBox, MetricGain, Region, RegionEvidence, jsonable
from domainsr.errors import DomainSRError
from domainsr.io.atomic import atomic_path

TEMPLATE = "report.html.j2"
MAX_TABLE_REGIONS = 60  # worst first; the JSON lists every region
MAX_DRAWN_REGIONS = 30
MAX_KV_ROWS = 400  # rows of one key/value table
MAX_VALUE_CHARS = 1200
METRIC_LABELS = {
    "psnr": ("PSNR", "dB"), "ssim": ("SSIM", ""), "hfen": ("HFEN", "relative"),
    "gradient_error": ("Gradient error", "relative"), "sam": ("SAM", "degrees"), "ergas": ("ERGAS", ""),
    "lr_psnr": ("LR-consistency PSNR", "dB"), "lr_rmse_sigma": ("LR-consistency RMSE", "noise sigma"),
}
KIND_TEXT = {
    "hallucination": "structure the HR reference does not have",
    "omission": "detail in the HR reference that the model did not recover",
    "inconsistency": "SR re-degraded does not give back the LR input",
    "uncertain": "the model's answer is unstable (test-time augmentation / ensemble spread)",
}
KIND_TEXT.update({"lr-inconsistency": KIND_TEXT["inconsistency"], "uncertainty": KIND_TEXT["uncertain"]})
SUMMARY_SHOWN = {"domainsr_audit", "created", "mode", "verdict", "reasons", "domain", "bands", "units", "scale", "grid",
                 "metrics", "fractions", "noise", "regions", "thresholds", "min_region_size", "rule", "model",
                 "provenance", "warnings", "timings_s", "calibration", "conformal", "coverage"}


# ---------------------------------------------------------------------------------------------
# values and key/value tables


def fmt(v: Any, digits: int = 4) -> str:
    """A number for the report: ``digits`` significant digits, ``n/a`` for NaN, ``∞``, ``–`` for none."""
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        v = float(v)
        if math.isnan(v):
            return "n/a"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        return f"{v:.{digits}g}" if abs(v) < 10 ** max(5, digits) else f"{v:.3e}"
    return str(v)


def flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    """Key/value rows of a nested record: dict keys joined with dots (``card.degradation.kind``),
    lists of plain values as one comma-separated value, lists of records indexed (``history.0.step``);
    empty values are left out. At most ``MAX_KV_ROWS`` rows, values cut at ``MAX_VALUE_CHARS``."""
    rows: list[tuple[str, str]] = []

    def walk(v: Any, key: str) -> None:
        if len(rows) >= MAX_KV_ROWS:
            return
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(x, f"{key}.{k}" if key else str(k))
            return
        if isinstance(v, (list, tuple)):
            if not v:
                return
            if all(not isinstance(x, (Mapping, list, tuple)) for x in v):
                text = ", ".join(fmt(x, 10) for x in v)
            else:
                for i, x in enumerate(v):
                    walk(x, f"{key}.{i}" if key else str(i))
                return
        elif v is None or v == "":
            return
        else:
            text = fmt(v, 10)
        if len(text) > MAX_VALUE_CHARS:
            text = text[: MAX_VALUE_CHARS - 1] + "…"
        rows.append((key or "value", text))

    walk(jsonable(value), prefix)
    if len(rows) >= MAX_KV_ROWS:
        rows.append(("…", f"more entries in the JSON file (the first {MAX_KV_ROWS} are shown)"))
    return rows


def _scalar(v: Any) -> bool:
    return not isinstance(v, (Mapping, list, tuple))


def _flat_record(v: Any) -> bool:
    """A dict of plain values, or of lists of plain values."""
    return isinstance(v, Mapping) and bool(v) and all(
        _scalar(x) or (isinstance(x, (list, tuple)) and all(_scalar(y) for y in x)) for x in v.values())


def record_tables(value: Any) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """A nested record as key/value rows plus tables: per top-level key, a list of flat records
    (one row each), a dict of flat records (a row per key) or a dict of dicts of flat records
    (a row per key pair) is a table; anything else is key/value rows (:func:`flatten`)."""
    data = jsonable(value)
    if not isinstance(data, Mapping):
        return flatten(data), []
    rows: list[tuple[str, str]] = []
    tables: list[dict[str, Any]] = []

    def table(title: str, keys: list[str], records: list[tuple[list[str], Mapping[str, Any]]]) -> dict[str, Any]:
        cols: list[str] = []
        for _, rec in records:
            cols += [c for c in rec if c not in cols]
        body = [[*k, *(", ".join(fmt(y, 6) for y in rec[c]) if isinstance(rec.get(c), (list, tuple))
                       else fmt(rec.get(c), 6) if c in rec else "" for c in cols)] for k, rec in records]
        return {"title": title, "columns": keys + cols, "rows": body[:MAX_KV_ROWS]}

    for k, v in data.items():
        if isinstance(v, list) and v and all(_flat_record(x) for x in v):
            tables.append(table(k, ["#"], [([str(i)], x) for i, x in enumerate(v)]))
        elif isinstance(v, Mapping) and v and all(_flat_record(x) for x in v.values()):
            tables.append(table(k, [k], [([str(a)], x) for a, x in v.items()]))
        elif (isinstance(v, Mapping) and v and all(isinstance(x, Mapping) and x and all(_flat_record(y) for y in x.values())
                                                   for x in v.values())):
            tables.append(table(k, [k, ""], [([str(a), str(b)], y) for a, x in v.items() for b, y in x.items()]))
        else:
            rows += flatten(v, str(k))
    return rows, tables


INPUTS = ("lr", "sr", "reference")


def inputs_table(provenance: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The inputs' provenance side by side: columns ``lr``, ``sr``, ``reference`` (those present),
    a row per flattened key (in first-seen order)."""
    names = [n for n in INPUTS if isinstance(provenance.get(n), Mapping)]
    flat = {n: dict(flatten(provenance[n])) for n in names}
    keys: list[str] = []
    for n in names:
        keys += [k for k in flat[n] if k not in keys]
    return names, [[k, *(flat[n].get(k, "") for n in names)] for k in keys]


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


def region_rows(result: AuditResult, with_figure: set[int] | None = None) -> list[dict[str, Any]]:
    """The regions table in the given (ranked) order, at most ``MAX_TABLE_REGIONS``; ``figure``
    when the region has a close-up (``with_figure`` ids) to link to."""
    rows = []
    for r in result.regions[:MAX_TABLE_REGIONS]:
        w = r.world
        world = ""
        if w is not None:
            world = f"{w.space}: min {_coord(w.min)}, max {_coord(w.max)}; centre {_coord(w.centroid)}"
            if isinstance(w, MapBox) and w.lonlat_centroid:
                world += f"; lon/lat {w.lonlat_centroid[0]:.6f}, {w.lonlat_centroid[1]:.6f}"
        score = getattr(r, "score", None)
        rows.append({"id": r.id, "kind": r.kind, "kind_text": KIND_TEXT.get(r.kind, ""), "verdict": r.verdict,
                     "size": r.size,
                     "physical": (f"{r.physical_size:,.0f}" if r.physical_size >= 1000 else fmt(r.physical_size, 4))
                     + f" {r.physical_unit}",
                     "bbox": " × ".join(f"{a}–{b}" for a, b in r.bbox_index), "world": world,
                     "peak": fmt(r.peak_risk, 3), "mean": fmt(r.mean_risk, 3),
                     "score": fmt(score, 3) if score is not None else "–",
                     "evidence": "; ".join(x for x in (f"band {r.band}" if r.band else "", evidence_text(r.evidence)) if x),
                     "figure": with_figure is not None and r.id in with_figure})
    return rows


def evidence_text(ev: RegionEvidence) -> str:
    """The evidence column: what share of the region is LR-inconsistent / unstable, the spread."""
    parts = []
    if ev.lr_inconsistent is not None:
        parts.append(f"{100 * ev.lr_inconsistent:.0f} % LR-inconsistent")
    if ev.uncertainty_sigma is not None:
        parts.append(f"spread {ev.uncertainty_sigma:.3g} σ")
    peak = getattr(ev, "uncertainty_peak_sigma", None)
    if peak is not None:
        parts.append(f"peak spread {peak:.3g} σ")
    if ev.unstable is not None:
        parts.append(f"{100 * ev.unstable:.0f} % unstable")
    if ev.agreement:
        parts.append("LR-inconsistent and unstable agree")
    return ", ".join(parts)


def _coord(v: Sequence[float]) -> str:
    return "(" + ", ".join(f"{x:.2f}" for x in v) + ")"


CARD_KEYS = ("name", "version", "architecture", "domain", "spatial_dims", "scale", "bands", "units", "input_range",
             "normalization", "receptive_radius", "application", "degradation", "training_data", "training",
             "metrics", "weights_sha256", "license", "intended_use", "limitations", "created", "domainsr_version")


def card_rows(model: dict[str, Any]) -> list[tuple[str, str]]:
    """The model table: the caller's model record, then the card's fields that are set (nested
    fields as dotted keys)."""
    card = model.get("card") or {}
    rows = flatten({k: v for k, v in model.items() if k != "card"})
    ordered = {k: card[k] for k in CARD_KEYS if k in card}
    ordered.update({k: v for k, v in card.items() if k not in ordered})
    rows += flatten(ordered, "card") if ordered else []
    return rows


def coverage_text(result: Any, summary: AuditSummary, scene_shape: Sequence[int] | None = None) -> str:
    """What was audited, in one line: e.g. ``whole scene, 100 % of 21960×21960 px in 121 windows
    of 2048×2048 px (halo 64 px); 97.1 % of px valid``; a part names its box and the scene's
    size (``scene_shape``, where known)."""
    cov = getattr(result, "coverage", None) or getattr(summary, "coverage", None)
    shape = list(summary.grid.sr_shape)
    unit = "voxels" if len(shape) == 3 else "px"
    dims = lambda v: "×".join(str(int(n)) for n in v)
    get = (lambda k, d=None: cov.get(k, d)) if isinstance(cov, Mapping) else (lambda k, d=None: getattr(cov, k, d))
    if cov is None:
        return (f"whole scene, 100 % of {dims(shape)} {unit} in one pass; "
                f"{100 * summary.grid.valid_fraction:.1f} % of {unit} valid")
    frac = get("scene_fraction", 1.0)
    frac = 1.0 if frac is None else float(frac)
    if frac >= 0.9999:
        text = f"whole scene, 100 % of {dims(scene_shape or shape)} {unit}"
    else:
        scene = f" {dims(scene_shape)} {unit}" if scene_shape else ""
        box = get("box")
        where = (" (" + ", ".join(f"axis {a}: {lo}–{hi}" for a, (lo, hi) in enumerate(box)) + ")") if box else ""
        text = f"PART OF THE SCENE ONLY: {100 * frac:.3g} % of the{scene} scene, a {dims(shape)} {unit} box{where}"
    windows, wshape, halo = get("windows"), get("window_shape"), get("halo")
    if windows == 1:
        text += " in one pass"
    elif windows:
        text += f" in {windows} windows"
        if wshape:
            text += " of " + "×".join(str(n) for n in wshape) + f" {unit}"
        halo_px = [int(h) for h in (halo if isinstance(halo, (list, tuple)) else [halo or 0])]
        if any(halo_px):
            text += f" (halo {max(halo_px)} {unit})"
    valid = get("valid_fraction", summary.grid.valid_fraction)
    if valid is not None:
        text += f"; {100 * float(valid):.1f} % of {unit} valid"
    if get("noise_sampling"):
        text += f"; noise estimated on {get('noise_sampling')}"
    return text


def conformal_text(summary: AuditSummary) -> str | None:
    """The per-pixel error bound in a sentence, or None."""
    c = getattr(summary, "conformal", None)
    if c is None:
        return None
    get = (lambda k: c.get(k)) if isinstance(c, Mapping) else (lambda k: getattr(c, k, None))
    alpha, q = get("alpha"), get("q")
    if alpha is None or q is None:
        return None
    text = (f"|SR − truth| ≤ q·u per pixel with probability {100 * (1 - float(alpha)):.3g} % "
            f"(q = {fmt(q, 3)}, u the local scale")
    if get("scale_rule"):
        text += f": {get('scale_rule')}"
    text += ")"
    cov = get("coverage_holdout")
    text += (f"; measured coverage on held-out data {100 * float(cov):.3g} %" if cov is not None
             else "; coverage not measured on held-out data")
    bands, med = get("bands") or [], get("median_bound") or []
    if med:
        text += "; median bound " + ", ".join(f"{b}: {fmt(m, 3)}" for b, m in zip(bands or [""] * len(med), med))
        text += f" {summary.units or 'a.u.'}"
    return text


def link_rows(links: Mapping[str, str | Path] | None, base: Path | None) -> list[dict[str, str]]:
    """``label``, relative ``path`` (shown) and ``href`` (percent-encoded) of each exported file.
    With ``base`` (the report's folder), absolute paths and paths relative to the working directory
    are made relative to it; a bare file name is taken to lie in the report's folder."""
    out = []
    for label, path in (links or {}).items():
        p = Path(path)
        if base is not None and (p.is_absolute() or len(p.parts) > 1):
            rel = os.path.relpath(p.resolve(), Path(base).resolve())
        else:
            rel = str(p)
        rel = rel.replace(os.sep, "/")
        out.append({"label": str(label), "path": rel, "href": quote(rel)})
    return out


def extra_fields(summary: AuditSummary) -> list[tuple[str, list[tuple[str, str]]]]:
    """Fields of the summary the template does not show by name (added later), as tables."""
    data = jsonable(summary)
    return [(k, flatten(v)) for k, v in data.items() if k not in SUMMARY_SHOWN and v not in (None, {}, [])]


# ---------------------------------------------------------------------------------------------
# figures


def _file_shape(result: AuditResult) -> list[int] | None:
    """The SR file's shape where the result says it (the provenance of the SR input)."""
    shape = ((result.provenance or {}).get("sr") or {}).get("shape")
    if isinstance(shape, (list, tuple)) and len(shape) >= len(result.scale):
        return [int(n) for n in shape[-len(result.scale):]]
    return None


def _overview(result: AuditResult, disp: Display, painter: Painter) -> list[dict[str, Any]]:
    layers = painter.L
    worst = [r for r in result.regions if r.verdict != "pass"] or result.regions
    if disp.volume:
        centre = (disp.region_centre(worst[0]) if worst
                  else [float(np.mean(np.nonzero(np.any(layers.mask, axis=tuple(a for a in range(3) if a != ax)))))
                        for ax in range(3)])
    else:
        centre = [0, 0]
    drawn = result.regions[:MAX_DRAWN_REGIONS]
    return [{"plane": disp.slice_title(p), "panels": painter.panels(disp, p, drawn, max_side=420 if disp.volume
                                                                     else 480)}
            for p in disp.planes(centre)]


def _close_up(result: AuditResult, disp: Display, painter: Painter, reg: Region) -> dict[str, Any]:
    """Zoomed crops through one region: at full resolution (``result.crop``) where the arrays are
    an overview and the region is small enough, else sliced from the arrays at hand."""
    note = ""
    src_disp, src_painter = disp, painter
    if disp.stride > 1:
        crop = getattr(result, "crop", None)
        sub, why = None, ""
        if callable(crop) and is_small(reg):
            try:
                sub = crop(reg, crop_margin(reg))
            except (DomainSRError, OSError) as exc:  # the inputs are gone or cannot be re-read: say so
                why = f"; no full-resolution crop: {exc}"
        if sub is not None:
            offset = None  # where the crop lies in the file: its coverage box, else from the geometries
            if getattr(getattr(sub, "coverage", None), "box", None) is None:
                rel = crop_offset(full_geometry(disp), sub.sr.geometry)
                offset = ([o + r for o, r in zip(disp.offset, rel)] if rel is not None
                          else [max(0, a - crop_margin(reg)) for a, _ in reg.bbox_index])
            src_disp = Display(sub, offset=offset)
            src_disp.file_shape = disp.file_shape
            src_painter = Painter(sub, layers_of(sub, src_disp), windows=painter.windows, ranges=painter.ranges)
            note = "full resolution (recomputed on a window about the region)"
        else:
            large = callable(crop) and not is_small(reg)
            note = (f"overview resolution 1:{disp.stride}"
                    + (" (the region is too large for a full-resolution crop)" if large else why))
    rows = []
    for p in src_disp.planes(src_disp.region_centre(reg)):
        window = region_crop(src_disp, reg, p, src_disp.take(src_painter.L.mask, p).shape)
        rows.append({"plane": src_disp.slice_title(p),
                     "panels": src_painter.panels(src_disp, p, [reg], crop=window, min_side=150, max_side=190)})
    return {"id": reg.id, "verdict": reg.verdict, "kind": reg.kind, "risk": fmt(reg.peak_risk, 3), "rows": rows,
            "note": note}


# ---------------------------------------------------------------------------------------------
# writing


def render_html(result: AuditResult, links: Mapping[str, str | Path] | None = None,
                base: str | Path | None = None) -> str:
    """The report as one HTML string (figures embedded). ``links``: label -> exported file (risk
    map, regions.geojson, label map ...), linked by its path relative to ``base`` (the report's
    folder: see :func:`link_rows`)."""
    import jinja2

    summary = result.summary()
    disp = Display(result)
    disp.file_shape = _file_shape(result)
    layers = layers_of(result, disp)
    painter = Painter(result, layers)
    overview = _overview(result, disp, painter)
    region_figs = [_close_up(result, disp, painter, reg)
                   for reg in result.regions[: result.thresholds.max_figure_regions]]
    oblique = disp.obliquity_deg()
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))
    return env.get_template(TEMPLATE).render(
        s=summary, r=result, overview=overview, region_figs=region_figs, metric_rows=metric_rows(result),
        region_rows=region_rows(result, {f["id"] for f in region_figs}), card_rows=card_rows(result.model),
        frac=result.fractions.headline, heat_bar=fg.colourbar(),
        class_colours={k: "#{:02x}{:02x}{:02x}".format(*c) for k, c in fg.CLASS_COLOURS.items()},
        fmt=fmt, flatten=flatten, record_tables=record_tables, inputs=inputs_table(summary.provenance),
        input_names=INPUTS, coverage=coverage_text(result, summary, disp.file_shape), conformal=conformal_text(summary),
        links=link_rows(links, Path(base) if base is not None else None), extra=extra_fields(summary),
        axes=disp.axes_text(disp.file_shape or summary.grid.sr_shape), stride=disp.stride, scale_note=disp.scale_note,
        oblique=oblique if oblique >= 1 else 0.0, kind_text=KIND_TEXT,
        n_halluc=int(np.sum(result.classes == HALLUCINATED)) if result.classes is not None else None,
        is_volume=disp.volume)


def write_report(result: AuditResult, out_dir: str | Path, stem: str = "audit",
                 links: Mapping[str, str | Path] | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.html`` and ``<stem>.json`` into ``out_dir`` (atomically); return both paths.
    ``links``: label -> exported file to link from the HTML (relative to ``out_dir``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    html_path, json_path = out / f"{stem}.html", out / f"{stem}.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(result.summary().to_json(), encoding="utf-8")
    html = render_html(result, links, base=out)
    with atomic_path(html_path) as tmp:
        tmp.write_text(html, encoding="utf-8")
    return html_path, json_path


__all__ = ["KIND_TEXT", "METRIC_LABELS", "card_rows", "conformal_text", "coverage_text", "evidence_text", "flatten",
           "fmt", "link_rows", "metric_rows", "record_tables", "region_rows", "render_html", "write_report"]
