#!/usr/bin/env bash
# Idempotent set-up: a project venv in .venv with the pinned dependencies and crossroute installed.
# Re-running it is cheap: it reinstalls only when requirements.lock or pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
# bubblewrap: the code sandbox's preferred jail (without it crossroute uses util-linux unshare). Best effort.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  timeout 120 apt-get install -y -q bubblewrap >/dev/null 2>&1 || true
fi
stamp=.venv/.crossroute-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 first: on these machines pip takes the CPU build from local disk (no CUDA download).
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.lock
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
