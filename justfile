# gemini-proxy tasks. `just --list` shows them. Each sets up .venv on first use.
# The serving recipes run scripts/run as a job of its own (bash's job control) when in a terminal:
# a Ctrl-C then stops the proxy cleanly and just reports nothing (it never saw the signal).

# run the proxy (demo if there is no keys.yaml and no GEMINI_API_KEYS); args go to mitmdump
run *ARGS:
    #!/usr/bin/env bash
    [[ -t 0 ]] && set -m # in a terminal, a Ctrl-C reaches scripts/run alone: no "interrupted" from just
    ./scripts/run {{ARGS}}

# the same under mitmweb (web UI on http://127.0.0.1:8081)
web *ARGS:
    #!/usr/bin/env bash
    [[ -t 0 ]] && set -m # in a terminal, a Ctrl-C reaches scripts/run alone: no "interrupted" from just
    GEMINI_PROXY_TOOL=mitmweb ./scripts/run {{ARGS}}

# N mitmdump workers sharing one key pool on Redis, behind HAProxy on 127.0.0.1:8080; args go to each mitmdump
workers N *ARGS:
    #!/usr/bin/env bash
    [[ -t 0 ]] && set -m # in a terminal, a Ctrl-C reaches scripts/run alone: no "interrupted" from just
    ./scripts/run --workers {{N}} {{ARGS}}

# the demo against the local fake Gemini, even if keys.yaml exists
demo *ARGS:
    #!/usr/bin/env bash
    [[ -t 0 ]] && set -m # in a terminal, a Ctrl-C reaches scripts/run alone: no "interrupted" from just
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
