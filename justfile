# gemini-proxy tasks. `just --list` shows them. Each sets up .venv on first use.

# run the proxy (demo if there is no keys.yaml and no GEMINI_API_KEYS); args go to mitmdump
run *ARGS:
    ./scripts/run {{ARGS}}

# the same under mitmweb (web UI on http://127.0.0.1:8081)
web *ARGS:
    GEMINI_PROXY_TOOL=mitmweb ./scripts/run {{ARGS}}

# N mitmdump workers sharing one key pool on Redis, behind HAProxy on 127.0.0.1:8080; args go to each mitmdump
workers N *ARGS:
    ./scripts/run --workers {{N}} {{ARGS}}

# the demo against the local fake Gemini, even if keys.yaml exists
demo *ARGS:
    GEMINI_PROXY_DEMO=1 ./scripts/run {{ARGS}}

# the whole test suite (ruff, mypy, pytest); args go to pytest
test *ARGS:
    ./scripts/test {{ARGS}}

# ruff and mypy only
lint:
    ./scripts/lint

# benchmark against bare mitmdump and a direct connection; writes scripts/bench_results.md
bench *ARGS:
    ./scripts/bench {{ARGS}}

# LiteLLM, LangChain and the Gemini CLI through the proxy (installs them into .cache/clients first)
check-clients *ARGS:
    ./scripts/check_clients {{ARGS}}

# build the container image (scripts/deploy/Containerfile) and run it against the fake Gemini (podman; installs it first)
check-container *ARGS:
    ./scripts/check_container {{ARGS}}
