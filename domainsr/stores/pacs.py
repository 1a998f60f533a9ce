"""A PACS as a store: DICOMweb (QIDO-RS / WADO-RS / STOW-RS, dicomweb-client) or DIMSE
(C-FIND / C-GET / C-STORE, pynetdicom).

URL grammar (options as query parameters or as keyword arguments / a config block; keywords win)::

    dicomweb://HOST[:PORT]/PATH        DICOMweb over HTTPS (TLS verified)
    dicomweb+https://HOST[:PORT]/PATH  the same, spelt out
    dicomweb+http://HOST[:PORT]/PATH   DICOMweb over plain HTTP (loopback / trusted networks)
    dimse://HOST:PORT                  DICOM upper layer (C-FIND, C-GET, C-STORE)

    DICOMweb options: auth=none|basic|bearer, username=, password=, token=, verify=true|false|CA.pem,
                      timeout=30, max_request_mb=64
    DIMSE options:    called_aet=, calling_aet=, timeout=30
    both:             retries=3, backoff=0.5, extras_dir=PATH, concurrency_limit=NAME

``password``/``token`` are ``env:NAME`` or ``prefect:NAME`` references (never literals);
``username`` and the AE titles may also be literal. Unset options fall back to the environment:
``DOMAINSR_PACS_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``, ``DOMAINSR_DIMSE_CALLED_AET`` /
``_CALLING_AET`` (else ``ANY-SCP`` / ``DOMAINSR``).

Items are image series (``list_items`` keys: ``modality``, ``study_date``, ``series_description``,
``study_uid``, ``series_uid``, ``include_derived``, ``limit``). ``Item.id`` is a hash of the series
UID, never a patient identifier; query answers are reduced to UIDs, modality, description, date and
counts before anything else sees them, and pynetdicom's INFO/DEBUG output (which echoes AE titles
and identifiers) is held back while DomainSR talks DIMSE. A QIDO-RS search reads further pages
(``offset``) only while the server answers with the ``Warning: 299`` of truncated results and a
page brings new UIDs, and never more than ``QIDO_MAX_PAGES`` pages (a server that ignores
``offset`` would otherwise be asked forever).

Writing: the derived series (new UIDs, same study, DERIVED / AI ENHANCED, references to the
source, see :func:`domainsr.io.dicom.write_derived_series`) is written completely to a local
temporary folder before anything is sent. Its Series and SOP Instance UIDs are derived from the
source series UID and the run key (``2.25.`` UUID form), and every instance carries a private block
(group 0x0077, creator ``DomainSR 1``) with the run key and the series' instance count. So a
re-run finds the series (``existing`` counts only a series whose instances are all there), and an
upload interrupted half-way is completed by the next run under the same UIDs instead of being
duplicated. When the extras hold the audit's risk map (and region label map and report), they
are sent too, first, as DICOM on the derived series' planes: a Parametric Map of the risk and a
Segmentation of the review/fail regions (same study and frame of reference, UIDs derived from the
derived series', :mod:`domainsr.stores.maps`); such map series are not listed as inputs
(``include_derived`` lists them). A PACS cannot hold HTML/JSON audit files: ``extras`` (and copies
of the maps, ``risk.dcm``, ``regions.seg.dcm``) are copied to ``extras_dir`` when it is set (else
they are not kept, with a warning).

A global limit for a PACS shared by many workers: ``concurrency_limit=NAME`` (or
``$DOMAINSR_PACS_CONCURRENCY_LIMIT``) holds one slot of the Prefect global concurrency limit NAME
(``prefect gcl create NAME --limit 2``) around every exchange with the PACS (query, retrieve,
upload; each try). Without a name, without a configured Prefect API, or when no limit of that
name exists (one warning), it is a no-op: see :func:`pacs_slot`.

Size: two protocols (DICOMweb and DIMSE) behind one Store, sharing the reduction of query answers
(no patient identifier passes it) and the resumable, duplicate-free upload rule.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

import pydicom

from domainsr.errors import ConfigError, InputError, StoreError
from domainsr.image import SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.io.dicom import MAP_SERIES_PREFIX, quiet_pydicom, read_dicom_series, write_derived_series
from domainsr.retry import PermanentStoreError
from domainsr.stores.base import Item, Store, WriteResult
from domainsr.stores.http import (
    HttpAuth,
    RetryPolicy,
    TransientError,
    call_with_retries,
    extra_file_name,
    http_session,
    redact_url,
    resolve_secret,
    split_store_url,
    tls_verify,
)
from domainsr.stores.maps import dicom_maps

log = logging.getLogger("domainsr.stores.pacs")

PRIVATE_GROUP = 0x0077
PRIVATE_CREATOR = "DomainSR 1"
_RUN_KEY_ELEM, _COUNT_ELEM = 0x01, 0x02
_UID_NAMESPACE = uuid.UUID("5b0d2c1e-8f3a-5c53-9a57-646f6d61696e")  # DomainSR's own namespace
DERIVED_MARK = "AI ENHANCED"  # ImageType value 4 of series written by DomainSR (and other AI tools)

_COMMON_OPTS = {"retries", "backoff", "extras_dir", "timeout", "concurrency_limit"}
LIMIT_ENV = "DOMAINSR_PACS_CONCURRENCY_LIMIT"
_LIMITS: dict[tuple[str, str], bool] = {}  # (API URL, limit name) -> whether the limit exists
_WEB_OPTS = _COMMON_OPTS | {"auth", "username", "password", "token", "verify", "max_request_mb"}
_DIMSE_OPTS = _COMMON_OPTS | {"called_aet", "calling_aet"}
_QUERY_KEYS = {"modality", "study_date", "series_description", "study_uid", "series_uid",
               "include_derived", "limit"}


# ------------------------------------------------------------------------------------ helpers

def series_item_id(series_uid: str) -> str:
    """Log-safe, stable item id of a series (a hash of its UID)."""
    return "series-" + hashlib.sha256(series_uid.encode()).hexdigest()[:16]


def _name_uid(*parts: str) -> str:
    """A ``2.25.`` UID from a name-based (SHA-1, version 5) UUID, ISO/IEC 9834-8 / DICOM PS3.5 B.2."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '|'.join(parts)).int}"


