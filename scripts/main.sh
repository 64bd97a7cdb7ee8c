#!/usr/bin/env bash
# Installs visenv, then runs the main job on its embedded defaults and prints the results table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
source scripts/env.sh
python -m rl.cli main "$@"
