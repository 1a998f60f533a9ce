"""Single-grid pairing: one HR image, LR made from it by the config's degradation.

The image is split along ``data.split.axis`` (:func:`domainsr.train.regions.split`); patches of
the train region are degraded on the fly (:class:`~domainsr.train.datasets.PatchDataset`, 2D
planes of a volume with ``data.planes``), val / test regions are degraded once as wholes
(:func:`~domainsr.train.datasets.eval_pairs`). The network maps the normalised LR to the
normalised HR; figures are in the data's units.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from domainsr.errors import ConfigError
from domainsr.image import SpatialImage
from domainsr.models.checkpoints import (
    Architecture,
    FixedNormalization,
    InputNormalization,
    ModelCard,
    PercentileNormalization,
    RegionMetrics,
    TrainingData,
    TrainingSettings,
    percentile_normalization,
)
from domainsr.train.config import FixedNormSpec, PercentileNormSpec, SourceSpec, TrainConfig
from domainsr.train.datasets import (
    Degradation,
    EvalPair,
    MixedPatchDataset,
    PatchDataset,
    Region,
    denormalize,
    eval_pairs,
    normalize,
)
from domainsr.train.pairing import (
    DEFAULT_UNITS,
    Autocast,
    Pairing,
    build_network,
    card_fields,
    check_degradation,
    inflate_weights,
    init_weights,
    log,
    robust_range,
    split_record,
)
from domainsr.train.regions import fixed_normalization, foreground, split
from domainsr.train.sources import load_source, read_source, source_files


@dataclass
class SingleGridData:
    """The split, the train dataset, the held-out pairs and the train region's normalisation."""

    image: SpatialImage
    regions: dict[str, Region]
    gap: int
    train: PatchDataset | MixedPatchDataset
    val: list[EvalPair]
    test: list[EvalPair]
    norm: InputNormalization  # of the train region (fixed: the card's numbers)
    valid: np.ndarray
    #: ``"holdout:<source>"`` -> the pairs of a source kept out of training entirely
    holdout: dict[str, list[EvalPair]] = field(default_factory=dict)
    #: the images of ``data.extra`` (trained on whole), in order
    extras: list[SpatialImage] = field(default_factory=list)


def _region_image(img: SpatialImage, data: np.ndarray, valid: np.ndarray, region: Region) -> SpatialImage:
    box = region.slices(data.shape[1:])
    start = [s.start for s in box]
    shape = [s.stop - s.start for s in box]
    return img.derive(data[(slice(None), *box)], geometry=img.geometry.cropped(start, shape), mask=valid[box])


def _check_geometry(config: TrainConfig, data: np.ndarray, planes: list[tuple[int, int]] | None,
                    source: str) -> None:
    nd = data.ndim - 1
    if planes is None and nd != config.spatial_dims:
        raise ConfigError(f"scale {config.scale} is for {config.spatial_dims}D but {source} is {nd}D; "
                          "use data.planes for a 2D network on a volume", source or None)
    for pair in planes or []:
        if max(pair) >= nd:
            raise ConfigError(f"data.planes {pair} names an axis the {nd}D source lacks", source or None)


@dataclass
class _Other:
    """A ``data.extra`` / ``data.holdout`` image, ready: its data, whole-image region, planes,
    foreground and normalisation."""

    image: SpatialImage
    data: np.ndarray
    region: Region
    planes: list[tuple[int, int]] | None
    foreground: np.ndarray
    norm: InputNormalization


def _other(config: TrainConfig, spec: SourceSpec, image: SpatialImage | None,
           fixed: InputNormalization | None) -> _Other:
    """Read (unless given) and check another source; ``fixed``: the main train region's fixed
    normalisation (else the image's own percentiles, as inference does)."""
    img = image if image is not None else read_source(spec.source, spec.bands or config.data.bands)
    if img.domain != config.domain:
        raise ConfigError(f"config is for {config.domain} but {spec.source} is {img.domain}", img.source or None)
    data = np.asarray(img.data, dtype=np.float32)
    valid, fg = foreground(img, data, spec.background if spec.background is not None else config.data.background)
    if spec.axes is not None:
        if len(spec.axes) != data.ndim - 1:
            raise ConfigError(f"axes {spec.axes} do not order the {data.ndim - 1} spatial axes of {spec.source}",
                              img.source or None)
        data, valid, fg = data.transpose(0, *(a + 1 for a in spec.axes)), valid.transpose(spec.axes), fg.transpose(spec.axes)
    data, valid, fg = np.ascontiguousarray(data), np.ascontiguousarray(valid), np.ascontiguousarray(fg)
    planes = spec.planes or config.data.planes
    _check_geometry(config, data, planes, img.source)
    whole = Region("train", 0, 0, data.shape[1])
    norm = fixed if fixed is not None else _percentile(config, img, data, valid, whole)
    return _Other(img, data, whole, planes, fg, norm)


