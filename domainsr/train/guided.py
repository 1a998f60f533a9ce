"""Two-grid (guided, DSen2-style) pairing: target and guide bands by Wald's protocol.

A config with ``guide:`` (see :class:`~domainsr.train.config.GuideSpec`) trains ``guided_rescnn``
to super-resolve ``data.bands`` with ``guide.bands`` of the same scene on a grid ``scale`` times
finer (Sentinel-2: B05-B07, B8A, B11, B12 at 20 m guided by B02-B04, B08 at 10 m). Training pairs
are made one level down (Lanaras et al. 2018): *all* bands are degraded by ``scale`` with their own
sensor PSF, and the net learns ``(target at 40 m, guide at 20 m) -> target at 20 m``; inference
applies it one level up, ``(target at 20 m, guide at 10 m) -> target at 10 m``
(:mod:`domainsr.engine.guided`). Scale invariance of the mapping is the method's assumption.

The split is made on the target grid with the same rule as single-grid training (rows: train on
top, then val, test at the bottom; the test region is never trained on); per-band normalisation is
fixed on the train region; figures compare with the best interpolation of the target bands.
Batches carry the two grids packed into one LR-grid tensor (:func:`domainsr.models.guided.pack`),
so the one loop (:mod:`domainsr.train.loop`) trains a :class:`~domainsr.models.guided.PackedGuided`
view of the net. Guides of several resolutions (the 60 m model: 10 m and 20 m guides) are degraded
group by group, each on its own grid with its own PSF, then stacked on the finest guide grid with
the engine's own :func:`~domainsr.engine.guided.stack_guides`.

Size: one pairing strategy (loading, Wald pairs for one or several guide grids, held-out pairs,
the card) whose parts only make sense together; the mixed-resolution helpers are a few small
functions beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from domainsr.engine.guided import GuideGroups
from domainsr.errors import ConfigError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.models.checkpoints import (
    Architecture,
    FixedNormalization,
    InputNormalization,
    ModelCard,
    RegionMetrics,
    TrainingData,
    TrainingSettings,
)
from domainsr.models.guided import PackedGuided, pack
from domainsr.train.config import FixedNormSpec, TrainConfig
from domainsr.train.datasets import Degradation, PatchDataset, Region, denormalize, normalize
from domainsr.train.pairing import (
    DEFAULT_UNITS,
    Autocast,
    Pairing,
    build_network,
    card_fields,
    check_degradation,
    init_weights,
    robust_range,
    split_record,
)
from domainsr.train.regions import fixed_normalization, foreground, hr_box, on_hr_grid, on_lr_grid, split
from domainsr.train.sources import open_source, source_files, source_path


def load_guided_source(config: TrainConfig) -> tuple[SpatialImage, SpatialImage]:
    """``(target, guide)``: ``data.bands`` and ``guide.bands`` of the band set ``data.source``,
    cropped to nested grids (``guide.geometry == target.geometry.scaled(scale)``)."""
    return two_grid(_band_set(config), config)


def load_guided_groups(config: TrainConfig) -> GuideGroups:
    """:func:`guide_groups_of` the band set ``data.source``."""
    return guide_groups_of(_band_set(config), config)


def _band_set(config: TrainConfig) -> MultiResolutionImage:
    img = open_source(config.data.source)
    if not isinstance(img, MultiResolutionImage):
        raise ConfigError("guided training needs a band set with bands at two resolutions "
                          "(a Sentinel-2 or Landsat 8 folder)", source_path(config))
    return img


def group_degradation(spec: dict[str, Any], positions: list[int], n_bands: int) -> dict[str, Any]:
    """``guide.degradation`` for one resolution group of the guides: a per-band ``mtf`` list (one
    value per guide band, in ``guide.bands`` order) is cut to the group's bands."""
    out = dict(spec)
    mtf = spec.get("mtf")
    if isinstance(mtf, (list, tuple)):
        if len(mtf) != n_bands:
            raise ConfigError(f"guide.degradation.mtf has {len(mtf)} values for {n_bands} guide bands "
                              "(one per guide band, in guide.bands order)")
        out["mtf"] = [mtf[i] for i in positions]
    return out


