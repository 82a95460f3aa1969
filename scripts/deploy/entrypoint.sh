#!/bin/sh
# The container's entrypoint (scripts/deploy/Containerfile): mitmdump with the gemini-proxy addon.
# Arguments are mitmdump's; without --mode it proxies to GEMINI_UPSTREAM (Google). It sets the
# key file (GEMINI_KEYS_FILE), the SQLite file and mitmproxy's confdir (in GEMINI_STATE_DIR, the
# volume) and the admin address (GEMINI_ADMIN), unless an argument sets one (`--set gemini_db=...`).
# The HEALTHCHECK reads GEMINI_ADMIN: move the admin port with it, not with --set gemini_admin.
# `exec`: mitmdump is PID 1 and gets SIGTERM itself; it drains the requests in flight, then exits 0.
set -eu
APP=/opt/gemini-proxy
STATE=${GEMINI_STATE_DIR:-/var/lib/gemini-proxy}
KEYS=${GEMINI_KEYS_FILE:-/etc/gemini-proxy/keys.yaml}
ADMIN=${GEMINI_ADMIN-0.0.0.0:8090}

mode= info= given=' ' prev=
for a in "$@"; do
  if [ "$prev" = --set ]; then given="$given${a%%=*} "; fi
  case $a in
    --set=*) a=${a#--set=} && given="$given${a%%=*} " ;;
    --mode | --mode=* | -m) mode=1 ;;
    -h | --help | --options | --commands | --version) info=1 ;;
  esac
  prev=$a
done
case $given in *" gemini_keys "*) KEYS= ;; esac # the arguments name the key file
if [ -z "$info" ] && [ -n "$KEYS" ] && [ ! -f "$KEYS" ] && [ -z "${GEMINI_API_KEYS:-}" ]; then
  echo "gemini-proxy: no key file at $KEYS and no GEMINI_API_KEYS. Mount one" \
    "(-v /path/keys.yaml:$KEYS:ro) or set GEMINI_API_KEYS=key1,key2" >&2
  exit 2
fi
if [ ! -w "$STATE" ]; then
  echo "gemini-proxy: the state directory $STATE is not writable by uid $(id -u)" \
    "(a bind mount: chown it to 10001)" >&2
  exit 2
fi
# mitmproxy refuses an option set twice: each default only where the arguments do not set it
for opt in "confdir=$STATE/mitmproxy" "gemini_keys=$KEYS" "gemini_db=$STATE/gemini-proxy.db" \
  "gemini_admin=$ADMIN"; do
  case $given in *" ${opt%%=*} "*) ;; *) set -- --set "$opt" "$@" ;; esac
done
if [ -z "$mode" ]; then
  set -- --mode "reverse:${GEMINI_UPSTREAM:-https://generativelanguage.googleapis.com}" "$@"
fi
exec "$APP/.venv/bin/mitmdump" -s "$APP/addon/gemini_proxy.py" "$@"