def prepare_data(config: TrainConfig, img: SpatialImage, degradation: Degradation,
                 receptive_radius: tuple[int, ...], others: dict[str, SpatialImage] | None = None) -> SingleGridData:
    """Split ``img``, fix the normalisation and build the train dataset and val/test pairs; the
    config's ``data.extra`` sources add training patches (the whole image of each), its
    ``data.holdout`` sources become scored-only pairs. ``others`` maps a source name to its image
    already read (tests, flows)."""
    d = config.data
    data = np.ascontiguousarray(img.data, dtype=np.float32)
    _check_geometry(config, data, d.planes, img.source)
    regions, gap = split(config, data.shape[1:], receptive_radius, img.source)
    valid, fg = foreground(img, data, d.background)
    spec = config.normalization
    fixed = (fixed_normalization(spec, data, fg, regions["train"], img.source)
             if isinstance(spec, FixedNormSpec) else None)

    def norm_of(region: Region) -> InputNormalization:
        return fixed if fixed is not None else _percentile(config, img, data, valid, region)

    train_norm = norm_of(regions["train"])
    ds = PatchDataset(data, regions["train"], scale=config.scale, patch=config.patch_size,
                      degradation=degradation, norm=train_norm, foreground=fg,
                      min_foreground=d.min_foreground, planes=d.planes, margin=d.margin, augment=d.augment,
                      seed=config.seed, source=img.source)
    held = {name: eval_pairs(data, regions[name], scale=config.scale, degradation=degradation,
                             norm=norm_of(regions[name]), valid=fg, foreground=fg, planes=d.planes,
                             max_planes=d.val_planes, min_foreground=d.min_foreground,
                             seed=config.seed + (1 if name == "val" else 2))
            for name in ("val", "test")}
    others = others or {}
    parts, weights, extras = [ds], [1.0], []
    for i, spec in enumerate(d.extra):
        o = _other(config, spec, others.get(spec.source), train_norm if fixed is not None else None)
        extras.append(o.image)
        parts.append(PatchDataset(o.data, o.region, scale=config.scale, patch=config.patch_size,
                                  degradation=degradation, norm=o.norm, foreground=o.foreground,
                                  min_foreground=d.min_foreground, planes=o.planes, margin=d.margin, augment=d.augment,
                                  seed=config.seed + 101 + i, source=o.image.source))
        weights.append(spec.weight)
    holdout = {}
    for i, spec in enumerate(d.holdout):
        h = _other(config, spec, others.get(spec.source), train_norm if fixed is not None else None)
        holdout[f"holdout:{spec.source}"] = eval_pairs(
            h.data, h.region, scale=config.scale, degradation=degradation, norm=h.norm, valid=h.foreground,
            foreground=h.foreground, planes=h.planes, max_planes=spec.max_planes, min_foreground=d.min_foreground,
            seed=config.seed + 3 + i)
    train_set = ds if len(parts) == 1 else MixedPatchDataset(parts, weights, seed=config.seed)
    return SingleGridData(img, regions, gap, train_set, held["val"], held["test"], train_norm, valid, holdout, extras)


def _percentile(config: TrainConfig, img: SpatialImage, data: np.ndarray, valid: np.ndarray,
                region: Region) -> InputNormalization:
    spec = config.normalization
    assert isinstance(spec, PercentileNormSpec)
    return percentile_normalization(_region_image(img, data, valid, region), spec.low, spec.high, spec.voxels)


