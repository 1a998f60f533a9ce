"""Strict configuration models for ``configs/*.yaml``.

Every model forbids unknown keys, so a misspelt option is an error naming the file and the key,
never silently ignored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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
    stream_above_mpx: float | None = Field(
        64.0, gt=0, description="single-file rasters with more LR megapixels are streamed window by window "
        "(bounded memory) and audited on a central window; null: never stream")
    stream_audit_window: int = Field(2048, ge=64, description="LR side of the central probe window of a streamed "
                                     "raster (band and model checks, input statistics); the audit covers the whole "
                                     "scene from the files")
    consistency: bool | None = Field(None, description="data-consistency stage after the network (back-projection "
                                     "through the card's degradation, windowed): true/false force it on/off; "
                                     "null: the model card's setting")


class OutputConfig(StrictModel):
    dir: Path = Path("out")
    format: Literal["same", "nifti", "dicom", "cog"] = "same"


class StoreConfig(StrictModel):
    """Where a batch finds its items and puts its outputs (``domainsr.stores.open_store``).

    ``input``: a path (file or folder) or a store URL (``file://``; ``dicomweb://``, ``dimse://``,
    ``stac+https://``, ``stac+file://`` with their stores installed); ``$VARS`` and ``~`` are
    expanded. ``output``: the output root (default ``output.dir``). ``query``: which items
    (store-specific; the local store knows ``kinds``, ``glob`` and ``modified_within_hours``).
    ``options``: further keyword arguments of the store.

    Local outputs are named ``<item id><output_suffix>`` (``brain_sr.nii.gz``; the CLI's
    ``--suffix``). An input is never written over; an existing file that is not an earlier
    DomainSR output is replaced only with ``overwrite: true`` (the CLI's ``--overwrite``).
    """

    input: str | None = None
    output: str | None = None
    output_suffix: str = Field("_sr", max_length=40, pattern=r"^[A-Za-z0-9._-]*$",
                               description="appended to the item id in output names; may be empty")
    overwrite: bool = Field(False, description="replace existing files that are not earlier DomainSR outputs")
    query: dict[str, Any] = Field(default_factory=dict)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("output_suffix")
    @classmethod
    def _safe_suffix(cls, v: str) -> str:
        if ".." in v:
            raise ValueError("must not contain '..'")
        return v


class RunnerConfig(StrictModel):
    """How a batch runs under Prefect: the task runner of the per-item tasks, retries, time limit.

    ``task_runner: threads`` runs ``max_workers`` items at a time in this process;
    ``dask`` sends them to the Dask scheduler at ``dask_address`` (an existing cluster), or to a
    local cluster of ``dask_workers`` processes when no address is given.
    """

    task_runner: Literal["threads", "dask"] = "threads"
    max_workers: int = Field(1, ge=1)
    dask_address: str | None = None
    dask_workers: int | None = Field(None, ge=1)
    dask_threads_per_worker: int = Field(1, ge=1)
    dask_split: bool = Field(True, description="with dask: a single-file raster that streams (above "
                             "tiling.stream_above_mpx or the memory budget) is split into bands of tile rows "
                             "computed on all the workers and assembled into one COG (pixels as on one machine)")
    retries: int = Field(1, ge=0, description="retries of an item after a transient error (I/O, network)")
    retry_delay_s: float = Field(10.0, ge=0)
    item_timeout_s: float | None = Field(None, gt=0, description="time limit of one item (checked per tile batch)")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="GiB one item's decoded input and output may take; larger single-file rasters "
        "stream, other inputs are refused (null: DOMAINSR_MEMORY_BUDGET_GB, else half the machine's memory)")


class EnhanceConfig(StrictModel):
    """One enhancement task (e.g. ``configs/sentinel2_x2.yaml``).

    ``domain`` may be left out: each input's own domain is used (a mixed folder). ``bands``: the
    bands to enhance (any spelling: ``B2`` is ``B02``). ``band_map``: what a single-file raster's
    bands are when the file does not say, by 1-based index: ``{1: B02, 2: B03, 3: B04, 4: B08}``
    or ``"1=B02,2=B03,3=B04,4=B08"`` (the CLI's ``--band-map``). ``audit`` holds the audit
    settings (``domainsr.audit.AuditThresholds`` keys, checked when a run starts);
    ``run_audit: false`` skips the reference-free audit.
    """

    name: str
    domain: Literal["mri", "ct", "optical"] | None = None
    model: ModelRef
    bands: list[str] | None = None
    band_map: dict[int, str] | None = None
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    audit: dict[str, Any] = Field(default_factory=dict)
    run_audit: bool = True
    store: StoreConfig = Field(default_factory=StoreConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)

    @field_validator("band_map", mode="before")
    @classmethod
    def _band_map(cls, v: Any) -> dict[int, str] | None:
        from domainsr.bands import parse_band_map

        try:
            return parse_band_map(v)
        except ConfigError as exc:
            raise ValueError(exc.message) from None


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
