#!/usr/bin/env bash
# Create .venv and install attnlab with its test extras. Idempotent and quick when done.
#
# torch: a CPU build is preferred on machines without an NVIDIA GPU. Where a local CPU wheel
# lies in pip's find-links folders (as on attnlab's build machines), pin its version so pip
# takes the file instead of downloading a several-GB CUDA build. Elsewhere pip resolves
# `torch>=2.5` normally. ATTNLAB_TORCH overrides the requirement (e.g. "torch==2.5.1").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.attnlab-installed

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  spec=${ATTNLAB_TORCH:-}
  if [ -z "$spec" ]; then
    dirs="${PIP_FIND_LINKS:-} $("$VENV/bin/python" -m pip config get global.find-links 2>/dev/null || true)"
    for d in $dirs; do
      d=${d#file://}
      wheel=$(ls "$d"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
      if [ -n "$wheel" ]; then
        spec="torch==$(basename "$wheel" | cut -d- -f2)"
        break
      fi
    done
  fi
  spec=${spec:-"torch>=2.5"}
  echo "attnlab setup: installing $spec"
  pip install "$spec"
fi

# Reinstall the project when its metadata changed since the last setup.
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  echo "attnlab setup: installing attnlab[dev] (editable)"
  pip install -e ".[dev]"
  touch "$STAMP"
fi
