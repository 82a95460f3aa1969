# Sourced by scripts/run, scripts/test and scripts/bench: make sure .venv exists and is current.
# Creates .venv from a Python >= 3.12 found on PATH or under pyenv, then `pip install -e .[dev]`.
# Re-installs when pyproject.toml changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"

_python_ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

_find_python() {
  local c
  for c in ${GEMINI_PROXY_PYTHON:-} python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && _python_ok "$c"; then command -v "$c"; return 0; fi
  done
  for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python3; do
    if [[ -x $c ]] && _python_ok "$c"; then echo "$c"; return 0; fi
  done
  return 1
}

if [[ ! -x $VENV/bin/python ]]; then
  PY=$(_find_python) || { echo "gemini-proxy needs Python >= 3.12 (mitmproxy 12.3); none found on PATH (python3.13, python3.12, python3) or under pyenv. Install one, or set GEMINI_PROXY_PYTHON=/path/to/python3.12." >&2; exit 1; }
  echo "setting up .venv with $PY (first run only)..." >&2
  "$PY" -m venv "$VENV"
fi

stamp="$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -c1-16)"
if [[ ! -f $stamp ]]; then
  echo "installing gemini-proxy and its dependencies into .venv..." >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]" >&2
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"

# os_bin NAME: the path of a system binary, also when it lives in an sbin directory that is not on
# a non-root user's PATH (Debian puts haproxy in /usr/sbin). Fails when there is none.
os_bin() {
  local d
  if command -v "$1" 2>/dev/null; then return 0; fi
  for d in /usr/sbin /sbin /usr/local/sbin; do
    if [[ -x $d/$1 ]]; then echo "$d/$1"; return 0; fi
  done
  return 1
}

# ensure_os_packages PKG...: install missing OS packages on first use, like the venv above.
# Each argument is a package whose binary has the same name (redis-server, haproxy), or
# BINARY=PACKAGE, or ALT1|ALT2=PACKAGE (any of the binaries will do, e.g. redis-server|valkey-server).
# Silent when everything is there. As root with apt-get: `apt-get install -y` (after
# `apt-get update` when the package lists are empty or the first try fails). Otherwise it prints
# the exact command to run and fails.
ensure_os_packages() {
  local arg bins pkg b found missing=() alts=()
  for arg in "$@"; do
    bins=${arg%%=*}; pkg=${arg#*=}; found=
    IFS='|' read -ra alts <<<"$bins"
    for b in "${alts[@]}"; do os_bin "$b" >/dev/null && { found=1; break; }; done
    [[ -n $found ]] || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "gemini-proxy needs ${missing[*]} (the OS packages; on Fedora: dnf install redis haproxy, on macOS: brew install redis haproxy). Install them and run this again." >&2
    return 1
  fi
  if [[ $(id -u) != 0 ]]; then
    echo "gemini-proxy needs the OS packages ${missing[*]}. Install them with:" >&2
    echo "  sudo apt-get install -y ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]} from the OS packages (first use only)..." >&2
  local out rc=0
  out=$(mktemp)
  export DEBIAN_FRONTEND=noninteractive
  if ! compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null \
    || ! apt-get install -y -q --no-install-recommends "${missing[@]}" >"$out" 2>&1; then
    { apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; } >"$out" 2>&1 || rc=$?
  fi
  if ((rc)); then
    cat "$out" >&2
    echo "could not install ${missing[*]} (apt-get failed, output above)" >&2
  fi
  rm -f "$out"
  return "$rc"
}
