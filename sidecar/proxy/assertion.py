"""The signed identity assertion (docs/reference/headers.md): sign, publish (JWKS), and verify.

``X-Toolio-Assertion`` is a compact JWS (RFC 7515) carrying a JWT (RFC 7519) with header
``{"alg", "kid", "typ": "toolio+jwt"}`` (RFC 8725 3.11: explicit typing so this token cannot be
confused with another JWT the upstream accepts). Signing is on the hot path, so the header is
encoded once per key and the static claims once per cache fill (see ``Principal``); each request
adds only its times, ``jti``, ``htm`` and ``htu`` and one signature via ``cryptography``.

Upstreams written in Python can use :func:`verify` (PyJWT underneath); any stock JWT library
works the same way with the JWKS at ``/.well-known/jwks.json``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from sidecar.gate.principal import Principal
from sidecar.settings import SettingsError, SigningSettings

TYP = "toolio+jwt"
_PEM_BLOCK = "-----BEGIN"
PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | bytes


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass(frozen=True, slots=True)
class SigningKey:
    algorithm: str
    kid: str
    private: PrivateKey
    public_jwk: Mapping[str, str] | None   # None for HS256: a shared secret is never published


def _public_jwk(algorithm: str, key: PrivateKey) -> dict[str, str] | None:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        numbers = key.public_key().public_numbers()
        return {"kty": "EC", "crv": "P-256", "x": _b64(numbers.x.to_bytes(32, "big")),
                "y": _b64(numbers.y.to_bytes(32, "big"))}
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return {"kty": "OKP", "crv": "Ed25519", "x": _b64(raw)}
    return None


def _thumbprint(jwk: Mapping[str, str] | None, secret: bytes | None) -> str:
    """RFC 7638 JWK thumbprint as the kid (stable across restarts, no registry needed)."""
    if jwk is None:
        assert secret is not None
        # HS256: a kid derived from the secret must not reveal it; a truncated HMAC does not.
        return _b64(hmac.new(secret, b"toolio-sidecar kid", hashlib.sha256).digest()[:16])
    required = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}[jwk["kty"]]
    canonical = json.dumps({k: jwk[k] for k in required}, separators=(",", ":"), sort_keys=True)
    return _b64(hashlib.sha256(canonical.encode()).digest())


def _make_key(algorithm: str, private: PrivateKey, where: str) -> SigningKey:
    if algorithm == "ES256":
        if not (isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp256r1"):
            raise SettingsError(where, "ES256 needs an EC P-256 private key (PEM)")
    elif algorithm == "EdDSA":
        if not isinstance(private, ed25519.Ed25519PrivateKey):
            raise SettingsError(where, "EdDSA needs an Ed25519 private key (PEM)")
    elif not isinstance(private, bytes) or len(private) < 32:
        raise SettingsError(where, "HS256 needs a secret of at least 32 bytes")
    jwk = _public_jwk(algorithm, private)
    kid = _thumbprint(jwk, private if isinstance(private, bytes) else None)
    if jwk is not None:
        jwk = {**jwk, "kid": kid, "alg": algorithm, "use": "sig"}
    return SigningKey(algorithm=algorithm, kid=kid, private=private, public_jwk=jwk)


def _parse_material(algorithm: str, text: bytes, where: str) -> list[SigningKey]:
    if algorithm == "HS256":
        return [_make_key(algorithm, text.strip(), where)]
    keys = []
    blocks = [b"-----BEGIN" + part for part in text.split(b"-----BEGIN")[1:]]
    if not blocks:
        raise SettingsError(where, "expected a PEM private key")
    for block in blocks:
        try:
            loaded = serialization.load_pem_private_key(block, password=None)
        except (ValueError, TypeError):
            raise SettingsError(where, "not a readable unencrypted PEM private key") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise SettingsError(where, f"unsupported key type {type(loaded).__name__}")
        keys.append(_make_key(algorithm, loaded, where))
    return keys


def _generate(algorithm: str) -> tuple[PrivateKey, bytes]:
    if algorithm == "HS256":
        secret = secrets.token_urlsafe(48).encode()
        return secret, secret + b"\n"
    private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
        ec.generate_private_key(ec.SECP256R1()) if algorithm == "ES256" else ed25519.Ed25519PrivateKey.generate()
    )
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return private, pem


def load_signing_keys(signing: SigningSettings, data_dir: Path) -> list[SigningKey]:
    """Configured keys, newest first: the environment's, then the files'. With none configured,
    a key generated once into ``data_dir`` (mode 0600) and reused on later starts."""
    keys = configured_keys(signing)
    if keys:
        return keys
    suffix = "key" if signing.algorithm == "HS256" else "pem"
    path = data_dir / f"signing-{signing.algorithm.lower()}.{suffix}"
    if path.exists():
        return _parse_material(signing.algorithm, path.read_bytes(), str(path))
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    private, encoded = _generate(signing.algorithm)
    # O_EXCL: two processes starting at once must not overwrite each other's key.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _parse_material(signing.algorithm, path.read_bytes(), str(path))
    with os.fdopen(fd, "wb") as handle:
        handle.write(encoded)
        handle.flush()
        os.fsync(handle.fileno())
    return [_make_key(signing.algorithm, private, str(path))]


# A key set kept in a shared store (several replicas, no configured keys): a JSON document
# {"keys": [{"key": PEM or secret, "sign_from": epoch seconds}, ...]}, newest first.
STORED_KEYS = "signing_keys:{algorithm}"
# How often replicas re-read a stored key set, and so how long a new key is published before
# any replica signs with it (twice that, plus slack): rotation never has one replica signing
# with a key another does not publish yet.
STORED_KEYS_REFRESH_SECONDS = 30.0
STORED_KEYS_PUBLISH_SECONDS = 2 * STORED_KEYS_REFRESH_SECONDS + 15
STORED_KEYS_KEPT = 3


class KeySource(Protocol):
    """Where a shared signing key set lives (a :class:`~sidecar.keys.store.base.KeyStore`)."""

    shared: bool

    async def get_or_create_secret(self, name: str, make: Callable[[], str]) -> str: ...


def configured_keys(signing: SigningSettings) -> list[SigningKey]:
    """Keys from the environment and files, newest first (may be none)."""
    keys: list[SigningKey] = []
    if signing.env_keys:
        keys += _parse_material(signing.algorithm, signing.env_keys.encode(), "TOOLIO_SIDECAR_SIGNING_KEYS")
    for index, path in enumerate(signing.private_key_files):
        where = f"signing.private_key_files[{index}]"
        try:
            material = path.read_bytes()
        except OSError as exc:
            raise SettingsError(where, f"cannot read {path}: {exc.strerror}") from None
        keys += _parse_material(signing.algorithm, material, where)
    return keys


def _new_stored_entry(algorithm: str, sign_from: float) -> dict[str, Any]:
    _, encoded = _generate(algorithm)
    return {"key": encoded.decode("ascii"), "sign_from": sign_from}


def stored_key_set(document: str, algorithm: str, now: float) -> list[SigningKey]:
    """A stored key set as signing keys: the newest key whose ``sign_from`` has come first
    (it signs), then every other key (published, so verifiers know it before and after)."""
    entries = json.loads(document)["keys"]
    keys = [(_parse_material(algorithm, entry["key"].encode(), "shared signing key set")[0],
             float(entry["sign_from"])) for entry in entries]
    signing = next((key for key, sign_from in keys if sign_from <= now), keys[-1][0])
    return [signing, *(key for key, _ in keys if key is not signing)]


async def signing_keys(signing: SigningSettings, data_dir: Path, store: KeySource) -> list[SigningKey]:
    """The keys to sign and publish with, newest (signing) first: configured ones; else, on a
    shared store, the key set every replica reads from it (generated once, first writer wins);
    else a key generated into ``data_dir`` (one replica)."""
    if signing.env_keys or signing.private_key_files or not store.shared:
        return load_signing_keys(signing, data_dir)
    name = STORED_KEYS.format(algorithm=signing.algorithm)
    document = await store.get_or_create_secret(
        name, lambda: json.dumps({"keys": [_new_stored_entry(signing.algorithm, 0.0)]}))
    return stored_key_set(document, signing.algorithm, time.time())


def rotated_key_set(document: str, algorithm: str, now: float,
                    publish_seconds: float = STORED_KEYS_PUBLISH_SECONDS) -> str:
    """``document`` with a new key in front that replicas publish at once and sign with only
    after ``publish_seconds``; the oldest keys beyond a few are dropped."""
    entries = json.loads(document)["keys"]
    entries.insert(0, _new_stored_entry(algorithm, now + publish_seconds))
    return json.dumps({"keys": entries[:STORED_KEYS_KEPT]})


class Signer:
    """Signs per-request assertions with the newest key; publishes all public keys."""

    def __init__(self, keys: Sequence[SigningKey], signing: SigningSettings) -> None:
        self._lifetime = signing.lifetime_seconds
        self._jti_prefix = secrets.token_hex(8) + "-"
        self._jti_counter = 0
        self.use(keys)

    def use(self, keys: Sequence[SigningKey]) -> None:
        """Sign with ``keys[0]`` from now on and publish all of them."""
        if not keys:
            raise ValueError("at least one signing key is required")
        self._keys = tuple(keys)
        self._key = keys[0]
        header = {"alg": self._key.algorithm, "kid": self._key.kid, "typ": TYP}
        self._header = _b64(json.dumps(header, separators=(",", ":")).encode()) + "."
        self._sign = self._signer_for(self._key)
        self._jwks = json.dumps({"keys": [dict(k.public_jwk) for k in self._keys if k.public_jwk]}).encode()

    @property
    def kids(self) -> tuple[str, ...]:
        """Key ids, the signing one first."""
        return tuple(k.kid for k in self._keys)

    @property
    def jwks_body(self) -> bytes:
        return self._jwks

    @property
    def jwks(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self._jwks)
        return result

    @staticmethod
    def _signer_for(key: SigningKey) -> Any:
        private = key.private
        if isinstance(private, ec.EllipticCurvePrivateKey):
            # Hashing with hashlib and signing the digest is measurably cheaper per call than
            # letting cryptography hash (same ECDSA-SHA256 signature, RFC 7518 3.4).
            algorithm = ec.ECDSA(Prehashed(hashes.SHA256()))

            def sign_es256(data: bytes) -> bytes:
                # RFC 7518 3.4: JWS carries R || S, each 32 bytes, not the DER from cryptography.
                r, s = decode_dss_signature(private.sign(hashlib.sha256(data).digest(), algorithm))
                return r.to_bytes(32, "big") + s.to_bytes(32, "big")
            return sign_es256
        if isinstance(private, ed25519.Ed25519PrivateKey):
            return private.sign
        secret = private

        def sign_hs256(data: bytes) -> bytes:
            return hmac.new(secret, data, hashlib.sha256).digest()
        return sign_hs256

    def sign(self, principal: Principal, method: str, path_qs: str) -> str:
        now = int(time.time())
        # jti (RFC 7519 4.1.7) must be unique, not secret: a random per-process prefix and a
        # counter give that without a syscall per request.
        self._jti_counter += 1
        claims = (f'{principal.claims_prefix},"iat":{now},"nbf":{now},"exp":{now + self._lifetime},'
                  f'"jti":"{self._jti_prefix}{self._jti_counter:x}","htm":{_json_text(method)},'
                  f'"htu":{_json_text(path_qs)}}}')
        signing_input = self._header + _b64(claims.encode())
        return f"{signing_input}.{_b64(self._sign(signing_input.encode('ascii')))}"


def _json_text(value: str) -> str:
    """A JSON string literal; request targets and methods are printable ASCII almost always."""
    if value.isascii() and value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    return json.dumps(value)


def verify(token: str, *, jwks: Mapping[str, Any] | None = None, hmac_secret: bytes | str | None = None,
           issuer: str = "toolio-sidecar", audience: str = "toolio-mcp", method: str | None = None,
           path: str | None = None, leeway: float = 5.0) -> dict[str, Any]:
    """Verify an ``X-Toolio-Assertion`` and return its claims; raises ``jwt.InvalidTokenError``.

    Pass the sidecar's JWKS document (``GET /.well-known/jwks.json``) for ES256 / EdDSA, or the
    shared secret for HS256. ``method`` / ``path`` (path + query) bind the assertion to the
    request it arrived with (the ``htm`` / ``htu`` claims)."""
    header = jwt.get_unverified_header(token)
    if header.get("typ") != TYP:
        raise jwt.InvalidTokenError(f"typ must be {TYP!r}")
    algorithm = header.get("alg")
    key: Any
    if algorithm == "HS256":
        if hmac_secret is None:
            raise jwt.InvalidTokenError("HS256 assertion but no shared secret given")
        key = hmac_secret.encode() if isinstance(hmac_secret, str) else hmac_secret
    elif algorithm in ("ES256", "EdDSA"):
        if jwks is None:
            raise jwt.InvalidTokenError("no JWKS given")
        matches = [k for k in jwks.get("keys", []) if k.get("kid") == header.get("kid")]
        if not matches:
            raise jwt.InvalidTokenError("unknown kid")
        key = jwt.PyJWK(matches[0], algorithm=algorithm).key
    else:
        raise jwt.InvalidTokenError(f"unexpected alg {algorithm!r}")
    claims: dict[str, Any] = jwt.decode(
        token, key, algorithms=[algorithm], issuer=issuer, audience=audience, leeway=leeway,
        options={"require": ["iss", "aud", "sub", "iat", "nbf", "exp", "jti"]},
    )
    if method is not None and claims.get("htm") != method:
        raise jwt.InvalidTokenError("htm does not match the request method")
    if path is not None and claims.get("htu") != path:
        raise jwt.InvalidTokenError("htu does not match the request path")
    return claims
