"""Opaque upload tokens: the caller never sees Google's upload_id, and nothing the proxy keeps is one.

Google's upload_id is a bearer capability: whoever holds it can send bytes straight to Google, into
the pool's project, past the proxy. So the upload URL the proxy hands back carries a token of its
own instead (`gp1.` + 32 random bytes, base64url), and the proxy keeps, under a digest of that token
(`pins.upload_digest`, the upload pin's name), Google's upload_id sealed with AES-256-GCM under a key
derived from the token itself (HKDF-SHA256). SQLite, Redis and a memory dump hold a digest and a
ciphertext that only the caller's token opens; a follow-up opens it with the token it carries and
goes upstream with Google's id, while its flow, log line and records keep the token.

Anything that is not a token of this form, or does not open its sealed id, lets nothing through
(`unseal` fails closed and never raises). Pure logic (the `cryptography` package, no mitmproxy).
"""

from __future__ import annotations

import base64
import binascii
import os
import re

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PREFIX = "gp1."
TOKEN_BYTES = 32
NONCE_BYTES = 12
MAX_SEALED = 4096  # characters: Google's upload ids are a few hundred at most
_TOKEN = re.compile(r"gp1\.[A-Za-z0-9_-]{43}")
_INFO = b"gemini-proxy upload id v1"  # HKDF info: this key seals upload ids only
_AAD = b"gemini-proxy sealed upload id"


def new_token() -> str:
    """A fresh upload token, 256 random bits: what the caller's upload URL names as upload_id."""
    return PREFIX + _b64(os.urandom(TOKEN_BYTES))


def is_token(value: str) -> bool:
    """A string of the token's form (says nothing about whether a session has it)."""
    return _TOKEN.fullmatch(value) is not None


def seal(token: str, upload_id: str) -> str:
    """Google's `upload_id`, encrypted under a key only `token` gives: base64url(nonce | ct | tag)."""
    nonce = os.urandom(NONCE_BYTES)
    return _b64(nonce + AESGCM(_key(token)).encrypt(nonce, upload_id.encode(), _AAD))


def unseal(token: str, sealed: str) -> str | None:
    """Google's upload_id sealed under `token`; None for the wrong token, a tampered or malformed
    ciphertext, or anything that is not a token. Never raises."""
    if not is_token(token) or not 0 < len(sealed) <= MAX_SEALED:
        return None
    try:
        raw = base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4))
        if len(raw) <= NONCE_BYTES + 16:
            return None
        plain = AESGCM(_key(token)).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _AAD)
        return plain.decode()
    except (InvalidTag, binascii.Error, ValueError):  # UnicodeDecodeError is a ValueError
        return None


def _key(token: str) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO)
    return hkdf.derive(token.encode())


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
