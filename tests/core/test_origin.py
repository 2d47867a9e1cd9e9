"""The same-origin check: scheme, host and default ports, as rules and against a real endpoint."""

from __future__ import annotations

from typing import Dict, Iterator, List, Tuple

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pgws_sync._core.origin import origin_allowed
from pgws_sync._core.origin import forwarded_scheme, request_scheme

from ..helpers import Gunicorn, raw_upgrade, serve

DEFAULT_PORT = {"http": 80, "https": 443}
OTHER = {"http": "https", "https": "http"}

hosts = st.from_regex(r"[a-z][a-z0-9-]{0,15}(\.[a-z][a-z0-9-]{0,10}){0,2}", fullmatch=True)
ports = st.integers(min_value=1, max_value=65535)
schemes = st.sampled_from(["http", "https"])


def test_scheme_rules():
    # an http page is not the https site, where the request's scheme is known
    assert not origin_allowed("http://app.example", "app.example", scheme="https")
    assert origin_allowed("https://app.example", "app.example", scheme="https")
    assert not origin_allowed("https://app.example", "app.example", scheme="http")
    # unknown (plain http at the server, maybe a TLS proxy that says nothing): as before
    assert origin_allowed("http://app.example", "app.example")
    assert origin_allowed("https://app.example", "app.example")
    # default ports: https://host is host:443, http://host is host:80
    assert origin_allowed("https://app.example", "app.example:443", scheme="https")
    assert origin_allowed("https://app.example:443", "app.example", scheme="https")
    assert not origin_allowed("https://app.example", "app.example:80", scheme="https")
    assert not origin_allowed("https://app.example", "app.example:8443", scheme="https")
    assert origin_allowed("http://app.example", "app.example:80", scheme="http")
    assert not origin_allowed("http://app.example:443", "app.example", scheme="https")
    # listed origins are taken as listed, whatever the request's scheme
    assert origin_allowed("http://legacy.example", "app.example", ["http://legacy.example"],
                          scheme="https")


@given(host=hosts, port=ports, scheme=schemes)
def test_the_page_own_origin_and_no_other_scheme(host, port, scheme):
    assert origin_allowed(f"{scheme}://{host}:{port}", f"{host}:{port}", scheme=scheme)
    assert origin_allowed(f"{scheme}://{host}:{port}", f"{host}:{port}")
    assert not origin_allowed(f"{OTHER[scheme]}://{host}:{port}", f"{host}:{port}",
                              scheme=scheme)
    assert not origin_allowed(f"{scheme}://{host}.evil:{port}", f"{host}:{port}", scheme=scheme)


@given(host=hosts, scheme=schemes)
def test_a_default_port_equals_no_port(host, scheme):
    port = DEFAULT_PORT[scheme]
    for known in (scheme, None):
        assert origin_allowed(f"{scheme}://{host}", f"{host}:{port}", scheme=known)
        assert origin_allowed(f"{scheme}://{host}:{port}", host, scheme=known)
        assert not origin_allowed(f"{scheme}://{host}", f"{host}:{DEFAULT_PORT[OTHER[scheme]]}",
                                  scheme=known)


@pytest.mark.parametrize("environ, stated", [
    ({}, None),
    ({"HTTP_X_FORWARDED_PROTO": "https"}, "https"),
    ({"HTTP_X_FORWARDED_PROTO": "HTTP"}, "http"),
    ({"HTTP_X_FORWARDED_PROTO": "https, http"}, "http"),  # the nearest proxy's, last
    ({"HTTP_X_FORWARDED_PROTO": "wss"}, "https"),
    ({"HTTP_X_FORWARDED_PROTO": "gopher"}, None),
    ({"HTTP_FORWARDED": "for=192.0.2.60;proto=https;by=203.0.113.43"}, "https"),
    ({"HTTP_FORWARDED": 'for="[2001:db8::1]:80";proto="http"'}, "http"),
    ({"HTTP_FORWARDED": "proto=http, for=192.0.2.1;proto=https"}, "https"),
    ({"HTTP_FORWARDED": "proto=https", "HTTP_X_FORWARDED_PROTO": "http"}, "https"),
    ({"HTTP_FORWARDED": "for=192.0.2.1", "HTTP_X_FORWARDED_PROTO": "https"}, "https"),
])
def test_forwarded_scheme(environ, stated):
    assert forwarded_scheme(environ) == stated


