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
