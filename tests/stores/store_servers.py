"""Loopback servers for the store tests: a static file server with HTTP Range support (and
optional basic auth and injected failures), a forwarding proxy that can fail on purpose, and the
Orthanc process."""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    return free_port()


@dataclass
class Failures:
    """Let ``skip`` matching requests through, then answer the next ``count`` of them with
    ``status`` (and ``headers``, e.g. ``Retry-After``) instead of serving them."""

    count: int = 0
    status: int = 503
    methods: tuple[str, ...] = ("GET", "HEAD", "POST")
    skip: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def set(self, count: int, methods: tuple[str, ...] = ("GET", "HEAD", "POST"), skip: int = 0,
            status: int = 503, headers: dict[str, str] | None = None) -> None:
        with self.lock:
            self.count, self.methods, self.skip, self.status = count, methods, skip, status
            self.headers = dict(headers or {})

    def take(self, method: str) -> int | None:
        with self.lock:
            if method not in self.methods or self.count <= 0:
                return None
            if self.skip > 0:
                self.skip -= 1
                return None
            self.count -= 1
            return self.status


class _RangeHandler(SimpleHTTPRequestHandler):
    """SimpleHTTPRequestHandler serves whole files only; this adds single byte ranges (206,
    Content-Range, 416), basic auth, a request log and injected failures."""

    server: RangeServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # requests are recorded in server.log instead of stderr

    def _gate(self) -> bool:
        self.server.record(self.command, self.path, self.headers.get("Range"), self.headers.get("Authorization"))
        status = self.server.failures.take(self.command)
        if status is not None and not self.server.failures.headers:
            self.send_error(status, "injected failure")
            return False
        if status is not None:
            self.send_response(status, "injected failure")
            for k, v in self.server.failures.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        if self.server.credentials and self.headers.get("Authorization") != self.server.credentials:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        return True

    def do_GET(self) -> None:
        if self._gate():
            super().do_GET()

    def do_HEAD(self) -> None:
        if self._gate():
            super().do_HEAD()

    def send_head(self) -> Any:
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().send_head()
        m = _RANGE.match(spec.strip())
        size = path.stat().st_size
        if not m or (not m.group(1) and not m.group(2)):
            return super().send_head()  # multi-range or malformed: RFC 9110 allows the full answer
        if m.group(1):
            start = int(m.group(1))
            end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        else:  # suffix range: the last N bytes
            start, end = max(0, size - int(m.group(2))), size - 1
        if start >= size or start > end:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        with open(path, "rb") as fh:
            fh.seek(start)
            body = fh.read(end - start + 1)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(str(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return BytesIO(body)


class RangeServer(ThreadingHTTPServer):
    """Static files from ``root`` on 127.0.0.1 with Range support; ``log`` lists
    ``(method, path, range, authorization)`` of every request."""

    daemon_threads = True

    def __init__(self, root: Path, credentials: tuple[str, str] | None = None,
                 tls: dict[str, Path] | None = None) -> None:
        super().__init__(("127.0.0.1", 0), partial(_RangeHandler, directory=str(root)))
        self.scheme = "http"
        if tls is not None:  # HTTPS with the certificate of make_pki()
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(tls["cert"], tls["key"])
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
            self.scheme = "https"
        self.failures = Failures()
        self.log: list[tuple[str, str, str | None, str | None]] = []
        self._lock = threading.Lock()
        self.credentials = None if credentials is None else "Basic " + base64.b64encode(
            f"{credentials[0]}:{credentials[1]}".encode()).decode()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # refused TLS handshakes and dropped clients are part of the tests

    def record(self, *entry: Any) -> None:
        with self._lock:
            self.log.append(entry)

    def __enter__(self) -> RangeServer:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


# ------------------------------------------------------------------------------ forwarding proxy

class _ProxyHandler(BaseHTTPRequestHandler):
    server: FlakyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self) -> None:
        body = self._body()
        self.server.seen.append(self.command)
        status = self.server.failures.take(self.command)
        if status is not None:
            self.send_response(status)
            for k, v in self.server.failures.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("transfer-encoding", "connection", "content-length", "host")}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection("127.0.0.1", self.server.target_port, timeout=60)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _forward


