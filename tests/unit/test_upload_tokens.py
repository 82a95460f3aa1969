"""Opaque upload tokens: Google's upload_id sealed under the caller's token, opened only by it."""

from __future__ import annotations

import base64

from hypothesis import given, settings
from hypothesis import strategies as st

from gemini_pool.pins import KIND_UPLOAD, ResourcePins, upload_digest
from gemini_pool.upload_tokens import PREFIX, is_token, new_token, seal, unseal

# Google's upload ids are URL-safe text; any text must survive the round trip all the same
IDS = st.text(min_size=1, max_size=300)
TOKENS = st.builds(lambda _: new_token(), st.integers())


def test_a_token_is_fresh_random_and_of_one_form() -> None:
    tokens = {new_token() for _ in range(200)}
    assert len(tokens) == 200
    for t in tokens:
        assert t.startswith(PREFIX) and is_token(t) and len(t) == len(PREFIX) + 43
        assert len(base64.urlsafe_b64decode(t[len(PREFIX) :] + "=")) == 32
    for not_one in ("", "gp1.", "abc", "gp1." + "A" * 42, "gp1." + "A" * 44, "gp1." + "+" * 43):
        assert not is_token(not_one)


@given(upload_id=IDS, token=TOKENS)
def test_the_sealed_id_opens_with_its_token(upload_id: str, token: str) -> None:
    sealed = seal(token, upload_id)
    assert unseal(token, sealed) == upload_id
    if len(upload_id) >= 8:  # (a byte or two may turn up in any ciphertext by chance)
        assert upload_id.encode() not in base64.urlsafe_b64decode(sealed + "==")
    assert token not in sealed
    assert seal(token, upload_id) != sealed  # a fresh nonce every time


@given(upload_id=IDS, token=TOKENS, other=TOKENS)
def test_the_wrong_token_opens_nothing(upload_id: str, token: str, other: str) -> None:
    sealed = seal(token, upload_id)
    assert other == token or unseal(other, sealed) is None
    # Google's id itself, or anything else not a token, never opens anything
    assert unseal(upload_id, sealed) is None or is_token(upload_id)
    assert unseal(token[:-1], sealed) is None


@settings(max_examples=300)
@given(upload_id=IDS, token=TOKENS, data=st.data())
def test_a_tampered_ciphertext_fails_closed(
    upload_id: str, token: str, data: st.DataObject
) -> None:
    raw = bytearray(base64.urlsafe_b64decode(seal(token, upload_id) + "=="))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    assert unseal(token, tampered) is None
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert unseal(token, base64.urlsafe_b64encode(bytes(raw[:cut])).decode()) is None


@given(token=TOKENS, junk=st.text(max_size=200))
def test_malformed_sealed_values_fail_closed_never_raise(token: str, junk: str) -> None:
    assert unseal(token, junk) is None
    assert unseal(token, "A" * 5000) is None


def test_the_pin_keeps_a_digest_and_a_ciphertext_never_the_token_or_googles_id() -> None:
    emitted = []
    pins = ResourcePins(on_pin=emitted.append)
    token, google_id = new_token(), "googles-upload-id-1234567890"
    pins.remember_upload(token, "alpha", "/upload/v1beta/files", 1000.0, seal(token, google_id))
    (pin,) = emitted
    assert pin.kind == KIND_UPLOAD and pin.name == upload_digest(token)
    assert token not in repr(pin) and google_id not in repr(pin)
    session = pins.upload_session(token, "PUT", "/upload/v1beta/files", 1001.0)
    assert session is not None and unseal(token, session.sealed) == google_id
    fresh = ResourcePins()  # another worker, or a restart, from the persisted row
    fresh.restore(emitted, 1001.0)
    again = fresh.upload_session(token, "POST", "/upload/v1beta/files", 1001.0)
    assert again is not None and unseal(token, again.sealed) == google_id
    pins.forget_upload(token, 1002.0)
    assert emitted[-1].sealed == "" and emitted[-1].expires == 1002.0  # ended: nothing kept
