"""Fidelity audits: metrics, hallucination/omission/improvement maps, region flags, reports.

``audit_heldout`` degrades a real reference, enhances it and compares; ``audit_output`` audits an SR
image made by any tool from its LR input; ``write_report`` writes the HTML + JSON report.
"""
from domainsr.audit.protocol import (
    AuditResult,
    AuditThresholds,
    audit_checkpoint,
    audit_heldout,
    audit_output,
    risk_image,
    write_risk_map,
)
from domainsr.audit.report import write_report

__all__ = ["AuditResult", "AuditThresholds", "audit_checkpoint", "audit_heldout", "audit_output", "risk_image", "write_report",
           "write_risk_map"]
