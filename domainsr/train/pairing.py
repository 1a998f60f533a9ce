"""The pairing strategy: what differs between kinds of training, behind one interface the loop
(:func:`domainsr.train.loop.fit`) runs.

A :class:`Pairing` reads its source and degradations, builds the network, makes the leak-free
split, the training set (batches ``(model input, target)``) and the held-out pairs, gives the
model input for a held-out pair, scores a region against the best interpolation and writes the
model card. Two strategies exist: :class:`~domainsr.train.single_grid.SingleGridPairing` (HR ->
degraded LR on one grid) and :class:`~domainsr.train.guided.TwoGridPairing` (target bands at the
coarse resolution plus guide bands at the fine one, Wald's protocol). Helpers both use follow.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from domainsr.errors import ConfigError, ModelError
from domainsr.models.checkpoints import ModelCard, RegionMetrics, TrainingSettings
from domainsr.train.config import TrainConfig
from domainsr.train.datasets import Region
from domainsr.train.scoring import Baseline, HeldOut, best_baseline, region_metrics

log = logging.getLogger("domainsr.train")

#: the card's units when neither the config nor the source names them
DEFAULT_UNITS = {"optical": "DN", "ct": "HU", "mri": "a.u."}
#: ``amp()``: the autocast context of the run (``nullcontext`` when off)
Autocast = Callable[[], Any]


class PairedData(Protocol):
    """What every strategy's prepared data holds (train set and held-out pairs per region)."""

    regions: dict[str, Region]
    gap: int
    train: torch.utils.data.Dataset
    val: Sequence[HeldOut]
    test: Sequence[HeldOut]


class Pairing(ABC):
    """One kind of training's data, model inputs and scoring. The loop calls, in order:
    :meth:`load`, :meth:`build_net`, :meth:`prepare` (which sets :attr:`data`), :meth:`trainable`,
    then :meth:`baseline` / :meth:`evaluate` per held-out region, :meth:`network` and :meth:`card`.

    ``image`` replaces ``data.source`` (already read, e.g. by a flow)."""

    data: PairedData

    def __init__(self, config: TrainConfig, image: Any = None) -> None:
        self.config = config
        self.image = image

    @abstractmethod
    def load(self) -> None:
        """Read the source (unless given) and build the degradations, checked against the config."""

    @abstractmethod
    def build_net(self) -> nn.Module:
        """The registry architecture the card names, with ``init_from`` weights when set."""

    @abstractmethod
    def prepare(self, receptive_radius: tuple[int, ...]) -> None:
        """Split, fix the normalisation and make the train set and the held-out pairs (:attr:`data`)."""

    @abstractmethod
    def describe(self) -> str:
        """What is trained on, for the log."""

    @abstractmethod
    def predict(self, module: nn.Module, pair: Any, device: torch.device, amp: Autocast) -> np.ndarray:
        """The trained ``module``'s output for a held-out pair, in the data's units."""

    @abstractmethod
    def metrics_description(self, n_pairs: int) -> str:
        """How a held-out region was scored (the card's ``RegionMetrics.description``)."""

    @abstractmethod
    def card(self, net: nn.Module, receptive_radius: tuple[int, ...], val: RegionMetrics,
             test: RegionMetrics, training: TrainingSettings) -> ModelCard:
        """The model card of the trained network ``net`` (as :meth:`network` returns it)."""

    def trainable(self, net: nn.Module) -> nn.Module:
        """The module the loop optimises: maps a batch's input to its target's grid."""
        return net

    def teacher(self) -> nn.Module | None:
        """``config.distill``'s teacher network on this run's normalised batches (eval mode, CPU),
        or ``None`` without distillation."""
        if self.config.distill is not None:
            raise ConfigError(f"distill: is not supported by {type(self).__name__}")
        return None

    def network(self, module: nn.Module) -> nn.Module:
        """The network to save from a trained :meth:`trainable` module."""
        return module

    def interpolate(self, net: nn.Module, pair: Any) -> np.ndarray:
        """A baseline interpolation ``net``'s output for a held-out pair, in the data's units."""
        return self.predict(net, pair, torch.device("cpu"), nullcontext)

    def pairs(self, region: str) -> Sequence[HeldOut]:
        """The held-out pairs of ``region``: ``val``, ``test`` or a :meth:`holdout_regions` name."""
        if region in ("val", "test"):
            return getattr(self.data, region)
        return getattr(self.data, "holdout", {})[region]

    def holdout_regions(self) -> list[str]:
        """``holdout:<source>`` for every source kept out of training (``data.holdout``)."""
        return list(getattr(self.data, "holdout", {}))

    def baseline(self, region: str) -> Baseline:
        """The best interpolation on held-out ``region`` (``val``, ``test`` or a kept-out source)."""
        return best_baseline(self.pairs(region), self.config.spatial_dims, tuple(self.config.scale),
                             self.interpolate)

    def evaluate(self, module: nn.Module, region: str, baseline: Baseline, device: torch.device,
                 amp: Autocast) -> RegionMetrics:
        """``module`` vs ``baseline`` on held-out ``region``, in the data's units."""
        pairs = self.pairs(region)
        was = module.training
        module.eval()
        outs = [self.predict(module, p, device, amp) for p in pairs]
        module.train(was)
        note = "" if region in ("val", "test") else "kept out of training entirely (generalisation); "
        return region_metrics(outs, pairs, tuple(self.config.scale), baseline, region,
                              note + self.metrics_description(len(pairs)))


