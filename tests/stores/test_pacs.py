"""PacsStore against a real Orthanc on 127.0.0.1 (DICOMweb and DIMSE): query, retrieve, enhance,
store the derived series back, no duplicates, retries, no partial series, no secrets in logs."""
from __future__ import annotations

import base64
import logging
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from store_fixtures import (
    CLIENT_AET,
    PIXEL_SPACING,
    SERIES_SHAPE,
    SLICE_GAP,
    dicomweb_url,
    make_mr_series,
    study_series,
    upload,
)
from store_servers import closed_port

from domainsr.engine import PatchInferer, enhance_image
from domainsr.errors import ConfigError, StoreError
from domainsr.models import build_model
from domainsr.stores.pacs import PacsStore, derived_series_uid, dicom_date_range, series_item_id

SCALE = (1, 1, 2)  # thick slices: double the slice count


def enhance(img):
    model = build_model("cubic", spatial_dims=3, in_channels=1, scale=SCALE)
    return enhance_image(img, PatchInferer(model, device="cpu", threads=1))


def derived_in_study(server, study_uid: str) -> list[dict]:
    return [s for s in study_series(server, study_uid)
            if "AI ENHANCED" in s["MainDicomTags"].get("ImageType", "")
            or s["MainDicomTags"].get("SeriesDescription", "").startswith("SR ")]


def fetch_instances(server, series: dict) -> list[pydicom.Dataset]:
    import io

    import requests

    out = []
    for iid in series["Instances"]:
        r = requests.get(f"{server.http_url}/instances/{iid}/file", auth=(server.username, server.password),
                         timeout=30)
        r.raise_for_status()
        out.append(pydicom.dcmread(io.BytesIO(r.content)))
    return sorted(out, key=lambda d: int(d.InstanceNumber))


def check_derived_series(server, source: dict, enhanced) -> pydicom.Dataset:
    """The derived series is in the source's study, complete, measured right, linked to the
    source, marked DERIVED / AI ENHANCED, and its pixels decode to the enhanced values."""
    derived = derived_in_study(server, source["study"])
    assert len(derived) == 1
    ni, nj, nk = SERIES_SHAPE
    datasets = fetch_instances(server, derived[0])
    assert len(datasets) == nk * SCALE[2]
    first = datasets[0]
    assert first.StudyInstanceUID == source["study"]
    assert first.SeriesInstanceUID != source["series"]
    assert not {d.SOPInstanceUID for d in datasets} & set(source["sop_uids"])
    assert len({d.SOPInstanceUID for d in datasets}) == len(datasets)
    assert list(first.ImageType)[:2] == ["DERIVED", "SECONDARY"] and "AI ENHANCED" in first.ImageType
    assert (first.Rows, first.Columns) == (nj, ni)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], PIXEL_SPACING)
    z = np.array([float(d.ImagePositionPatient[2]) for d in datasets])
    np.testing.assert_allclose(np.diff(z), SLICE_GAP / SCALE[2], atol=1e-4)
    assert float(first.SpacingBetweenSlices) == pytest.approx(SLICE_GAP / SCALE[2])
    for d in datasets:
        assert d.ReferencedSeriesSequence[0].SeriesInstanceUID == source["series"]
        refs = {r.ReferencedSOPInstanceUID for r in d.SourceImageSequence}
        assert refs and refs <= set(source["sop_uids"])
    volume = np.stack([d.pixel_array.T * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets],
                      axis=-1)
    assert volume.shape == (ni, nj, nk * SCALE[2])
    np.testing.assert_allclose(volume, enhanced.data[0], atol=float(first.RescaleSlope))
    return first


def test_dicomweb_round_trip_writes_linked_derived_series_once(pacs_env, mr_in_pacs):
    store = PacsStore.from_url(dicomweb_url(pacs_env), retries=2, backoff=0.05)
    items = store.list_items({"modality": "MR", "study_uid": mr_in_pacs["study"]})
    assert [i.id for i in items] == [series_item_id(mr_in_pacs["series"])]
    item = items[0]
    assert item.meta["n_instances"] == SERIES_SHAPE[2] and item.kind == "dicom"
    assert "Synthetic" not in repr(item) and "SYN-PACS" not in repr(item)  # no patient identifiers

    img = store.read(item)
    assert img.data.shape == (1, *SERIES_SHAPE) and img.domain == "mri"
    np.testing.assert_allclose(img.geometry.spacing, (PIXEL_SPACING[1], PIXEL_SPACING[0], SLICE_GAP))
    run_key = "run-dicomweb-0001"
    assert store.existing(item, run_key) is None

    enhanced = enhance(img)
    result = store.write(item, enhanced, run_key)
    assert derived_series_uid(mr_in_pacs["series"], run_key) in result.uri
    check_derived_series(pacs_env, mr_in_pacs, enhanced)

    # Re-running finds the output and creates nothing new; the derived series is not listed as input.
    assert store.existing(item, run_key) == result
    assert store.write(item, enhanced, run_key) == result
    assert len(study_series(pacs_env, mr_in_pacs["study"])) == 2
    assert [i.id for i in store.list_items({"study_uid": mr_in_pacs["study"]})] == [item.id]
    assert len(store.list_items({"study_uid": mr_in_pacs["study"], "include_derived": True})) == 2