def derived_series_uid(source_series_uid: str, run_key: str) -> str:
    """The Series Instance UID DomainSR gives the output of ``run_key`` on a source series."""
    return _name_uid("derived-series", source_series_uid, run_key)


def _instance_uid(series_uid: str, number: int) -> str:
    return _name_uid("derived-instance", series_uid, str(number))


def _date(value: Any) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, (_dt.date, _dt.datetime)):
        return value.strftime("%Y%m%d")
    text = str(value).replace("-", "")
    if len(text) != 8 or not text.isdigit():
        raise ConfigError(f"study date {value!r} is not YYYYMMDD or YYYY-MM-DD")
    return text


def dicom_date_range(value: Any) -> str:
    """``"20240101"``, ``"20240101-20241231"``, ``"2024-01-01/2024-12-31"`` or a pair (either end
    may be open) -> a DICOM date range matching key."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"study_date range {value!r} must have two ends")
        return f"{_date(value[0])}-{_date(value[1])}"
    text = str(value).strip()
    if "/" in text:
        lo, hi = text.split("/", 1)
        return f"{_date(lo)}-{_date(hi)}"
    if len(text) > 10 and "-" in text:  # YYYYMMDD-YYYYMMDD
        lo, hi = text.split("-", 1)
        return f"{_date(lo)}-{_date(hi)}"
    return _date(text)


def _model_name(img: SpatialImage) -> str:
    model = img.provenance.get("model")
    if isinstance(model, dict) and model.get("name"):  # the flow's model identity
        return str(model["name"])
    for step in reversed(img.provenance.get("history", [])):
        if isinstance(step, dict) and step.get("model"):
            return str(step["model"])
    return "DomainSR"


def _private_int(value: Any) -> int | None:
    """An IS value that may come back as text, a number or undecoded bytes (C-FIND answers)."""
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).decode("ascii", "ignore")
    try:
        return int(str(value).strip("\x00 ").strip())
    except ValueError:
        return None


@quiet_pydicom()
def _stamp(files: Sequence[Path], series_uid: str, run_key: str) -> None:
    """Give the locally written derived series its run-derived UIDs and the DomainSR block."""
    for path in files:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _instance_uid(series_uid, int(ds.InstanceNumber))
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(_RUN_KEY_ELEM, "LT", run_key)
        block.add_new(_COUNT_ELEM, "IS", len(files))
        ds.save_as(path, enforce_file_format=True)


@contextmanager
def _quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom logs AE titles and query identifiers at INFO/DEBUG: hold those records back."""
    logger = logging.getLogger("pynetdicom")
    saved = logger.level
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(saved)


class _Series(dict):
    """One series as a query answer: only UIDs, modality, description, date, counts, image type."""


