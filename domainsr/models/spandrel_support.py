"""spandrel, imported without torchvision, and its networks as DomainSR modules.

spandrel (PyPI) detects the architecture of third-party SR weights from their key layout
(ESRGAN/Real-ESRGAN RRDBNet, Real-ESRGAN compact, SwinIR, HAT, SPAN, OmniSR, DAT, ...). It
declares torchvision as a dependency but uses it in two non-SR architectures only (LaMa
inpainting, RestoreFormer face restoration), both imported at the top of ``import spandrel``.
PyPI's torchvision is built against the CUDA torch and fails to import beside the CPU build
("operator torchvision::nms does not exist"), so DomainSR installs spandrel with ``--no-deps``
(the Makefile; its small dependencies are in the ``weights`` extra) and :func:`import_spandrel`
imports it with each architecture module guarded: one that fails to import (a missing or broken
optional dependency) is replaced by a disabled architecture that detects nothing, and is listed
in :data:`DISABLED`. No torchvision stand-in is ever installed.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import threading
from types import ModuleType
from typing import Any

import torch
from torch import nn

from domainsr.errors import ModelError

#: Architecture modules that could not be imported, and why (e.g. {"LaMa": "No module named 'torchvision'"}).
DISABLED: dict[str, str] = {}
INSTALL_HINT = ("bring-your-own weights need spandrel: pip install --no-deps 'spandrel>=0.4.2,<0.5' "
                "safetensors einops (its torchvision dependency is not needed; `make install` does this)")
_PREFIX = "spandrel.architectures."
_LOCK = threading.Lock()


class _DisabledArch:
    """Stands in for an architecture whose module failed to import: detects no state dict."""

    def __init__(self, arch_id: str, reason: str) -> None:
        self.id = self.name = arch_id
        self.reason = reason

    def detect(self, state_dict: Any) -> bool:
        return False

    def load(self, state_dict: Any) -> Any:
        raise ModelError(f"spandrel architecture {self.id} is disabled: {self.reason}")


class _GuardedLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, short: str) -> None:
        self.inner, self.short = inner, short

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        try:
            self.inner.exec_module(module)
        except (ImportError, RuntimeError, OSError) as exc:  # torchvision absent, or present but broken
            reason = f"{type(exc).__name__}: {exc}"
            DISABLED[self.short] = reason
            keep = {k: v for k, v in vars(module).items() if k.startswith("__")}
            vars(module).clear()
            vars(module).update(keep)
            setattr(module, f"{self.short}Arch", lambda: _DisabledArch(self.short, reason))


class _ArchGuard(importlib.abc.MetaPathFinder):
    """Wraps the loaders of ``spandrel.architectures.<Name>`` packages in :class:`_GuardedLoader`."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PREFIX) or "." in fullname[len(_PREFIX):]:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _GuardedLoader(spec.loader, fullname[len(_PREFIX):])
        return spec


def import_spandrel() -> ModuleType:
    """``spandrel``, imported with its architecture modules guarded (see the module docstring);
    ModelError with the install command when it is not installed."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    with _LOCK:
        guard = _ArchGuard()
        sys.meta_path.insert(0, guard)
        try:
            import spandrel
        except ImportError as exc:
            for name in [m for m in sys.modules if m == "spandrel" or m.startswith("spandrel.")]:
                del sys.modules[name]
            raise ModelError(f"{INSTALL_HINT} ({exc})") from exc
        finally:
            sys.meta_path.remove(guard)
    return spandrel


class SpandrelNet(nn.Module):
    """A spandrel image model as a DomainSR SR module: ``(N, C, H, W)`` in 0..1 ->
    ``(N, C_out, H * s, W * s)`` in 0..1, through spandrel's own call (its size-rule padding,
    its architecture's forward, output clamped to [0, 1])."""

    def __init__(self, descriptor: Any) -> None:
        super().__init__()
        self.net = descriptor.model  # registered, so .to() and .eval() reach it
        self._spandrel = descriptor
        self.spatial_dims = 2
        self.in_channels = int(descriptor.input_channels)
        self.out_channels = int(descriptor.output_channels)
        self.scale = (int(descriptor.scale),) * 2
        self.receptive_radius = None  # unknown to the module: measured by domainsr.models.radius

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._spandrel(x)


def tiling_advice(descriptor: Any) -> str:
    """spandrel's ``ModelTiling`` as ``"supported"``, ``"discouraged"`` or ``"internal"``."""
    return {1: "supported", 2: "discouraged", 3: "internal"}.get(int(descriptor.tiling.value), "supported")


def spandrel_version() -> str:
    return str(getattr(import_spandrel(), "__version__", ""))


__all__ = ["DISABLED", "INSTALL_HINT", "SpandrelNet", "import_spandrel", "spandrel_version", "tiling_advice"]