class SingleGridPairing(Pairing):
    """HR -> degraded LR pairs on one grid (``image``: a :class:`SpatialImage`)."""

    data: SingleGridData

    def load(self) -> None:
        from domainsr.degrade import build_degradation

        config = self.config
        img = self.image if self.image is not None else load_source(config)
        if img.domain != config.domain:
            raise ConfigError(f"config is for {config.domain} but the source is {img.domain}", img.source or None)
        self.source: SpatialImage = img
        self.degradation = build_degradation(config.degradation)
        check_degradation("the degradation", self.degradation, config)

    def build_net(self) -> nn.Module:
        config, channels = self.config, self.source.channels
        net = build_network(config, channels, config.model.kwargs)
        if config.init_from:
            from domainsr.models.checkpoints import load_checkpoint

            model, card = load_checkpoint(config.init_from)
            if card.spatial_dims == 2 and config.spatial_dims == 3:
                inflate_weights(net, config, model, card, channels)
                return net
            init_weights(net, config, model, card, (config.model.name, config.model.kwargs, tuple(config.scale),
                                                    channels),
                         (card.architecture.name, card.architecture.kwargs, tuple(card.scale), card.in_channels),
                         "with {} channels")
        return net

    def prepare(self, receptive_radius: tuple[int, ...]) -> None:
        self.data = prepare_data(self.config, self.source, self.degradation, receptive_radius)

    def teacher(self) -> nn.Module | None:
        spec = self.config.distill
        if spec is None:
            return None
        from domainsr.models.checkpoints import load_checkpoint

        model, card = load_checkpoint(spec.teacher)
        ours = self.config.normalization
        theirs = card.normalization
        if isinstance(ours, FixedNormSpec):
            same = theirs.kind == "fixed" and np.allclose(theirs.offset, self.data.norm.offset, rtol=1e-4) and \
                np.allclose(theirs.scale, self.data.norm.scale, rtol=1e-4)
        else:
            same = theirs.kind == "percentile" and (theirs.low, theirs.high, theirs.voxels) == (
                ours.low, ours.high, ours.voxels)
        if not same or tuple(card.scale) != tuple(self.config.scale) or card.in_channels != self.source.channels:
            raise ConfigError(f"distill teacher {spec.teacher!r} does not read this run's input: its card has "
                              f"scale {list(card.scale)}, {card.in_channels} channels and normalisation "
                              f"{theirs.model_dump()}; train the student on the teacher's data and normalisation")
        log.info("distilling from %s (sha256 %s), weight %g", spec.teacher, card.weights_sha256[:12], spec.weight)
        return model.net.eval()

    def describe(self) -> str:
        return f"{self.source.source or 'image'} ({list(self.source.band_names)})"

    def predict(self, module: nn.Module, pair: EvalPair, device: torch.device, amp: Autocast) -> np.ndarray:
        x = torch.from_numpy(normalize(pair.lr, pair.norm))[None].to(device)
        with torch.no_grad(), amp():
            y = module(x).float()[0].cpu().numpy()
        return denormalize(y, pair.norm)

    def metrics_description(self, n_pairs: int) -> str:
        d = self.config.data
        return (f"{n_pairs} {'plane' if d.planes else 'region'}(s); valid "
                f"{'foreground ' if d.background is not None else ''}pixels "
                "without a 2 LR px border; PSNR pooled over pixels, mean over bands")

    def card(self, net: nn.Module, receptive_radius: tuple[int, ...], val: RegionMetrics,
             test: RegionMetrics, training: TrainingSettings) -> ModelCard:
        config, data, img, c = self.config, self.data, self.source, self.config.card
        generic = all(b == f"band{i + 1}" for i, b in enumerate(img.band_names))
        bands = list(config.data.bands) or ([] if generic else list(img.band_names))
        norm: FixedNormalization | PercentileNormalization
        if isinstance(config.normalization, FixedNormSpec):
            norm = FixedNormalization(offset=[float(v) for v in data.norm.offset],
                                      scale=[float(v) for v in data.norm.scale])
        else:
            norm = PercentileNormalization(low=config.normalization.low, high=config.normalization.high,
                                           voxels=config.normalization.voxels)
        if c.input_range is not None:
            in_range = c.input_range
        else:
            box = data.regions["train"].slices(img.spatial_shape)
            in_range = robust_range(np.asarray(img.data, np.float32)[(slice(None), *box)][:, data.valid[box]])
        split_info = split_record(
            config, data, "source pixels along the axis (end exclusive)",
            "train patches (with their degradation margin) lie inside the train region; val/test are degraded "
            "as wholes, so no val/test pixel is seen in training; the gap is at least the receptive radius "
            "plus the patch extent along the axis")
        if config.data.planes:
            split_info["planes"] = [list(p) for p in config.data.planes]
        if config.data.background is not None:
            split_info["background"] = config.data.background  # values <= it are not scored
        files = source_files(img, bands)
        for spec, o_img in zip(config.data.extra, data.extras):
            split_info.setdefault("extra", []).append(
                {"source": spec.source, "planes": [list(p) for p in spec.planes or config.data.planes or []],
                 **({"axes": list(spec.axes)} if spec.axes is not None else {}),
                 "weight": spec.weight, "shape": list(o_img.data.shape), "region": "whole image (training only)"})
            files += source_files(o_img, bands)
        for spec in config.data.holdout:
            split_info.setdefault("holdout", []).append(
                {"source": spec.source, "planes": [list(p) for p in spec.planes or config.data.planes or []],
                 **({"axes": list(spec.axes)} if spec.axes is not None else {}),
                 "region": "whole image, never trained on (metrics key holdout:<source>)"})
        units = c.units or img.units or DEFAULT_UNITS[config.domain]
        desc = (f"{img.source or 'image'} ({img.domain}, shape {list(img.data.shape)}, units "
                f"{img.units or DEFAULT_UNITS[config.domain]})"
                + "".join(f" + {s.source} (whole, weight {s.weight:g})" for s in config.data.extra)
                + "; pairs made on the fly with the degradation below"
                + (f"; kept out entirely: {', '.join(h.source for h in config.data.holdout)}"
                   if config.data.holdout else ""))
        return ModelCard(
            **card_fields(config, val, test, training),
            architecture=Architecture(name=config.model.name, kwargs=config.model.kwargs),
            in_channels=int(net.in_channels), out_channels=int(net.out_channels), bands=bands,
            channel_meaning=c.channel_meaning, units=units, input_range=in_range, normalization=norm,
            receptive_radius=receptive_radius, application="slicewise" if config.data.planes else "direct",
            degradation=self.degradation.describe(),
            training_data=TrainingData(source=config.data.source, files=files, bands=bands,
                                       split=split_info, description=desc))


__all__ = ["SingleGridData", "SingleGridPairing", "prepare_data"]
