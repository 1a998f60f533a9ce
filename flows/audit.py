"""The audit flow: the held-out audit of a model on real high-resolution references (each is
degraded with the model card's degradation, enhanced, and compared with the interpolation
baseline and the reference), or the audit of an SR file made elsewhere against its LR input.
One task per reference; a table artifact with the numbers and links to the reports.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from domainsr.app import heldout_audit, output_audit
from domainsr.audit import AuditOutcome, MetricMeans
from domainsr.audit.privacy import public_path, relabel
from domainsr.config import ModelRef
from domainsr.errors import DomainSRError
from flows.common import artifact_key, link


@task(name="heldout-audit", cache_policy=NO_CACHE, persist_result=False)
def heldout_task(reference: str, model: str, scale: int | list[int] | None, out: str, audit: dict[str, Any],
                 bands: list[str] | None, seed: int, number: int = 1) -> AuditOutcome:
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
    return result.model_copy(update={"reference": shown})


@task(name="output-audit", cache_policy=NO_CACHE, persist_result=False)
def output_task(sr: str, lr: str, reference: str | None, out: str, audit: dict[str, Any],
                bands: list[str] | None) -> AuditOutcome:
    shown = {str(p): public_path(p) for p in (sr, lr, reference) if p}
    try:
        result = output_audit(sr, lr, out, reference=reference, audit=audit, bands=bands)
    except DomainSRError as exc:
        raise relabel(exc, shown) from None
    return result.model_copy(update={"reference": shown.get(str(reference), ""), "sr": shown[str(sr)]})


def table_row(outcome: AuditOutcome) -> dict[str, Any]:
    """One row of the audit flow's table artifact."""
    psnr, ssim = outcome.psnr or MetricMeans(), outcome.ssim or MetricMeans()
    return {"reference": outcome.reference, "verdict": outcome.verdict, "psnr": psnr.model_mean,
            "psnr_baseline": psnr.baseline_mean, "psnr_gain_db": psnr.gain_mean, "ssim": ssim.model_mean,
            "ssim_baseline": ssim.baseline_mean, "regions": outcome.regions, "html": outcome.html}


@flow(name="domainsr-audit")
def audit_flow(references: list[str] | None = None, model: str | None = None, scale: int | list[int] | None = None,
               out: str = "audit_out", audit: dict[str, Any] | None = None, bands: list[str] | None = None,
               seed: int = 0, sr: str | None = None, lr: str | None = None) -> State:
    """Held-out audit of ``model`` on each of ``references`` (files or band-set folders), or, with
    ``sr`` and ``lr``, the audit of a third-party output (``references[0]`` as its optional
    high-resolution reference). Ends Failed when an audit could not run or a verdict is 'fail'."""
    from domainsr.errors import ConfigError

    audit = audit or {}
    if sr is not None or lr is not None:
        if sr is None or lr is None:
            raise ConfigError("an output audit needs both sr and lr")
        ref = (references or [None])[0]
        futures = [output_task.submit(sr, lr, ref, out, audit, bands)]
    else:
        if not references or model is None:
            raise ConfigError("a held-out audit needs references and a model")
        futures = [heldout_task.submit(r, model, scale, out, audit, bands, seed, k)
                   for k, r in enumerate(references, 1)]
    done: list[AuditOutcome] = []
    errors: list[str] = []
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
        f"- {o.reference or o.sr}: **{o.verdict}** ({'; '.join(o.reasons)}) "
        f"{link(o.html, 'report')} {link(o.risk_map, 'risk map')}" for o in done)
        + "".join(f"\n- error: {e}" for e in errors) + "\n")
    data = {"audits": [o.to_row() for o in done], "errors": errors}
    if errors or "fail" in verdicts:
        return Failed(message=desc, data=data)
    return Completed(message=desc, data=data)
