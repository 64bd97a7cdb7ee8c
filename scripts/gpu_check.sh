#!/usr/bin/env bash
# Runs the CUDA tests (tests/test_gpu.py) on a GPU machine, from the repository root; the log goes to
# ${OUT:-/tmp}/gpu_tests.log. Needs torch, transformers, peft and gymnasium; not Ray, not open_clip.
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="${OUT:-/tmp}/gpu_tests.log"
mkdir -p "$(dirname "$LOG")"
{
  nvidia-smi -L || echo "nvidia-smi not found"
  python3 - <<'EOF'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "gymnasium"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as err:
        print(name, "missing:", err)
EOF
  python3 -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_gpu.py
  python3 -c "import vllm; print('vllm', vllm.__version__)" || echo "vllm missing: the vLLM engine test was skipped (pip install 'visenv[vllm]')"
} 2>&1 | tee "$LOG"
status=$?
if [ "$status" = 0 ] && ! python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  echo "no CUDA device: every test was skipped" | tee -a "$LOG"; status=3
fi
echo "exit status $status; log: $LOG"
exit $status
