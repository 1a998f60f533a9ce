"""Fidelity audits: metrics, hallucination/omission/improvement maps, region flags, reports.

``audit_heldout`` degrades a real reference, enhances it and compares; ``audit_output`` audits an SR
image made by any tool from its LR input; ``write_report`` writes the HTML + JSON report. Results
are typed (``results``: :class:`AuditSummary` is the JSON report; ``outcome``: the headline of a run).
"""
from domainsr.audit.heldout import audit_checkpoint, audit_heldout, crop_to_multiple, heldout_region
from domainsr.audit.operators import area_average, as_enhancer, interpolation_enhancer, module_enhancer
from domainsr.audit.outcome import AuditHeadline, AuditOutcome
from domainsr.audit.protocol import AuditResult, audit_files, audit_output, risk_image, write_risk_map
from domainsr.audit.report import write_report
from domainsr.audit.results import (
    AuditMetrics,
    AuditSummary,
    ClassFractions,
    Fractions,
    MetricGain,
    MetricMeans,
    NoiseReport,
    Region,
    RegionEvidence,
    Verdict,
)
from domainsr.audit.settings import AuditThresholds

__all__ = ["AuditHeadline", "AuditMetrics", "AuditOutcome", "AuditResult", "AuditSummary", "AuditThresholds",
           "ClassFractions", "Fractions", "MetricGain", "MetricMeans", "NoiseReport", "Region", "RegionEvidence",
           "Verdict", "area_average", "as_enhancer", "audit_checkpoint", "audit_files", "audit_heldout", "audit_output",
           "crop_to_multiple", "heldout_region", "interpolation_enhancer", "module_enhancer", "risk_image",
           "write_report", "write_risk_map"]
