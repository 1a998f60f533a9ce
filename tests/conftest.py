"""Shared fixtures: sample data is fetched once into the ignored cache (see domainsr.data)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


@pytest.fixture(scope="session")
def sample_data():
    """Paths of the real sample data (Sentinel-2, Landsat 8, MNI152, pydicom files)."""
    from domainsr.data import fetch_sample_data

    return fetch_sample_data()