class _Backend(Protocol):
    url: str

    def find_series(self, keys: Mapping[str, str]) -> list[_Series]: ...

    def stamp(self, study_uid: str, series_uid: str) -> tuple[int, int | None, str | None]:
        """``(instances found, instance count recorded by DomainSR, run key recorded)``."""

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int: ...

    def store(self, files: Sequence[Path], study_uid: str) -> None: ...


# ----------------------------------------------------------------------------------- DICOMweb

_SERIES_FIELDS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "StudyDate",
                  "NumberOfSeriesRelatedInstances", "ImageType")
_TAGS = {"StudyInstanceUID": "0020000D", "SeriesInstanceUID": "0020000E", "Modality": "00080060",
         "SeriesDescription": "0008103E", "StudyDate": "00080020",
         "NumberOfSeriesRelatedInstances": "00201209", "ImageType": "00080008", "SOPInstanceUID": "00080018"}


#: Most QIDO-RS pages read for one search: a server that keeps saying "more results" is not
#: followed further (with a warning).
QIDO_MAX_PAGES = 100
_TRUNCATED = re.compile(r"(?:^|,)\s*299\s")


def truncated_results(headers: Mapping[str, str]) -> bool:
    """Whether a QIDO-RS answer carries the ``Warning: 299`` of truncated results (DICOM PS3.18,
    QIDO-RS: "The number of results exceeded the maximum supported by the server. Additional
    results can be requested."). Other warnings (1xx, 199, 214) say nothing about paging."""
    return bool(_TRUNCATED.search(headers.get("Warning") or ""))


def _record_key(record: Mapping[str, Any], keyword: str) -> str:
    """A record's ``keyword`` UID, or (none given) the whole record, to recognise a repeat."""
    uid = _json_value(record, keyword)
    return str(uid) if uid else json.dumps(record, sort_keys=True)


def _json_value(record: Mapping[str, Any], keyword: str) -> Any:
    values = (record.get(_TAGS[keyword]) or {}).get("Value") or []
    return values if keyword == "ImageType" else (values[0] if values else None)


