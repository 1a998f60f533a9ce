"""Shared fixtures: sample data is fetched once into the ignored cache (see domainsr.data)."""
from __future__ import annotations

import importlib.util
import os
from collections import Counter
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def _schema_check():
    """tests/audit/schema_check.py, loaded by path (tests/ is no package)."""
    path = Path(__file__).resolve().parent / "audit" / "schema_check.py"
    spec = importlib.util.spec_from_file_location("domainsr_tests_schema_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_report(path: Path) -> bool:
    """A file named as an audit report that says it is one (tests also write stand-in JSON)."""
    if not (path.name == "report.json" or path.name.endswith("audit.json")):
        return False
    try:
        return '"domainsr_audit"' in path.read_text(encoding="utf-8")[:4096]
    except (OSError, UnicodeDecodeError):
        return False


@pytest.fixture(scope="session")
def check_report():
    """``check_report(path_or_dict)``: assert that an audit report validates against
    docs/audit.schema.json (returns it parsed)."""
    return _schema_check().check_report


@pytest.fixture(autouse=True)
def _every_report_validates(request):
    """The contract: every audit report a test writes under its ``tmp_path`` (``report.json``,
    ``*audit.json`` carrying ``domainsr_audit``) validates against docs/audit.schema.json."""
    if "tmp_path" not in request.fixturenames:
        yield
        return
    tmp = request.getfixturevalue("tmp_path")  # before the test: torn down after this check
    yield
    reports = [p for p in tmp.rglob("*.json") if _is_report(p)]
    if reports:
        check = _schema_check().check_report
        for path in reports:
            check(path)


@pytest.fixture(scope="session")
def sample_data():
    """Paths of the real sample data (Sentinel-2, Landsat 8, MNI152, pydicom files)."""
    from domainsr.data import fetch_sample_data

    return fetch_sample_data()


@pytest.fixture(scope="session")
def prefect_home(tmp_path_factory):
    """Prefect in ephemeral mode (its own SQLite database under a temporary PREFECT_HOME, no
    PREFECT_API_URL) for the whole session: the ephemeral server starts once."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_HOME,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        temporary_settings,
    )

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings(updates={PREFECT_HOME: str(home), PREFECT_API_URL: None,
                                     PREFECT_SERVER_ANALYTICS_ENABLED: False,
                                     PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: 180}):
        yield home


#: What the reliability tests did, printed at the end of the run (README: "Reliability").
_RELIABILITY: Counter[str] = Counter()
_RELIABILITY_ORDER = ("bad inputs tried", "faults injected", "items checked after faults", "items lost")


@pytest.fixture
def tally():
    """``tally(kind, n=1)``: count a bad input tried, a fault injected, items checked or lost."""
    def add(kind: str, n: int = 1) -> None:
        if kind not in _RELIABILITY_ORDER:
            raise ValueError(f"unknown reliability count {kind!r}")
        _RELIABILITY[kind] += n

    return add


def pytest_terminal_summary(terminalreporter) -> None:
    if _RELIABILITY:
        terminalreporter.write_sep("-", "reliability: " + ", ".join(
            f"{_RELIABILITY[k]} {k}" for k in _RELIABILITY_ORDER))
