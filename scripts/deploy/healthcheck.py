"""The container's HEALTHCHECK: GET /healthz on the admin port (GEMINI_ADMIN). Exit 0 when 200."""

import os
import sys
import urllib.request

host, _, port = os.environ.get("GEMINI_ADMIN", "0.0.0.0:8090").rpartition(":")
host = host.strip("[]")
if host in ("", "0.0.0.0", "::"):
    host = "127.0.0.1"
elif ":" in host:
    host = f"[{host}]"
try:
    with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception as e:
    print(f"unhealthy: {e}", file=sys.stderr)
    sys.exit(1)
