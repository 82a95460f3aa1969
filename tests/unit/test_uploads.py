"""Upload and download URLs at Google pointed back at the proxy, at the address the caller used."""

from __future__ import annotations

import ipaddress

from gemini_pool.uploads import Where, proxy_origin, rewrite_upload_headers

GOOGLE = "generativelanguage.googleapis.com"


def test_upload_urls_point_at_the_proxy_and_name_their_upload() -> None:
    headers = [
        (
            "X-Goog-Upload-URL",
            f"https://{GOOGLE}/upload/v1beta/files?upload_id=abc&upload_protocol=resumable",
        ),
        ("Location", "https://storage.example.com/elsewhere"),
        ("Content-Type", "text/plain"),
    ]
    out, started = rewrite_upload_headers(headers, GOOGLE, "http://127.0.0.1:8080")
    ids = [upload_id for upload_id, _ in started]
    assert out[0] == (
        "X-Goog-Upload-URL",
        "http://127.0.0.1:8080/upload/v1beta/files?upload_id=abc&upload_protocol=resumable",
    )
    assert out[1:] == headers[1:]  # other hosts and headers untouched
    assert ids == ["abc"]
    control = (
        "X-Goog-Upload-Control-URL",
        f"https://{GOOGLE}/upload/v1beta/files?upload_id=abc&upload_protocol=resumable",
    )
    out2, uploads = rewrite_upload_headers([*headers, control], GOOGLE, "http://p")
    assert uploads == [("abc", "/upload/v1beta/files")]  # one session, with its path
    assert out2[3] == (control[0], "http://p/upload/v1beta/files?" + control[1].split("?")[1])


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