def test_dimse_round_trip(orthanc, mr_in_pacs, monkeypatch):
    monkeypatch.setenv("DOMAINSR_DIMSE_CALLED_AET", orthanc.aet)  # AE titles from the environment
    monkeypatch.setenv("SITE_CALLING_AET", CLIENT_AET)
    store = PacsStore.from_url(f"dimse://127.0.0.1:{orthanc.dicom_port}?calling_aet=env:SITE_CALLING_AET",
                               retries=2, backoff=0.05)
    items = store.list_items({"modality": "MR", "study_uid": mr_in_pacs["study"],
                              "study_date": "2024-01-01/2024-01-31"})
    assert [i.id for i in items] == [series_item_id(mr_in_pacs["series"])]
    img = store.read(items[0])
    assert img.data.shape == (1, *SERIES_SHAPE)
    enhanced = enhance(img)
    result = store.write(items[0], enhanced, "run-dimse-0001")
    check_derived_series(orthanc, mr_in_pacs, enhanced)
    assert store.write(items[0], enhanced, "run-dimse-0001") == result
    assert len(study_series(orthanc, mr_in_pacs["study"])) == 2


def test_query_filters_select_series(pacs_env, mri_block, tmp_path):
    a = make_mr_series(tmp_path / "a", mri_block[:, :, :2], description="T1 thick axial", study_date="20230310")
    b = make_mr_series(tmp_path / "b", mri_block[:, :, :2], description="FLAIR sag", study_date="20230320")
    upload(pacs_env, a["files"] + b["files"])
    store = PacsStore.from_url(dicomweb_url(pacs_env))

    def ids(**q):
        return {i.meta["series_uid"] for i in store.list_items(q)} & {a["series"], b["series"]}

    assert ids(modality="MR") == {a["series"], b["series"]}
    assert ids(modality="CT") == set()
    assert ids(study_date=("2023-03-01", "2023-03-15")) == {a["series"]}
    assert ids(study_date="20230315-20230331") == {b["series"]}
    assert ids(series_description="FLAIR*") == {b["series"]}
    with pytest.raises(ConfigError, match="unknown PACS query key"):
        store.list_items({"modalty": "MR"})


def test_interrupted_upload_is_completed_not_duplicated(pacs_env, mr_in_pacs, flaky_proxy, caplog, tally):
    """An upload that dies half-way leaves an incomplete series that no one counts as an output;
    the next run completes it under the same UIDs."""
    caplog.set_level(logging.WARNING, logger="domainsr")
    # One instance per STOW request; the proxy lets 5 through, then fails every POST.
    flaky = PacsStore.from_url(dicomweb_url(pacs_env, flaky_proxy.port), retries=3, backoff=0.05,
                               max_request_mb=0.000001)
    item = flaky.list_items({"study_uid": mr_in_pacs["study"]})[0]
    enhanced = enhance(flaky.read(item))
    flaky_proxy.failures.set(count=100, methods=("POST",), skip=5)
    with pytest.raises(StoreError, match=r"upload .* failed after 3 tries: HTTP 503") as err:
        flaky.write(item, enhanced, "run-interrupted")
    assert pacs_env.password not in str(err.value)
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    partial = derived_in_study(pacs_env, mr_in_pacs["study"])
    assert len(partial) == 1 and len(partial[0]["Instances"]) == 5
    healthy = PacsStore.from_url(dicomweb_url(pacs_env))
    assert healthy.existing(item, "run-interrupted") is None  # incomplete is not an output

    result = healthy.write(item, enhanced, "run-interrupted")
    check_derived_series(pacs_env, mr_in_pacs, enhanced)
    assert healthy.existing(item, "run-interrupted") == result
    tally("faults injected")
    tally("items checked after faults")