def test_the_request_scheme_trusts_headers_only_when_told():
    forwarded = {"HTTP_X_FORWARDED_PROTO": "https", "wsgi.url_scheme": "http"}
    assert request_scheme(forwarded) is None
    assert request_scheme(forwarded, trust_forwarded=True) == "https"
    assert request_scheme({"wsgi.url_scheme": "https"}) == "https"
    assert request_scheme({"wsgi.url_scheme": "http"}) is None  # maybe a silent TLS proxy
    assert request_scheme({"wsgi.url_scheme": "https", "HTTP_FORWARDED": "proto=http"},
                          trust_forwarded=True) == "http"


# ------------------------------------------------ against a real endpoint under gunicorn


@pytest.fixture(scope="module")
def servers(pg_dsn: str) -> Iterator[Dict[str, Gunicorn]]:
    made = {"plain": serve(pg_dsn), "trusting": serve(pg_dsn, options={"trust_forwarded": True})}
    try:
        for g in made.values():
            g.wait_up()
        yield made
    finally:
        for g in made.values():
            g.stop()


# (server, Host, Origin, more headers, status). gunicorn itself trusts X-Forwarded-Proto from
# 127.0.0.1 (its forwarded_allow_ips): the WSGI scheme is then https. It never reads Forwarded.
CASES: List[Tuple[str, str, str, Dict[str, str], int]] = [
    ("plain", "app.test:8080", "http://app.test:8080", {}, 101),
    ("plain", "app.test:8080", "https://app.test:8080", {}, 101),  # scheme unknown
    ("plain", "app.test:8080", "http://app.test:8080", {"X-Forwarded-Proto": "https"}, 403),
    ("plain", "app.test:8080", "https://app.test:8080", {"X-Forwarded-Proto": "https"}, 101),
    ("plain", "app.test", "https://app.test", {"X-Forwarded-Proto": "https"}, 101),
    ("plain", "app.test:443", "https://app.test", {"X-Forwarded-Proto": "https"}, 101),
    ("plain", "app.test", "https://app.test:443", {"X-Forwarded-Proto": "https"}, 101),
    ("plain", "app.test", "http://app.test", {"X-Forwarded-Proto": "https"}, 403),
    ("plain", "app.test:80", "https://app.test", {"X-Forwarded-Proto": "https"}, 403),
    ("plain", "app.test:8443", "https://app.test", {"X-Forwarded-Proto": "https"}, 403),
    ("plain", "app.test", "https://evil.test", {"X-Forwarded-Proto": "https"}, 403),
    # Forwarded is read only by an endpoint told to trust it
    ("plain", "app.test:8080", "http://app.test:8080", {"Forwarded": "proto=https"}, 101),
    ("trusting", "app.test:8080", "http://app.test:8080", {"Forwarded": "proto=https"}, 403),
    ("trusting", "app.test:8080", "https://app.test:8080",
     {"Forwarded": "for=192.0.2.1;proto=https"}, 101),
    ("trusting", "app.test:8080", "https://app.test:8080", {"Forwarded": "proto=http"}, 403),
    ("trusting", "app.test:8080", "http://app.test:8080", {"Forwarded": "proto=http"}, 101),
    ("trusting", "app.test", "https://app.test", {"Forwarded": "proto=https"}, 101),
    ("trusting", "app.test:443", "https://app.test", {"Forwarded": "proto=https"}, 101),
    ("trusting", "app.test", "http://app.test", {"Forwarded": "proto=https"}, 403),
]


def test_origins_against_a_real_endpoint(servers):
    wrong = []
    for name, host, origin, headers, status in CASES:
        sock, head = raw_upgrade(servers[name].port,
                                 headers={"Host": host, "Origin": origin, **headers})
        sock.close()
        if not head.startswith(f"HTTP/1.1 {status} ".encode()):
            wrong.append((name, host, origin, headers, status, head[:40]))
    assert wrong == []
    assert ("refused a socket from origin 'http://app.test': the request came for host "
            "'app.test' over https") in servers["plain"].log()
