"""The model card schema: what a checkpoint's ``<name>.json`` says (DESIGN.md).

Architecture, domain, per-axis scale, bands, units, the expected input range and the intensity
normalisation, plus how the weights were made (data, split, degradation, settings) and what they
achieve against interpolation. Validation only; loading, input checks and saving live in
:mod:`domainsr.models.checkpoints` (which re-exports these names).
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from domainsr.image import now_iso


class StrictCardModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Architecture(StrictCardModel):
    """Registry name and the keyword arguments besides ``spatial_dims``/``in_channels``/``scale``."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class FixedNormalization(StrictCardModel):
    """``x_net = (x - offset) / scale`` per channel, inverted on the output."""

    kind: Literal["fixed"] = "fixed"
    offset: list[float]
    scale: list[float]

    @model_validator(mode="after")
    def _check(self) -> FixedNormalization:
        if len(self.offset) != len(self.scale) or any(s <= 0 for s in self.scale):
            raise ValueError("offset and scale need one entry per channel and scale > 0")
        return self


class PercentileNormalization(StrictCardModel):
    """Per image and channel: ``low``/``high`` percentiles of the valid voxels map to 0/1.

    ``voxels="foreground"`` takes the percentiles over the foreground only (valid voxels above the
    channel's Otsu threshold), so a volume's share of background does not move them; ``"valid"``
    (the default, as the shipped cards were trained) over every valid voxel.
    """

    kind: Literal["percentile"] = "percentile"
    low: float = 0.5
    high: float = 99.5
    voxels: Literal["valid", "foreground"] = "valid"

    @model_validator(mode="after")
    def _check(self) -> PercentileNormalization:
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError("need 0 <= low < high <= 100")
        return self


Normalization = Annotated[FixedNormalization | PercentileNormalization, Field(discriminator="kind")]


class ConsistencySettings(StrictCardModel):
    """The engine's optional data-consistency stage (:mod:`domainsr.engine.consistency`): after the
    network, ``iterations`` back-projection steps ``x <- x + step * U(lr - D(x))`` through the
    card's noise-free degradation ``D`` (``U``: ``upsampler`` interpolation), then, with
    ``clamp_margin``, each output pixel clipped to its local LR range (3x3 LR neighbourhood)
    widened by that share of the range. ``noise_tolerance`` (multiples of the degradation's noise
    std in the image's units, ``noise_sigma``/``sigma_hu``) leaves residuals within the noise
    alone (soft threshold): the output need only match the LR within noise."""

    iterations: int = Field(default=3, ge=0, le=50)
    upsampler: Literal["cubic", "nearest"] = "cubic"
    step: float = Field(default=1.0, gt=0.0, le=2.0)
    clamp_margin: float | None = Field(default=None, ge=0.0)
    noise_tolerance: float = Field(default=0.0, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> ConsistencySettings:
        if self.iterations == 0 and self.clamp_margin is None:
            raise ValueError("data consistency with 0 iterations and no clamp_margin does nothing")
        return self


class FileRecord(StrictCardModel):
    path: str
    sha256: str


class TrainingData(StrictCardModel):
    """What the weights were trained on and which part of it was held out."""

    source: str
    files: list[FileRecord] = Field(default_factory=list)
    bands: list[str] = Field(default_factory=list)
    split: dict[str, Any] = Field(default_factory=dict)
    description: str = ""


class TrainingSettings(StrictCardModel):
    steps: int
    gan_steps: int = 0
    seconds: float
    device: str
    threads: int
    seed: int
    batch_size: int
    patch_size: list[int]
    lr: float
    loss: str
    stopped_by: str = "steps"
    extra: dict[str, Any] = Field(default_factory=dict)


class RegionMetrics(StrictCardModel):
    """Model vs the best interpolation baseline on one held-out region, on the data's own range."""

    region: str
    psnr: float
    ssim: float
    baseline: str
    psnr_baseline: float
    ssim_baseline: float
    gain_db: float
    data_range: float
    n_pixels: int
    description: str = ""


class PrecisionCheck(StrictCardModel):
    """A reduced precision (or backend) measured against float32 on the card's held-out region
    (``benchmarks/backends.py``): PSNR lost, and the throughput ratio on the machine it ran on."""

    psnr_loss_db: float
    speedup: float | None = None
    measured_on: str = ""


class ModelCard(StrictCardModel):
    name: str
    version: str = "1"
    architecture: Architecture
    domain: Literal["mri", "ct", "optical"]
    spatial_dims: Literal[2, 3]
    scale: tuple[int, ...]
    in_channels: int = Field(ge=1)
    out_channels: int = Field(ge=1)
    bands: list[str] = Field(default_factory=list)
    output_bands: list[str] = Field(default_factory=list)
    channel_meaning: str = ""
    units: str
    input_range: tuple[float, float] | None = None
    normalization: Normalization
    receptive_radius: tuple[int, ...] | None  # LR px per axis; None: unknown (third-party weights)
    #: direct: on images of spatial_dims axes; slicewise: a 2D net along the thick-slice axis of a
    #: volume (scale (1, s)); inplane: a 2D net on each slice of a volume, in its plane
    application: Literal["direct", "slicewise", "inplane"] = "direct"
    degradation: dict[str, Any] = Field(default_factory=dict)
    #: the engine's data-consistency stage through ``degradation``; ``None``: off (the network alone)
    consistency: ConsistencySettings | None = None
    training_data: TrainingData | None = None
    training: TrainingSettings | None = None
    metrics: dict[str, RegionMetrics] = Field(default_factory=dict)
    #: reduced precisions measured on the held-out region (``"bf16"``: the engine's ``amp="auto"``
    #: uses it on a CPU with native bf16 when the loss is within ``CPU_BF16_MAX_LOSS_DB``)
    precision: dict[str, PrecisionCheck] = Field(default_factory=dict)
    weights_sha256: str = ""
    created: str = Field(default_factory=now_iso)
    domainsr_version: str = ""
    license: str = ""
    intended_use: str = ""
    limitations: str = ""

    @field_validator("domainsr_version", mode="before")
    @classmethod
    def _version(cls, v: str) -> str:
        if v:
            return v
        from domainsr import __version__

        return __version__

    @model_validator(mode="after")
    def _consistent(self) -> ModelCard:
        if len(self.scale) != self.spatial_dims or any(s < 1 for s in self.scale):
            raise ValueError(f"scale {self.scale} must give a factor >= 1 for each of {self.spatial_dims} axes")
        rr = self.receptive_radius
        if rr is not None and (len(rr) != self.spatial_dims or min(rr) < 0):
            raise ValueError("receptive_radius needs one value >= 0 per axis (input pixels)")
        if self.bands and len(self.bands) != self.in_channels:
            raise ValueError(f"{len(self.bands)} band names for {self.in_channels} input channels")
        if self.output_bands and (len(self.output_bands) != self.out_channels
                                  or not set(self.output_bands) <= set(self.bands)):
            raise ValueError("output_bands must name out_channels of the input bands")
        if not self.output_bands and self.out_channels != self.in_channels:
            raise ValueError("out_channels differs from in_channels: name the output_bands")
        if isinstance(self.normalization, FixedNormalization) and len(self.normalization.offset) != self.in_channels:
            raise ValueError("fixed normalisation needs one offset/scale per input channel")
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError("input_range must be [low, high] with low < high")
        if self.consistency is not None and (self.application != "direct" or not self.degradation):
            raise ValueError("data consistency needs a direct model with a degradation")
        if self.application != "direct" and self.spatial_dims != 2:
            raise ValueError(f"{self.application} application is for 2D networks applied to 3D volumes")
        return self
