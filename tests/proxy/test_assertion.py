"""The signed assertion (docs/reference/headers.md): what the upstream receives can be verified with a stock JWT
library against the published JWKS, in each selectable algorithm; keys are generated once,
configurable, and rotatable."""

from __future__ import annotations

import base64
import json
import stat
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from sidecar.gate.principal import Principal
from sidecar.keys.records import ENABLED, KeyRecord, utcnow
from sidecar.proxy.assertion import TYP, Signer, load_signing_keys, verify
from sidecar.settings import SIGNING_KEYS_ENV, Settings, SettingsError, SigningSettings, settings_from_mapping
from tests.support.config import ConfigFactory
from tests.support.harness import SidecarStarter, bearer, client_session
from tests.support.upstreams import RecordingUpstream

HS_SECRET = "0123456789abcdef0123456789abcdef-hs256-test-secret"
SETTINGS = settings_from_mapping({"roles": {"viewer": {"permissions": ["plans:read"]},
                                            "writer": {"permissions": ["plans:write", "plans:read"]}}}, {})


def _principal(settings: Settings = SETTINGS) -> Principal:
    record = KeyRecord(id="key_abc", lookup_id="LOOKUP00", name="ci-bot", roles=("writer", "viewer"),
                       workspace="acme", status=ENABLED, created_at=utcnow(), created_by="test", key_hash="h")
    return Principal.from_record(record, settings)


def _pem(private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def _signer(algorithm: str, tmp_path: Path, **signing: Any) -> Signer:
    settings = SigningSettings(algorithm=algorithm, env_keys=HS_SECRET if algorithm == "HS256" else None,
                               **signing)
    return Signer(load_signing_keys(settings, tmp_path), settings)


def _segment(token: str, index: int) -> dict[str, Any]:
    part = token.split(".")[index]
    decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
    return decoded


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "HS256"])
def test_assertion_verifies_with_the_package_verifier(algorithm: str, tmp_path: Path) -> None:
    signer = _signer(algorithm, tmp_path)
    token = signer.sign(_principal(), "POST", "/mcp?x=1")
    claims = verify(token, jwks=signer.jwks, hmac_secret=HS_SECRET, method="POST", path="/mcp?x=1")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm
    assert header["typ"] == TYP
    assert header["kid"]
    now = int(time.time())
    assert claims["iss"] == "toolio-sidecar"
    assert claims["aud"] == "toolio-mcp"
    assert claims["sub"] == "key_abc"
    assert claims["name"] == "ci-bot"
    assert claims["ws"] == "acme"
    assert claims["roles"] == ["viewer", "writer"]
    assert claims["perms"] == ["plans:read", "plans:write"]
    assert abs(claims["iat"] - now) <= 2
    assert claims["nbf"] == claims["iat"]
    assert claims["exp"] == claims["iat"] + 60
    assert claims["htm"] == "POST"
    assert claims["htu"] == "/mcp?x=1"
    assert len(claims["jti"]) >= 16
    assert signer.sign(_principal(), "POST", "/mcp?x=1") != token  # a fresh jti each time


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
def test_assertion_verifies_with_plain_pyjwt_and_the_jwks(algorithm: str, tmp_path: Path) -> None:
    signer = _signer(algorithm, tmp_path, issuer="me", audience="them", lifetime_seconds=30)
    # iss / aud are part of the principal's pre-rendered claims (one render per cache fill).
    settings = settings_from_mapping({"signing": {"issuer": "me", "audience": "them"}}, {})
    token = signer.sign(_principal(settings), "GET", "/mcp")
    jwks = jwt.PyJWKSet.from_dict(signer.jwks)
    key = jwks[jwt.get_unverified_header(token)["kid"]]
    claims = jwt.decode(token, key.key, algorithms=[algorithm], audience="them", issuer="me")
    assert claims["exp"] - claims["iat"] == 30
    published = signer.jwks["keys"][0]
    assert published["alg"] == algorithm
    assert published["use"] == "sig"
    assert "d" not in published  # never the private part


