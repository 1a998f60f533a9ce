"""The training package's shape: one loop, no import cycle, no private name imported across modules
(here or by the benchmarks), modules of a readable size."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ROOT / "domainsr" / "train"
MAX_LINES = 400


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from domainsr... import`` in ``path`` (lazy ones included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n.module, [a.name for a in n.names]) for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("domainsr")]


def test_no_import_cycle_in_the_training_package():
    graph = {p.stem: {m.rsplit(".", 1)[1] for m, _ in _imports(p) if m.startswith("domainsr.train.")}
             for p in TRAIN.glob("*.py")}
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        assert state.get(node) != "open", f"import cycle: {' -> '.join([*trail, node])}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            visit(dep, [*trail, node])
        state[node] = "done"

    for module in sorted(graph):
        visit(module, [])


def test_no_private_name_is_imported_from_another_module():
    files = [*TRAIN.glob("*.py"), ROOT / "benchmarks" / "quality.py"]
    private = [(f.name, m, n) for f in files for m, names in _imports(f) if m.startswith("domainsr.train")
               for n in names if n.startswith("_")]
    assert not private


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
