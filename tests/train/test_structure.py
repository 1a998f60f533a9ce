"""The training package's shape: one loop for both pairings. Module sizes, import cycles (even
through lazy imports) and private names imported across modules are checked for every module by
tests/test_architecture.py (``STRICT_PACKAGES``)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "domainsr" / "train"


def test_one_loop_serves_both_pairings():
    from domainsr.train.guided import TwoGridPairing
    from domainsr.train.pairing import Pairing
    from domainsr.train.single_grid import SingleGridPairing
    from domainsr.train.trainer import pairing_for

    assert issubclass(SingleGridPairing, Pairing) and issubclass(TwoGridPairing, Pairing)
    stages = [p.name for p in TRAIN.glob("*.py") if "def psnr_stage" in p.read_text(encoding="utf-8")]
    assert stages == ["loop.py"]

    class Config:
        guide = None

    assert isinstance(pairing_for(Config()), SingleGridPairing)  # type: ignore[arg-type]
    Config.guide = object()  # type: ignore[assignment]
    assert isinstance(pairing_for(Config()), TwoGridPairing)  # type: ignore[arg-type]
