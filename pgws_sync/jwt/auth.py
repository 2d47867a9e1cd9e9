"""JWT authorisation as postgres-websockets does it: secrets, token checks, claims to channels."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, NamedTuple, Optional, Tuple, Union

import jwt

from ..errors import ConfigError, TokenRefused

logger = logging.getLogger(__name__)

#: Refusal bodies postgres-websockets answers with (HTTP 400, before the upgrade).
TOKEN_EXPIRED = "Token expired"
MISSING_MODE = "Missing mode"
NO_ALLOWED_CHANNELS = "No allowed channels"

#: What each ``mode`` claim allows.
MODES = {"r": (True, False), "w": (False, True), "rw": (True, True)}

#: Tokens longer than this many bytes are refused without being parsed.
DEFAULT_MAX_TOKEN_BYTES = 16384

_HMAC = ("HS256", "HS384", "HS512")
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512", "secp256k1": "ES256K"}
_CRYPTO_NEEDED = (
    "RSA, EC and OKP keys need the cryptography package: install pgws_sync with its crypto "
    "extra (from a checkout: pip install '.[crypto]'), or pip install cryptography"
)

Secret = Union[str, bytes, Mapping[str, Any]]


def _error(reason: str) -> TokenRefused:
    return TokenRefused(f"Error: {reason}")


class Grant(NamedTuple):
    """What a valid token allows one socket: channels, mode, the claims, when it expires."""

    channels: Tuple[str, ...]
    mode: str
    claims: Dict[str, Any]
    #: The ``exp`` claim (unix seconds), or None when the token never expires.
    expires_at: Optional[float]

    @property
    def can_read(self) -> bool:
        return MODES[self.mode][0]

    @property
    def can_write(self) -> bool:
        return MODES[self.mode][1]


class TokenRequest(NamedTuple):
    """Where a connection's token came from, and the channel its path asks for."""

    channel: Optional[str]
    token: Optional[str]
    #: The Sec-WebSocket-Protocol value holding the token, to answer with (browsers insist).
    subprotocol: Optional[str]


# ------------------------------------------------------------------ secrets


def decode_base64url(text: str, *, name: str = "PGWS_JWT_SECRET") -> bytes:
    """Decode base64url (or standard base64), padding optional, as postgres-websockets does.

    Raises :class:`ConfigError` naming ``name`` when ``text`` is not base64.
    """
    cleaned = text.strip().replace("-", "+").replace("_", "/").replace(".", "=").rstrip("=")
    cleaned += "=" * (-len(cleaned) % 4)
    try:
        decoded = base64.b64decode(cleaned, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"{name} is not valid base64url ({exc}); unset PGWS_JWT_SECRET_BASE64 if the "
            f"secret is plain text"
        ) from None
    if not decoded:
        raise ConfigError(f"{name} decodes from base64url to nothing")
    return decoded


def load_secret(value: str, *, is_base64: bool = False, name: str = "PGWS_JWT_SECRET") -> bytes:
    """The secret a ``PGWS_JWT_SECRET`` setting names, as bytes.

    ``@path`` reads the file (one trailing newline dropped, as postgres-websockets
    does); ``is_base64`` decodes base64url afterwards. Raises :class:`ConfigError`
    naming ``name`` for an empty secret, an unreadable file or bad base64.
    """
    if value.startswith("@"):
        path = value[1:]
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"{name} names the file {path!r}, which cannot be read: "
                              f"{reason}") from None
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
        where = f"{name} names the file {path!r}, which"
    else:
        raw = value.encode("utf-8")
        where = f"{name}"
    if not raw.strip():
        raise ConfigError(f"{where} is empty" if value.startswith("@") else f"{name} is empty")
    if is_base64:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"{name} is not valid base64url (it is not ASCII text)") from None
        raw = decode_base64url(text, name=name)
    return raw


# --------------------------------------------------------------------- keys


class _Key(NamedTuple):
    kid: Optional[str]
    key: Any  # bytes for HMAC, a cryptography public key otherwise
    algorithms: FrozenSet[str]


def _algorithms_for(jwk: Mapping[str, Any]) -> FrozenSet[str]:
    kty = jwk.get("kty")
    if kty == "oct":
        family: Tuple[str, ...] = _HMAC
    elif kty == "RSA":
        family = _RSA
    elif kty == "EC":
        alg = _EC_BY_CURVE.get(str(jwk.get("crv")))
        if alg is None:
            raise ConfigError(f"EC key with unsupported curve {jwk.get('crv')!r}")
        family = (alg,)
    elif kty == "OKP":
        family = ("EdDSA",)
    else:
        raise ConfigError(f"unsupported JWK key type {kty!r} (use oct, RSA, EC or OKP)")
    alg = jwk.get("alg")
    if alg is None:
        return frozenset(family)
    if alg not in family:
        raise ConfigError(f"JWK alg {alg!r} does not fit its key type {kty!r}")
    return frozenset((alg,))


def _jwk_name(jwk: Mapping[str, Any]) -> str:
    kid = jwk.get("kid")
    return f"the JWK {kid!r}" if kid is not None else "the JWK"


