"""Strict configuration models for ``configs/*.yaml``.

Every model forbids unknown keys, so a misspelt option is an error naming the file and the key,
never silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domainsr.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ModelRef(StrictModel):
    """Which model to run: a shipped/user checkpoint name, or a registry name with a scale."""

    name: str
    scale: int | list[int] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class TilingConfig(StrictModel):
    """Patch engine settings; ``None`` means derive from the model and the machine."""

    tile: int | list[int] | None = None
    overlap: int = 0
    batch_size: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    blend: Literal["cosine", "gaussian"] = "cosine"
    threads: int | None = None


class OutputConfig(StrictModel):
    dir: Path = Path("out")
    format: Literal["same", "nifti", "dicom", "cog"] = "same"


class EnhanceConfig(StrictModel):
    """One enhancement task (e.g. ``configs/sentinel2_x2.yaml``)."""

    name: str
    domain: Literal["mri", "ct", "optical"]
    model: ModelRef
    bands: list[str] | None = None
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    audit: dict[str, Any] = Field(default_factory=dict)
    store: dict[str, Any] = Field(default_factory=dict)


M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: str | Path, model: type[M]) -> M:
    """Load ``path`` into ``model``; any problem raises ConfigError naming the file and the key."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError("config file not found", p) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {exc}", p) from exc
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping of keys to values", p)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid config: {problems}", p) from exc


def load_enhance_config(path: str | Path) -> EnhanceConfig:
    return load_yaml_model(path, EnhanceConfig)
