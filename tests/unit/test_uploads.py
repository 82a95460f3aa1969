"""Upload and download URLs at Google pointed back at the proxy, at the address the caller used."""

from __future__ import annotations

import ipaddress

from gemini_pool.upload_tokens import is_token, new_token
from gemini_pool.uploads import (
    Where,
    mask_upload_ids,
    names_upload_id,
    proxy_origin,
    rewrite_upload_headers,
    upstream_query,
)

GOOGLE = "generativelanguage.googleapis.com"


def test_upload_urls_point_at_the_proxy_with_a_token_of_ours_never_googles_id() -> None:
    google_id = "AbC-googles-own_id.123"
    url = f"https://{GOOGLE}/upload/v1beta/files?upload_id={google_id}&upload_protocol=resumable"
    headers = [
        ("X-Goog-Upload-URL", url),
        ("X-Goog-Upload-Control-URL", url),
        ("X-GUploader-UploadID", google_id),
        ("Location", "https://storage.example.com/elsewhere"),
        ("Content-Type", "text/plain"),
    ]
    out, started = rewrite_upload_headers(headers, GOOGLE, "http://127.0.0.1:8080")
    assert [(s.upload_id, s.path) for s in started] == [(google_id, "/upload/v1beta/files")]
    token = started[0].token
    assert is_token(token)
    assert out[:2] == [
        (
            name,
            f"http://127.0.0.1:8080/upload/v1beta/files?upload_id={token}&upload_protocol="
            "resumable",
        )
        for name in ("X-Goog-Upload-URL", "X-Goog-Upload-Control-URL")
    ]  # one session, one token, in both URLs
    assert out[2:] == headers[3:]  # Google's uploader id goes; other hosts and headers stay
    assert google_id not in repr(out)
    # a follow-up's answer naming its own session again: the caller's token, no new session
    again, none = rewrite_upload_headers(headers, GOOGLE, "http://p", {google_id: token})
    assert none == [] and token in again[0][1] and google_id not in repr(again)


def test_a_follow_up_goes_upstream_with_googles_id_in_place_of_every_upload_id() -> None:
    token = new_token()
    query = f"upload_id={token}&upload_protocol=resumable&uploadId=x&%75pload_id=y"
    assert upstream_query(query, "g/1+") == "upload_id=g%2F1%2B&upload_protocol=resumable"
    assert upstream_query("alt=json", "g") == "alt=json"  # (a follow-up always names one)
    assert names_upload_id(query) and names_upload_id("uploadId=1")
    assert names_upload_id("%2575pload_id=1") and not names_upload_id("upload=1&alt=json")


def test_a_refused_requests_upload_ids_show_only_as_the_proxys_tokens() -> None:
    token = new_token()
    query = f"upload_id=googles-id&alt=json&uploadId=x%2By&upload_id={token}"
    assert (
        mask_upload_ids(query) == f"upload_id=redacted&alt=json&uploadId=redacted&upload_id={token}"
    )
    assert mask_upload_ids("alt=json") == "alt=json"


def test_the_origin_upload_urls_point_at() -> None:
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert proxy_origin(Where(host="gw:8080")) == "http://gw:8080"
    assert proxy_origin(Where(host="gw:8080", tls=True)) == "https://gw:8080"
    assert proxy_origin(Where(local=("::1", 8080))) == "http://[::1]:8080"
    assert proxy_origin(Where(host="gw"), "https://pub.example/") == "https://pub.example"
    fwd = Where(host="gw", peer="10.1.2.3", forwarded_host="pub.example", forwarded_proto="http")
    assert proxy_origin(fwd, trusted=trusted) == "http://pub.example"
    assert proxy_origin(fwd) == "http://gw"  # nobody trusted: X-Forwarded-Host is ignored
    untrusted = Where(host="gw", peer="192.0.2.1", forwarded_host="evil.example")
    assert proxy_origin(untrusted, trusted=trusted) == "http://gw"
    bad = Where(host="gw", peer="10.1.2.3", forwarded_host="evil.example/path")
    assert proxy_origin(bad, trusted=trusted) == "http://gw"
