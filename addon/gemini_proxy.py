"""gemini-proxy: a key-pool reverse proxy for Google's Gemini API, as mitmproxy addons.

    mitmdump -s addon/gemini_proxy.py --mode reverse:https://generativelanguage.googleapis.com

This entry script stays tiny on purpose: mitmproxy re-imports only this file when it changes,
so the proxy's state and servers live in the gemini_pool package and survive a reload.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gemini_pool.mitm import make_addons

addons = make_addons()
