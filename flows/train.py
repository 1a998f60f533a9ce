"""The training flow: one ``configs/train/*.yaml`` run (``domainsr.train.trainer.train``) as a
Prefect task, then artifacts with the held-out metrics against interpolation and the checkpoint.

A retry resumes from the run's last saved state instead of starting afresh.
"""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import task_run

from domainsr.app import report
from flows.common import artifact_key, link, retry_if_transient


def _region(m: Any) -> dict[str, Any] | None:
    return None if m is None else m.model_dump(mode="json")


@task(name="train-model", cache_policy=NO_CACHE, persist_result=False, retries=1, retry_delay_seconds=30,
      retry_condition_fn=retry_if_transient)
def train_task(config: str, resume: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train as the config says (resuming when asked, and on a retry); returns plain data."""
    from domainsr.train.config import TrainConfig
    from domainsr.train.trainer import train

    cfg = TrainConfig.from_yaml(config, overrides)
    logger = get_run_logger()
    resume = resume or task_run.run_count > 1
    total = {"psnr": cfg.steps, "gan": cfg.gan.steps}
    every = max(1, cfg.steps // 20)

    def on_step(event: dict[str, Any]) -> None:
        if event.get("event") == "step":
            step, n = int(event["step"]), int(total.get(event.get("stage", "psnr"), cfg.steps) or 1)
            report("steps", cfg.output.name, step, n)
            if step % every == 0 or step == n:
                logger.info("%s step %d/%d, loss %.5f, %.0f s", event.get("stage"), step, n,
                            float(event["loss"]), float(event.get("elapsed", 0.0)))

    result = train(cfg, resume=resume, on_step=on_step)
    return {"name": cfg.output.name, "checkpoint": str(result.checkpoint), "run_dir": str(result.run_dir),
            "steps": result.steps, "gan_steps": result.gan_steps, "seconds": round(result.seconds, 1),
            "stopped_by": result.stopped_by, "val": _region(result.val), "test": _region(result.test),
            "holdout": {k: _region(m) for k, m in result.holdout.items()},
            "domain": result.card.domain, "scale": list(result.card.scale)}


@flow(name="domainsr-train")
def train_flow(config: str, resume: bool = False, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the model ``config`` describes and publish its held-out metrics (model vs the best
    interpolation, on the validation and the held-out test region)."""
    summary = train_task(config, resume, overrides)
    rows = [{"region": name, "psnr_db": m["psnr"], "baseline": m["baseline"], "psnr_baseline_db": m["psnr_baseline"],
             "gain_db": m["gain_db"], "ssim": m["ssim"], "ssim_baseline": m["ssim_baseline"],
             "pixels": m["n_pixels"]} for name, m in [("val", summary["val"]), ("test", summary["test"]),
                                                      *summary.get("holdout", {}).items()] if m]
    key = artifact_key("domainsr-train", summary["name"])
    desc = (f"{summary['name']}: {summary['steps']} steps ({summary['stopped_by']}), {summary['seconds']} s; "
            f"test gain {summary['test']['gain_db']:+.2f} dB" if summary["test"] else summary["name"])
    create_table_artifact(table=rows or [{"region": "none"}], key=key, description=desc)
    create_markdown_artifact(key=f"{key}-card", description=desc, markdown=(
        f"# Trained {summary['name']}\n\nCheckpoint: {link(summary['checkpoint'])} (model card beside it); "
        f"{summary['steps']} PSNR steps + {summary['gan_steps']} GAN steps in {summary['seconds']} s, stopped by "
        f"{summary['stopped_by']}.\n\n" + "\n".join(
            f"- **{r['region']}**: {r['psnr_db']:.2f} dB vs {r['baseline']} {r['psnr_baseline_db']:.2f} dB "
            f"(gain {r['gain_db']:+.2f} dB), SSIM {r['ssim']:.4f} vs {r['ssim_baseline']:.4f}" for r in rows) + "\n"))
    return summary
