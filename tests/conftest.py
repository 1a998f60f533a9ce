"""Shared fixtures: sample data is fetched once into the ignored cache (see domainsr.data)."""
from __future__ import annotations

import os
from collections import Counter

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


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
