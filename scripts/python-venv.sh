# shellcheck shell=bash
# Python venv for Switchyard's client-compatibility tests (openai and anthropic SDKs + pytest).
#
# Usage (sourced):
#   source scripts/python-venv.sh
#   ensure_python_venv      # exports SWITCHYARD_PYTHON=<venv>/bin/python
#
# The venv lives at ${SWITCHYARD_PY_VENV:-<repo>/.venv}. Safe under
# `set -euo pipefail`.

_SY_PYVENV_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." 2>/dev/null && pwd)" || _SY_PYVENV_REPO=""

ensure_python_venv() {
    local repo="${_SY_PYVENV_REPO:-}"
    if [ -z "$repo" ]; then
        printf '[python-venv] ERROR: cannot locate repository root\n' >&2
        return 1
    fi
    local venv="${SWITCHYARD_PY_VENV:-$repo/.venv}"

    if [ ! -x "$venv/bin/python" ]; then
        local py=""
        py="$(command -v python3 2>/dev/null)" || py=""
        if [ -z "$py" ]; then
            printf '[python-venv] ERROR: python3 not found on PATH\n' >&2
            return 1
        fi
        printf '[python-venv] creating %s\n' "$venv" >&2
        rm -rf "$venv"
        if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
            # Debian's python3 ships venv/ensurepip in python3-venv.
            if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
                printf '[python-venv] installing python3-venv\n' >&2
                timeout 300 apt-get update -qq >/dev/null 2>&1 || true
                timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
                    >/dev/null 2>&1 || true
            fi
            rm -rf "$venv"
            if ! "$py" -m venv "$venv" >/dev/null 2>&1; then
                printf '[python-venv] ERROR: %s -m venv %s failed\n' "$py" "$venv" >&2
                return 1
            fi
        fi
    fi

    # find_spec is a cheap presence check (importing openai takes ~2 s).
    if ! "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("openai") and u.find_spec("anthropic") and u.find_spec("pytest") else 1)' >/dev/null 2>&1; then
        printf '[python-venv] pip install openai anthropic pytest into %s\n' "$venv" >&2
        if ! timeout 600 "$venv/bin/python" -m pip install -q --disable-pip-version-check \
                openai anthropic pytest >"$venv/pip-install.log" 2>&1; then
            printf '[python-venv] ERROR: pip install failed; see %s/pip-install.log\n' "$venv" >&2
            tail -n 20 "$venv/pip-install.log" >&2 2>/dev/null || true
            return 1
        fi
        if ! "$venv/bin/python" -c 'import openai, anthropic, pytest' >/dev/null 2>&1; then
            printf '[python-venv] ERROR: openai/anthropic/pytest still not importable in %s\n' "$venv" >&2
            return 1
        fi
    fi

    export SWITCHYARD_PYTHON="$venv/bin/python"
    return 0
}
