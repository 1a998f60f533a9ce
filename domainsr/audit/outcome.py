"""The headline of one audit run outside a batch, and of a written report.

:class:`AuditOutcome` is what ``domainsr.app.heldout_audit`` / ``output_audit`` return and what the
audit flow and ``domainsr audit`` show: verdict, reasons, the files written, and the PSNR/SSIM
means when there was a reference. Its flat row (``to_row``, read back by ``model_validate``)
keeps the documented field names: ``json`` for the report path, ``psnr`` / ``psnr_baseline`` /
``psnr_gain_db`` and ``ssim`` / ``ssim_baseline`` for the means, which in code are
``outcome.psnr.model_mean`` / ``.baseline_mean`` / ``.gain_mean`` (the names of
:class:`~domainsr.audit.results.MetricGain`). :class:`AuditHeadline` reads a report's verdict back.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from domainsr.audit.results import MetricMeans, Record, Verdict

#: flat row fields of the PSNR and SSIM means, in MetricMeans order (None: not in the row)
FLAT_MEANS: dict[str, tuple[str, str, str | None]] = {
    "psnr": ("psnr", "psnr_baseline", "psnr_gain_db"), "ssim": ("ssim", "ssim_baseline", None)}
_MEANS = ("model_mean", "baseline_mean", "gain_mean")


class AuditHeadline(BaseModel):
    """A written report's verdict and reasons (other keys ignored: reports of any version)."""

    model_config = ConfigDict(extra="ignore")
    verdict: Verdict | None = None
    reasons: list[str] = Field(default_factory=list)

    @classmethod
    def read(cls, path: str | Path) -> AuditHeadline | None:
        """The headline of the JSON report at ``path``, or ``None`` if it cannot be read."""
        try:
            return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # pydantic's ValidationError is a ValueError
            return None


class AuditOutcome(Record):
    """The headline of one held-out or output audit (``domainsr audit``, the audit flow): verdict,
    reasons, the files written, and the PSNR/SSIM means when there was a reference. It
    serialises (``to_row``) to a flat row; ``model_validate`` reads such a row back."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    OMIT_NONE = frozenset({"reference", "sr", "json", "risk_map", "model", "scale", "domain"})
    reference: str | None = Field(None, description="the reference as shown (medical paths pseudonymised)")
    sr: str | None = Field(None, description="the audited SR file as shown (output audits)")
    verdict: Verdict
    reasons: list[str] = Field(default_factory=list)
    html: str | None = None
    json_path: str | None = Field(None, alias="json")
    risk_map: str | None = None
    model: str | None = None
    scale: list[int] | None = None
    domain: str | None = None
    psnr: MetricMeans | None = None
    ssim: MetricMeans | None = None
    regions: int = 0

    @model_validator(mode="before")
    @classmethod
    def _nest(cls, data: Any) -> Any:
        """Flat row fields (``psnr``, ``psnr_baseline``, ``psnr_gain_db``, ...) to the means."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        for name, keys in FLAT_MEANS.items():
            if isinstance(data.get(name), (Mapping, MetricMeans)):
                continue
            values = [data.pop(k, None) if k else None for k in keys]
            data[name] = None if all(v is None for v in values) else dict(zip(_MEANS, values))
        return data

    @model_serializer(mode="wrap")
    def _flatten(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = {k: v for k, v in handler(self).items() if not (v is None and k in self.OMIT_NONE)}
        out: dict[str, Any] = {}
        for key, value in data.items():
            if key not in FLAT_MEANS:
                out[key] = value
            elif value is not None:
                for flat, part in zip(FLAT_MEANS[key], _MEANS):
                    if flat:
                        out[flat] = value.get(part)
        return out

    def to_row(self) -> dict[str, Any]:
        """The flat row (documented field names: ``json``, ``psnr_gain_db``, ...)."""
        return self.model_dump(by_alias=True)


__all__ = ["FLAT_MEANS", "AuditHeadline", "AuditOutcome"]
