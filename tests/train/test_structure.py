"""The training package's shape: one loop, modules of a readable size. No import cycle (even
through lazy imports) and no private name imported across modules: tests/test_architecture.py
(``STRICT_PACKAGES``), for every module and the benchmarks."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "domainsr" / "train"
MAX_LINES = 400


def test_modules_stay_readable():
    long = {p.name: n for p in TRAIN.glob("*.py") if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long


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
