#!/usr/bin/env bash
# The GPU path on one GPU in under 10 minutes: the suite's CUDA tests (tests/test_cuda.py: bf16/fp16 plug-in,
# capture, off- and on-policy training, sampling, eval) and `toe bench --shapes` at the real depth of the seed's
# pair (Qwen2.5-1.5B base, DeepSeek-R1-Distill-Qwen-7B teacher: random weights of the real configurations, bf16).
# Usage: runs/gpu_check.sh OUT_DIR. Needs torch with CUDA, transformers, accelerate, peft, safetensors, matplotlib
# and pytest; the package is read from src/ (no install). Results: results/bench/gpu-<card>/ (committed).
set -uo pipefail
out=${1:?usage: runs/gpu_check.sh OUT_DIR}
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$out"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, transformers, peft, accelerate
print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__,
      'accelerate', accelerate.__version__)"; } > "$out/machine.txt" 2>&1
cat "$out/machine.txt"
timeout 120 python3 -m pytest tests/test_cuda.py tests/test_bench.py -q -p no:cacheprovider \
  -o addopts="" -m "not slow" 2>&1 | tail -40 > "$out/cuda_tests.log"
tail -5 "$out/cuda_tests.log"
bench() {  # bench NAME SHAPES [bench() keyword arguments]
  timeout 170 python3 - "$out/$1" "$2" "${3:-}" <<'PY' 2>&1 | grep -v -i "warn" | tail -5
import sys
from tree_of_experts.commands.bench import bench
extra = eval(f"dict({sys.argv[3]})")
r = bench(shapes=sys.argv[2], dtype="bfloat16", out=sys.argv[1], reps=3, batches=[1, 8], new_tokens=64,
          prompt_len=256, extract_batch=4, extract_length=1024, train_batch=4, train_length=1024, overwrite=True,
          **extra)
print(r["summary"])
PY
}
bench bench-1.5b-7b qwen2.5-1.5b:deepseek-r1-distill-qwen-7b
bench bench-3b-7b qwen2.5-3b:deepseek-r1-distill-qwen-7b "parts=['generation', 'training', 'extraction']"
