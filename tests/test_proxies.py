"""The proxy configurations of docs/deployment.md, run as written: real nginx and HAProxy ending
TLS in front of a real gunicorn, a WebSocket client connecting through them over TLS.

The configurations live in examples/proxy/, which the page includes; only the addresses, the
port and the certificate are replaced, each exactly once. Binding port 443 needs privileges
and a port nobody else holds, so the proxy listens on a free port: a browser on the default
port (``https://localhost``) sends ``Host: localhost`` and ``Origin: https://localhost``,
which the tests send on the free port just the same.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple

import pytest

from . import programs
from .helpers import ROOT, Gunicorn, Ws, pg_notify, replace_once, serve, wait_for, wait_sockets
from .proxy_process import ProxyProcess, check_haproxy

EXAMPLES = ROOT / "examples" / "proxy"
#: What the examples name, replaced by what the tests run.
GUNICORN = "127.0.0.1:8000"


def program(name: str) -> str:
    """The path of ``name``, or the test is skipped naming it (tests/programs.py)."""
    return programs.require(name)


def unprivileged_group() -> str:
    """The group of ``nobody``: ``nogroup`` on Debian, ``nobody`` elsewhere."""
    import grp

    try:
        grp.getgrnam("nogroup")
        return "nogroup"
    except KeyError:
        return "nobody"


# ------------------------------------------------------------------ a certificate


def self_signed(directory: Path) -> Tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "localhost.crt", directory / "localhost.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


# ------------------------------------------------------------------ the proxies


class Proxy(ProxyProcess):
    """A proxy process ending TLS on 127.0.0.1:``port`` in front of gunicorn on ``upstream``."""

    def __init__(self, upstream: int, *, edit: Optional[Dict[str, str]] = None) -> None:
        super().__init__(program(self.name))
        self.cert, self.key = self_signed(self.dir)
        self.run(self.configure(upstream, edit or {}))

    def configure(self, upstream: int, edit: Dict[str, str]) -> list:
        """Write the configuration into ``self.dir``; return the command that runs it."""
        raise NotImplementedError

    def example(self, filename: str, edit: Dict[str, str]) -> str:
        text = (EXAMPLES / filename).read_text()
        for old, new in edit.items():
            text = replace_once(text, old, new)
        return text

    def context(self) -> ssl.SSLContext:
        """A client context trusting only this proxy's certificate."""
        return ssl.create_default_context(cafile=str(self.cert))