class DicomWebBackend:
    """QIDO-RS / WADO-RS / STOW-RS through dicomweb-client (its own retries off: ours apply)."""

    def __init__(self, base_url: str, auth: HttpAuth, verify: bool | str, timeout: float,
                 max_request_bytes: int) -> None:
        from dicomweb_client import DICOMwebClient

        self.url = base_url
        self.session = http_session(auth, verify, base_url)
        self.timeout = timeout
        self.client = DICOMwebClient(base_url, session=self.session, timeout=timeout)
        self.client.set_http_retry_params(retry=False)
        self.max_request_bytes = max_request_bytes

    def find_series(self, keys: Mapping[str, str]) -> list[_Series]:
        """QIDO-RS series search. The query string is built here rather than by dicomweb-client,
        which percent-encodes the ``*``/``?`` wildcards; RFC 3986 allows them as they are and
        Orthanc (1.10) matches wildcards only then (it also does not decode ``%20``: match a
        description with spaces with ``?`` or ``*``)."""
        params = [*keys.items(), *(("includefield", f) for f in _SERIES_FIELDS)]
        records = self._search("series", params, key="SeriesInstanceUID", what="series search")
        out = []
        for rec in records:
            n = _json_value(rec, "NumberOfSeriesRelatedInstances")
            out.append(_Series(
                study_uid=str(_json_value(rec, "StudyInstanceUID") or ""),
                series_uid=str(_json_value(rec, "SeriesInstanceUID") or ""),
                modality=str(_json_value(rec, "Modality") or ""),
                description=str(_json_value(rec, "SeriesDescription") or ""),
                study_date=str(_json_value(rec, "StudyDate") or ""),
                n_instances=None if n is None else int(n),
                image_type=[str(v) for v in _json_value(rec, "ImageType")]))
        return out

    def _search(self, path: str, params: Sequence[tuple[str, str]], *, key: str, what: str) -> list[dict[str, Any]]:
        """A QIDO-RS search at ``path``, paged with ``offset`` only while the server answers with
        the 299 warning of truncated results, a page brings records not seen before (by their
        ``key`` UID: a server that ignores ``offset`` repeats itself) and fewer than
        :data:`QIDO_MAX_PAGES` pages were read."""
        query = "&".join(f"{quote(k)}={quote(str(v), safe='*?')}" for k, v in params)
        records: dict[str, dict[str, Any]] = {}
        offset = 0
        for _ in range(QIDO_MAX_PAGES):
            page, truncated = self._qido_page(f"{self.url}/{path}?{query}", offset)
            new = {k: rec for rec in page if (k := _record_key(rec, key)) not in records}
            records.update(new)
            offset += len(page)
            if not truncated or not page:
                break
            if not new:
                log.warning("%s at %s: the server says more results remain but repeated itself at offset %d "
                            "(does it ignore offset?); keeping the %d found", what, redact_url(self.url),
                            offset - len(page), len(records))
                break
        else:
            log.warning("%s at %s: results still truncated after %d pages; keeping the %d found", what,
                        redact_url(self.url), QIDO_MAX_PAGES, len(records))
        return list(records.values())

    def _qido_page(self, url: str, offset: int) -> tuple[list[dict[str, Any]], bool]:
        """One QIDO-RS answer from ``offset``: its records and whether it says it was truncated."""
        r = self.session.get(url + (f"&offset={offset}" if offset else ""),
                             headers={"Accept": "application/dicom+json"}, timeout=self.timeout)
        r.raise_for_status()
        page = r.json() if r.status_code != 204 and r.content else []
        return ([page] if isinstance(page, dict) else list(page)), truncated_results(r.headers)

    def stamp(self, study_uid: str, series_uid: str) -> tuple[int, int | None, str | None]:
        """Counts the instances (QIDO) and reads the DomainSR block of one (WADO-RS metadata;
        QIDO does not return private attributes)."""
        instances = self._search(f"studies/{study_uid}/series/{series_uid}/instances",
                                 [("includefield", "SOPInstanceUID")], key="SOPInstanceUID", what="instance search")
        if not instances:
            return 0, None, None
        sop = _json_value(instances[0], "SOPInstanceUID")
        meta = self.client.retrieve_instance_metadata(study_uid, series_uid, sop)
        if (meta.get("00770010") or {}).get("Value", [None])[0] != PRIVATE_CREATOR:
            return len(instances), None, None
        count = (meta.get("00771002") or {}).get("Value", [None])[0]
        run_key = (meta.get("00771001") or {}).get("Value", [None])[0]
        return len(instances), _private_int(count), None if run_key is None else str(run_key)

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int:
        n = 0
        for n, ds in enumerate(self.client.iter_series(study_uid, series_uid), start=1):
            ds.save_as(folder / f"{n:06d}.dcm", enforce_file_format=True)
        return n

    def store(self, files: Sequence[Path], study_uid: str) -> None:
        """STOW-RS in requests of at most ``max_request_bytes``; any failed instance is an error."""
        batch: list[Path] = []
        size = 0
        for path in files:
            if batch and size + path.stat().st_size > self.max_request_bytes:
                self._stow(batch, study_uid)
                batch, size = [], 0
            batch.append(path)
            size += path.stat().st_size
        if batch:
            self._stow(batch, study_uid)

    @quiet_pydicom()
    def _stow(self, files: Sequence[Path], study_uid: str) -> None:
        datasets = [pydicom.dcmread(p) for p in files]
        answer = self.client.store_instances(datasets, study_instance_uid=study_uid)
        failed = len(answer.get("FailedSOPSequence") or [])
        stored = len(answer.get("ReferencedSOPSequence") or [])
        if failed or stored != len(datasets):
            raise StoreError(f"STOW-RS stored {stored} of {len(datasets)} instances ({failed} refused)",
                             redact_url(self.url))


# -------------------------------------------------------------------------------------- DIMSE

