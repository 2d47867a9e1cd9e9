"""The same-origin check: a browser's Origin against the request's own scheme, host and port."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional
from urllib.parse import urlsplit

#: The port a URL of each scheme means when it names none.
DEFAULT_PORTS = {"http": 80, "https": 443}

#: What proxies write in a forwarded scheme, as the scheme of the page.
_SCHEMES = {"http": "http", "https": "https", "ws": "http", "wss": "https"}


def origin_allowed(origin: Optional[str], host: Optional[str], allowed: Iterable[str] = (), *,
                   scheme: Optional[str] = None) -> bool:
    """Decide whether a browser on ``origin`` may open a socket on ``host``.

    A missing Origin header (a non-browser client) is allowed; so is any origin
    listed in ``allowed`` (compared as ``scheme://host[:port]``, case-insensitively),
    or anything when ``allowed`` contains ``"*"``. Otherwise the origin must be the
    request's own: the same host and port as the Host header and, when the request's
    ``scheme`` is known (``"http"`` or ``"https"``), the same scheme. A port left out
    is the scheme's default: ``https://host`` is ``host:443``. With ``scheme`` None
    (unknown) the origin's own scheme says which default a Host without a port means.
    """
    if origin is None:
        return True
    origin = origin.strip().lower().rstrip("/")
    allowed_set = {a.strip().lower().rstrip("/") for a in allowed}
    if "*" in allowed_set or origin in allowed_set:
        return True
    try:
        parts = urlsplit(origin)
        origin_host, origin_port = parts.hostname, parts.port
    except ValueError:
        return False
    if not origin_host or parts.scheme not in DEFAULT_PORTS or not host:
        return False
    if scheme is not None and parts.scheme != scheme:
        return False
    try:
        target = urlsplit("//" + host.strip().lower())
        target_host, target_port = target.hostname, target.port
    except ValueError:
        return False
    origin_default = DEFAULT_PORTS[parts.scheme]
    target_default = DEFAULT_PORTS.get(scheme or parts.scheme, origin_default)
    return (origin_host == target_host
            and (origin_port or origin_default) == (target_port or target_default))


def forwarded_scheme(environ: Mapping[str, object]) -> Optional[str]:
    """The scheme a proxy says the client used: ``Forwarded: proto=`` (the last element that
    has one: the nearest proxy's), else ``X-Forwarded-Proto`` (its last value); None when
    neither says ``http`` or ``https`` (``ws``/``wss`` count as those)."""
    forwarded = environ.get("HTTP_FORWARDED")
    if isinstance(forwarded, str):
        for element in reversed(forwarded.split(",")):
            for pair in element.split(";"):
                name, _, value = pair.partition("=")
                if name.strip().lower() == "proto":
                    return _SCHEMES.get(value.strip().strip('"').lower())
    proto = environ.get("HTTP_X_FORWARDED_PROTO")
    if isinstance(proto, str) and proto.strip():
        return _SCHEMES.get(proto.split(",")[-1].strip().lower())
    return None


def request_scheme(environ: Mapping[str, object], *,
                   trust_forwarded: bool = False) -> Optional[str]:
    """The scheme the browser used for this request, where it is known; else None.

    With ``trust_forwarded``, what the proxy's header says (:func:`forwarded_scheme`)
    when it says something. Else ``"https"`` when the WSGI server says so (its own TLS,
    or gunicorn trusting its proxy's header: ``forwarded_allow_ips``). Plain ``http``
    at the server is not taken as known: it is also what a request through a TLS proxy
    that says nothing looks like.
    """
    if trust_forwarded:
        stated = forwarded_scheme(environ)
        if stated is not None:
            return stated
    return "https" if environ.get("wsgi.url_scheme") == "https" else None
