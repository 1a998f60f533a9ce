"""The audit next to a derived DICOM series: a store that has just written the series (in a
folder, or to send to a PACS) and holds the audit's files among the item's extras makes DICOM
objects of them on the series' planes, which become extras too:

* :data:`PARAMETRIC_MAP_LABEL` (``risk.dcm``): the risk map (``risk.nii.gz``) as a Parametric Map
  (:func:`domainsr.io.dicom.write_risk_parametric_map`);
* :data:`SEGMENTATION_LABEL` (``regions.seg.dcm``): the region label map (``regions.nii.gz``) with
  each region's verdict from the JSON report (``audit.json``: ``regions[].id``/``verdict``) as a
  Segmentation, one segment per verdict (:func:`domainsr.io.dicom.write_regions_segmentation`),
  when a region needs a review.

The enhanced item is never lost over them: a map that cannot be put on the series (another grid,
an unreadable report) is logged as a warning naming the item and left out.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from domainsr.errors import DomainSRError
from domainsr.io.formats import risk_label

log = logging.getLogger("domainsr.stores")

#: Extra label (and name suffix) of the Parametric Map of the audit's risk.
PARAMETRIC_MAP_LABEL = "risk.dcm"
#: Extra label (and name suffix) of the Segmentation of the audit's flagged regions.
SEGMENTATION_LABEL = "regions.seg.dcm"
#: Labels of the audit's exports (``domainsr.audit.exports``) an item may carry as extras.
EXPORT_LABELS = ("regions.geojson", "regions.nii.gz", "regions.tif", PARAMETRIC_MAP_LABEL, SEGMENTATION_LABEL)


def _verdicts(report: Path) -> dict[int, str]:
    regions = json.loads(Path(report).read_text(encoding="utf-8")).get("regions") or []
    return {int(r["id"]): str(r["verdict"]) for r in regions}


def dicom_maps(extras: Mapping[str, Path], domain: str, series_files: Sequence[Path], folder: Path, *,
               item_id: str, uid_for: Callable[[str], str] | None = None) -> dict[str, Path]:
    """The DICOM objects (label -> file in ``folder``) made from the audit's extras on the derived
    series ``series_files`` (see the module doc). ``uid_for(name)`` gives their series and
    instance UIDs (e.g. name-based from the derived series' UID, so a re-run sends the same
    instances again instead of new ones); without it they are new."""
    from domainsr.io.dicom import write_regions_segmentation, write_risk_parametric_map

    def uids(what: str) -> dict[str, str | None]:
        if uid_for is None:
            return {"series_uid": None, "instance_uid": None}
        return {"series_uid": uid_for(what), "instance_uid": uid_for(what + "-1")}

    made: dict[str, Path] = {}
    if not series_files:
        return made
    risk = extras.get(risk_label(domain))
    if risk is not None and str(risk).endswith((".nii", ".nii.gz")):
        try:
            made[PARAMETRIC_MAP_LABEL] = write_risk_parametric_map(risk, series_files, folder / PARAMETRIC_MAP_LABEL,
                                                                   **uids("risk-map"))
        except DomainSRError as exc:
            log.warning("%s: the audit risk map is not stored as a DICOM Parametric Map: %s", item_id, exc.message)
    labels, report = extras.get("regions.nii.gz"), extras.get("audit.json")
    if labels is not None and report is not None:
        try:
            seg = write_regions_segmentation(labels, _verdicts(report), series_files, folder / SEGMENTATION_LABEL,
                                             **uids("regions-seg"))
        except (DomainSRError, OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s: the audit regions are not stored as a DICOM Segmentation: %s", item_id,
                        getattr(exc, "message", exc))
        else:
            if seg is not None:
                made[SEGMENTATION_LABEL] = seg
    return made


__all__ = ["EXPORT_LABELS", "PARAMETRIC_MAP_LABEL", "SEGMENTATION_LABEL", "dicom_maps"]
