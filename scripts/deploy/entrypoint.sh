#!/bin/sh
# The container's entrypoint (scripts/deploy/Containerfile): mitmdump with the gemini-proxy addon.
# Arguments are mitmdump's; without --mode it proxies to GEMINI_UPSTREAM (Google). It sets the
# key file (GEMINI_KEYS_FILE), the SQLite file and mitmproxy's confdir (in GEMINI_STATE_DIR, the
# volume) and the admin address (GEMINI_ADMIN); a --set given as an argument comes later and wins.
# `exec`: mitmdump is PID 1 and gets SIGTERM itself; it drains the requests in flight, then exits 0.
set -eu
APP=/opt/gemini-proxy
STATE=${GEMINI_STATE_DIR:-/var/lib/gemini-proxy}
KEYS=${GEMINI_KEYS_FILE:-/etc/gemini-proxy/keys.yaml}
ADMIN=${GEMINI_ADMIN-0.0.0.0:8090}

mode= info=
for a in "$@"; do
  case $a in
    --mode | --mode=* | -m) mode=1 ;;
    -h | --help | --options | --commands | --version) info=1 ;;
  esac
done
if [ -z "$info" ] && [ ! -f "$KEYS" ] && [ -z "${GEMINI_API_KEYS:-}" ]; then
  echo "gemini-proxy: no key file at $KEYS and no GEMINI_API_KEYS. Mount one" \
    "(-v /path/keys.yaml:$KEYS:ro) or set GEMINI_API_KEYS=key1,key2" >&2
  exit 2
fi
if [ -z "$mode" ]; then
  set -- --mode "reverse:${GEMINI_UPSTREAM:-https://generativelanguage.googleapis.com}" "$@"
fi
if [ ! -w "$STATE" ]; then
  echo "gemini-proxy: the state directory $STATE is not writable by uid $(id -u)" \
    "(a bind mount: chown it to 10001)" >&2
  exit 2
fi
exec "$APP/.venv/bin/mitmdump" -s "$APP/addon/gemini_proxy.py" \
  --set confdir="$STATE/mitmproxy" \
  --set gemini_keys="$KEYS" --set gemini_db="$STATE/gemini-proxy.db" --set gemini_admin="$ADMIN" \
  "$@"