def _load_jwk(jwk: Mapping[str, Any]) -> _Key:
    if not isinstance(jwk, Mapping):
        raise ConfigError("every JWK must be a JSON object")
    name = _jwk_name(jwk)
    if jwk.get("use", "sig") != "sig":
        raise ConfigError(f"{name} has use {jwk.get('use')!r}; a signing key needs use "
                          f"\"sig\" (or none)")
    algorithms = _algorithms_for(jwk)
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError(f"JWK kid must be a string, got {kid!r}")
    try:
        loaded = jwt.PyJWK(dict(jwk), algorithm=sorted(algorithms)[0])
    except jwt.exceptions.MissingCryptographyError:
        raise ConfigError(_CRYPTO_NEEDED) from None
    except (jwt.exceptions.PyJWKError, jwt.exceptions.InvalidKeyError, ValueError,
            TypeError, KeyError) as exc:
        raise ConfigError(f"{name} cannot be used: {exc}") from None
    key = loaded.key
    public = getattr(key, "public_key", None)
    if callable(public):  # a private JWK: verify with its public half
        key = public()
    if isinstance(key, bytes) and not key:
        raise ConfigError(f"{name} has an empty key")
    return _Key(kid, key, algorithms)


def _load_keys(secret: Secret) -> List[_Key]:
    document: Any = secret
    if isinstance(secret, (str, bytes)):
        raw = secret.encode("utf-8") if isinstance(secret, str) else secret
        if not raw:
            raise ConfigError("the JWT secret is empty")
        try:
            document = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            document = None
        if not isinstance(document, dict):
            return [_Key(None, raw, frozenset(_HMAC))]
    if not isinstance(document, Mapping):
        raise ConfigError("the JWT secret must be a string, bytes, or a JWK / JWKS mapping")
    if "keys" in document:
        keys = document["keys"]
        if not isinstance(keys, list) or not keys:
            raise ConfigError('the JWKS secret needs a non-empty "keys" array')
        return [_load_jwk(k) for k in keys]
    if "kty" in document:
        return [_load_jwk(document)]
    raise ConfigError('the JWT secret is a JSON object but neither a JWK (no "kty") nor a '
                      'JWKS (no "keys"); a plain HMAC secret must not be a JSON object')


# -------------------------------------------------------------------- tokens


def split_request(path: str, authorization: Optional[str] = None,
                  protocols: Optional[str] = None) -> TokenRequest:
    """Find the channel and the token of a connection request (pure; no checks yet).

    As postgres-websockets: ``/<channel>/<jwt>`` or ``/<jwt>``. The token may
    instead come from ``Authorization: Bearer <jwt>`` or from
    ``Sec-WebSocket-Protocol`` (the first offered protocol that looks like a
    JWT); then ``/<channel>`` names the channel. A path token and a header
    token that differ are refused.
    """
    header_token: Optional[str] = None
    subprotocol: Optional[str] = None
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            header_token = value.strip()
    if protocols:
        for offered in protocols.split(","):
            offered = offered.strip()
            if offered.count(".") == 2:
                subprotocol = offered
                break
    if header_token is None:
        header_token = subprotocol
    elif subprotocol is not None and subprotocol != header_token:
        raise _error("two different tokens (Authorization and Sec-WebSocket-Protocol)")

    parts = path[1:].split("/") if path.startswith("/") else path.split("/")
    channel: Optional[str]
    if len(parts) > 1:
        channel, path_token = parts[0], parts[1] or None
    elif header_token is not None and parts[0] != header_token:
        channel, path_token = parts[0] or None, None
    else:
        channel, path_token = None, parts[0] or None
    if path_token is not None and header_token is not None and path_token != header_token:
        raise _error("two different tokens (the URL and a header)")
    return TokenRequest(channel, path_token or header_token, subprotocol)


