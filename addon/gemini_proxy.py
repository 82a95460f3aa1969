"""gemini-proxy: a key-pool reverse proxy for Google's Gemini API, as a mitmproxy addon.

    mitmdump -s addon/gemini_proxy.py --mode reverse:https://generativelanguage.googleapis.com

This entry script stays tiny on purpose: mitmproxy re-imports only this file when it changes,
so the proxy's state and servers live in the gemini_pool package and survive a reload.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemini_pool.addon import GeminiProxy
from gemini_pool.config import EMPTY
from gemini_pool.startup_guard import StartupGuard
from gemini_pool.upload_catchup import UploadCatchUp

_proxy = GeminiProxy()
# the guard refuses every flow until the proxy has configured with its keys (and stops mitmdump
# when it cannot); upload follow-ups wait for their session's pin from another worker
addons = StartupGuard(lambda: _proxy.service.config is not EMPTY).around(
    _proxy, UploadCatchUp(lambda: _proxy.service)
)