def two_grid(img: MultiResolutionImage, config: TrainConfig) -> tuple[SpatialImage, SpatialImage]:
    """``(target, guide)`` of band set ``img`` on nested grids, as :func:`load_guided_source`
    (guides of several resolutions on the finest guide grid, exactly as inference builds them)."""
    gg = guide_groups_of(img, config)
    return gg.lr, gg.guide


def guide_groups_of(img: MultiResolutionImage, config: TrainConfig) -> GuideGroups:
    """Target and guide bands of band set ``img``, the guides grouped by resolution
    (:func:`domainsr.engine.guided.guide_groups`, the function inference uses)."""
    from domainsr.engine.guided import guide_groups

    assert config.guide is not None
    missing = [b for b in (*config.data.bands, *config.guide.bands) if b not in img.band_names]
    if missing or not config.data.bands:
        raise ConfigError(f"bands {missing or 'data.bands'} not in {list(img.band_names)}",
                          img.provenance.get("source") or None)
    return guide_groups(img, config.data.bands, config.guide.bands, config.scale, resample=True)


@dataclass
class GuideGroup:
    """One resolution group of the guides for Wald pairs: ``data`` on the target grid refined by
    ``factor``, its bands at ``positions`` of the guide list, degraded by the scale with its own
    ``degradation`` (its PSF) before :func:`~domainsr.engine.guided.stack_guides` puts it on the
    degraded finest guide grid."""

    data: np.ndarray
    factor: tuple[int, ...]
    positions: list[int]
    degradation: Degradation


def wald_guide_groups(gg: GuideGroups, spec: dict[str, Any]) -> list[GuideGroup] | None:
    """The :class:`GuideGroup` list of guides at several resolutions (``None`` for one): each
    group's data and the guide degradation ``spec`` cut to its bands (:func:`group_degradation`).
    For anything that makes Wald pairs like training (e.g. a benchmark: ``guided_eval_pair(...,
    guide_groups=wald_guide_groups(guide_groups(bands, ...), card.degradation["guide"]))``)."""
    from domainsr.degrade import build_degradation

    if len(gg.groups) < 2:
        return None
    n = sum(len(p) for p in gg.positions)
    return [GuideGroup(np.ascontiguousarray(img.data, dtype=np.float32), tuple(f), list(pos),
                       build_degradation(group_degradation(spec, list(pos), n)))
            for img, f, pos in zip(gg.groups, gg.factors, gg.positions)]


def degrade_guides(groups: list[GuideGroup], boxes: list[tuple[slice, ...]] | None, scale: tuple[int, ...],
                   rng: np.random.Generator, arrays: list[np.ndarray] | None = None) -> np.ndarray:
    """Each guide group (``arrays``, or ``data`` over ``boxes``) degraded by ``scale`` with its own
    PSF, then all on the degraded finest guide grid by the inference function ``stack_guides``."""
    from domainsr.engine.guided import stack_guides

    if arrays is None:
        assert boxes is not None
        arrays = [np.ascontiguousarray(g.data[(slice(None), *b)], dtype=np.float32) for g, b in zip(groups, boxes)]
    low = [np.asarray(g.degradation(np.ascontiguousarray(a, dtype=np.float32), rng), np.float32)
           for g, a in zip(groups, arrays)]
    return stack_guides(low, [g.factor for g in groups], [g.positions for g in groups], scale)


# ---------------------------------------------------------------------------------------------
# pairs