def test_transient_5xx_is_retried_with_backoff(pacs_env, mr_in_pacs, flaky_proxy, caplog, tally):
    caplog.set_level(logging.WARNING, logger="domainsr")
    store = PacsStore.from_url(dicomweb_url(pacs_env, flaky_proxy.port), retries=3, backoff=0.1)
    flaky_proxy.failures.set(count=2, methods=("GET",))
    t0 = time.monotonic()
    items = store.list_items({"study_uid": mr_in_pacs["study"]})
    assert len(items) == 1
    assert time.monotonic() - t0 >= 0.1 + 0.2  # waited base, then twice the base (plus jitter)
    waits = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(waits) == 2 and "retry 1 of 2 in" in waits[0] and "retry 2 of 2 in" in waits[1]
    seconds = [float(re.search(r" in (\d+\.\d+) s", w).group(1)) for w in waits]
    assert 0.1 <= seconds[0] <= 0.2 and 0.2 <= seconds[1] <= 0.3  # jitter adds up to one base delay
    tally("faults injected", 2)


def test_store_down_fails_clearly_after_retries_and_writes_nothing(pacs_env, mr_in_pacs, caplog, tally):
    tally("faults injected", 2)  # DICOMweb and DIMSE down
    caplog.set_level(logging.WARNING, logger="domainsr")
    up = PacsStore.from_url(dicomweb_url(pacs_env))
    item = up.list_items({"study_uid": mr_in_pacs["study"]})[0]
    enhanced = enhance(up.read(item))
    port = closed_port()
    down = PacsStore.from_url(dicomweb_url(pacs_env, port), retries=3, backoff=0.05)
    with pytest.raises(StoreError) as err:
        down.write(item, enhanced, "run-down")
    msg = str(err.value)
    assert f"127.0.0.1:{port}" in msg and "failed after 3 tries: connection refused" in msg
    assert pacs_env.password not in msg and "password=***" in msg
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    assert derived_in_study(pacs_env, mr_in_pacs["study"]) == []
    dimse_down = PacsStore.from_url(f"dimse://127.0.0.1:{port}", called_aet="X", calling_aet=CLIENT_AET,
                                    retries=2, backoff=0.01, timeout=2)
    with pytest.raises(StoreError, match="failed after 2 tries: cannot open a DICOM association"):
        dimse_down.list_items({"modality": "MR"})


def test_wrong_credentials_fail_at_once(pacs_env, orthanc, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="domainsr")
    monkeypatch.setenv("TEST_PACS_PASSWORD", "not-the-password")
    with pytest.raises(StoreError, match="series query failed: HTTP 401"):
        PacsStore.from_url(dicomweb_url(orthanc), retries=3, backoff=0.05).list_items({})
    assert not [r for r in caplog.records if "retry" in r.getMessage()]  # a 401 is not retried
    store = PacsStore.from_url(f"dimse://127.0.0.1:{orthanc.dicom_port}", called_aet=orthanc.aet,
                               calling_aet="STRANGER", retries=3, backoff=0.05)
    with pytest.raises(StoreError, match="rejected the association"):
        store.list_items({})


def test_no_credentials_or_patient_identifiers_in_debug_logs(pacs_env, mr_in_pacs, caplog):
    """A full DICOMweb + DIMSE round trip with every logger at DEBUG leaks no secret."""
    loggers = ["", "domainsr", "dicomweb_client", "requests", "urllib3", "pynetdicom", "pydicom"]
    for name in loggers:
        caplog.set_level(logging.DEBUG, logger=name)
    web = PacsStore.from_url(dicomweb_url(pacs_env))
    item = web.list_items({"study_uid": mr_in_pacs["study"]})[0]
    enhanced = enhance(web.read(item))
    web.write(item, enhanced, "run-logs")
    dimse = PacsStore.from_url(f"dimse://127.0.0.1:{pacs_env.dicom_port}", called_aet=pacs_env.aet,
                               calling_aet=CLIENT_AET)
    dimse.read(dimse.list_items({"study_uid": mr_in_pacs["study"]})[0])
    text = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    assert "dicomweb_client" in text and "urllib3" in text  # the libraries did log at DEBUG
    basic = base64.b64encode(f"{pacs_env.username}:{pacs_env.password}".encode()).decode()
    for secret in (pacs_env.password, basic, "Authorization", "Synthetic^Phantom", "SYN-PACS-0001",
                   CLIENT_AET, pacs_env.aet):
        assert secret not in text, f"{secret!r} appeared in the logs"
    assert pacs_env.password not in repr(web) + repr(web.backend.session.adapters)


