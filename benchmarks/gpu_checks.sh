#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with one CUDA GPU and the CUDA build of torch:
# the tests that need a GPU, then the table of each GPU speed target (issues 4-7).
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]     # ~6-8 min on one H100; one .txt per step in OUT_DIR
#
# Each step has its own time limit, so that a slow one cannot use up a lent machine's time; a failed step
# is reported and the next one runs. Record the figures in the README's "Measured speed" table.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: torch sees no CUDA GPU here (install the CUDA build of torch==2.13.0 on a GPU machine)" >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local status=$?
  tail -n 25 "$out/$name.txt"
  echo "=== $name: exit $status after $((SECONDS - start)) s"
}

step cuda_tests 120 python3 -m pytest -q tests/test_ridge.py -k cuda                        # 06's CUDA branches
step bench_vqvae 150 python3 benchmarks/bench_vqvae.py --precisions fp32 bf16 --steps 10   # issue 4: >= 250 clips/s
step bench_gpt 120 python3 benchmarks/bench_gpt.py --precisions bf16 fp16 --steps 20       # issue 5: >= 4,000 clips/s
step bench_extract 90 python3 benchmarks/bench_extract.py --precisions bf16                # issue 6: TRs/s
step bench_ridge 150 python3 benchmarks/bench_ridge.py --device cuda --paper-scale         # issue 7: < 60 s