class GuidedPatchDataset(PatchDataset):
    """Random training pairs ``(packed input, target)`` from the train region of two grids.

    Boxes are drawn on the target grid exactly as :class:`PatchDataset` draws them (foreground,
    margin, seeds); the guide's box covers the same ground. Both are flipped/rotated alike, the
    target is degraded by ``scale`` with ``degradation`` and the guide with ``guide_degradation``
    (one level down), margins are cropped, and the item is ``pack(lr, guide)`` ``(Ct + Cg * prod(s),
    *patch // s)`` with the target patch ``(Ct, *patch)``, normalised with ``norm``/``guide_norm``.
    """

    def __init__(self, data: np.ndarray, guide: np.ndarray, region: Region, *, scale: tuple[int, ...],
                 patch: tuple[int, ...], degradation: Degradation, guide_degradation: Degradation,
                 norm: InputNormalization, guide_norm: InputNormalization,
                 foreground: np.ndarray | None = None, min_foreground: float = 0.5, margin: int = 4,
                 augment: bool = True, seed: int = 0,
                 length: int = 2**62, source: str = "", guide_groups: list[GuideGroup] | None = None) -> None:
        super().__init__(data, region, scale=scale, patch=patch, degradation=degradation, norm=norm,
                         foreground=foreground, min_foreground=min_foreground, margin=margin, augment=augment,
                         seed=seed, length=length, source=source)
        want = tuple(n * f for n, f in zip(data.shape[1:], self.scale))
        if tuple(guide.shape[1:]) != want:
            raise ConfigError(f"guide shape {guide.shape[1:]} is not the target's {data.shape[1:]} "
                              f"x {self.scale}", source or None)
        self.guide = guide
        self.guide_degradation = guide_degradation
        self.guide_norm = guide_norm
        #: guides of several resolutions: degraded group by group (each its own PSF), then stacked
        self.guide_groups = guide_groups if guide_groups and len(guide_groups) > 1 else None

    def guide_box(self, index: int) -> tuple[slice, ...]:
        """Guide index box (margin included) that item ``index`` reads: for leakage checks."""
        return hr_box(self.sample_box(index), self.scale)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(index)))
        _, box = self.draw_box(rng)
        hr = self.data[(slice(None), *box)]
        if self.guide_groups is not None:
            gs = [grp.data[(slice(None), *hr_box(box, grp.factor))] for grp in self.guide_groups]
            if self.augment:
                hr, *gs = self.flip_rotate(rng, hr, *gs)
            hr = np.ascontiguousarray(hr, dtype=np.float32)
            g = hr
            lr = np.asarray(self.degradation(hr, rng), dtype=np.float32)
            gd = degrade_guides(self.guide_groups, None, self.scale, rng, arrays=gs)
        else:
            g = self.guide[(slice(None), *hr_box(box, self.scale))]
            if self.augment:
                hr, g = self.flip_rotate(rng, hr, g)
            hr = np.ascontiguousarray(hr, dtype=np.float32)
            g = np.ascontiguousarray(g, dtype=np.float32)
            lr = np.asarray(self.degradation(hr, rng), dtype=np.float32)
            gd = np.asarray(self.guide_degradation(g, rng), dtype=np.float32)
        if lr.shape[1:] != self.lr_extent or gd.shape[1:] != hr.shape[1:]:
            raise ConfigError(f"degradations returned {lr.shape[1:]} (target) and {gd.shape[1:]} (guide) for "
                              f"{hr.shape[1:]} and {g.shape[1:]}, expected {self.lr_extent} and {hr.shape[1:]}")
        lr, (hr, gd) = self.crop_margin(lr, hr, gd)
        x = pack(torch.from_numpy(normalize(lr, self.norm))[None],
                 torch.from_numpy(normalize(gd, self.guide_norm))[None], self.scale)[0]
        return x, torch.from_numpy(normalize(hr, self.norm))


@dataclass
class GuidedEvalPair:
    """A held-out region: target ``hr``, its degraded ``lr``, the degraded ``guide`` (on the hr
    grid) and the valid mask over ``hr``."""

    hr: np.ndarray
    lr: np.ndarray
    guide: np.ndarray
    valid: np.ndarray


