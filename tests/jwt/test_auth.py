"""JWT checks and claims as postgres-websockets does them (pure: no sockets, no database)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from pathlib import Path
from typing import Any, Dict

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from pgws_sync import ConfigError, JwtAuth, PgwsError
from pgws_sync.errors import TokenRefused
from pgws_sync.errors import Refused
from pgws_sync.jwt.auth import (
    MISSING_MODE,
    NO_ALLOWED_CHANNELS,
    TOKEN_EXPIRED,
    Grant,
    decode_base64url,
    grant_for,
    load_secret,
    split_request,
)

SECRET = "reallyreallyreallyreallyverysafe"  # the secret of postgres-websockets' own tests


def token(claims: Dict[str, Any], key: Any = SECRET, alg: str = "HS256", **headers: Any) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # short test keys
        return jwt.encode(claims, key, algorithm=alg, headers=headers or None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def refusal(auth: JwtAuth, tok: Any, channel: Any = None, **kw: Any) -> str:
    with pytest.raises(TokenRefused) as caught:
        auth.authorize(tok, channel, **kw)
    assert caught.value.status == 400
    return caught.value.body


@pytest.fixture
def auth() -> JwtAuth:
    return JwtAuth(SECRET)


# ------------------------------------------- postgres-websockets' claim cases


def test_expired_token_is_refused_with_token_expired(auth: JwtAuth) -> None:
    assert refusal(auth, token({"mode": "r", "channel": "test", "exp": 1})) == TOKEN_EXPIRED


def test_token_without_channel_claims_opens_the_requested_channel(auth: JwtAuth) -> None:
    grant = auth.authorize(token({"mode": "r"}), "test")
    assert grant == Grant(("test",), "r", {"mode": "r"}, None)


def test_old_style_channel_claim_opens_that_channel(auth: JwtAuth) -> None:
    grant = auth.authorize(token({"mode": "r", "channel": "test"}), "test")
    assert grant.channels == ("test",) and grant.claims == {"mode": "r", "channel": "test"}


def test_no_requested_channel_gives_every_channel_of_the_token(auth: JwtAuth) -> None:
    claims = {"mode": "r", "channels": ["test", "another test"]}
    grant = auth.authorize(token(claims))
    assert grant.channels == ("test", "another test") and grant.claims == claims


def test_requested_channel_from_channels_claim_gives_only_that_channel(auth: JwtAuth) -> None:
    grant = auth.authorize(token({"mode": "r", "channels": ["test", "test2"]}), "test")
    assert grant.channels == ("test",)


def test_requesting_a_channel_not_in_the_claims_is_refused(auth: JwtAuth) -> None:
    tok = token({"mode": "r", "channels": ["test", "test2"]})
    assert refusal(auth, tok, "notAllowed") == NO_ALLOWED_CHANNELS


def test_token_without_mode_is_refused(auth: JwtAuth) -> None:
    assert refusal(auth, token({"channels": ["test", "test2"]}), "test") == MISSING_MODE
    assert refusal(auth, token({"mode": 1, "channel": "test"})) == MISSING_MODE


def test_channel_and_channels_claims_are_merged_without_repeats(auth: JwtAuth) -> None:
    tok = token({"mode": "rw", "channel": "b", "channels": ["a", "b", "c", "a"]})
    assert auth.authorize(tok).channels == ("b", "a", "c")
    assert auth.authorize(tok, "c").channels == ("c",)


def test_token_without_channels_and_no_requested_channel_is_refused(auth: JwtAuth) -> None:
    assert refusal(auth, token({"mode": "r"})) == NO_ALLOWED_CHANNELS


@pytest.mark.parametrize("mode,read,write", [("r", True, False), ("w", False, True),
                                             ("rw", True, True)])
def test_modes(auth: JwtAuth, mode: str, read: bool, write: bool) -> None:
    grant = auth.authorize(token({"mode": mode}), "x")
    assert (grant.can_read, grant.can_write) == (read, write)


# ------------------------------------------------------------ time claims


def test_exp_in_the_future_is_kept_for_the_close_timer(auth: JwtAuth) -> None:
    exp = int(time.time()) + 3600
    assert auth.authorize(token({"mode": "r", "exp": exp}), "x").expires_at == exp


def test_exp_is_checked_against_the_given_time(auth: JwtAuth) -> None:
    tok = token({"mode": "r", "exp": 1000})
    assert auth.authorize(tok, "x", now=999.5).expires_at == 1000
    assert refusal(auth, tok, "x", now=1000) == TOKEN_EXPIRED
    assert JwtAuth(SECRET, leeway=5).authorize(tok, "x", now=1004).channels == ("x",)


def test_not_yet_valid_token_is_refused(auth: JwtAuth) -> None:
    tok = token({"mode": "r", "nbf": int(time.time()) + 3600})
    body = refusal(auth, tok, "x")
    assert body.startswith("Error: ") and "not yet valid" in body
    assert auth.authorize(token({"mode": "r", "nbf": 10}), "x", now=10).mode == "r"


def test_non_numeric_exp_is_refused(auth: JwtAuth) -> None:
    body = refusal(auth, token({"mode": "r", "exp": "tomorrow"}), "x")
    assert body.startswith("Error: ") and "exp" in body


def test_iat_and_aud_are_not_checked_like_postgres_websockets(auth: JwtAuth) -> None:
    tok = token({"mode": "r", "iat": int(time.time()) + 3600, "aud": "someone", "sub": 5})
    assert auth.authorize(tok, "x").claims["aud"] == "someone"


# ------------------------------------------------------------- bad tokens


def test_tampered_token_is_refused(auth: JwtAuth) -> None:
    head, _, sig = token({"mode": "r", "channel": "a"}).split(".")
    forged = b64url(json.dumps({"mode": "rw", "channel": "a"}).encode())
    assert refusal(auth, f"{head}.{forged}.{sig}") == "Error: invalid signature"


def test_token_signed_with_another_secret_is_refused(auth: JwtAuth) -> None:
    tok = token({"mode": "r", "channel": "a"}, key="another-secret-another-secret-xx")
    assert refusal(auth, tok) == "Error: invalid signature"


def test_alg_none_is_refused(auth: JwtAuth) -> None:
    head = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"mode": "rw", "channel": "a"}).encode())
    for tok in (f"{head}.{body}.", f"{head}.{body}.c2ln"):
        assert refusal(auth, tok).startswith("Error: unsigned tokens (alg none)")
    tok = jwt.encode({"mode": "rw", "channel": "a"}, None, algorithm="none")
    assert refusal(auth, tok).startswith("Error: ")


@pytest.mark.parametrize("garbage", ["x", "a.b.c", "....", "eyJhbGciOiJIUzI1NiJ9.e30",
                                     "not a token at all", "\u00e9t\u00e9.\u00e9t\u00e9.x",
                                     "eyJhbGciOiJIUzI1NiJ9.!!!.abc"])
def test_garbage_tokens_are_refused_with_an_error(auth: JwtAuth, garbage: str) -> None:
    assert refusal(auth, garbage).startswith("Error: ")


def test_missing_token_is_refused_with_a_hint(auth: JwtAuth) -> None:
    for empty in (None, ""):
        body = refusal(auth, empty, "x")
        assert body.startswith("Error: no token") and "Bearer" in body


def test_huge_token_is_refused_unread() -> None:
    auth = JwtAuth(SECRET, max_token_bytes=1000)
    body = refusal(auth, "x" * 1001)
    assert body == "Error: token too long (1001 bytes, at most 1000)"
    big = token({"mode": "r", "channel": "a", "pad": "y" * 5000})
    assert JwtAuth(SECRET).authorize(big).claims["pad"] == "y" * 5000
    assert refusal(auth, big).startswith("Error: token too long")


def test_claims_of_the_wrong_type_are_refused_not_ignored(auth: JwtAuth) -> None:
    # postgres-websockets ignores such claims, and so opens any requested channel.
    body = refusal(auth, token({"mode": "r", "channels": "test"}), "other")
    assert body.startswith("Error: the channels claim must be an array of strings")
    assert refusal(auth, token({"mode": "r", "channel": ["a"]})).startswith(
        "Error: the channel claim must be a string")
    assert refusal(auth, token({"mode": "x", "channel": "a"})) == (
        "Error: mode must be r, w or rw, got 'x'")
    assert refusal(auth, token({"mode": "r"}), "") == "Error: empty channel name in the URL"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_hmac_secret_accepts_hs384_and_hs512(auth: JwtAuth) -> None:
    for alg in ("HS384", "HS512"):
        assert auth.authorize(token({"mode": "r"}, alg=alg), "x").mode == "r"


def test_token_refused_is_a_refused_pgws_error() -> None:
    exc = TokenRefused("Missing mode")
    assert isinstance(exc, Refused) and isinstance(exc, PgwsError)
    assert (exc.status, exc.body, str(exc)) == (400, "Missing mode", "Missing mode")


# ------------------------------------------------------------ JWK and JWKS


def oct_jwk(secret: bytes, **extra: Any) -> Dict[str, Any]:
    return {"kty": "oct", "k": b64url(secret), **extra}


def test_jwk_secret(auth: JwtAuth) -> None:
    key = b"0123456789abcdef0123456789abcdef"
    jwk_auth = JwtAuth(json.dumps(oct_jwk(key, alg="HS256")))
    assert jwk_auth.authorize(token({"mode": "r"}, key=key), "x").mode == "r"
    body = refusal(jwk_auth, token({"mode": "r"}, key=key, alg="HS512"), "x")
    assert body == "Error: algorithm HS512 does not fit the configured key"
    assert refusal(jwk_auth, token({"mode": "r"}), "x") == "Error: invalid signature"


def test_jwks_secret_chooses_the_key_by_kid() -> None:
    one, two = b"1" * 32, b"2" * 32
    jwks = json.dumps({"keys": [oct_jwk(one, kid="one"), oct_jwk(two, kid="two")]})
    auth = JwtAuth(jwks)
    assert auth.authorize(token({"mode": "r"}, key=one, kid="one"), "x").mode == "r"
    assert auth.authorize(token({"mode": "w"}, key=two, kid="two"), "x").mode == "w"
    # Without a kid, any key of the set that fits.
    assert auth.authorize(token({"mode": "rw"}, key=two), "x").mode == "rw"


def test_jwks_wrong_key_is_refused() -> None:
    one, two, other = b"1" * 32, b"2" * 32, b"3" * 32
    auth = JwtAuth({"keys": [oct_jwk(one, kid="one"), oct_jwk(two, kid="two")]})
    assert refusal(auth, token({"mode": "r"}, key=two, kid="one"), "x") == (
        "Error: invalid signature")
    assert refusal(auth, token({"mode": "r"}, key=other), "x") == "Error: invalid signature"
    assert refusal(auth, token({"mode": "r"}, key=one, kid="three"), "x") == (
        "Error: unknown kid 'three'")


def rsa_pair() -> Any:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private: Any, **extra: Any) -> Dict[str, Any]:
    alg = "RS256" if isinstance(private, rsa.RSAPrivateKey) else "ES256"
    exported = jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key())
    return {**json.loads(exported), **extra}


def test_rsa_and_ec_keys_in_a_jwks() -> None:
    rsa_key, ec_key = rsa_pair(), ec.generate_private_key(ec.SECP256R1())
    auth = JwtAuth({"keys": [public_jwk(rsa_key, kid="r"), public_jwk(ec_key, kid="e")]})
    assert auth.authorize(token({"mode": "r"}, key=rsa_key, alg="RS256", kid="r"), "x").mode == "r"
    assert auth.authorize(token({"mode": "r"}, key=rsa_key, alg="PS384", kid="r"), "x").mode == "r"
    assert auth.authorize(token({"mode": "w"}, key=ec_key, alg="ES256", kid="e"), "x").mode == "w"
    assert refusal(auth, token({"mode": "r"}, key=ec_key, alg="ES256", kid="r"), "x") == (
        "Error: algorithm ES256 does not fit the configured key")


def test_algorithm_confusion_is_refused() -> None:
    rsa_key = rsa_pair()
    jwk = public_jwk(rsa_key)
    auth = JwtAuth(jwk)
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    # HS256 "signed" with the public key, which an attacker knows.
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps({"mode": "rw"}).encode())
    sig = b64url(hmac.new(pem, f"{head}.{body}".encode(), hashlib.sha256).digest())
    assert refusal(auth, f"{head}.{body}.{sig}", "x") == (
        "Error: algorithm HS256 does not fit the configured key")
    assert JwtAuth(jwk).authorize(token({"mode": "r"}, key=rsa_key, alg="RS256"), "x").mode == "r"


def test_private_jwk_verifies_with_its_public_half() -> None:
    rsa_key = rsa_pair()
    private_jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    auth = JwtAuth(private_jwk)
    assert auth.authorize(token({"mode": "r"}, key=rsa_key, alg="RS256"), "x").mode == "r"


@pytest.mark.parametrize("secret,fragment", [
    ('{"not": "a key"}', "neither a JWK"),
    ('{"kty": "XYZ"}', "unsupported JWK key type"),
    ('{"keys": []}', "non-empty \"keys\""),
    ('{"kty": "oct", "k": ""}', "cannot be used"),
    ('{"kty": "oct", "k": "c2VjcmV0", "alg": "RS256"}', "does not fit"),
    ('{"kty": "oct", "k": "c2VjcmV0", "use": "enc"}', "use"),
    ('{"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA"}', "unsupported curve"),
    ("", "empty"),
])
def test_unusable_secrets_are_config_errors(secret: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        JwtAuth(secret)
    assert fragment in str(caught.value)


def test_short_secret_logs_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    JwtAuth("short")
    assert "use at least 32 bytes" in caplog.text


# ------------------------------------------------------------- secret loading


def test_secret_from_a_file_drops_one_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(SECRET.encode() + b"\n")
    assert load_secret(f"@{path}") == SECRET.encode()
    path.write_bytes(b" spaced \n\n")
    assert load_secret(f"@{path}") == b" spaced \n"


def test_unreadable_or_empty_secret_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_secret(f"@{tmp_path / 'missing'}")
    assert str(caught.value).startswith("PGWS_JWT_SECRET names the file")
    assert "cannot be read" in str(caught.value)
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="PGWS_JWT_SECRET names the file .* which is empty"):
        load_secret(f"@{tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="PGWS_JWT_SECRET is empty"):
        load_secret("")


def test_base64url_secret() -> None:
    raw = bytes(range(256))[:48] + b"\xfb\xff"  # bytes whose base64 needs - and _
    encoded = b64url(raw)
    assert "-" in encoded or "_" in encoded
    assert load_secret(encoded, is_base64=True) == raw
    assert decode_base64url(base64.b64encode(raw).decode()) == raw  # standard alphabet too
    assert decode_base64url(encoded + "=" * (-len(encoded) % 4)) == raw
    tok = token({"mode": "r"}, key=raw)
    assert JwtAuth.from_setting(encoded, is_base64=True).authorize(tok, "x").mode == "r"


@pytest.mark.parametrize("bad", ["not base64!", "abc$", "a"])
def test_bad_base64_is_a_clear_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_secret(bad, is_base64=True)
    message = str(caught.value)
    assert message.startswith("PGWS_JWT_SECRET is not valid base64url")
    assert "PGWS_JWT_SECRET_BASE64" in message


def test_base64_jwk_secret_from_a_file(tmp_path: Path) -> None:
    key = b"k" * 32
    path = tmp_path / "jwk"
    path.write_text(b64url(json.dumps(oct_jwk(key)).encode()) + "\n")
    auth = JwtAuth.from_setting(f"@{path}", is_base64=True)
    assert auth.authorize(token({"mode": "r"}, key=key), "x").mode == "r"


def test_from_setting_names_the_variable_for_a_bad_jwk() -> None:
    with pytest.raises(ConfigError, match="^PGWS_JWT_SECRET: .*neither a JWK"):
        JwtAuth.from_setting('{"a": 1}')


# ------------------------------------------------------------- requests


@pytest.mark.parametrize("path,auth_header,protocols,expected", [
    ("/test/TOK.a.b", None, None, ("test", "TOK.a.b", None)),
    ("/TOK.a.b", None, None, (None, "TOK.a.b", None)),
    ("/test/TOK.a.b/extra", None, None, ("test", "TOK.a.b", None)),
    ("/", None, None, (None, None, None)),
    ("/test/", None, None, ("test", None, None)),
    ("/test", "Bearer H.e.s", None, ("test", "H.e.s", None)),
    ("/", "bearer H.e.s", None, (None, "H.e.s", None)),
    ("/H.e.s", "Bearer H.e.s", None, (None, "H.e.s", None)),
    ("/test", None, "P.r.o", ("test", "P.r.o", "P.r.o")),
    ("/test", None, "chat, P.r.o", ("test", "P.r.o", "P.r.o")),
    ("/", "Basic dXNlcg==", None, (None, None, None)),
    ("/test/P.r.o", "Bearer P.r.o", "P.r.o", ("test", "P.r.o", "P.r.o")),
])
def test_split_request(path: str, auth_header: Any, protocols: Any, expected: Any) -> None:
    assert tuple(split_request(path, auth_header, protocols)) == expected


@pytest.mark.parametrize("path,auth_header,protocols", [
    ("/test/A.b.c", "Bearer X.y.z", None),
    ("/test", "Bearer A.b.c", "X.y.z"),
])
def test_two_different_tokens_are_refused(path: str, auth_header: Any, protocols: Any) -> None:
    with pytest.raises(TokenRefused) as caught:
        split_request(path, auth_header, protocols)
    assert caught.value.body.startswith("Error: two different tokens")


def test_grant_for_is_pure() -> None:
    claims = {"mode": "w", "channels": ["a"], "exp": 12.5}
    assert grant_for(claims) == Grant(("a",), "w", claims, 12.5)