# ---------------------------------------------------------------------------------------------
# helpers of the strategies


def check_degradation(name: str, degradation: Any, config: TrainConfig, note: str = "") -> None:
    """Refuse a degradation whose reduction factors are not the config's ``scale``."""
    factors = getattr(degradation, "factors", None)
    if factors is not None and tuple(factors(config.spatial_dims)) != tuple(config.scale):
        raise ConfigError(f"{name} reduces by {tuple(factors(config.spatial_dims))} per axis but scale is "
                          f"{tuple(config.scale)}{note}")


def build_network(config: TrainConfig, in_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """``config.model`` from the registry (a bad name or kwargs is a config error)."""
    from domainsr.models import build_model

    try:
        return build_model(config.model.name, spatial_dims=config.spatial_dims, in_channels=in_channels,
                           scale=config.scale, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot build model {config.model.name!r}: {exc}") from exc


def init_weights(net: nn.Module, config: TrainConfig, loaded: nn.Module, card: ModelCard,
                 want: tuple[Any, ...], got: tuple[Any, ...], what: str) -> None:
    """Copy ``init_from``'s weights (``loaded.net``) into ``net`` when its card describes the same
    network: ``want`` / ``got`` are ``(name, kwargs, scale, inputs)`` of this run and of the card,
    ``inputs`` described by the format string ``what`` (``"with {} channels"``)."""
    if want != got:
        raise ConfigError(f"init_from {config.init_from!r} is {got[0]} {got[1]} x{got[2]} {what.format(got[3])}; "
                          f"this run builds {want[0]} {want[1]} x{want[2]} {what.format(want[3])}")
    net.load_state_dict(loaded.net.state_dict())
    log.info("initialised from %s (sha256 %s)", config.init_from, card.weights_sha256[:12])


def inflate_weights(net: nn.Module, config: TrainConfig, loaded: nn.Module, card: ModelCard,
                    in_channels: int) -> None:
    """Start a 3D run from a 2D checkpoint of the same architecture (``init_from`` a slice-wise
    model): its kernels inflated onto the centre plane of the axis its scale lacks
    (:mod:`domainsr.models.inflate`), so the 3D net starts as the 2D net on every plane of the
    other two axes. The interpolation base must be the same (``model.kwargs.base``)."""
    from domainsr.models.baselines import default_base
    from domainsr.models.inflate import inflate_state_dict, inserted_axis
    from domainsr.models.registry import ALIASES

    def parts(kwargs: dict[str, Any], dims: int) -> tuple[dict[str, Any], str]:
        base = str(kwargs.get("base") or default_base(dims))
        return {k: v for k, v in kwargs.items() if k != "base"}, ALIASES.get(base, base)

    (want_kw, want_base), (got_kw, got_base) = (parts(dict(config.model.kwargs), 3),
                                                parts(dict(card.architecture.kwargs), 2))
    if (config.model.name, want_kw, in_channels) != (card.architecture.name, got_kw, card.in_channels):
        raise ConfigError(f"init_from {config.init_from!r} is {card.architecture.name} {got_kw} with "
                          f"{card.in_channels} channels; this run builds {config.model.name} {want_kw} with "
                          f"{in_channels}: a 2D model inflates only into the same network in 3D")
    if want_base != got_base:
        raise ConfigError(f"init_from {config.init_from!r} adds its residual to {got_base} interpolation; set "
                          f"model.kwargs.base: {got_base} (this run's base is {want_base})")
    axis = inserted_axis(card.scale, config.scale)
    net.load_state_dict(inflate_state_dict(loaded.net.state_dict(), net.state_dict(), axis))
    log.info("initialised from 2D %s (sha256 %s), inflated along axis %d", config.init_from,
             card.weights_sha256[:12], axis)


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """The card's expected input range: the 0.1-99.9 percentiles of the training values (never empty)."""
    lo, hi = float(np.percentile(values, 0.1)), float(np.percentile(values, 99.9))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def split_record(config: TrainConfig, data: PairedData, units: str, note: str) -> dict[str, Any]:
    """The card's ``training_data.split``: axis, order, gap, regions (end exclusive) and a note."""
    return {"axis": config.data.split.axis, "order": list(config.data.split.order), "gap_px": data.gap,
            "regions": {k: [v.start, v.stop] for k, v in data.regions.items()}, "units": units, "note": note}


def card_fields(config: TrainConfig, val: RegionMetrics, test: RegionMetrics,
                training: TrainingSettings) -> dict[str, Any]:
    """The card fields every strategy fills the same way."""
    c = config.card
    return {"name": config.output.name, "version": c.version, "domain": config.domain,
            "spatial_dims": config.spatial_dims, "scale": tuple(config.scale), "training": training,
            "metrics": {"val": val, "test": test}, "license": c.license, "intended_use": c.intended_use,
            "limitations": c.limitations, "consistency": c.consistency}


__all__ = ["DEFAULT_UNITS", "Autocast", "PairedData", "Pairing", "build_network", "card_fields",
           "check_degradation", "init_weights", "robust_range", "split_record"]