def test_hs256_secret_is_never_published(tmp_path: Path) -> None:
    signer = _signer("HS256", tmp_path)
    assert signer.jwks == {"keys": []}
    assert HS_SECRET.encode() not in signer.jwks_body
    token = signer.sign(_principal(), "GET", "/")
    assert HS_SECRET not in token
    assert jwt.get_unverified_header(token)["kid"] not in HS_SECRET
    claims = jwt.decode(token, HS_SECRET, algorithms=["HS256"], audience="toolio-mcp")
    assert claims["sub"] == "key_abc"


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA", "HS256"])
def test_verifier_refuses_tampering_and_mismatches(algorithm: str, tmp_path: Path) -> None:
    signer = _signer(algorithm, tmp_path)
    token = signer.sign(_principal(), "POST", "/mcp")
    kwargs: dict[str, Any] = {"jwks": signer.jwks, "hmac_secret": HS_SECRET}
    header, _, signature = token.split(".")
    claims = _segment(token, 1)
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "roles": ["org-admin"]}).encode()).rstrip(b"=")
    bad: list[tuple[str, dict[str, Any]]] = [
        (f"{header}.{forged.decode()}.{signature}", {}),
        (token, {"audience": "someone-else"}),
        (token, {"issuer": "someone-else"}),
        (token, {"method": "GET"}),
        (token, {"path": "/other"}),
    ]
    for candidate, extra in bad:
        with pytest.raises(jwt.InvalidTokenError):
            verify(candidate, **kwargs, **extra)
    if algorithm == "HS256":
        with pytest.raises(jwt.InvalidTokenError):
            verify(token, hmac_secret="another secret that is long enough to use")
        with pytest.raises(jwt.InvalidTokenError):
            verify(token, jwks=signer.jwks)
    else:
        other = _signer(algorithm, tmp_path / "other")
        with pytest.raises(jwt.InvalidTokenError, match="kid"):
            verify(token, jwks=other.jwks)
        with pytest.raises(jwt.InvalidTokenError):
            verify(token)


def test_verifier_refuses_other_types_algorithms_and_expired_tokens(tmp_path: Path) -> None:
    private = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "k.pem"
    pem.write_bytes(_pem(private))
    signer = Signer(load_signing_keys(SigningSettings(private_key_files=(pem,)), tmp_path), SigningSettings())
    kid = signer.jwks["keys"][0]["kid"]
    now = int(time.time())
    claims = {"iss": "toolio-sidecar", "aud": "toolio-mcp", "sub": "key_abc", "iat": now, "nbf": now,
              "exp": now + 60, "jti": "j"}
    plain_jwt = jwt.encode(claims, private, algorithm="ES256", headers={"kid": kid, "typ": "JWT"})
    with pytest.raises(jwt.InvalidTokenError, match="typ"):
        verify(plain_jwt, jwks=signer.jwks)
    unsigned = jwt.encode(claims, "", algorithm="none", headers={"kid": kid, "typ": TYP})
    with pytest.raises(jwt.InvalidTokenError, match="alg"):
        verify(unsigned, jwks=signer.jwks)
    expired = jwt.encode({**claims, "iat": now - 600, "nbf": now - 600, "exp": now - 300}, private,
                         algorithm="ES256", headers={"kid": kid, "typ": TYP})
    with pytest.raises(jwt.ExpiredSignatureError):
        verify(expired, jwks=signer.jwks)
    missing_jti = jwt.encode({k: v for k, v in claims.items() if k != "jti"}, private, algorithm="ES256",
                             headers={"kid": kid, "typ": TYP})
    with pytest.raises(jwt.MissingRequiredClaimError):
        verify(missing_jti, jwks=signer.jwks)
    good = jwt.encode(claims, private, algorithm="ES256", headers={"kid": kid, "typ": TYP})
    assert verify(good, jwks=signer.jwks)["sub"] == "key_abc"


@pytest.mark.parametrize(("algorithm", "suffix"), [("ES256", "pem"), ("EdDSA", "pem"), ("HS256", "key")])
def test_key_is_generated_once_into_the_data_dir_and_reused(algorithm: str, suffix: str, tmp_path: Path) -> None:
    signing = SigningSettings(algorithm=algorithm)
    first = load_signing_keys(signing, tmp_path / "data")
    path = tmp_path / "data" / f"signing-{algorithm.lower()}.{suffix}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    second = load_signing_keys(signing, tmp_path / "data")
    assert [k.kid for k in first] == [k.kid for k in second]
    assert len(first) == 1


def test_several_configured_keys_newest_signs_and_all_are_published(tmp_path: Path) -> None:
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "old.pem").write_bytes(_pem(old))
    (tmp_path / "new.pem").write_bytes(_pem(new))
    before = SigningSettings(private_key_files=(tmp_path / "old.pem",))
    after = SigningSettings(private_key_files=(tmp_path / "new.pem", tmp_path / "old.pem"))
    old_signer = Signer(load_signing_keys(before, tmp_path), before)
    new_signer = Signer(load_signing_keys(after, tmp_path), after)
    in_flight = old_signer.sign(_principal(), "GET", "/")  # signed just before the rotation
    fresh = new_signer.sign(_principal(), "GET", "/")
    kids = [k["kid"] for k in new_signer.jwks["keys"]]
    assert len(kids) == 2
    assert jwt.get_unverified_header(fresh)["kid"] == kids[0]
    assert jwt.get_unverified_header(in_flight)["kid"] == kids[1]
    assert verify(in_flight, jwks=new_signer.jwks)["sub"] == "key_abc"
    assert verify(fresh, jwks=new_signer.jwks)["sub"] == "key_abc"
    assert not list(tmp_path.glob("signing-*"))  # nothing generated when keys are configured


