"""Patient identifiers never reach logs, Prefect artifacts, flow results or file names, across the
enhance and audit flows, even when the export folder and the DICOM file names carry the patient's
name and ID and some files are broken (error messages are where paths usually leak)."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import time
from pathlib import Path

import pydicom
import pytest

_spec = importlib.util.spec_from_file_location("_flow_inputs", Path(__file__).parents[1] / "flows" / "flow_inputs.py")
_inputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_inputs)

NAME, PID, ACCESSION, BIRTH = "ZYXWOWSKI^QUENTINA", "PID778899Q", "ACC4455Q", "19410203"
FOLDER = "ZYXWOWSKI_QUENTINA_PID778899Q"
#: What must never be seen outside the DICOM outputs (which keep the patient module by design).
IDENTIFIERS = (NAME, "ZYXWOWSKI", "QUENTINA", PID, ACCESSION, BIRTH, FOLDER)


def _identified_series(folder: Path, n_slices: int, drop: int | None = None) -> list[Path]:
    _inputs.write_mr_series(folder, n_slices=n_slices, prefix=f"{FOLDER}_")
    files = sorted(folder.glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.PatientBirthDate = NAME, PID, ACCESSION, BIRTH
        ds.save_as(f)
    if drop is not None:
        files[drop].unlink()
    return files


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """``exports/<FOLDER>/`` with a good MR series, a series with a missing slice, and a broken
    file, all named after the patient. (The flows are given ``exports/``: Prefect records the
    parameters a flow is called with verbatim, so the audit's reference path is left out of that
    one check.)"""
    root = tmp_path_factory.mktemp("exports") / FOLDER
    _identified_series(root / "series_good", 6)
    _identified_series(root / "series_gap", 6, drop=3)
    raw = (root / "series_good" / f"{FOLDER}_000.dcm").read_bytes()
    (root / f"{FOLDER}_broken.dcm").write_bytes(raw[:400])  # DICM preamble, header cut mid-element
    return root


async def _prefect_texts(audit_run_id) -> list[str]:
    """Every flow run's name, parameters (but the audit run's: see ``export``) and final message,
    every log line Prefect stored, and every artifact."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, LogFilter

    async with get_client() as client:
        runs = await client.read_flow_runs()
        logs = await client.read_logs(log_filter=LogFilter())
        arts = await client.read_artifacts(artifact_filter=ArtifactFilter())
    assert runs and logs and arts
    return ([f"{r.name} {r.parameters if r.id != audit_run_id else ''} {r.state.message if r.state else ''}"
             for r in runs] + [log.message for log in logs] + [f"{a.key} {a.description} {a.data}" for a in arts])


def _stored_texts(audit_run_id, expected: list[str], timeout_s: float = 30.0) -> list[str]:
    """:func:`_prefect_texts` once Prefect's log worker has sent what it queued: its batches leave
    every couple of seconds, so on a loaded machine the enhance flow's last lines can still be in
    the queue when the audit flow ends (CI failed so once). Waits at most ``timeout_s``."""
    from prefect.logging.handlers import APILogHandler

    deadline = time.monotonic() + timeout_s
    while True:
        APILogHandler().flush()
        texts = asyncio.run(_prefect_texts(audit_run_id))
        if all(any(line in t for t in texts) for line in expected) or time.monotonic() > deadline:
            return texts
        time.sleep(1.0)


def _assert_clean(texts: list[str], where: str) -> None:
    blob = "\n".join(texts)
    for secret in IDENTIFIERS:
        assert secret not in blob, f"{secret!r} found in {where}: ...{blob[max(0, blob.find(secret) - 300):blob.find(secret) + 80]}"


def test_enhance_and_audit_flows_leak_no_identifier(prefect_home, export, tmp_path, caplog, capfd):
    from flows.audit import audit_flow
    from flows.enhance import enhance_flow

    for name in ("", "domainsr", "prefect", "pydicom", "flows"):
        caplog.set_level(logging.DEBUG, logger=name)
    out = tmp_path / "out"
    state = enhance_flow(inputs=[str(export.parent)], out=str(out), model="cubic", scale=[1, 1, 2], return_state=True)
    summary = state.result(raise_on_failure=False)
    status = sorted(r["status"] for r in summary["items"])
    assert status == ["enhanced", "failed", "failed"], summary["items"]
    audit_state = audit_flow(references=[str(export / "series_good")], model="cubic", scale=[1, 1, 2],
                             out=str(tmp_path / "audit"), return_state=True)
    assert audit_state.result(raise_on_failure=False) is not None

    failed = [r for r in summary["items"] if r["status"] == "failed"]
    expected = [f"{row['item_id']} failed" for row in failed]
    prefect_texts = _stored_texts(audit_state.state_details.flow_run_id, expected)
    for row, line in zip(failed, expected):  # the failures were logged with their reasons, naming the item
        assert row["message"] and row["item_id"] in row["message"], row
        assert any(line in t for t in prefect_texts), f"{line!r} not in Prefect's stored logs"
    _assert_clean([f"{r.name} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records], "Python logs")
    _assert_clean([str(summary)], "the flow result")
    _assert_clean(list(capfd.readouterr()), "the console")
    _assert_clean(prefect_texts, "Prefect's logs, runs and artifacts")

    written = [p for root in (out, tmp_path / "audit") for p in root.rglob("*")]
    assert written
    _assert_clean([str(p.relative_to(tmp_path)) for p in written], "output file names")
    for p in written:
        if p.is_file() and p.suffix in (".json", ".html"):
            _assert_clean([p.read_text(encoding="utf-8")], p.name)
    derived = next(p for p in written if p.suffix == ".dcm")
    ds = pydicom.dcmread(derived)
    assert str(ds.PatientName) == NAME and "DERIVED" in ds.ImageType  # the derived series stays with its patient
