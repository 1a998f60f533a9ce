"""The audit flow: the held-out audit of a model on real high-resolution references (each is
degraded with the model card's degradation, enhanced, and compared with the interpolation
baseline and the reference), or the audit of SR files made elsewhere against their LR inputs
(one pair, folders matched by stem, or several pairs: :func:`domainsr.app.audit_items.plan_audits`).

One task per audit; each writes ``report.html``, ``report.json`` and the risk map into ``out`` (one
audit) or ``out/<item>/`` (a batch). An item that cannot be audited is an error of its own; the
others run. A table artifact with the numbers and links to the reports.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from domainsr.app import heldout_audit, output_audit
from domainsr.app.audit_items import AuditPair, heldout_items, plan_audits
from domainsr.app.audits import AuditRow
from domainsr.app.progress import audit_progress
from domainsr.audit import MetricMeans
from domainsr.audit.privacy import public_path, relabel
from domainsr.config import ModelRef
from domainsr.errors import DomainSRError
from flows.common import artifact_key, link


@task(name="heldout-audit", cache_policy=NO_CACHE, persist_result=False)
def heldout_task(reference: str, model: str, scale: int | list[int] | None, out: str, audit: dict[str, Any],
                 bands: list[str] | None, seed: int, number: int = 1, item: str | None = None) -> AuditRow:
    shown = public_path(reference)  # medical paths pseudonymised in logs, artifacts, results
    if shown != reference:
        shown = f"reference #{number} ({shown})"  # the position in the given list identifies it
    try:
        result = heldout_audit(reference, ModelRef(name=model, scale=scale), out, audit=audit, bands=bands,
                               seed=seed)
    except DomainSRError as exc:
        raise relabel(exc, {str(reference): shown}, shown) from None
    gain = (result.psnr or MetricMeans()).gain_mean
    get_run_logger().info("%s: %s, PSNR gain over interpolation %+.2f dB -> %s", shown, result.verdict,
                          float("nan") if gain is None else gain, result.html)
    return result.model_copy(update={"reference": shown, "item": item})


@task(name="output-audit", cache_policy=NO_CACHE, persist_result=False)
def output_task(pair: AuditPair, out: str, audit: dict[str, Any], bands: list[str] | None,
                degradation: str | None, batch: bool) -> AuditRow:
    shown = {str(p): public_path(p) for p in (pair.sr, pair.lr, pair.reference) if p}
    try:
        result = output_audit(pair.sr, pair.lr, out, reference=pair.reference, audit=audit, bands=bands,
                              degradation=degradation, progress=audit_progress(pair.item))
    except DomainSRError as exc:
        raise relabel(exc, shown, pair.item if batch else None) from None
    get_run_logger().info("%s: %s (%s) -> %s", pair.item, result.verdict, (result.degradation or {}).get("spec"),
                          result.html)
    return result.model_copy(update={"reference": shown.get(str(pair.reference), ""), "sr": shown[str(pair.sr)],
                                     "item": pair.item if batch else None})


def table_row(outcome: AuditRow) -> dict[str, Any]:
    """One row of the audit flow's table artifact."""
    psnr, ssim = outcome.psnr or MetricMeans(), outcome.ssim or MetricMeans()
    return {"item": outcome.item or "", "reference": outcome.reference, "verdict": outcome.verdict,
            "psnr": psnr.model_mean, "psnr_baseline": psnr.baseline_mean, "psnr_gain_db": psnr.gain_mean,
            "ssim": ssim.model_mean, "ssim_baseline": ssim.baseline_mean, "regions": outcome.regions,
            "degradation": (outcome.degradation or {}).get("spec", ""), "html": outcome.html}


@flow(name="domainsr-audit")
def audit_flow(references: list[str] | None = None, model: str | None = None, scale: int | list[int] | None = None,
               out: str = "audit_out", audit: dict[str, Any] | None = None, bands: list[str] | None = None,
               seed: int = 0, sr: str | list[str] | None = None, lr: str | list[str] | None = None,
               degradation: str | None = None) -> State:
    """Held-out audit of ``model`` on each of ``references`` (files or band-set folders), or, with
    ``sr`` and ``lr`` (paths or lists of paths; folders of images are matched by stem), the audit of
    third-party outputs (``references``: their high-resolution references, one per ``sr``, when
    there are any) re-degraded with ``degradation`` (default ``auto``). Reports go into ``out``, or
    ``out/<item>/`` for a batch. Ends Failed when an audit could not run or a verdict is 'fail'."""
    from domainsr.errors import ConfigError

    audit = audit or {}
    errors: list[str] = []
    if sr is not None or lr is not None:
        if sr is None or lr is None:
            raise ConfigError("an output audit needs both sr and lr")
        plan = plan_audits([sr] if isinstance(sr, str) else sr, [lr] if isinstance(lr, str) else lr,
                           references or ())
        errors += plan.problems
        futures = [output_task.submit(p, str(Path(out) / p.item) if plan.per_item else out, audit, bands,
                                      degradation, plan.per_item) for p in plan.pairs]
    else:
        if not references or model is None:
            raise ConfigError("a held-out audit needs references and a model")
        batch = len(references) > 1
        futures = [heldout_task.submit(r, model, scale, str(Path(out) / name) if batch else out, audit, bands, seed,
                                       k, name if batch else None)
                   for k, (name, r) in enumerate(heldout_items(references), 1)]
    done: list[AuditRow] = []
    for f in futures:
        f.wait()
        if f.state.is_completed():
            done.append(f.result())
        else:
            exc = f.state.result(raise_on_failure=False)
            errors.append(str(exc) if isinstance(exc, BaseException) else f.state.message)
    key = artifact_key("domainsr-audit", model or "output")
    verdicts = [o.verdict for o in done]
    desc = f"{len(done)} audit(s): {', '.join(verdicts) or 'none'}; {len(errors)} error(s)"
    create_table_artifact(table=[table_row(o) for o in done] or [{"reference": "", "verdict": "no audit"}], key=key,
                          description=desc)
    create_markdown_artifact(key=f"{key}-reports", description=desc, markdown="# DomainSR audit\n\n" + "\n".join(
        f"- {o.item or o.reference or o.sr}: **{o.verdict}** ({'; '.join(o.reasons)}) "
        f"{link(o.html, 'report')} {link(o.risk_map, 'risk map')}" for o in done)
        + "".join(f"\n- error: {e}" for e in errors) + "\n")
    data = {"audits": [o.to_row() for o in done], "errors": errors}
    if errors or "fail" in verdicts:
        return Failed(message=desc, data=data)
    return Completed(message=desc, data=data)