class Nginx(Proxy):
    """nginx in the foreground (``daemon off``), everything it writes in its own folder."""

    name = "nginx"

    def configure(self, upstream: int, edit: Dict[str, str]) -> list:
        site = self.example("nginx.conf", {
            "listen 443 ssl;": f"listen 127.0.0.1:{self.port} ssl;",
            "/etc/nginx/tls/app.example.com.crt": str(self.cert),
            "/etc/nginx/tls/app.example.com.key": str(self.key),
            f"http://{GUNICORN};": f"http://127.0.0.1:{upstream};",
            **edit})
        (self.dir / "site.conf").write_text(site)
        d = self.dir
        temp = "\n".join(f"    {kind}_temp_path {d / kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        # As root, nginx's workers run as an unprivileged user: they only need the temp paths.
        user = f"user nobody {unprivileged_group()};\n" if os.geteuid() == 0 else ""
        (d / "nginx.conf").write_text(f"""{user}daemon off;
worker_processes 1;
pid {d / "nginx.pid"};
error_log {self.log_path} info;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temp}
    include {d / "site.conf"};
}}
""")
        d.chmod(0o755)
        return [self.binary, "-p", str(d), "-e", str(self.log_path), "-c", str(d / "nginx.conf")]


class HAProxy(Proxy):
    """HAProxy in the foreground (``-db``)."""

    name = "haproxy"

    def configure(self, upstream: int, edit: Dict[str, str]) -> list:
        pem = self.dir / "localhost.pem"
        pem.write_text(self.cert.read_text() + self.key.read_text())
        config = self.example("haproxy.cfg", {
            "bind :443 ssl crt /etc/haproxy/tls/app.example.com.pem":
                f"bind 127.0.0.1:{self.port} ssl crt {pem}",
            f"server gunicorn {GUNICORN}": f"server gunicorn 127.0.0.1:{upstream}",
            **edit})
        (self.dir / "haproxy.cfg").write_text(config)
        check_haproxy(self.binary, self.dir / "haproxy.cfg")
        return [self.binary, "-db", "-f", str(self.dir / "haproxy.cfg")]


# ------------------------------------------------------------------ clients


def tls_upgrade(proxy: Proxy, host: str, origin: str,
                headers: Optional[Dict[str, str]] = None) -> int:
    """Send an upgrade request through ``proxy`` over TLS with these headers; the status."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    with proxy.context().wrap_socket(raw, server_hostname="localhost") as sock:
        lines = ["GET /ws HTTP/1.1", f"Host: {host}", f"Origin: {origin}", "Upgrade: websocket",
                 "Connection: Upgrade", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                 "Sec-WebSocket-Version: 13", *(f"{k}: {v}" for k, v in (headers or {}).items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(1024)
            if not chunk:
                break
            head += chunk
    assert head.startswith(b"HTTP/1.1 "), head
    return int(head.split()[1])


def tls_get(proxy: Proxy, path: str) -> Tuple[int, str]:
    """A plain GET through ``proxy`` over TLS: (status, body)."""
    import http.client

    conn = http.client.HTTPSConnection("localhost", proxy.port, context=proxy.context(),
                                       timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


# ------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def app(pg_dsn: str) -> Iterator[Gunicorn]:
    g = serve(pg_dsn).wait_up()
    yield g
    g.stop()


@pytest.fixture(params=[Nginx, HAProxy], ids=["nginx", "haproxy"], scope="module")
def proxy(request: pytest.FixtureRequest, app: Gunicorn) -> Iterator[Proxy]:
    started = request.param(app.port)
    yield started
    started.stop()


def test_the_page_own_origin_connects_over_tls_and_receives(proxy, sender):
    page = f"https://localhost:{proxy.port}"
    ws = Ws(f"wss://localhost:{proxy.port}/ws", headers={"Origin": page},
            ssl_context=proxy.context())
    try:
        pg_notify(sender, "pgws", 'default,{"through": "the proxy"}')
        assert ws.recv_json()["payload"] == {"through": "the proxy"}
    finally:
        ws.close()


def test_other_origins_get_403(proxy):
    port = proxy.port
    assert tls_upgrade(proxy, f"localhost:{port}", f"https://localhost:{port}") == 101
    assert tls_upgrade(proxy, f"localhost:{port}", "https://evil.example") == 403
    assert tls_upgrade(proxy, f"localhost:{port}", f"https://evil.example:{port}") == 403
    # the same host over plain http is another origin: the proxy says the page is https
    assert tls_upgrade(proxy, f"localhost:{port}", f"http://localhost:{port}") == 403
    # a client cannot say otherwise: the proxy replaces the header
    assert tls_upgrade(proxy, f"localhost:{port}", f"http://localhost:{port}",
                       {"X-Forwarded-Proto": "http"}) == 403
    assert tls_upgrade(proxy, f"localhost:{port}", f"https://localhost:{port}",
                       {"X-Forwarded-Proto": "http"}) == 101


def test_a_page_on_the_default_port(proxy):
    """What a browser on https://localhost (port 443) sends, Host with or without the port."""
    assert tls_upgrade(proxy, "localhost", "https://localhost") == 101
    assert tls_upgrade(proxy, "localhost:443", "https://localhost") == 101
    assert tls_upgrade(proxy, "localhost", "https://localhost:443") == 101
    assert tls_upgrade(proxy, "localhost", "http://localhost") == 403
    assert tls_upgrade(proxy, "localhost", "https://localhost:8443") == 403


def test_plain_requests_go_through_too(proxy):
    assert tls_get(proxy, "/healthz") == (200, '{"status": "ok"}')


def test_nginx_passing_host_without_its_port_refused_the_page(app):
    """The block these docs had (``Host $host``) dropped the port: on a port other than 443
    the page's own origin was refused."""
    proxy = Nginx(app.port, edit={"proxy_set_header Host $http_host;":
                                  "proxy_set_header Host $host;"})
    try:
        page = f"https://localhost:{proxy.port}"
        assert tls_upgrade(proxy, f"localhost:{proxy.port}", page) == 403
    finally:
        proxy.stop()


@pytest.mark.parametrize("kind, cap", [(Nginx, {"limit_conn per_address 50;":
                                                 "limit_conn per_address 2;"}),
                                         (HAProxy, {"gt 50 }": "gt 2 }"})],
                         ids=["nginx", "haproxy"])
def test_the_proxy_caps_the_sockets_of_one_address(app, kind, cap):
    """The examples' per-address cap (50, here 2): the third socket of one address gets 503
    from the proxy, gunicorn never sees it, and a closed socket makes room again."""
    proxy = kind(app.port, edit=cap)
    page = f"https://localhost:{proxy.port}"
    socks = []
    try:
        socks = [Ws(f"wss://localhost:{proxy.port}/ws", headers={"Origin": page},
                    ssl_context=proxy.context()) for _ in range(2)]
        wait_sockets(app, 2)
        assert tls_upgrade(proxy, f"localhost:{proxy.port}", page) == 503
        assert app.stats()["sockets"] == 2
        socks.pop().close()
        wait_for(lambda: tls_upgrade(proxy, f"localhost:{proxy.port}", page) == 101,
                 message="room for a socket again")
    finally:
        for ws in socks:
            ws.close()
        proxy.stop()


def test_the_deployment_page_includes_the_examples():
    page = (ROOT / "docs" / "deployment.md").read_text()
    for filename in ("nginx.conf", "haproxy.cfg"):
        assert f'--8<-- "examples/proxy/{filename}"' in page  # the files, not copies
