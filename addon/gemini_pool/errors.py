"""Error bodies the proxy itself answers with, in the shape the caller's SDK parses.

Native paths: google.rpc.Status, `{"error": {"code", "message", "status", "details"}}` (google-genai).
OpenAI paths: `{"error": {"message", "type", "code"}}` (openai SDK).
"""

from __future__ import annotations

import json

from .routing import Api

GOOGLE_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    413: "INVALID_ARGUMENT",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

OPENAI_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


def error_body(api: Api, status: int, message: str, reason: str) -> bytes:
    if api is Api.OPENAI:
        doc: dict[str, object] = {
            "error": {
                "message": message,
                "type": OPENAI_TYPE.get(status, "server_error" if status >= 500 else "api_error"),
                "code": reason,
                "param": None,
            }
        }
    else:
        doc = {
            "error": {
                "code": status,
                "message": message,
                "status": GOOGLE_STATUS.get(status, "UNKNOWN"),
                "details": [
                    {
                        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": reason,
                        "domain": "gemini-proxy",
                    }
                ],
            }
        }
    return json.dumps(doc).encode()
