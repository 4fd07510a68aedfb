#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs what is missing, then runs
#   bash dev.sh demo           the main job (`mirrorprune demo`; any mirrorprune subcommand works)
#   bash dev.sh test [ARGS]    ruff + the test suite (what CI runs)
# Torch: if the venv has none, the CPU wheel torch==$MIRRORPRUNE_TORCH (default 2.13.0) is
# installed first, so pip does not fetch a multi-GB CUDA build; set MIRRORPRUNE_TORCH to change it.
set -euo pipefail
cd "$(dirname "$0")"
venv=${MIRRORPRUNE_VENV:-.venv}
py=$venv/bin/python

if [ ! -x "$py" ]; then
  if ! python3 -m venv "$venv" 2>/dev/null; then
    # Debian ships venv separately; install it when we can, else say what is missing.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$venv"; python3 -m venv "$venv"
    else
      echo "dev.sh: python3 -m venv failed; install it (Debian: sudo apt-get install python3-venv)" >&2
      exit 1
    fi
  fi
fi
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==${MIRRORPRUNE_TORCH:-2.13.0}"
# Reinstall the package only when its metadata changed (the source is an editable install).
stamp=$venv/.mirrorprune-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$py" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  test)
    "$py" -m ruff check src tests
    exec "$py" -m pytest -q "$@"
    ;;
  *)
    exec "$venv/bin/mirrorprune" "$cmd" "$@"
    ;;
esac
