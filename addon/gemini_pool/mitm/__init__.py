"""The mitmproxy layer: everything that imports mitmproxy lives in this package, nothing else does.

gemini-proxy is a few addons of one concern each, sharing one Runtime (`runtime.current()`):
  StartupGuard  - no gate, no service: refuses every flow until the key file loaded (startup_guard.py)
  Options       - gemini_* options, validation, the key file, the database (options.py)
  Lifecycle     - side servers on `running`, the drain on `done` (lifecycle.py)
  UploadCatchUp - an upload's bytes wait for their session from another worker (upload_catchup.py)
  Gatekeeper    - who may use the proxy, on the request head (gatekeeper.py)
  Forwarding    - a flow into the request pipeline, its decision back onto the flow (forwarding.py)
  Console       - gemini.* commands, mitmweb comments and marks (console.py)
"""

from __future__ import annotations

from typing import Any

from ..config import EMPTY
from ..runtime import current
from .console import Console
from .forwarding import Forwarding
from .gatekeeper import Gatekeeper
from .lifecycle import Lifecycle
from .options import Options
from .startup_guard import StartupGuard
from .upload_catchup import UploadCatchUp


def make_addons() -> list[Any]:
    """The addons in hook order: the guard first and last, options validated before anything runs."""
    rt = current()
    options = Options(rt)
    guard = StartupGuard(lambda: rt.service.config is not EMPTY)
    return guard.around(
        [
            options,
            Lifecycle(rt),
            UploadCatchUp(lambda: rt.service),
            Gatekeeper(rt),
            Forwarding(rt),
            Console(rt),
        ],
        options,
    )
