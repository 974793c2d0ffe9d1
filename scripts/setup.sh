#!/usr/bin/env bash
# Build .venv with the verified stack (docs/dependencies.md) on a fresh machine, or do nothing when it is
# already built from the same constraints.txt + pyproject.toml. Idempotent; safe to call every time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# the stamp covers what decides the install: the pins and the declared dependencies (not lint/test settings)
stamp=$({ cat constraints.txt; sed -n '/^dependencies = \[/,/^]/p;/^test = /p' pyproject.toml; } | sha256sum | cut -c1-16)
if [ -x "$VENV/bin/python" ] && [ "$(cat "$VENV/.stamp" 2>/dev/null)" = "$stamp" ]; then
  exit 0
fi
echo "[setup] building $VENV (first time: ~3 min, 6.5 GB; torch is the CUDA build, it runs on CPU too)"
python3 -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q -c constraints.txt)
"$VENV/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
"${pip[@]}" torch torchvision                       # first, so nothing pulls another torch build
"${pip[@]}" -e '.[test]'
# image-reward pins timm==0.6.13 (open_clip needs timm>=1.0.17): install it and its `clip` module
# without their declared deps; what they really import is in pyproject's dependencies.
"${pip[@]}" --no-deps image-reward==1.5 clip-anytorch==2.6.0
echo "$stamp" > "$VENV/.stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch,diffusers,ray;print("torch",torch.__version__,"diffusers",diffusers.__version__,"ray",ray.__version__)')"