def test_pem_blocks_from_the_environment_come_first(tmp_path: Path) -> None:
    env_key, file_key = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "file.pem").write_bytes(_pem(file_key))
    settings = settings_from_mapping({"signing": {"algorithm": "EdDSA", "private_key_files": ["file.pem"]}},
                                     {SIGNING_KEYS_ENV: _pem(env_key).decode()}, base_dir=tmp_path)
    keys = load_signing_keys(settings.signing, tmp_path)
    raw = [k.public_jwk["x"] for k in keys if k.public_jwk]
    expected = base64.urlsafe_b64encode(env_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw)).rstrip(b"=").decode()
    assert raw[0] == expected
    assert len(raw) == 2


@pytest.mark.parametrize(("algorithm", "material"), [
    ("ES256", "ed25519"), ("EdDSA", "p256"), ("ES256", "p384"), ("ES256", "garbage"), ("HS256", "short"),
])
def test_unusable_key_material_is_a_settings_error_naming_where(algorithm: str, material: str,
                                                                 tmp_path: Path) -> None:
    path = tmp_path / "key.pem"
    if material == "ed25519":
        path.write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    elif material == "p256":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP256R1())))
    elif material == "p384":
        path.write_bytes(_pem(ec.generate_private_key(ec.SECP384R1())))
    elif material == "garbage":
        path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    else:
        path.write_bytes(b"too short")
    with pytest.raises(SettingsError) as caught:
        load_signing_keys(SigningSettings(algorithm=algorithm, private_key_files=(path,)), tmp_path)
    assert caught.value.key == "signing.private_key_files[0]"


# -- through the running proxy ------------------------------------------------------------------


async def _assertion_for(config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream,
                         signing: dict[str, Any], environ: dict[str, str] | None = None
                         ) -> tuple[str, dict[str, Any], dict[str, Any], str, str]:
    settings = config.settings({"proxy": {"upstream": echo.url}, "signing": signing}, environ)
    sidecar = await start_sidecar(settings)
    record, key = await sidecar.create_key("agent-7", ["writer", "viewer"])
    async with client_session() as http:
        async with http.post(sidecar.proxy_url + "/mcp/tools?cursor=a%20b&x=1", data=b"{}",
                             headers=bearer(key)) as resp:
            assert resp.status == 200
        jwks = []
        for base in (sidecar.proxy_url, sidecar.admin_url):
            async with http.get(base + "/.well-known/jwks.json") as resp:  # no Authorization
                assert resp.status == 200
                assert resp.content_type == "application/json"
                jwks.append(await resp.json())
    assert jwks[0] == jwks[1]
    token = echo.requests[-1].one("X-Toolio-Assertion")
    return token, jwks[0], {"id": record.id}, echo.requests[-1].method, echo.requests[-1].path_qs


@pytest.mark.parametrize("algorithm", ["ES256", "EdDSA"])
async def test_upstream_assertion_verifies_with_pyjwt_against_jwks_from_both_listeners(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream, algorithm: str) -> None:
    token, jwks, key, method, path_qs = await _assertion_for(
        config, start_sidecar, echo, {"algorithm": algorithm, "issuer": "sidecar-a", "audience": "mcp-a"})
    header = jwt.get_unverified_header(token)
    assert header["alg"] == algorithm
    assert header["typ"] == "toolio+jwt"
    signing_key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(token, signing_key.key, algorithms=[algorithm], audience="mcp-a", issuer="sidecar-a",
                        options={"require": ["iss", "aud", "sub", "iat", "nbf", "exp", "jti"]})
    assert claims["sub"] == key["id"]
    assert claims["name"] == "agent-7"
    assert claims["ws"] == "acme"
    assert claims["roles"] == ["viewer", "writer"]
    assert claims["perms"] == ["plans:read", "plans:write"]
    assert claims["htm"] == method == "POST"
    assert claims["htu"] == path_qs == "/mcp/tools?cursor=a%20b&x=1"
    assert claims["exp"] - claims["iat"] == 60
    assert claims["nbf"] <= time.time() + 1
    assert verify(token, jwks=jwks, issuer="sidecar-a", audience="mcp-a", method=method, path=path_qs)


async def test_upstream_assertion_in_hs256_verifies_with_the_shared_secret(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    token, jwks, key, method, path_qs = await _assertion_for(
        config, start_sidecar, echo, {"algorithm": "HS256"}, {SIGNING_KEYS_ENV: HS_SECRET})
    assert jwks == {"keys": []}
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = verify(token, hmac_secret=HS_SECRET, method=method, path=path_qs)
    assert claims["sub"] == key["id"]
    assert jwt.decode(token, HS_SECRET, algorithms=["HS256"], audience="toolio-mcp")["jti"] == claims["jti"]


async def test_restart_reuses_the_generated_signing_key(
        config: ConfigFactory, start_sidecar: SidecarStarter, echo: RecordingUpstream) -> None:
    settings = config.settings({"proxy": {"upstream": echo.url}})
    first = await start_sidecar(settings)
    second = await start_sidecar(settings)  # same data dir, e.g. after a restart
    assert first.services.signer is not None
    assert second.services.signer is not None
    assert first.services.signer.jwks == second.services.signer.jwks
