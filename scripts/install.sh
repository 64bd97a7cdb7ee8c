#!/usr/bin/env bash
# Installs visenv and everything its tests and main job need, from this repository's own files.
# torch goes first and on its own (pip's torch cap on this machine keeps it to the local wheel);
# the constraints file pins every version known to work together.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check -c constraints.txt torch torchvision
python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[all]"