class FlakyProxy(ThreadingHTTPServer):
    """Forwards HTTP to 127.0.0.1:``target_port``; ``failures`` answers chosen requests itself."""

    daemon_threads = True

    def __init__(self, target_port: int) -> None:
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.target_port = target_port
        self.failures = Failures()
        self.seen: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def __enter__(self) -> FlakyProxy:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


# -------------------------------------------------------------------------------- STAC API

class _ApiHandler(BaseHTTPRequestHandler):
    server: StacApiServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _json(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/geo+json" if body.get("type") == "FeatureCollection"
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _search(self, params: dict[str, Any]) -> None:
        self.server.searches.append(params)
        ids, collections = params.get("ids"), params.get("collections")
        items = [it for it in self.server.items
                 if (not ids or it["id"] in ids) and (not collections or it.get("collection") in collections)]
        self._json({"type": "FeatureCollection", "features": items, "links": []})

    def do_GET(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(self.path)
        if parts.path in ("", "/"):
            self._json(self.server.landing())
        elif parts.path == "/search":
            q = {k: v[0] for k, v in parse_qs(parts.query).items()}
            for key in ("ids", "collections", "bbox"):
                if key in q:
                    q[key] = q[key].split(",")
            self._search(q)
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path.split("?")[0] == "/search":
            self._search(json.loads(body or b"{}"))
        else:
            self.send_error(404)


class StacApiServer(ThreadingHTTPServer):
    """A minimal STAC API (landing page advertising item search, and /search by GET or POST):
    it records each search's parameters and answers with ``items`` filtered by ids/collections
    only, so a test sees what the client asked the API to do."""

    daemon_threads = True

    def __init__(self, items: list[dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.items = items
        self.searches: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def landing(self) -> dict[str, Any]:
        return {"type": "Catalog", "id": "test-api", "stac_version": "1.1.0", "description": "loopback STAC API",
                "conformsTo": ["https://api.stacspec.org/v1.0.0/core",
                               "https://api.stacspec.org/v1.0.0/item-search"],
                "links": [{"rel": "self", "href": self.url + "/", "type": "application/json"},
                          {"rel": "root", "href": self.url + "/", "type": "application/json"},
                          {"rel": "search", "href": self.url + "/search", "type": "application/geo+json",
                           "method": "GET"},
                          {"rel": "search", "href": self.url + "/search", "type": "application/geo+json",
                           "method": "POST"}]}

    def __enter__(self) -> StacApiServer:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


# ------------------------------------------------------------------------------- QIDO-RS fake

MORE_RESULTS = ('299 {+service}: "The number of results exceeded the maximum supported by the server. '
                'Additional results can be requested."')


def qido_series(n: int, start: int = 0) -> list[dict[str, Any]]:
    """``n`` series (or instance) records in DICOM JSON, UIDs numbered from ``start``."""
    return [{"0020000D": {"vr": "UI", "Value": ["1.2.3.4"]},
             "0020000E": {"vr": "UI", "Value": [f"1.2.3.4.{start + i}"]},
             "00080018": {"vr": "UI", "Value": [f"1.2.3.4.{start + i}.1"]},
             "00080060": {"vr": "CS", "Value": ["MR"]}, "00080020": {"vr": "DA", "Value": ["20240101"]},
             "00201209": {"vr": "IS", "Value": [1]}, "00080008": {"vr": "CS", "Value": ["ORIGINAL"]}}
            for i in range(n)]


class _QidoHandler(BaseHTTPRequestHandler):
    server: QidoServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(self.path)
        offset = int(parse_qs(parts.query).get("offset", ["0"])[0])
        self.server.offsets.append(offset)
        if parts.path.endswith("/metadata"):
            page, warning = [{}], None
        else:
            page, warning = self.server.page(offset)
        body = json.dumps(page).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/dicom+json")
        if warning:
            self.send_header("Warning", warning)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class QidoServer(ThreadingHTTPServer):
    """A QIDO-RS server over ``total`` series (``None``: endless), ``limit`` per answer.

    ``ignore_offset``: every answer is the first page; ``warning``: the ``Warning`` header of a
    truncated answer (``always_warn``: of every answer). ``offsets`` lists each request's offset."""

    daemon_threads = True

    def __init__(self, total: int | None, limit: int = 100, *, ignore_offset: bool = False,
                 warning: str = MORE_RESULTS, always_warn: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _QidoHandler)
        self.total, self.limit, self.ignore_offset = total, limit, ignore_offset
        self.warning, self.always_warn = warning, always_warn
        self.offsets: list[int] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    def page(self, offset: int) -> tuple[list[dict[str, Any]], str | None]:
        start = 0 if self.ignore_offset else offset
        left = self.limit if self.total is None else max(0, min(self.limit, self.total - start))
        truncated = self.total is None or start + left < self.total
        return qido_series(left, start), self.warning if truncated or self.always_warn else None

    @property
    def url(self) -> str:
        return f"dicomweb+http://127.0.0.1:{self.server_address[1]}/dicom-web"

    def __enter__(self) -> QidoServer:  # noqa: PYI034
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


# ---------------------------------------------------------------------------------------- Orthanc

ORTHANC_BINARY = "/usr/sbin/Orthanc"
DICOMWEB_PLUGINS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)


def install_orthanc() -> str | None:
    """Install Orthanc + its DICOMweb plugin with tests/stores/install_services.sh when missing.
    Returns ``None`` when ready, else why not (for a skip message)."""
    if Path(ORTHANC_BINARY).exists() and any(Path(p).exists() for p in DICOMWEB_PLUGINS):
        return None
    script = HERE / "install_services.sh"
    try:
        proc = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot run {script.name}: {exc}"
    if proc.returncode != 0:
        return f"{script.name} failed (exit {proc.returncode}): {(proc.stdout + proc.stderr).strip()[-400:]}"
    if not Path(ORTHANC_BINARY).exists():
        return f"{script.name} ran but {ORTHANC_BINARY} is missing"
    return None


@dataclass
class Orthanc:
    """A running Orthanc: loopback HTTP (basic auth) + DICOM (AE-title and host checked)."""

    http_port: int
    dicom_port: int
    username: str
    password: str
    aet: str
    client_aet: str
    process: subprocess.Popen
    workdir: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log_text(self) -> str:
        return (self.workdir / "orthanc.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_orthanc(workdir: Path, username: str, password: str, client_aet: str) -> Orthanc:
    """Start Orthanc with tests/stores/orthanc/orthanc.json (ports, storage, users and the allowed
    client AE filled in) and wait until ``/system`` answers with the credentials."""
    import requests

    config = json.loads((HERE / "orthanc" / "orthanc.json").read_text())
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config.update(
        StorageDirectory=str(storage), IndexDirectory=str(storage),
        Plugins=[p for p in DICOMWEB_PLUGINS if Path(p).exists()],
        HttpPort=http_port, DicomPort=dicom_port, RegisteredUsers={username: password},
        DicomModalities={"domainsr": {"AET": client_aet, "Host": "127.0.0.1", "Port": free_port(),
                                      "AllowEcho": True, "AllowFind": True, "AllowGet": True,
                                      "AllowMove": False, "AllowStore": True}},
    )
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=1))
    os.chmod(cfg, 0o600)
    with open(workdir / "orthanc.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([ORTHANC_BINARY, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = Orthanc(http_port, dicom_port, username, password, config["DicomAet"], client_aet, proc, workdir)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{server.log_text()[-2000:]}")
        try:
            r = requests.get(f"{server.http_url}/system", auth=(username, password), timeout=2)
            if r.status_code == 200 and r.json().get("DicomPort") == dicom_port:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"Orthanc did not answer within 60 s:\n{server.log_text()[-2000:]}")


# ------------------------------------------------------------------------------------------- TLS

def make_pki(folder: Path) -> dict[str, Path]:
    """A throw-away CA (``ca``) and a server certificate/key for 127.0.0.1 signed by it."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def cert(subject: str, key: Any, issuer: str, issuer_key: Any, ca: bool) -> Any:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_cert = cert("DomainSR test CA", ca_key, "DomainSR test CA", ca_key, True)
    srv_cert = cert("127.0.0.1", srv_key, "DomainSR test CA", ca_key, False)
    paths = {"ca": folder / "ca.pem", "cert": folder / "server.pem", "key": folder / "server.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(srv_cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return paths
