"""What a report may say about its inputs: provenance with patient identifiers pseudonymised.

For medical images (MRI, CT) a report shows no patient identifier by default: patient ID and
name, accession number and study/series UIDs are replaced by keyed hashes
(HMAC-SHA256 with a per-installation secret salt, first 12 hex digits), and file paths, which
often carry patient names, are replaced by a hash of the path plus its suffix. The same input gives
the same pseudonym on the same installation, so a site can match reports to its own records;
nobody without the salt can. Birth date, sex, age, size and weight are dropped. Pass
``allow_identifiers=True`` to show the real values (e.g. inside a hospital's own system).

The same rule covers what the flows print: :func:`public_path` (a medical input's path in logs and
artifacts), :func:`public_stem` (report file names) and :func:`relabel` (error messages).

The salt, first found of:

1. ``$DOMAINSR_PSEUDONYM_SALT``;
2. a Prefect ``Secret`` block (default name ``domainsr-pseudonym-salt``, or
   ``$DOMAINSR_PSEUDONYM_SALT_BLOCK``) on the Prefect API a URL is configured for
   (``PREFECT_API_URL``, a profile, ...): every worker of that server then gives the same
   pseudonyms. A block named in ``$DOMAINSR_PSEUDONYM_SALT_BLOCK`` must be readable (else a
   ConfigError); the default one is used only when it exists (``=none`` turns the look-up off);
3. a random secret created once in ``$XDG_CONFIG_HOME/domainsr/pseudonym_salt``
   (``~/.config/...``) with owner-only permissions (one machine's own salt).

A block's salt is read once per process and API; the salt is never logged.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from domainsr.errors import ConfigError, DomainSRError
from domainsr.image import GeoGeometry, MedicalGeometry, SpatialImage

MEDICAL = ("mri", "ct")
_DICOM_TAGS = {  # DICOM JSON keys of the identifying tags a report would otherwise show
    "patient_id": "00100020", "patient_name": "00100010", "accession_number": "00080050",
    "study_instance_uid": "0020000D",
}
_SHOWN_DICOM = {"modality": None, "manufacturer": "00080070", "model": "00081090", "study_date": "00080020"}


def salt_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "domainsr" / "pseudonym_salt"


SALT_ENV, SALT_BLOCK_ENV = "DOMAINSR_PSEUDONYM_SALT", "DOMAINSR_PSEUDONYM_SALT_BLOCK"
SALT_BLOCK = "domainsr-pseudonym-salt"  #: the default name of the Secret block holding the salt
_BLOCK_SALTS: dict[tuple[str, str], bytes | None] = {}  # (API URL, block name) -> salt (None: no block)


def salt_block_name() -> tuple[str, bool] | None:
    """The Secret block to read the salt from and whether it was named explicitly; None when the
    look-up is off (``$DOMAINSR_PSEUDONYM_SALT_BLOCK=none``)."""
    name = os.environ.get(SALT_BLOCK_ENV, "").strip()
    if name.lower() == "none":
        return None
    return (name, True) if name else (SALT_BLOCK, False)


def block_salt() -> bytes | None:
    """The salt of the Prefect Secret block (see the module docstring), or None when no API URL
    is configured, the look-up is off, or the default block does not exist (cached per process)."""
    block = salt_block_name()
    if block is None:
        return None
    name, explicit = block
    url = _api_url()
    if not url:
        if explicit:
            raise ConfigError(f"{SALT_BLOCK_ENV}={name!r} but no Prefect API is configured (PREFECT_API_URL)")
        return None
    key = (url, name)
    if key not in _BLOCK_SALTS:
        _BLOCK_SALTS[key] = _read_block(name, explicit, url)
    return _BLOCK_SALTS[key]


def _api_url() -> str | None:
    """The Prefect API a client would use: Prefect's current settings once it is imported (the
    settings of this thread's context), else what they would say (without importing Prefect)."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        return get_current_settings().api.url or None
    from domainsr.orchestration import configured_api_url

    return configured_api_url(settings=False)


def _read_block(name: str, explicit: bool, url: str) -> bytes | None:
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name, _sync=True).get()
    except ValueError as exc:  # "Unable to find block document named ..."
        if "unable to find" not in str(exc).lower():
            raise ConfigError(f"cannot read the pseudonym salt from Secret block {name!r} on {url}: "
                              f"{type(exc).__name__}") from None
        if explicit:
            raise ConfigError(f"{SALT_BLOCK_ENV}={name!r}: no Secret block of that name on {url} (create it: "
                              f"Secret(value=...).save({name!r}))") from None
        return None
    except Exception as exc:  # noqa: BLE001 - API down, bad schema...: never a silent other salt
        hint = "" if explicit else f"; {SALT_BLOCK_ENV}=none uses this machine's salt instead"
        raise ConfigError(f"cannot read the pseudonym salt from Secret block {name!r} on {url}: "
                          f"{type(exc).__name__} (is the Prefect server up?{hint})") from None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"Secret block {name!r} must hold a non-empty string (the pseudonym salt)")
    return value.strip().encode()


def installation_salt() -> bytes:
    """The salt: the environment, the Prefect Secret block, or this machine's file (created on first use)."""
    env = os.environ.get(SALT_ENV)
    if env:
        return env.encode()
    from_block = block_salt()
    if from_block is not None:
        return from_block
    path = salt_path()
    if path.exists():
        return path.read_bytes().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # O_EXCL: two processes creating it at once agree on the first one's salt
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_bytes().strip()
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path.read_bytes().strip()


