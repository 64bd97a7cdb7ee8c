#!/usr/bin/env bash
# Runs, on a GPU machine and from the repository root, the CUDA tests (tests/test_gpu.py) and then a tiny
# Qwen2.5-VL through SFT -> GRPO with Ray GPU actors: learner workers (nccl, ddp then fsdp) and rollout
# workers on the GPUs (scripts/gpu_pipeline.py). The log goes to ${OUT:-/tmp}/gpu_tests.log. Needs torch,
# transformers, peft, gymnasium and ray; not open_clip. Without a CUDA device nothing runs on a GPU and the
# script says so (exit status 3); `python scripts/gpu_pipeline.py --device cpu` is the pipeline's CPU dry run.
set -uo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG="${OUT:-/tmp}/gpu_tests.log"
mkdir -p "$(dirname "$LOG")"
has_cuda() { python3 -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; }
{
  nvidia-smi -L || echo "nvidia-smi not found"
  python3 - <<'PY'
import importlib, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "gymnasium", "ray"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as err:
        print(name, "missing:", err)
PY
  python3 -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_gpu.py
  tests=$?
  python3 -c "import vllm; print('vllm', vllm.__version__)" || echo "vllm missing: the vLLM engine test was skipped (pip install 'visenv[vllm]')"
  if has_cuda; then
    echo "== SFT -> GRPO with Ray GPU actors (scripts/gpu_pipeline.py)"
    timeout 900 python3 scripts/gpu_pipeline.py
    pipeline=$?
  else
    echo "no CUDA device: the SFT -> GRPO pipeline with Ray GPU actors (scripts/gpu_pipeline.py) did not run"
    pipeline=3
  fi
  echo "CUDA tests: exit status $tests; pipeline: exit status $pipeline (0 passed, 1 a step failed, 3 no GPU)"
  [ "$tests" = 0 ] && [ "$pipeline" = 0 ]
} 2>&1 | tee "$LOG"
status=$?
if ! has_cuda; then
  echo "no CUDA device: every CUDA test was skipped and nothing ran on a GPU" | tee -a "$LOG"; status=3
fi
echo "exit status $status; log: $LOG"
exit $status
