"""The mutable state of one training run: network, EMA, optimisers, counters and histories, and
its ``state.pt`` (saved atomically, refused on resume when the config's substance changed)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from domainsr.errors import ConfigError
from domainsr.io.atomic import atomic_path
from domainsr.train.config import TrainConfig


def ema_model(net: nn.Module, decay: float) -> AveragedModel:
    """EMA of the weights (and buffers) with a warm-up: ``d_t = min(decay, (1 + t) / (10 + t))``,
    so short runs are not dominated by the initial weights."""

    @torch.no_grad()
    def update(avg: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        t = float(n)
        d = min(decay, (1.0 + t) / (10.0 + t))
        torch._foreach_lerp_(avg, cur, 1.0 - d)

    return AveragedModel(net, multi_avg_fn=update, use_buffers=True)


def fingerprint(config: TrainConfig) -> str:
    """What must not change between a run and its resumption (budgets and cadences may)."""
    keep = config.model_dump(mode="json", exclude={"steps", "max_minutes", "val_every", "save_every",
                                                   "threads", "device", "amp", "card"})
    keep["gan"] = {k: v for k, v in keep["gan"].items() if k not in ("steps", "max_minutes")}
    if keep.get("guide") is None:  # unguided runs hash as before the guide option existed
        keep.pop("guide", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


class RunState:
    """One run's state (what ``state.pt`` holds). ``net`` is the module the loop trains (for
    guided training the packed view of the guided net)."""

    def __init__(self, config: TrainConfig, net: nn.Module, device: torch.device) -> None:
        self.config = config
        self.net = net
        self.ema = ema_model(net, config.ema_decay)
        self.opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                    weight_decay=config.weight_decay)
        self.disc: nn.Module | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        self.stage = "psnr"
        self.step = 0
        self.gan_step = 0
        self.elapsed = {"psnr": 0.0, "gan": 0.0}
        self.stopped_by = {"psnr": "", "gan": ""}
        self.losses: list[tuple[int, float]] = []
        self.val_history: list[dict[str, Any]] = []
        self.device = device

    def state(self) -> dict[str, Any]:
        s = {"fingerprint": fingerprint(self.config), "stage": self.stage, "step": self.step,
             "gan_step": self.gan_step, "elapsed": dict(self.elapsed), "stopped_by": dict(self.stopped_by),
             "net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
             "losses": [list(t) for t in self.losses], "val_history": json.dumps(self.val_history)}
        if self.disc is not None and self.opt_d is not None:
            s["disc"] = self.disc.state_dict()
            s["opt_d"] = self.opt_d.state_dict()
        return s

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    def load(self, path: Path) -> None:
        s = torch.load(path, map_location=self.device, weights_only=True)
        if s["fingerprint"] != fingerprint(self.config):
            raise ConfigError("the run state was made with a different config (model, data, degradation, "
                              "patches or losses); start a new run or restore that config", path)
        self.stage, self.step, self.gan_step = s["stage"], int(s["step"]), int(s["gan_step"])
        self.elapsed, self.stopped_by = dict(s["elapsed"]), dict(s["stopped_by"])
        self.losses = [(int(a), float(b)) for a, b in s["losses"]]
        self.val_history = json.loads(s["val_history"])
        if self.stage == "gan":
            self.start_gan(init=False)
            assert self.disc is not None and self.opt_d is not None
            self.disc.load_state_dict(s["disc"])
            self.opt_d.load_state_dict(s["opt_d"])
        self.net.load_state_dict(s["net"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])

    def start_gan(self, init: bool = True) -> None:
        """Generator from the PSNR stage's EMA weights, fresh EMA, Adam, and the discriminator
        (on the network's outputs, i.e. target-grid images)."""
        from domainsr.models import build_model

        g = self.config.gan
        if init:
            self.net.load_state_dict(self.ema.module.state_dict())
        self.ema = ema_model(self.net, self.config.ema_decay)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=g.lr_g, betas=(0.9, 0.99))
        self.disc = build_model(g.discriminator.name, spatial_dims=self.config.spatial_dims,
                                in_channels=self.net.out_channels, **g.discriminator.kwargs).to(self.device)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=g.lr_d, betas=(0.9, 0.99))
        self.stage = "gan"


__all__ = ["RunState", "ema_model", "fingerprint"]
