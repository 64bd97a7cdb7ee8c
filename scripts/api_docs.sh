#!/usr/bin/env bash
# Builds the API reference from the docstrings into docs/api/ (HTML, searchable, works offline).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
python -m pdoc visenv rl baselines -o "${1:-docs/api}"
echo "API reference written to ${1:-docs/api}/index.html"
