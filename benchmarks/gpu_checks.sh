#!/usr/bin/env bash
# Every GPU check of the project in one run, for a machine with one CUDA GPU and the CUDA build of torch:
# the tests that need a GPU, then each speed table, default paths and fast paths (torch.compile,
# channels-last + cuDNN autotuning, bf16 and fp16). Record the figures in benchmarks/README.md.
#
#   bash benchmarks/gpu_checks.sh [OUT_DIR]     # one .txt per step in OUT_DIR (default gpu_checks/)
#
# Each step has its own time limit, cut to what is left of the whole run's BUDGET_S (default 470 s), so
# that a slow step cannot use up a lent machine's time; a failed step is reported and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-gpu_checks}
budget=${BUDGET_S:-470}
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "error: torch sees no CUDA GPU here (install the CUDA build of torch on a GPU machine)" >&2
  exit 2
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$out/gpu.txt"

step() {  # name, time limit (s), command...
  local name=$1 limit=$2
  shift 2
  local left=$(( budget - SECONDS ))
  if [ "$left" -lt 20 ]; then
    echo "=== $name: skipped, the run's budget of ${budget} s is spent" | tee "$out/$name.txt"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "=== $name (limit ${limit} s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.txt" 2>&1
  local status=$?
  tail -n 25 "$out/$name.txt"
  echo "=== $name: exit $status after $((SECONDS - start)) s" | tee -a "$out/$name.txt"
}

# 06's CUDA branches against the CPU solver (the only tests that need a GPU)
step cuda_tests 90 python3 -m pytest -q -rs tests/test_ridge.py -k cuda
# 04: the GPT train step; target >= 4,000 clips/s in bf16
step gpt_eager 60 python3 benchmarks/bench_gpt.py --precisions bf16 fp16 --batch-size 64 --steps 20
step gpt_compiled 120 python3 benchmarks/bench_gpt.py --compile --precisions bf16 --batch-size 64 256 --steps 20
# 03: the VQ-VAE train step; target >= 250 clips/s in bf16
step vqvae_eager 60 python3 benchmarks/bench_vqvae.py --precisions fp32 bf16 --batch-size 16 --steps 10
step vqvae_fast_16 60 python3 benchmarks/bench_vqvae.py --channels-last --cudnn-benchmark --precisions bf16 fp16 \
  --batch-size 16 --steps 10
step vqvae_fast_32 60 python3 benchmarks/bench_vqvae.py --channels-last --cudnn-benchmark --precisions bf16 fp16 \
  --batch-size 32 --steps 10
# 05: feature rows per second at the paper's layer; target >= 1,000 TRs/s
step extract 60 python3 benchmarks/bench_extract.py --precisions bf16 fp16
# 06: the ridge at the paper's scale; target < 10 s
step ridge 120 python3 benchmarks/bench_ridge.py --device cuda --paper-scale
echo "gpu_checks.sh: done in $SECONDS s; outputs in $out/"
