"""API key format (docs/reference/keys.md): generate, parse, checksum, preview; argon2id hashing.

    tak_ + LLLLLLLL (lookup id, 8) + SSSS...S (secret, 32) + CCCCCC (checksum, 6)

All body characters are base62 (``0-9A-Za-z``), so a double-click selects the whole key. The
checksum is ``zlib.crc32`` of ``tak_`` + lookup id + secret as 6 base62 digits, most
significant first, which lets a secret scanner (or this parser) reject a mistyped or made-up
token without touching the store.
"""

from __future__ import annotations

import hashlib
import secrets
import zlib
from dataclasses import dataclass

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from sidecar.settings import Argon2Settings

PREFIX = "tak_"
ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
LOOKUP_LEN = 8
SECRET_LEN = 32
CHECKSUM_LEN = 6
BODY_LEN = LOOKUP_LEN + SECRET_LEN + CHECKSUM_LEN
KEY_LEN = len(PREFIX) + BODY_LEN
_ALPHABET_SET = frozenset(ALPHABET)


class KeyFormatError(ValueError):
    """The text is not a well-formed key (shape or checksum); never carries the text itself."""


@dataclass(frozen=True, slots=True)
class ParsedKey:
    lookup_id: str
    full: str

    @property
    def digest(self) -> bytes:
        return key_digest(self.full)


def key_digest(text: str) -> bytes:
    """SHA-256 of a presented token: what the verified-key cache compares (constant time)."""
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()


def lookup_id_of(text: str) -> str:
    """The lookup-id position of a token (meaningful only once it parses or matches the cache)."""
    return text[len(PREFIX):len(PREFIX) + LOOKUP_LEN]


def _base62(value: int, width: int) -> str:
    digits = []
    for _ in range(width):
        value, rem = divmod(value, 62)
        digits.append(ALPHABET[rem])
    return "".join(reversed(digits))


def checksum(lookup_id: str, secret: str) -> str:
    """6 base62 digits of CRC-32 over ``tak_`` + lookup id + secret (docs/reference/keys.md)."""
    # 62**6 > 2**32, so every CRC-32 value fits in six digits without loss.
    return _base62(zlib.crc32(f"{PREFIX}{lookup_id}{secret}".encode("ascii")), CHECKSUM_LEN)


def _random_base62(length: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(length))


def new_lookup_id() -> str:
    return _random_base62(LOOKUP_LEN)


def generate_key(lookup_id: str | None = None) -> ParsedKey:
    """A fresh key; 32 base62 characters from ``secrets`` give ~190 bits of secret."""
    lookup = lookup_id if lookup_id is not None else new_lookup_id()
    secret = _random_base62(SECRET_LEN)
    full = f"{PREFIX}{lookup}{secret}{checksum(lookup, secret)}"
    return ParsedKey(lookup_id=lookup, full=full)


def parse_key(text: str) -> ParsedKey:
    """Check shape and checksum offline; raise :class:`KeyFormatError` otherwise."""
    if len(text) != KEY_LEN or not text.startswith(PREFIX):
        raise KeyFormatError("not an API key (tak_ followed by 46 base62 characters)")
    body = text[len(PREFIX):]
    if not _ALPHABET_SET.issuperset(body):
        raise KeyFormatError("not an API key (tak_ followed by 46 base62 characters)")
    lookup = body[:LOOKUP_LEN]
    secret = body[LOOKUP_LEN:LOOKUP_LEN + SECRET_LEN]
    if not secrets.compare_digest(checksum(lookup, secret), body[LOOKUP_LEN + SECRET_LEN:]):
        raise KeyFormatError("API key checksum does not match")
    return ParsedKey(lookup_id=lookup, full=text)


def preview(lookup_id: str) -> str:
    """``tak_`` + the first 4 body characters + ``...``: all that is ever shown again."""
    return f"{PREFIX}{lookup_id[:4]}..."


class KeyHasher:
    """argon2id hashing with configurable cost (RFC 9106); re-hash on use when it changes."""

    def __init__(self, params: Argon2Settings) -> None:
        self._hasher = PasswordHasher(
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )

    def hash(self, key: str) -> str:
        return self._hasher.hash(key)

    def verify(self, stored_hash: str, key: str) -> bool:
        """True when ``key`` matches; a corrupt stored hash counts as a mismatch."""
        try:
            return self._hasher.verify(stored_hash, key)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except InvalidHashError:
            return True
