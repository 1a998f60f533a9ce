"""Store test set-up: Orthanc (installed from Debian's packages by install_services.sh when
missing, started on loopback ports with our config in orthanc/orthanc.json), a loopback HTTP
server with Range support serving a static STAC catalog of COGs cut from the real Sentinel-2
sample, and synthetic MR series made of real MRI (MNI152) voxels."""
from __future__ import annotations

import secrets
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from store_fixtures import CLIENT_AET, SERIES_SHAPE, build_stac_catalog, make_mr_series, upload
from store_servers import FlakyProxy, Orthanc, RangeServer, install_orthanc, make_pki, start_orthanc


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory) -> Orthanc:
    why = install_orthanc()
    if why is not None:
        pytest.skip(f"Orthanc cannot be installed here: {why}")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), "domainsr-test",
                           secrets.token_urlsafe(18), CLIENT_AET)
    yield server
    server.stop()


@pytest.fixture()
def pacs_env(orthanc, monkeypatch) -> Orthanc:
    """The Orthanc password in an environment variable, as a deployment would provide it."""
    monkeypatch.setenv("TEST_PACS_PASSWORD", orthanc.password)
    return orthanc


@pytest.fixture()
def flaky_proxy(orthanc) -> FlakyProxy:
    with FlakyProxy(orthanc.http_port) as proxy:
        yield proxy


# ------------------------------------------------------------------------------ DICOM series

@pytest.fixture(scope="session")
def mri_block() -> np.ndarray:
    """Real MRI voxels (MNI152 T1) for a thick-slice series: every 3rd slice of a brain block."""
    from nilearn.datasets import MNI152_FILE_PATH

    vol = np.asanyarray(nib.load(MNI152_FILE_PATH).dataobj)
    ni, nj, nk = SERIES_SHAPE
    block = vol[70:70 + ni, 90:90 + nj, 60:60 + 3 * nk:3].astype(np.uint16) * 10
    assert block.shape == SERIES_SHAPE and block.max() > 500
    return block


@pytest.fixture()
def mr_in_pacs(orthanc, mri_block, tmp_path) -> dict:
    """A fresh synthetic MR study uploaded to Orthanc."""
    series = make_mr_series(tmp_path / "mr_source", mri_block)
    upload(orthanc, series["files"])
    return series


@pytest.fixture(scope="session")
def stac_catalog(tmp_path_factory, sample_data) -> Path:
    return build_stac_catalog(tmp_path_factory.mktemp("stac_in"), Path(sample_data["sentinel2"]))


@pytest.fixture()
def stac_server(stac_catalog, monkeypatch) -> RangeServer:
    """The catalog over loopback HTTP with basic auth; the password in an environment variable."""
    password = secrets.token_urlsafe(12)
    monkeypatch.setenv("TEST_STAC_PASSWORD", password)
    with RangeServer(stac_catalog.parent, credentials=("reader", password)) as server:
        server.password = password  # type: ignore[attr-defined]
        yield server


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1."""
    return make_pki(tmp_path_factory.mktemp("pki"))

