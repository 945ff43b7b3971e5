"""Key format (docs/reference/keys.md): generate / parse / checksum / preview, and argon2id hashing with re-hash
on use when the parameters change."""

from __future__ import annotations

import re
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.keys.format import (
    ALPHABET,
    BODY_LEN,
    KEY_LEN,
    PREFIX,
    KeyFormatError,
    KeyHasher,
    checksum,
    generate_key,
    parse_key,
    preview,
)
from sidecar.settings import Argon2Settings
from tests.support.config import ConfigFactory
from tests.support.harness import RunningSidecar, SidecarStarter, bearer, client_session
from tests.support.polling import eventually

KEY_SHAPE = re.compile(r"^tak_[0-9A-Za-z]{46}$")
CHEAP = Argon2Settings(time_cost=1, memory_cost_kib=1024, parallelism=1)

lookup_ids = st.text(alphabet=ALPHABET, min_size=8, max_size=8)
valid_keys = st.builds(lambda lookup: generate_key(lookup).full, lookup_ids)


def _base62_value(text: str) -> int:
    value = 0
    for char in text:
        value = value * 62 + ALPHABET.index(char)
    return value


@given(lookup_ids)
def test_generated_key_parses_back_to_its_lookup_id(lookup: str) -> None:
    key = generate_key(lookup)
    assert KEY_SHAPE.match(key.full)
    assert len(key.full) == KEY_LEN == len(PREFIX) + BODY_LEN
    parsed = parse_key(key.full)
    assert parsed == key
    assert parsed.lookup_id == lookup
    assert key.full[len(PREFIX):len(PREFIX) + 8] == lookup


def test_generated_keys_have_fresh_lookup_ids_and_secrets() -> None:
    keys = [generate_key().full for _ in range(200)]
    assert len(set(keys)) == 200
    assert len({k[4:12] for k in keys}) == 200
    assert len({k[12:44] for k in keys}) == 200


@given(valid_keys)
def test_checksum_is_crc32_of_prefix_lookup_and_secret_in_six_base62_digits(key: str) -> None:
    body = key[len(PREFIX):]
    lookup, secret, check = body[:8], body[8:40], body[40:]
    assert _base62_value(check) == zlib.crc32(f"tak_{lookup}{secret}".encode())
    assert checksum(lookup, secret) == check


def test_checksum_is_zero_padded_to_six_digits() -> None:
    # Search a small space for a CRC small enough to need padding (< 62**5).
    for n in range(200_000):
        secret = f"{n:032d}"
        if zlib.crc32(f"tak_AAAAAAAA{secret}".encode()) < 62**5:
            assert checksum("AAAAAAAA", secret).startswith("0")
            assert len(checksum("AAAAAAAA", secret)) == 6
            return
    pytest.fail("no small CRC found to exercise padding")


@settings(max_examples=500)
@given(st.text())
def test_parse_raises_only_key_format_error_on_arbitrary_text(text: str) -> None:
    try:
        parse_key(text)
    except KeyFormatError:
        pass
    else:
        assert KEY_SHAPE.match(text)


def test_format_errors_never_carry_the_token() -> None:
    key = generate_key().full
    bad_checksum = key[:-1] + ("0" if key[-1] != "0" else "1")
    for text in (bad_checksum, key + "x", key.replace("tak_", "tek_")):
        with pytest.raises(KeyFormatError) as caught:
            parse_key(text)
        assert text[4:12] not in str(caught.value)
        assert text not in repr(caught.value)


@given(st.text(alphabet=ALPHABET + "_-", min_size=46, max_size=46))
def test_parse_accepts_a_well_shaped_body_only_with_its_checksum(body: str) -> None:
    text = PREFIX + body
    valid = set(body) <= set(ALPHABET) and checksum(body[:8], body[8:40]) == body[40:]
    if valid:
        assert parse_key(text).full == text
    else:
        with pytest.raises(KeyFormatError):
            parse_key(text)


@given(valid_keys, st.data())
def test_every_single_character_change_is_rejected(key: str, data: st.DataObject) -> None:
    position = data.draw(st.integers(0, len(key) - 1), label="position")
    replacement = data.draw(
        st.characters(codec="utf-8").filter(lambda c: c != key[position]), label="replacement")
    changed = key[:position] + replacement + key[position + 1:]
    with pytest.raises(KeyFormatError):
        parse_key(changed)


def test_every_base62_substitution_at_every_position_is_rejected() -> None:
    # Exhaustive over one key: CRC-32 detects every single-symbol error in the body.
    key = generate_key().full
    for position in range(len(key)):
        for char in ALPHABET + "_-":
            if char != key[position]:
                with pytest.raises(KeyFormatError):
                    parse_key(key[:position] + char + key[position + 1:])


@given(valid_keys, st.sampled_from(["", " ", "\n", "x", "0"]))
def test_truncated_or_extended_keys_are_rejected(key: str, extra: str) -> None:
    for text in (key[:-1], key + extra if extra else key[1:], key.upper(), key.lower(), "TAK_" + key[4:]):
        if text != key:
            with pytest.raises(KeyFormatError):
                parse_key(text)


@given(valid_keys)
def test_preview_is_prefix_four_body_chars_and_ellipsis(key: str) -> None:
    parsed = parse_key(key)
    shown = preview(parsed.lookup_id)
    assert re.fullmatch(r"tak_[0-9A-Za-z]{4}\.\.\.", shown)
    assert shown == key[:8] + "..."
    assert key[8:] not in shown


def test_hash_verifies_only_the_same_key_and_is_argon2id() -> None:
    hasher = KeyHasher(CHEAP)
    key = generate_key().full
    other = generate_key().full
    stored = hasher.hash(key)
    assert stored.startswith("$argon2id$")
    assert key not in stored
    assert hasher.verify(stored, key)
    assert not hasher.verify(stored, other)
    assert not hasher.verify("not a hash", key)
    assert hasher.hash(key) != stored  # salted


def test_hash_needs_rehash_when_parameters_change() -> None:
    old = KeyHasher(CHEAP)
    new = KeyHasher(Argon2Settings(time_cost=2, memory_cost_kib=2048, parallelism=1))
    stored = old.hash(generate_key().full)
    assert not old.needs_rehash(stored)
    assert new.needs_rehash(stored)
    assert new.needs_rehash("garbage")


async def test_successful_auth_rehashes_a_key_hashed_with_old_parameters(
        config: ConfigFactory, start_sidecar: SidecarStarter, sidecar: RunningSidecar) -> None:
    record, key = await sidecar.create_key("old-params")
    old_hash = record.key_hash
    assert "m=1024,t=1" in old_hash
    # The same store, served by a sidecar configured with stronger parameters.
    stronger = config.settings({"proxy": {"upstream": sidecar.settings.proxy.upstream},
                                "argon2": {"memory_cost_kib": 2048, "time_cost": 2}})
    upgraded = await start_sidecar(stronger)
    async with client_session() as http, http.get(upgraded.proxy_url + "/x", headers=bearer(key)) as resp:
        assert resp.status == 200

    async def rehashed() -> str:  # the re-hash runs in the background; "" until it did
        stored = await upgraded.services.store.get_key(record.id)
        assert stored is not None
        return stored.key_hash if stored.key_hash != old_hash else ""

    stored_hash = await eventually(rehashed)
    assert "m=2048,t=2" in stored_hash
    assert KeyHasher(stronger.argon2).verify(stored_hash, key)
    assert not KeyHasher(stronger.argon2).needs_rehash(stored_hash)