def guided_eval_pair(data: np.ndarray, guide: np.ndarray, region: Region, *, scale: tuple[int, ...],
                     degradation: Degradation, guide_degradation: Degradation, valid: np.ndarray,
                     seed: int, guide_groups: list[GuideGroup] | None = None) -> GuidedEvalPair:
    """Degrade a whole held-out region once (deterministic ``seed``); with ``guide_groups`` (guides
    of several resolutions) each group is degraded on its own grid with its own PSF and the groups are
    stacked on the degraded finest guide grid (``guide`` and ``guide_degradation`` are then unused)."""
    box = region.slices(data.shape[1:])
    box = tuple(slice(b.start, b.start + ((b.stop - b.start) // f) * f) for b, f in zip(box, scale))
    rng = np.random.default_rng((seed, 0x5EED))
    hr = np.ascontiguousarray(data[(slice(None), *box)], dtype=np.float32)
    lr = np.asarray(degradation(hr, rng), np.float32)
    if guide_groups and len(guide_groups) > 1:
        gd = degrade_guides(guide_groups, [hr_box(box, g.factor) for g in guide_groups], scale, rng)
    else:
        g = np.ascontiguousarray(guide[(slice(None), *hr_box(box, scale))], dtype=np.float32)
        gd = np.asarray(guide_degradation(g, rng), np.float32)
    return GuidedEvalPair(hr, lr, gd, np.ascontiguousarray(valid[box]))


@dataclass
class GuidedData:
    """Both grids, the split, the train dataset, the held-out pairs and the normalisations."""

    target: SpatialImage
    guide: SpatialImage
    regions: dict[str, Region]
    gap: int
    train: GuidedPatchDataset
    val: list[GuidedEvalPair]
    test: list[GuidedEvalPair]
    norm: InputNormalization
    guide_norm: InputNormalization
    valid: np.ndarray


def prepare_guided_data(config: TrainConfig, target: SpatialImage, guide: SpatialImage,
                        degradation: Degradation, guide_degradation: Degradation,
                        receptive_radius: tuple[int, ...], guide_groups: list[GuideGroup] | None = None
                        ) -> GuidedData:
    """Split the target grid (:func:`domainsr.train.regions.split`), fix both normalisations on
    the train region and make the pairs. ``guide_groups``: guides of several resolutions, degraded
    group by group (``guide`` is then their stack on the finest grid, for the normalisation)."""
    d, s = config.data, tuple(config.scale)
    data = np.ascontiguousarray(target.data, dtype=np.float32)
    gdata = np.ascontiguousarray(guide.data, dtype=np.float32)
    nested = tuple(gdata.shape[1:]) == tuple(n * f for n, f in zip(data.shape[1:], s))
    if data.ndim - 1 != config.spatial_dims or not nested:
        raise ConfigError(f"target {data.shape[1:]} and guide {gdata.shape[1:]} are not nested grids at "
                          f"scale {s}", target.source or None)
    valid_t, fg_t = foreground(target, data, d.background)
    valid_g, _ = foreground(guide, gdata, None)
    g_ok = on_lr_grid(valid_g, s)
    valid, fg = valid_t & g_ok, fg_t & g_ok
    regions, gap = split(config, data.shape[1:], receptive_radius, target.source)
    spec = config.normalization
    assert isinstance(spec, FixedNormSpec)
    ct = data.shape[0]

    def part(v: list[float] | None, sl: slice) -> list[float] | None:
        return None if v is None else v[sl]

    n_all = ct + gdata.shape[0]
    for name, v in (("offsets", spec.offset), ("scales", spec.scale)):
        if v is not None and len(v) != n_all:
            raise ConfigError(f"normalization needs {n_all} {name} (target bands, then guide bands)")
    train = regions["train"]
    norm = fixed_normalization(FixedNormSpec(offset=part(spec.offset, slice(0, ct)),
                                             scale=part(spec.scale, slice(0, ct))), data, fg, train, target.source)
    axis = train.axis
    g_region = Region("train", axis, train.start * s[axis], train.stop * s[axis])
    g_fg = valid_g & on_hr_grid(fg, s)
    guide_norm = fixed_normalization(FixedNormSpec(offset=part(spec.offset, slice(ct, None)),
                                                   scale=part(spec.scale, slice(ct, None))), gdata, g_fg,
                                     g_region, guide.source)
    ds = GuidedPatchDataset(data, gdata, train, scale=s, patch=tuple(config.patch_size),
                            degradation=degradation, guide_degradation=guide_degradation, norm=norm,
                            guide_norm=guide_norm, foreground=fg, min_foreground=d.min_foreground,
                            margin=d.margin, augment=d.augment, seed=config.seed, source=target.source,
                            guide_groups=guide_groups)
    held = {name: [guided_eval_pair(data, gdata, regions[name], scale=s, degradation=degradation,
                                    guide_degradation=guide_degradation, valid=fg,
                                    seed=config.seed + (1 if name == "val" else 2), guide_groups=guide_groups)]
            for name in ("val", "test")}
    return GuidedData(target, guide, regions, gap, ds, held["val"], held["test"], norm, guide_norm, valid)


# ---------------------------------------------------------------------------------------------
# the strategy


class TwoGridPairing(Pairing):
    """Target bands at the coarse resolution plus guide bands at the fine one (``image``: a
    :class:`MultiResolutionImage` band set)."""

    data: GuidedData

    def load(self) -> None:
        from domainsr.degrade import build_degradation

        config = self.config
        if config.guide is None:
            raise ConfigError("guided training needs a guide: section")
        if self.image is not None and not isinstance(self.image, MultiResolutionImage):
            raise ConfigError("guided training takes a band set (MultiResolutionImage) as image")
        gg = guide_groups_of(self.image, config) if self.image is not None else load_guided_groups(config)
        target, guide = gg.lr, gg.guide
        if target.domain != config.domain:
            raise ConfigError(f"config is for {config.domain} but the source is {target.domain}",
                              target.source or None)
        self.target, self.guide = target, guide
        self.degradation = build_degradation(config.degradation)
        self.guide_degradation = build_degradation(config.guide.degradation)
        for name, deg in (("degradation", self.degradation), ("guide.degradation", self.guide_degradation)):
            check_degradation(name, deg, config, " (Wald's protocol degrades every band by the scale)")
        self.guide_groups = wald_guide_groups(gg, config.guide.degradation)
        for img, grp in zip(gg.groups, self.guide_groups or []):
            check_degradation(f"guide.degradation of {list(img.band_names)}", grp.degradation, config,
                              " (Wald's protocol degrades every band by the scale)")
        self.guide_group_bands = [list(img.band_names) for img in gg.groups]

    def build_net(self) -> nn.Module:
        config, gc = self.config, self.guide.channels
        self.kwargs: dict[str, Any] = {**config.model.kwargs, "guide_channels": gc}
        if config.model.kwargs.get("guide_channels", gc) != gc:
            raise ConfigError(f"model.kwargs.guide_channels differs from the {gc} guide bands")
        net = build_network(config, self.target.channels + gc, self.kwargs)
        if not hasattr(net, "guide_channels"):
            raise ConfigError(f"model {config.model.name!r} is not a guided model (use guided_rescnn)")
        if config.init_from:
            from domainsr.models.guided import load_guided_checkpoint

            model, card = load_guided_checkpoint(config.init_from)
            bands = [*self.target.band_names, *self.guide.band_names]
            init_weights(net, config, model, card, (config.model.name, self.kwargs, tuple(config.scale), bands),
                         (card.architecture.name, card.architecture.kwargs, tuple(card.scale), list(card.bands)),
                         "on bands {}")
        return net

    def prepare(self, receptive_radius: tuple[int, ...]) -> None:
        self.data = prepare_guided_data(self.config, self.target, self.guide, self.degradation,
                                        self.guide_degradation, receptive_radius, guide_groups=self.guide_groups)

    def describe(self) -> str:
        return (f"{self.target.source or 'band set'}, target {list(self.target.band_names)} guided by "
                f"{list(self.guide.band_names)}")

    def trainable(self, net: nn.Module) -> nn.Module:
        return PackedGuided(net)

    def network(self, module: nn.Module) -> nn.Module:
        assert isinstance(module, PackedGuided)
        return module.net

    def predict(self, module: nn.Module, pair: GuidedEvalPair, device: torch.device,
                amp: Autocast) -> np.ndarray:
        x = pack(torch.from_numpy(normalize(pair.lr, self.data.norm))[None],
                 torch.from_numpy(normalize(pair.guide, self.data.guide_norm))[None], self.config.scale)
        with torch.no_grad(), amp():
            y = module(x.to(device)).float()[0].cpu().numpy()
        return denormalize(y, self.data.norm)

    def interpolate(self, net: nn.Module, pair: GuidedEvalPair) -> np.ndarray:
        """Interpolation of the target bands alone."""
        with torch.no_grad():
            return net(torch.from_numpy(pair.lr)[None])[0].numpy()

    def degradation_record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"protocol": "Wald: train one level down, apply one level up",
                               "target": self.degradation.describe(), "guide": self.guide_degradation.describe()}
        if self.guide_groups:
            rec["guide_groups"] = [
                {"bands": bands, "grid": f"target grid refined by {list(g.factor)}",
                 "degradation": g.degradation.describe()}
                for bands, g in zip(self.guide_group_bands, self.guide_groups)]
            rec["guide_grid"] = ("each guide group is degraded by the scale on its own grid with its own PSF, then "
                                 "the coarser groups are cubic-upsampled (exact integer factor, Keys a=-0.5) onto the "
                                 "degraded finest guide grid; inference puts the native groups on the finest grid "
                                 "with the same function (domainsr.engine.guided.stack_guides)")
        return rec

    def metrics_description(self, n_pairs: int) -> str:
        return ("whole region, Wald's protocol (all bands degraded by the scale); valid pixels without a 2 LR "
                "px border; PSNR per band on its true range, pooled over pixels, mean over bands; baseline: "
                "interpolation of the target bands")

    def card(self, net: nn.Module, receptive_radius: tuple[int, ...], val: RegionMetrics,
             test: RegionMetrics, training: TrainingSettings) -> ModelCard:
        config, data, c = self.config, self.data, self.config.card
        t, g = data.target, data.guide
        target_bands, guide_bands = list(t.band_names), list(g.band_names)
        s = tuple(config.scale)
        norm = FixedNormalization(offset=[float(v) for v in (*data.norm.offset, *data.guide_norm.offset)],
                                  scale=[float(v) for v in (*data.norm.scale, *data.guide_norm.scale)])
        if c.input_range is not None:
            in_range = c.input_range
        else:
            box = data.regions["train"].slices(t.spatial_shape)
            t_vals = np.asarray(t.data, np.float32)[(slice(None), *box)][:, data.valid[box]]
            g_vals = np.asarray(g.data, np.float32)[(slice(None), *hr_box(box, s))][:, on_hr_grid(data.valid[box], s)]
            in_range = robust_range(np.concatenate([t_vals.ravel(), g_vals.ravel()]))
        split_info = split_record(
            config, data, "target-grid pixels along the axis (end exclusive); guide rows are these x the scale",
            "train patches (with their degradation margin) lie inside the train region on both grids; val/test "
            "are degraded as wholes, so no val/test pixel is seen in training; the gap is at least the "
            "receptive radius plus the patch extent along the axis")
        units = c.units or t.units or DEFAULT_UNITS[config.domain]
        desc = (f"{t.source or 'band set'} ({t.domain}): target bands {target_bands} on {list(t.spatial_shape)}, "
                f"guide bands {guide_bands} on {list(g.spatial_shape)}, units {units}; pairs made on the fly by "
                "Wald's protocol (every band degraded by the scale with its own PSF, see degradation)")
        meaning = c.channel_meaning or (f"inputs: target bands {target_bands} (LR grid) then guide bands "
                                        f"{guide_bands} (grid x{list(s)} finer); outputs: {target_bands} on the "
                                        "guide grid")
        return ModelCard(
            **card_fields(config, val, test, training),
            architecture=Architecture(name=config.model.name, kwargs=self.kwargs),
            in_channels=len(target_bands) + len(guide_bands), out_channels=len(target_bands),
            bands=target_bands + guide_bands, output_bands=target_bands, channel_meaning=meaning, units=units,
            input_range=in_range, normalization=norm, receptive_radius=receptive_radius, application="direct",
            degradation=self.degradation_record(),
            training_data=TrainingData(source=config.data.source, bands=target_bands + guide_bands, split=split_info,
                                       files=source_files(t, target_bands) + source_files(g, guide_bands),
                                       description=desc))


__all__ = ["GuideGroup", "GuidedData", "GuidedEvalPair", "GuidedPatchDataset", "TwoGridPairing", "degrade_guides",
           "group_degradation", "guide_groups_of", "guided_eval_pair", "load_guided_groups", "load_guided_source",
           "prepare_guided_data", "two_grid", "wald_guide_groups"]