class DimseBackend:
    """C-FIND / C-GET / C-STORE (study root) through pynetdicom."""

    def __init__(self, host: str, port: int, called_aet: str, calling_aet: str, timeout: float) -> None:
        self.url = f"dimse://{host}:{port}"
        self.host, self.port, self.timeout = host, port, timeout
        self._called, self._calling = called_aet, calling_aet

    def __repr__(self) -> str:  # AE titles stay out of reprs and logs
        return f"DimseBackend({self.url})"

    @contextmanager
    def _association(self, contexts: Sequence[str], roles: Sequence[str] = (),
                     on_store: Any = None) -> Iterator[Any]:
        from pynetdicom import AE, build_role, evt

        ae = AE(ae_title=self._calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        ae.connection_timeout = self.timeout
        for uid in contexts:
            ae.add_requested_context(uid)
        ext = [build_role(uid, scp_role=True) for uid in roles]
        handlers = [(evt.EVT_C_STORE, on_store)] if on_store else []
        with _quiet_pynetdicom():
            assoc = ae.associate(self.host, self.port, ae_title=self._called, ext_neg=ext or None,
                                 evt_handlers=handlers)
            if not assoc.is_established:
                if assoc.is_rejected:
                    result = getattr(getattr(assoc.acceptor, "primitive", None), "result", None)
                    if result == 0x02:
                        raise TransientError("association rejected transiently (PACS busy)")
                    raise PermanentStoreError("the PACS rejected the association: check called_aet/"
                                              "calling_aet and that this host is allowed to connect", self.url)
                raise TransientError("cannot open a DICOM association (connection refused, aborted "
                                     "or timed out)")
            try:
                yield assoc
            finally:
                if assoc.is_established:
                    assoc.release()

    @staticmethod
    def _check(status: Any, what: str, ok: Sequence[int] = (0x0000,)) -> int:
        if status is None or "Status" not in status:
            raise TransientError(f"{what}: no answer (association aborted or timed out)")
        code = int(status.Status)
        if code not in ok and code not in (0xFF00, 0xFF01):
            raise _dimse_failure(what, code)
        return code

    def _find(self, query: pydicom.Dataset) -> list[pydicom.Dataset]:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

        answers = []
        with self._association([FIND]) as assoc:
            for status, ident in assoc.send_c_find(query, FIND):
                code = self._check(status, "C-FIND")
                if code in (0xFF00, 0xFF01) and ident is not None:
                    answers.append(ident)
        return answers

    def find_series(self, keys: Mapping[str, str]) -> list[_Series]:
        q = pydicom.Dataset()
        q.QueryRetrieveLevel = "SERIES"
        for kw in _SERIES_FIELDS:
            setattr(q, kw, keys.get(kw, ""))
        out = []
        for ident in self._find(q):
            n = ident.get("NumberOfSeriesRelatedInstances")
            out.append(_Series(
                study_uid=str(ident.get("StudyInstanceUID", "")),
                series_uid=str(ident.get("SeriesInstanceUID", "")),
                modality=str(ident.get("Modality", "")),
                description=str(ident.get("SeriesDescription", "")),
                study_date=str(ident.get("StudyDate", "")),
                n_instances=None if n in (None, "") else int(n),
                image_type=[str(v) for v in (ident.get("ImageType") or [])]))
        return out

    def stamp(self, study_uid: str, series_uid: str) -> tuple[int, int | None, str | None]:
        """One IMAGE-level C-FIND: every instance answers (the count), with the DomainSR block
        (returned by PACS that read private attributes from storage for C-FIND, e.g. Orthanc)."""
        q = pydicom.Dataset()
        q.QueryRetrieveLevel = "IMAGE"
        q.StudyInstanceUID, q.SeriesInstanceUID, q.SOPInstanceUID = study_uid, series_uid, ""
        block = q.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
        block.add_new(_RUN_KEY_ELEM, "LT", None)
        block.add_new(_COUNT_ELEM, "IS", None)
        answers = self._find(q)
        for ident in answers:
            try:
                got = ident.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
            except KeyError:
                continue
            count = _private_int(got[_COUNT_ELEM].value) if _COUNT_ELEM in got else None
            key = got[_RUN_KEY_ELEM].value if _RUN_KEY_ELEM in got else None
            if isinstance(key, (bytes, bytearray)):
                key = bytes(key).decode("utf-8", "ignore").strip("\x00 ")
            return len(answers), count, None if key is None else str(key).strip()
        return len(answers), None, None

    def retrieve(self, study_uid: str, series_uid: str, folder: Path) -> int:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

        storage = _storage_classes()
        written: list[Path] = []

        def on_store(event: Any) -> int:
            path = folder / f"{len(written) + 1:06d}.dcm"
            with open(path, "wb") as fh:
                fh.write(event.encoded_dataset())
            written.append(path)
            return 0x0000

        q = pydicom.Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID, q.SeriesInstanceUID = study_uid, series_uid
        with self._association([GET, *storage], roles=storage, on_store=on_store) as assoc:
            for status, _ in assoc.send_c_get(q, GET):
                self._check(status, "C-GET")
        return len(written)

    def store(self, files: Sequence[Path], study_uid: str) -> None:
        from pydicom.uid import ExplicitVRLittleEndian

        with quiet_pydicom():
            classes = sorted({str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in files})
        with self._association(classes) as assoc:
            accepted = {c.abstract_syntax for c in assoc.accepted_contexts}
            missing = [c for c in classes if c not in accepted]
            if missing:
                raise PermanentStoreError(f"the PACS does not accept SOP class(es) {missing}", self.url)
            for path in files:
                with quiet_pydicom():
                    ds = pydicom.dcmread(path)
                if ds.file_meta.TransferSyntaxUID != ExplicitVRLittleEndian:
                    raise PermanentStoreError(f"unexpected transfer syntax in {path.name}", self.url)
                status = assoc.send_c_store(ds)
                self._check(status, "C-STORE", ok=(0x0000, 0xB000, 0xB006, 0xB007))


def _dimse_failure(what: str, code: int) -> Exception:
    """The error of a failed DIMSE status: "out of resources" (0xA7xx) is retried; "does not
    match the SOP class" (0xA9xx), "SOP class not supported" (0x0122) and "not authorized"
    (0x0124) are permanent; any other failure is a (transient) StoreError."""
    message = f"{what} failed with DIMSE status 0x{code:04X}"
    if code >> 8 == 0xA7:
        return TransientError(message + " (PACS out of resources)")
    if code >> 8 == 0xA9 or code in (0x0122, 0x0124):
        return PermanentStoreError(message)
    return StoreError(message)


def _aet(opts: Mapping[str, Any], key: str, default: str) -> str:
    """An AE title option (literal, env:NAME or prefect:NAME), else ``DOMAINSR_DIMSE_<KEY>``."""
    env = f"DOMAINSR_DIMSE_{key.upper()}"
    ref = opts.get(key) or (f"env:{env}" if env in os.environ else default)
    value = str(resolve_secret(str(ref), key, literal_ok=True) or "").strip()
    if not value or len(value) > 16:
        raise ConfigError(f"{key} must be 1 to 16 characters")
    return value


def _storage_classes() -> list[str]:
    from pynetdicom.sop_class import (
        CTImageStorage,
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        MRImageStorage,
    )

    return [CTImageStorage, MRImageStorage, EnhancedCTImageStorage, EnhancedMRImageStorage]


# -------------------------------------------------------------------------------------- store

@contextmanager
def pacs_slot(name: str | None, what: str = "PACS exchange") -> Iterator[None]:
    """One slot of the Prefect global concurrency limit ``name`` held around the block; a no-op
    without a name or a configured Prefect API, or when the server has no such limit (a warning,
    once per process). A slot that cannot be acquired (API down) is a :class:`StoreError`."""
    url = _api_url() if name else None
    if name and not url and ("", name) not in _LIMITS:
        _LIMITS["", name] = False
        log.warning("PACS concurrency limit %r: no Prefect API configured (PREFECT_API_URL), so this process's "
                    "PACS exchanges are not limited", name)
    if not name or not url or not _limit_exists(url, name):
        yield
        return
    from prefect.concurrency.sync import concurrency

    stack = ExitStack()
    try:  # a lease renewal that fails later does not stop a transfer half-way
        stack.enter_context(concurrency(name, occupy=1, strict=True, raise_on_lease_renewal_failure=False))
    except Exception as exc:  # noqa: BLE001 - Prefect's acquisition errors vary by version
        raise StoreError(f"{what}: no slot of the Prefect concurrency limit {name!r}: {type(exc).__name__}: {exc}",
                         url) from None
    with stack:
        yield


def _api_url() -> str | None:
    """The Prefect API this thread's client would use (None: Prefect would start an ephemeral one)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


def _limit_exists(url: str, name: str) -> bool:
    key = (url, name)
    if key not in _LIMITS:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound

        try:
            with get_client(sync_client=True) as client:
                client.read_global_concurrency_limit_by_name(name)
            _LIMITS[key] = True
        except ObjectNotFound:
            log.warning("no Prefect global concurrency limit %r on %s: PACS exchanges are not limited "
                        "(create it: prefect gcl create %s --limit N)", name, url, name)
            _LIMITS[key] = False
        except Exception as exc:  # noqa: BLE001 - the API did not answer
            raise StoreError(f"cannot read the Prefect concurrency limit {name!r}: {type(exc).__name__}", url) from None
    return _LIMITS[key]


class PacsStore(Store):
    """A PACS reached over DICOMweb or DIMSE (see the module docstring for the URL grammar)."""

    def __init__(self, url: str, backend: _Backend, *, retry: RetryPolicy | None = None,
                 extras_dir: str | os.PathLike[str] | None = None, concurrency_limit: str | None = None) -> None:
        self.url = redact_url(url)
        self.concurrency_limit = concurrency_limit or os.environ.get(LIMIT_ENV) or None
        self.backend = backend
        self.retry = retry or RetryPolicy()
        self.extras_dir = None if extras_dir is None else Path(extras_dir)
        self.output = self.extras_dir  # where local artefacts go (the images go to the PACS)

    def __repr__(self) -> str:
        return f"PacsStore({self.url!r})"

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> PacsStore:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme in ("dicomweb", "dicomweb+https", "dicomweb+http"):
            clean, o = split_store_url(url, _WEB_OPTS, opts)
            parts = urlsplit(clean)
            if not parts.hostname:
                raise ConfigError("a DICOMweb URL needs a host: dicomweb://HOST[:PORT]/PATH", redact_url(url))
            http = "http" if scheme == "dicomweb+http" else "https"
            base = f"{http}://{parts.netloc}{parts.path.rstrip('/')}"
            if parts.query:
                raise ConfigError(f"unknown option(s) in URL: {parts.query.split('=')[0]!r}", redact_url(url))
            backend: _Backend = DicomWebBackend(
                base, HttpAuth.from_options(o, "DOMAINSR_PACS"), tls_verify(o.get("verify")),
                float(o.get("timeout", 30)), int(float(o.get("max_request_mb", 64)) * 2**20))
        elif scheme == "dimse":
            clean, o = split_store_url(url, _DIMSE_OPTS, opts)
            parts = urlsplit(clean)
            if not parts.hostname or not parts.port:
                raise ConfigError("a DIMSE URL is dimse://HOST:PORT", redact_url(url))
            if parts.query or parts.path.strip("/"):
                raise ConfigError("a DIMSE URL has no path or unknown options", redact_url(url))
            called, calling = _aet(o, "called_aet", "ANY-SCP"), _aet(o, "calling_aet", "DOMAINSR")
            backend = DimseBackend(parts.hostname, parts.port, called, calling,
                                   float(o.get("timeout", 30)))
        else:
            raise ConfigError("a PACS URL starts with dicomweb://, dicomweb+http://, dicomweb+https:// "
                              "or dimse://", redact_url(url))
        return cls(url, backend, retry=RetryPolicy.from_options(o), extras_dir=o.get("extras_dir"),
                   concurrency_limit=o.get("concurrency_limit"))

    # ------------------------------------------------------------------------------ internals
    def _call(self, what: str, fn: Any) -> Any:
        def limited() -> Any:
            with pacs_slot(self.concurrency_limit, what):
                return fn()

        return call_with_retries(limited, what=what, url=self.url, policy=self.retry)

    def _series_uri(self, study_uid: str, series_uid: str) -> str:
        return f"{self.url.split('?', 1)[0].rstrip('/')}/studies/{study_uid}/series/{series_uid}"

    def _item(self, s: _Series) -> Item:
        meta = {k: s[k] for k in ("study_uid", "series_uid", "modality", "description", "study_date",
                                  "n_instances")}
        return Item(id=series_item_id(s["series_uid"]), uri=self._series_uri(s["study_uid"], s["series_uid"]),
                    kind="dicom", meta=meta)

    # -------------------------------------------------------------------------------- Store API
    def list_items(self, query: dict[str, Any] | None = None) -> list[Item]:
        query = dict(query or {})
        unknown = sorted(set(query) - _QUERY_KEYS)
        if unknown:
            raise ConfigError(f"unknown PACS query key(s) {unknown}; keys are {sorted(_QUERY_KEYS)}", self.url)
        keys: dict[str, str] = {}
        if query.get("study_date"):
            keys["StudyDate"] = dicom_date_range(query["study_date"])
        if query.get("series_description"):
            keys["SeriesDescription"] = str(query["series_description"])
        if query.get("study_uid"):
            keys["StudyInstanceUID"] = str(query["study_uid"])
        if query.get("series_uid"):
            keys["SeriesInstanceUID"] = str(query["series_uid"])
        modalities = query.get("modality") or [None]
        modalities = [modalities] if isinstance(modalities, str) else list(modalities)
        found: dict[str, _Series] = {}
        for modality in modalities:
            k = dict(keys, **({"Modality": str(modality)} if modality else {}))
            for s in self._call("series query", lambda k=k: self.backend.find_series(k)):
                found.setdefault(s["series_uid"], s)
        series = [s for s in found.values() if query.get("include_derived") or not (
            DERIVED_MARK in s["image_type"] or s["description"].startswith(MAP_SERIES_PREFIX))]
        series.sort(key=lambda s: (s["study_date"], s["study_uid"], s["series_uid"]))
        if query.get("limit"):
            series = series[: int(query["limit"])]
        return [self._item(s) for s in series]

    def read(self, item: Item) -> SpatialImage:
        study, series = self._uids(item)
        with tempfile.TemporaryDirectory(prefix="domainsr-pacs-") as tmp:
            def fetch() -> int:
                for f in Path(tmp).iterdir():  # a failed try may have left some files
                    f.unlink()
                return self.backend.retrieve(study, series, Path(tmp))

            n = self._call(f"retrieve of {item.id}", fetch)
            expected = item.meta.get("n_instances")
            if n == 0 or (expected and n < int(expected)):
                raise StoreError(f"retrieve of {item.id} returned {n} of {expected or '?'} instances", self.url)
            try:
                img = read_dicom_series(tmp)
            except InputError as exc:
                raise InputError(exc.message, item.id) from None
        img.provenance.update(source=item.uri, store=self.url, item_id=item.id)
        return img

    def existing(self, item: Item, run_key: str) -> WriteResult | None:
        study, series = self._uids(item)
        uid = derived_series_uid(series, run_key)
        found = self._call("derived series query", lambda: self.backend.find_series(
            {"StudyInstanceUID": study, "SeriesInstanceUID": uid}))
        if not found:
            return None
        actual, expected, key = self._call("derived series check", lambda: self.backend.stamp(study, uid))
        if expected is None or key != run_key or actual != expected:
            log.info("%s: derived series for run %s is incomplete (%s of %s instances)", item.id,
                     run_key[:12], actual, expected)
            return None
        return WriteResult(uri=self._series_uri(study, uid), extras=self._extras_of(item, run_key))

    def write(self, item: Item, image: SpatialImage, run_key: str,
              extras: dict[str, Path] | None = None) -> WriteResult:
        done = self.existing(item, run_key)
        if done is not None:
            log.info("%s: output of run %s already in the PACS; not written again", item.id, run_key[:12])
            return done
        study, series = self._uids(item)
        uid = derived_series_uid(series, run_key)
        extras = dict(extras or {})
        with tempfile.TemporaryDirectory(prefix="domainsr-derived-") as tmp:
            folder = write_derived_series(image, Path(tmp) / "series", model_name=_model_name(image))
            files = sorted(folder.glob("*.dcm"))
            _stamp(files, uid, run_key)
            maps = dicom_maps(extras, image.domain, files, Path(tmp), item_id=item.id,
                              uid_for=lambda what: _name_uid(what, uid))
            # the maps go first: once the series is complete (``existing``), its maps are there too
            sent = [*maps.values(), *files]
            self._call(f"upload of the derived series of {item.id}", lambda: self.backend.store(sent, study))
            extras.update(maps)
            self._keep_extras(item, run_key, extras)
        result = self.existing(item, run_key)
        if result is None:
            raise StoreError(f"the derived series of {item.id} is incomplete in the PACS after upload", self.url)
        log.info("%s: derived series stored (%d instances)", item.id, len(files))
        return result

    # ------------------------------------------------------------------------------- extras
    def _extras_folder(self, item: Item, run_key: str) -> Path | None:
        return None if self.extras_dir is None else self.extras_dir / item.id / run_key[:16]

    def _extras_of(self, item: Item, run_key: str) -> dict[str, str]:
        folder = self._extras_folder(item, run_key)
        if folder is None or not folder.is_dir():
            return {}
        return {p.name: str(p) for p in sorted(folder.iterdir()) if p.is_file()}

    def _keep_extras(self, item: Item, run_key: str, extras: Mapping[str, Path]) -> None:
        folder = self._extras_folder(item, run_key)
        if not extras:
            return
        if folder is None:
            log.warning("%s: a PACS cannot hold %s; set extras_dir to keep them", item.id, sorted(extras))
            return
        with atomic_path(folder, is_dir=True) as tmp:
            for name, path in extras.items():
                shutil.copy2(path, tmp / extra_file_name(name, path))

    @staticmethod
    def _uids(item: Item) -> tuple[str, str]:
        study, series = item.meta.get("study_uid"), item.meta.get("series_uid")
        if not study or not series:
            raise ConfigError("item has no study/series UID (not listed by a PacsStore)", item.id)
        return str(study), str(series)


def from_url(url: str, *, output: str | os.PathLike[str] | None = None, **options: Any) -> PacsStore:
    """``open_store`` entry point: a PACS keeps the derived series; ``output`` (a local folder)
    receives the extras (audit reports) unless ``extras_dir`` is given."""
    if output is not None:
        options.setdefault("extras_dir", str(output))
    return PacsStore.from_url(url, **options)
