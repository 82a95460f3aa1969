"""The mitmproxy layer: everything that imports mitmproxy lives in this package, nothing else does.

gemini-proxy is a few addons of one concern each, sharing one Runtime (`runtime.current()`):
  Options     - gemini_* options, validation, the key file, the database (options.py)
  Lifecycle   - side servers on `running`, the drain on `done` (lifecycle.py)
  Gatekeeper  - who may use the proxy, on the request head (gatekeeper.py)
  Forwarding  - a flow into the request pipeline, its decision back onto the flow (forwarding.py)
  Console     - gemini.* commands, mitmweb comments and marks (console.py)
"""

from __future__ import annotations

from ..runtime import current
from .console import Console
from .forwarding import Forwarding
from .gatekeeper import Gatekeeper
from .lifecycle import Lifecycle
from .options import Options

Addon = Options | Lifecycle | Gatekeeper | Forwarding | Console


def make_addons() -> list[Addon]:
    """The addons in hook order: options are validated before anything else runs."""
    rt = current()
    return [Options(rt), Lifecycle(rt), Gatekeeper(rt), Forwarding(rt), Console(rt)]