def pseudonym(value: str) -> str:
    """``anon-`` and 12 hex digits of HMAC-SHA256(salt, value)."""
    digest = hmac.new(installation_salt(), str(value).encode("utf-8"), hashlib.sha256).hexdigest()
    return f"anon-{digest[:12]}"


def _dicom_value(template: dict[str, Any], tag: str) -> str:
    item = template.get(tag) or {}
    vals = item.get("Value") or []
    if not vals:
        return ""
    v = vals[0]
    return str(v.get("Alphabetic", "")) if isinstance(v, dict) else str(v)


def path_label(path: str, medical: bool, allow: bool = False) -> str:
    """``path`` as a report, log or artifact may show it: a medical input's path is pseudonymised
    (``anon-<hash><suffix> (path pseudonymised)``) unless ``allow``."""
    if not path or allow or not medical:
        return path
    p = Path(path)
    suffix = "".join(p.suffixes[-2:]) if p.name.endswith(".gz") else p.suffix
    return f"{pseudonym(str(p.resolve()) if p.exists() else path)}{suffix} (path pseudonymised)"


def public_provenance(img: SpatialImage, allow_identifiers: bool = False) -> dict[str, Any]:
    """Provenance and grid description of ``img`` safe to put in a report."""
    medical = img.domain in MEDICAL
    out: dict[str, Any] = {
        "source": path_label(img.source, medical, allow_identifiers),
        "reader": img.provenance.get("reader", img.provenance.get("format", "")),
        "domain": img.domain,
        "shape": list(img.data.shape),
        "dtype": str(img.meta.get("storage_dtype", img.data.dtype)),
        "units": img.units,
        "bands": list(img.band_names),
    }
    g = img.geometry
    if isinstance(g, MedicalGeometry):
        out.update(spacing_mm=[round(s, 4) for s in g.spacing], orientation=g.orientation)
    elif isinstance(g, GeoGeometry):
        out.update(resolution=[round(r, 4) for r in g.res], crs=g.crs.to_string(),
                   bounds=[round(b, 3) for b in g.bounds])
    steps = [h.get("step") for h in img.provenance.get("history", []) if isinstance(h, dict) and h.get("step")]
    if steps:
        out["history"] = steps
    dicom = img.meta.get("dicom")
    if isinstance(dicom, dict):
        tpl = dicom.get("template") or {}
        info: dict[str, Any] = {"modality": dicom.get("modality", "")}
        for key, tag in _SHOWN_DICOM.items():
            if tag:
                info[key] = _dicom_value(tpl, tag)
        for key, tag in _DICOM_TAGS.items():
            value = dicom.get(key) or _dicom_value(tpl, tag)
            if value:
                info[key] = value if allow_identifiers else pseudonym(value)
        series = dicom.get("series_instance_uid")
        if series:
            info["series_instance_uid"] = series if allow_identifiers else pseudonym(series)
        out["dicom"] = info
    if medical:
        out["identifiers"] = "shown (allow_identifiers)" if allow_identifiers else "pseudonymised"
    return out


def public_stem(path: str | Path, domain: str) -> str:
    """The file-name stem of ``path``'s reports: its own name, or for a medical image a pseudonym
    (medical file and folder names often carry the patient's name)."""
    stem = Path(str(path).rstrip("/")).name.split(".")[0] or "input"
    if domain not in MEDICAL:
        return stem
    return path_label(str(path), medical=True).split(".")[0].split(" ")[0]


def public_path(path: str | Path) -> str:
    """``path`` as logs and artifacts may show it: a NIfTI, DICOM or unrecognised input's path
    pseudonymised, a raster's as it is."""
    from domainsr.io import detect_format

    try:
        medical = detect_format(path) not in ("raster", "sentinel2", "landsat8")
    except DomainSRError:
        medical = True
    return path_label(str(path), medical=medical)


def file_labels(files: list[str], subject: str, folder: str | None = None) -> dict[str, str]:
    """What :func:`relabel` should put in place of ``files`` (as given and resolved), their names
    and their folders: ``<file k of SUBJECT>`` / ``<folder of SUBJECT>``."""
    labels: dict[str, str] = {}
    for k, f in enumerate(files, 1):
        labels[f] = labels[str(Path(f).resolve())] = f"<file {k} of {subject}>"
        labels.setdefault(Path(f).name, f"<file {k} of {subject}>")
        for parent in (Path(f).parent, Path(f).resolve().parent):
            if str(parent) not in ("/", "."):
                labels.setdefault(str(parent), f"<folder of {subject}>")
    if folder:
        labels.setdefault(folder, f"<folder of {subject}>")
    return labels


def replace_paths(text: str, labels: dict[str, str]) -> str:
    """``text`` with every key of ``labels`` replaced by its value (longest first)."""
    for old in sorted(labels, key=len, reverse=True):
        text = text.replace(old, labels[old])
    return text


def relabel(exc: DomainSRError, labels: dict[str, str], subject: str | None = None) -> DomainSRError:
    """A copy of ``exc`` (same type) whose message has its paths replaced by ``labels`` and whose
    subject is ``subject`` (default: the label of its own path). Raise it ``from None``: a chained
    original would show the paths in a logged traceback."""
    path = subject if subject is not None else (labels.get(exc.path, exc.path) if exc.path else None)
    return type(exc)(replace_paths(exc.message, labels), path)
