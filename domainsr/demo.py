"""The `make demo` job: the enhancement flow over the real sample data with the shipped models.

Two tasks, each from its config in ``configs/``: the Sentinel-2 scene's 10 m bands x2
(``sentinel2_x2.yaml``) and the MNI152 T1 volume x2 (``mri_t1_x2.yaml``). Each produces the
enhanced image in the input's format, a reference-free audit report (HTML + JSON) and a risk
map. A shipped checkpoint that is missing is replaced by bicubic interpolation at the same scale,
with a warning. To stay within its time budget (10 minutes on 2 cores, set-up included) the demo
skips the audit's test-time-augmentation opinion (``audit.tta: off``); the configs keep it. The configs actually run are written beside the outputs (``<out>/configs/``);
a second run skips what is already done.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from domainsr.config import ModelRef, load_enhance_config
from domainsr.data import fetch_sample_data
from domainsr.errors import DomainSRError
from domainsr.io.atomic import atomic_path

log = logging.getLogger("domainsr.demo")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: (sample name, config file, label of the output)
TASKS: tuple[tuple[str, str, str], ...] = (
    ("sentinel2", "sentinel2_x2.yaml", "Sentinel-2 10 m bands x2"),
    ("mni152", "mri_t1_x2.yaml", "MNI152 T1 x2"),
)


@dataclass
class DemoResult:
    """What the demo made: labelled paths, warnings (fallbacks) and the per-task summaries."""

    paths: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    summaries: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: per task label: the audit's ``verdict`` (None: not audited), its ``reasons`` and ``report`` path
    verdicts: dict[str, dict[str, Any]] = field(default_factory=dict)


def demo_runs(out: Path, data: dict[str, Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """The flow runs of the demo (resolved configs written under ``out/configs``) and warnings."""
    from domainsr.app import find_checkpoint, model_identity

    runs, warnings = [], []
    for sample, config_name, _ in TASKS:
        cfg = load_enhance_config(CONFIGS / config_name)
        if find_checkpoint(cfg.model.name) is None:
            scale = 2
            warnings.append(f"shipped checkpoint {cfg.model.name!r} is not installed: {cfg.name} runs bicubic "
                            f"interpolation x{scale} instead (a baseline, not super-resolution)")
            cfg = cfg.model_copy(update={"model": ModelRef(name="cubic", scale=scale)})
        model_identity(cfg.model)  # fail now, not in the flow, if the model cannot be used
        task_out = out / cfg.name
        cfg = cfg.model_copy(update={"audit": {**cfg.audit, "tta": "off"},  # time budget: no TTA opinion
                                     "output": cfg.output.model_copy(update={"dir": task_out}),
                                     "store": cfg.store.model_copy(update={"input": str(data[sample]),
                                                                           "output": str(task_out)})})
        path = out / "configs" / config_name
        with atomic_path(path) as tmp:
            tmp.write_text(f"# resolved by `domainsr demo` from configs/{config_name}\n"
                           + yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True), sort_keys=False))
        runs.append({"config": str(path), "inputs": [str(data[sample])], "out": str(task_out)})
    return runs, warnings


def run_demo(out: Path, *, on_warning: Any = None) -> DemoResult:
    """Fetch the samples, run the demo flow, and return the outputs' and reports' paths.

    ``on_warning(message)`` (default: the log) gets each fallback before the (long) run starts.
    """
    from flows.demo import demo_flow

    out = Path(out)
    data = fetch_sample_data()
    runs, warnings = demo_runs(out, data)
    for w in warnings:
        (on_warning or log.warning)(w)
    state = demo_flow(runs, return_state=True)
    summaries = state.result(raise_on_failure=False)
    if isinstance(summaries, BaseException):
        raise summaries
    if "error" in summaries:
        raise DomainSRError(summaries["error"])
    result = DemoResult(warnings=warnings, summaries=summaries)
    for (_, _, label), summary in zip(TASKS, summaries.values()):
        for item in summary["items"]:
            if item["output"]:
                result.paths[f"{label}: output"] = Path(item["output"])
            for key, name in (("audit.html", "audit report"), ("audit.json", "audit JSON")):
                if key in item["extras"]:
                    result.paths[f"{label}: {name}"] = Path(item["extras"][key])
            risk = next((v for k, v in item["extras"].items() if k.startswith("risk")), None)
            if risk:
                result.paths[f"{label}: risk map"] = Path(risk)
            if item["status"] == "failed":
                result.errors.append(f"{label}: {item['message']}")
            else:
                result.verdicts[label] = {"verdict": item.get("verdict"), "reasons": list(item.get("reasons") or []),
                                          "report": item["extras"].get("audit.html")}
    return result
