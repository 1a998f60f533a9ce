"""``train(config) -> TrainResult``: PSNR stage, optional GAN stage, EMA, validation, checkpoint.

One loop (:func:`domainsr.train.loop.fit`) trains every kind of model; how pairs are made is the
config's pairing strategy (:mod:`domainsr.train.pairing`):

* single-grid (:class:`~domainsr.train.single_grid.SingleGridPairing`): one high-resolution image
  is split along an axis into train / val / test regions (:mod:`domainsr.train.regions`) and
  patches of the train region are degraded on the fly with the config's degradation;
* two-grid, guided (:class:`~domainsr.train.guided.TwoGridPairing`, a config with ``guide:``):
  target bands at the coarse resolution plus guide bands at the fine one, Wald's protocol.

The PSNR stage optimises L1/Charbonnier (+ optional SSIM, frequency and gradient terms) with Adam;
the GAN stage (single-grid only) starts the generator from the PSNR stage's EMA weights and adds a
relativistic-average GAN term. EMA weights (decay 0.999 with a warm-up) are validated every
``val_every`` steps against the best interpolation baseline on the val region, tested once on the
held-out test region (:mod:`domainsr.train.scoring`), and saved with their card.

Budgets: ``steps`` and ``max_minutes`` per stage, whichever ends first; the learning-rate
schedule follows the larger of the step and time fractions, so a run cut by time still anneals
(a run bounded by steps only is bit-for-bit reproducible on CPU). State is saved to
``<run_dir>/<name>/state.pt`` every ``save_every`` steps; ``resume=True`` continues from it.
"""
from __future__ import annotations

from domainsr.image import SpatialImage
from domainsr.train.config import TrainConfig
from domainsr.train.guided import TwoGridPairing
from domainsr.train.loop import Callback, TrainResult, fit
from domainsr.train.pairing import Pairing
from domainsr.train.single_grid import SingleGridPairing


def pairing_for(config: TrainConfig, image: SpatialImage | None = None) -> Pairing:
    """The config's pairing strategy: two-grid with a ``guide:`` section, else single-grid."""
    return (TwoGridPairing if config.guide is not None else SingleGridPairing)(config, image)


def train(config: TrainConfig, *, resume: bool = False, image: SpatialImage | None = None,
          on_step: Callback | None = None) -> TrainResult:
    """Train, validate, test and save a model as ``config`` says (see the module docstring).

    ``image`` replaces ``config.data.source`` (already read, e.g. by a flow; a band set for guided
    training); ``on_step`` gets a dict after every step and every validation (progress reporting;
    raising stops the run, and the last saved state can be resumed).
    """
    return fit(config, pairing_for(config, image), resume=resume, on_step=on_step)


__all__ = ["TrainResult", "pairing_for", "train"]
