"""Model names without loading a model: where checkpoints live, which names exist, and the
closest one to a misspelt name.

Imports neither torch nor any network, so the command line can check ``--model`` in
milliseconds before any flow starts. A checkpoint is ``<root>/<name>/<name>.json`` (with its
``.pt``) in the user folders (``$DOMAINSR_CHECKPOINTS``, else ``$XDG_DATA_HOME/domainsr/checkpoints``)
or the shipped ``domainsr/checkpoints/``; in names ``-`` and ``_`` are interchangeable.

Third-party weights (``--model FILE.pth``: ``.pth``, ``.pt``, ``.safetensors``, ``.ckpt``, run through
spandrel, see :mod:`domainsr.models.weights`) are files without a card beside them; a reference
may carry the input range as ``FILE.pth?input_range=LO,HI`` (what ``--input-range`` adds).
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

from domainsr.errors import ConfigError, ModelError

#: The checkpoints shipped with the package (tests point it elsewhere with monkeypatch).
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def user_checkpoint_dirs() -> list[Path]:
    """``$DOMAINSR_CHECKPOINTS`` (path list) or ``$XDG_DATA_HOME/domainsr/checkpoints``."""
    env = os.environ.get("DOMAINSR_CHECKPOINTS")
    if env:
        return [Path(p).expanduser() for p in env.split(os.pathsep) if p]
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return [base / "domainsr" / "checkpoints"]


def checkpoint_roots() -> list[Path]:
    """The folders searched for checkpoints by name, first match wins: user folders, then shipped."""
    return [*user_checkpoint_dirs(), SHIPPED_DIR]


def checkpoint_names() -> list[str]:
    """Names of the checkpoints in :func:`checkpoint_roots` (cards not read)."""
    names: dict[str, None] = {}
    for root in checkpoint_roots():
        if root.is_dir():
            for card in sorted(root.glob("*/*.json")):
                if card.stem == card.parent.name:
                    names.setdefault(card.stem)
    return list(names)


#: File suffixes of third-party weights (a ``.pt`` with a ``.json`` card beside it is a checkpoint).
WEIGHT_SUFFIXES = (".pth", ".pt", ".safetensors", ".ckpt")


def split_reference(ref: str) -> tuple[str, dict[str, str]]:
    """``"w.pth?input_range=0,1000"`` -> ``("w.pth", {"input_range": "0,1000"})``; other names as they are."""
    path, sep, query = str(ref).partition("?")
    if not sep:
        return path, {}
    opts = {}
    for part in query.split("&"):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"model reference {ref!r}: options after '?' are key=value (input_range=LO,HI)")
        opts[key.strip()] = value.strip()
    return path, opts


def is_weights_file(name: str) -> bool:
    """Whether ``name`` (optionally with ``?options``) is a third-party weights file: an existing
    ``.pth``/``.pt``/``.safetensors``/``.ckpt`` without a DomainSR model card (``.json``) beside it."""
    p = Path(split_reference(name)[0]).expanduser()
    return p.suffix.lower() in WEIGHT_SUFFIXES and p.is_file() and not p.with_suffix(".json").is_file()


def _spellings(name: str) -> list[str]:
    return list(dict.fromkeys((name, name.replace("-", "_"), name.replace("_", "-"))))


def is_checkpoint(name: str) -> bool:
    """Whether ``name`` is a checkpoint: a path to a card/weights file or folder, or a name in
    :func:`checkpoint_roots`."""
    p = Path(name).expanduser()
    if p.suffix == ".pt" and p.is_file():
        return p.with_suffix(".json").is_file()
    if (p.suffix == ".json" and p.is_file()) or (p.is_dir() and any(p.glob("*.json"))):
        return True
    return any((root / n / f"{n}.json").is_file() or (root / f"{n}.json").is_file()
               for root in checkpoint_roots() for n in _spellings(name))


def suggest(name: str, candidates: list[str]) -> str | None:
    """The candidate closest to ``name`` (ignoring case and ``-``/``_``), or ``None``."""
    def norm(s: str) -> str:
        return s.lower().replace("-", "_")

    by_norm = {norm(c): c for c in candidates}
    close = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.6)
    return by_norm[close[0]] if close else None


def check_model(name: str, scale: object = None) -> str:
    """``"checkpoint"``, ``"weights"`` (a third-party weights file) or ``"registry"`` for a usable
    ``--model``; ModelError for an unknown name (with the closest registered model or checkpoint:
    "did you mean cubic?"), a missing weights file or a model that cannot enhance, ConfigError for
    a registered model without a scale."""
    from domainsr.models.registry import get_spec

    if is_weights_file(name):
        return "weights"
    path = split_reference(name)[0]
    if Path(path).suffix.lower() in WEIGHT_SUFFIXES and not Path(path).expanduser().exists():
        raise ModelError("no such weights file", path)
    if is_checkpoint(name):
        return "checkpoint"
    try:
        spec = get_spec(name)
    except ModelError:
        raise unknown_model(name) from None
    if spec.kind != "sr":
        raise ModelError(f"a {spec.kind} cannot enhance images", name)
    if scale is None:
        raise ConfigError(f"model {name!r} is a registered model: give a scale (e.g. --scale 2 or --scale 1,1,4)")
    return "registry"


def unknown_model(name: str) -> ModelError:
    """The error for a name that is neither a checkpoint nor a registered model, suggesting the
    closest of both ("did you mean cubic?")."""
    from domainsr.models.registry import ALIASES, list_models

    sr = [s.name for s in list_models("sr")]
    ckpts = checkpoint_names()
    guess = suggest(name, [*sr, *ALIASES, *ckpts])
    what = "no checkpoint or registered model of this name"
    if guess:
        return ModelError(f"{what}; did you mean {guess}? (all models: `domainsr models list`)", name)
    return ModelError(f"{what}; registered: {', '.join(sr)}; checkpoints: {', '.join(ckpts) or 'none'}", name)
