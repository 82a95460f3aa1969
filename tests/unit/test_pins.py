"""Project-bound resources: upload URLs point back at the proxy; files stay with their project."""

from gemini_pool.pins import ResourcePins, rewrite_upload_urls

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
    out, ids = rewrite_upload_urls(headers, GOOGLE, "http://127.0.0.1:8080")
    assert out[0] == (
        "X-Goog-Upload-URL",
        "http://127.0.0.1:8080/upload/v1beta/files?upload_id=abc&upload_protocol=resumable",
    )
    assert out[1:] == headers[1:]  # other hosts and headers untouched
    assert ids == ["abc"]


def test_resources_are_pinned_to_the_project_that_made_them() -> None:
    pins = ResourcePins()
    pins.remember_resources(b'{"file": {"name": "files/abc123", "uri": "..."}}', "proj-a")
    assert pins.project_for("/v1beta/files/abc123", b"") == "proj-a"
    body = (
        b'{"contents": [{"parts": [{"fileData": {"fileUri": "https://x/v1beta/files/abc123"}}]}]}'
    )
    assert pins.project_for("/v1beta/models/m:generateContent", body) == "proj-a"
    assert pins.project_for("/v1beta/files/other", b"") is None
    pins.remember_upload("up-1", "alpha")
    assert pins.upload_key("up-1") == "alpha" and pins.upload_key("up-2") is None


def test_a_resource_named_late_in_a_large_body_is_found_and_lookalikes_are_not() -> None:
    pins = ResourcePins()
    assert pins.project_for("/v1beta/files/abc123", b"") is None  # nothing pinned yet
    pins.remember_resources(b'{"name": "cachedContents/c-9"} {"name": "files/abc123"}', "proj-a")
    inline = b"x " * 1_000_000  # 2 MB of inline text before the file reference
    body = b'{"contents": [{"parts": [{"text": "' + inline + b'"}, '
    body += b'{"fileData": {"fileUri": "https://x/v1beta/files/abc123"}}]}]}'
    assert pins.project_for("/v1beta/models/m:generateContent", body) == "proj-a"
    assert pins.project_for("/v1beta/models/m:generateContent", b'{"c": "cachedContents/c-9"}') == (
        "proj-a"
    )
    # "myfiles/abc123" is not files/abc123 (a word boundary is needed before the kind)
    assert pins.project_for("/v1beta/models/m:generateContent", b'{"t": "myfiles/abc123"}') is None