def test_urls_options_and_tls_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("DOMAINSR_PACS_TOKEN", "tok-123")
    store = PacsStore.from_url("dicomweb://pacs.example.org/dicom-web")
    session = store.backend.client._session
    assert store.backend.client.base_url == "https://pacs.example.org/dicom-web"
    assert session.verify is True and "tok-123" not in repr(store) + repr(session.adapters)
    assert PacsStore.from_url("dicomweb://h/x?verify=false").backend.client._session.verify is False
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    assert PacsStore.from_url("dicomweb://h/x", verify=str(ca)).backend.client._session.verify == str(ca)
    with pytest.raises(ConfigError, match="never literally"):
        PacsStore.from_url("dicomweb+http://h/x?username=u&password=hunter2")
    with pytest.raises(ConfigError, match="credentials do not belong"):
        PacsStore.from_url("dicomweb+http://u:pw@h/x")
    with pytest.raises(ConfigError, match="unknown store option"):
        PacsStore.from_url("dicomweb+http://h/x", pasword="env:X")
    with pytest.raises(ConfigError, match="environment variable NOPE is not set"):
        PacsStore.from_url("dicomweb+http://h/x?username=u&password=env:NOPE")
    with pytest.raises(ConfigError, match="dimse://HOST:PORT"):
        PacsStore.from_url("dimse://h")
    assert dicom_date_range(("2024-01-01", None)) == "20240101-"
    assert dicom_date_range("20240101") == "20240101"


def test_tls_certificate_is_verified(tmp_path, pki):
    """dicomweb:// verifies the server certificate: an unknown CA fails at once, our CA passes."""
    from store_servers import RangeServer

    (tmp_path / "dicom-web").mkdir()
    with RangeServer(tmp_path, tls=pki) as server:
        url = f"dicomweb://127.0.0.1:{server.server_address[1]}/dicom-web"
        with pytest.raises(StoreError, match="TLS certificate verification failed") as err:
            PacsStore.from_url(url, retries=3, backoff=0.05).list_items({})
        assert "after" not in str(err.value)  # not retried
        with pytest.raises(StoreError, match="HTTP 404"):  # TLS passed; the static server has no QIDO
            PacsStore.from_url(url, verify=str(pki["ca"])).list_items({})


@pytest.mark.slow
def test_enhance_flow_against_pacs(pacs_env, mr_in_pacs, tmp_path, prefect_home):
    """The real flow (config -> open_store -> list -> enhance + audit -> write) on the PACS, twice."""
    import yaml

    flows = pytest.importorskip("flows.enhance", reason="flows/enhance.py is not importable")
    config = tmp_path / "mr_pacs.yaml"
    config.write_text(yaml.safe_dump({
        "name": "mr-pacs-slices-x2", "domain": "mri", "model": {"name": "cubic", "scale": list(SCALE)},
        "tiling": {"device": "cpu", "threads": 1},
        "store": {"input": dicomweb_url(pacs_env), "output": str(tmp_path / "reports"),
                  "query": {"study_uid": mr_in_pacs["study"], "modality": "MR"}}}))
    first = flows.enhance_flow(config=str(config))
    assert (first["enhanced"], first["skipped"], first["failed"]) == (1, 0, 0), first
    (row,) = first["items"]
    derived = derived_in_study(pacs_env, mr_in_pacs["study"])
    assert len(derived) == 1 and len(derived[0]["Instances"]) == SERIES_SHAPE[2] * SCALE[2]
    assert row["output"].endswith(derived[0]["MainDicomTags"]["SeriesInstanceUID"])
    assert Path(row["extras"]["audit.html"]).is_file()  # the audit report is kept next to the PACS
    # the audit's maps went in as DICOM objects referencing the derived series, in the same study
    derived_uid = derived[0]["MainDicomTags"]["SeriesInstanceUID"]
    maps = [s for s in study_series(pacs_env, mr_in_pacs["study"])
            if s["MainDicomTags"]["SeriesInstanceUID"] not in (mr_in_pacs["series"], derived_uid)]
    found = {d.SOPClassUID: d for s in maps for d in fetch_instances(pacs_env, s)}
    assert "1.2.840.10008.5.1.4.1.1.30" in found  # the risk as a Parametric Map (a Segmentation if flagged)
    assert all(d.ReferencedSeriesSequence[0].SeriesInstanceUID == derived_uid for d in found.values())
    assert Path(row["extras"]["risk.dcm"]).is_file()
    second = flows.enhance_flow(config=str(config))
    assert (second["enhanced"], second["skipped"]) == (0, 1)
    assert len(study_series(pacs_env, mr_in_pacs["study"])) == 2 + len(maps)  # nothing new