class JwtAuth:
    """Checks tokens against a secret and turns their claims into a :class:`Grant`.

    ``secret`` is an HMAC secret (``str`` or ``bytes``), or a JWK or JWKS as
    JSON text or a mapping (a JWKS key is chosen by the token's ``kid``).
    HMAC secrets accept HS256, HS384 and HS512; a JWK accepts its own ``alg``,
    or the algorithms of its key type; ``none`` is never accepted. RSA, EC and
    OKP keys need the ``cryptography`` package. ``leeway`` seconds are allowed
    on ``exp`` and ``nbf``; tokens over ``max_token_bytes`` are refused unread.
    Raises :class:`ConfigError` for a secret it cannot use.
    """

    def __init__(self, secret: Secret, *, leeway: float = 0.0,
                 max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> None:
        if leeway < 0:
            raise ConfigError(f"leeway must be 0 or more seconds, got {leeway}")
        if max_token_bytes < 1:
            raise ConfigError(f"max_token_bytes must be positive, got {max_token_bytes}")
        self.keys: Tuple[_Key, ...] = tuple(_load_keys(secret))
        self.leeway = float(leeway)
        self.max_token_bytes = max_token_bytes
        for key in self.keys:
            if isinstance(key.key, bytes) and len(key.key) < 32:
                logger.warning("the JWT secret%s is %d bytes long; use at least 32 bytes",
                               f" {key.kid!r}" if key.kid else "", len(key.key))

    @classmethod
    def from_setting(cls, value: str, *, is_base64: bool = False,
                     name: str = "PGWS_JWT_SECRET", **options: Any) -> "JwtAuth":
        """A JwtAuth from a ``PGWS_JWT_SECRET``-style value (``@file``, base64url)."""
        raw = load_secret(value, is_base64=is_base64, name=name)
        try:
            return cls(raw, **options)
        except ConfigError as exc:
            raise ConfigError(f"{name}: {exc}") from None

    # ------------------------------------------------------------ checking

    def verify(self, token: str, *, now: Optional[float] = None) -> Dict[str, Any]:
        """The claims of ``token`` if its signature, ``exp`` and ``nbf`` hold; else TokenRefused."""
        if len(token) > self.max_token_bytes:
            raise _error(f"token too long ({len(token)} bytes, at most {self.max_token_bytes})")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.DecodeError as exc:
            raise _error(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise _error("unsigned tokens (alg none) are not accepted")
        kid = header.get("kid")
        candidates = list(self.keys)
        if kid is not None and any(k.kid is not None for k in self.keys):
            candidates = [k for k in candidates if k.kid == kid]
            if not candidates:
                raise _error(f"unknown kid {kid!r}")
        candidates = [k for k in candidates if alg in k.algorithms]
        if not candidates:
            raise _error(f"algorithm {alg} does not fit the configured key")
        claims: Optional[Dict[str, Any]] = None
        failure = "invalid signature"
        for key in candidates:
            try:
                claims = jwt.decode(token, key.key, algorithms=[alg], options=_SIGNATURE_ONLY)
                break
            except jwt.exceptions.InvalidSignatureError:
                continue
            except jwt.exceptions.InvalidKeyError as exc:
                failure = f"the key cannot check this token: {exc}"
            except jwt.exceptions.DecodeError as exc:
                raise _error(f"malformed token: {exc}") from None
            except jwt.exceptions.InvalidTokenError as exc:
                raise _error(str(exc) or type(exc).__name__) from None
        if claims is None:
            raise _error(failure)
        moment = time.time() if now is None else now
        exp = _numeric_claim(claims, "exp")
        if exp is not None and moment >= exp + self.leeway:
            raise TokenRefused(TOKEN_EXPIRED)
        nbf = _numeric_claim(claims, "nbf")
        if nbf is not None and moment < nbf - self.leeway:
            raise _error("token not yet valid (nbf)")
        return claims

    def authorize(self, token: Optional[str], channel: Optional[str] = None, *,
                  now: Optional[float] = None) -> Grant:
        """Check ``token`` and decide which channels it opens, as postgres-websockets does.

        ``channel`` is the channel the URL asks for (None: every channel in the
        claims). The ``channel`` and ``channels`` claims are merged; a token with
        neither opens any requested channel. Raises :class:`TokenRefused`.
        """
        if not token:
            raise _error("no token: put it in the URL (/<channel>/<jwt> or /<jwt>), an "
                         "Authorization: Bearer header, or Sec-WebSocket-Protocol")
        claims = self.verify(token, now=now)
        return grant_for(claims, channel)


_SIGNATURE_ONLY: Any = {
    "verify_signature": True, "verify_exp": False, "verify_nbf": False, "verify_iat": False,
    "verify_aud": False, "verify_iss": False, "verify_sub": False, "verify_jti": False,
    "require": [],
}


def _numeric_claim(claims: Mapping[str, Any], name: str) -> Optional[float]:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _error(f"the {name} claim must be a number (unix seconds), got {value!r}")
    return float(value)


def grant_for(claims: Dict[str, Any], channel: Optional[str] = None) -> Grant:
    """The :class:`Grant` of verified ``claims`` for a request of ``channel`` (pure).

    Raises :class:`TokenRefused` with ``Missing mode`` or ``No allowed channels``
    as postgres-websockets does, and ``Error: ...`` for claims of the wrong type
    (which postgres-websockets ignores, opening any channel).
    """
    allowed: List[str] = []
    single = claims.get("channel")
    if single is not None:
        if not isinstance(single, str):
            raise _error(f"the channel claim must be a string, got {single!r}")
        allowed.append(single)
    several = claims.get("channels")
    if several is not None:
        if not isinstance(several, list) or not all(isinstance(c, str) for c in several):
            raise _error(f"the channels claim must be an array of strings, got {several!r}")
        allowed.extend(several)
    allowed = list(dict.fromkeys(allowed))
    mode = claims.get("mode")
    if not isinstance(mode, str):
        raise TokenRefused(MISSING_MODE)
    if mode not in MODES:
        raise _error(f"mode must be r, w or rw, got {mode!r}")
    if channel is not None:
        if not channel:
            raise _error("empty channel name in the URL")
        chosen = [channel] if not allowed or channel in allowed else []
    else:
        chosen = allowed
    if not chosen:
        raise TokenRefused(NO_ALLOWED_CHANNELS)
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, (int, float)) and not isinstance(exp, bool) else None
    return Grant(tuple(chosen), mode, claims, expires_at)
