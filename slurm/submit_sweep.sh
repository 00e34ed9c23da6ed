#!/usr/bin/env bash
# Submit the paper's scaling experiments as SLURM job chains: for each configuration, train (04, GPUs,
# requeued on preemption and resumed from its checkpoint) -> extract (05, 1 GPU) -> ridge (06, 1 GPU),
# each starting only when the previous one succeeded; then one CPU job draws the figures and report
# once every chain has ended. Run from the repo root after stages 01-03:
#
#   bash slurm/submit_sweep.sh --work $SCRATCH/work                           # all five experiments
#   bash slurm/submit_sweep.sh --work $SCRATCH/work --experiments data hidden --train-args "--precision fp16"
#   DRY_RUN=1 bash slurm/submit_sweep.sh --work work                          # print the sbatch commands only
#
# Arguments are those of 07_sweep.py. Resources are yours to choose: GPUS_PER_TRAIN_JOB (default 1) GPUs
# train each configuration, and TRAIN_JOB_ARGS, EXTRACT_JOB_ARGS, RIDGE_JOB_ARGS and FIGURES_JOB_ARGS add
# sbatch options to each kind of job, after the templates' small defaults (slurm/*.sbatch), e.g.
#   GPUS_PER_TRAIN_JOB=4 TRAIN_JOB_ARGS="--cpus-per-task 32 --mem 128G --time 24:00:00" bash slurm/...
# Every job follows sbatch's SBATCH_ACCOUNT and SBATCH_PARTITION. The ridge runs on CUDA when torch sees
# a GPU on its node, else on the CPU, unless --ridge-args gives --device.
#
# When a job fails, SLURM cancels the jobs that wait for it (--kill-on-invalid-dep=yes) instead of
# leaving them pending forever; the other chains go on. The figures job runs once every chain has ended,
# draws what finished, names the configurations that did not, and then fails itself. `sacct -j <ids>`
# (the ids printed below) shows which job failed; its log is slurm-<job name>-<id>.out. Fix the cause
# and run the same command again: every stage skips what it finished, so only the rest is redone.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=${GPUS_PER_TRAIN_JOB:-1}
read -r -a train_job_args <<< "${TRAIN_JOB_ARGS:-}"
read -r -a extract_job_args <<< "${EXTRACT_JOB_ARGS:-}"
read -r -a ridge_job_args <<< "${RIDGE_JOB_ARGS:-}"
read -r -a figures_job_args <<< "${FIGURES_JOB_ARGS:-}"
dry_run=${DRY_RUN:-0}
fake_id=1000
all_ids=()

submit() {  # submit VAR [sbatch options...] script args...: sets VAR to the job id
  local var=$1 id
  shift
  if [ "$dry_run" = 1 ]; then
    fake_id=$((fake_id + 1))
    echo "sbatch --parsable $*"
    id=$fake_id
  else
    id=$(sbatch --parsable "$@") || { echo "submit_sweep.sh: sbatch failed: $*" >&2; exit 1; }
    id=${id%%;*}   # --parsable prints "id" or "id;cluster"
  fi
  [[ $id =~ ^[0-9]+$ ]] || { echo "submit_sweep.sh: sbatch printed no job id ('$id'): $*" >&2; exit 1; }
  printf -v "$var" %s "$id"
  all_ids+=("$id")
}

jobs_tsv=$(python3 07_sweep.py --dry-run --jobs-tsv "$@")
ridge_ids=()
# One job per distinct command: chains that read the same model (its block-4 and last-block features,
# the VQ-VAE control, every appendix module) share its training, and chains that read the same features
# share their extraction, instead of several jobs writing one checkpoint or folder at once.
declare -A job_of=() extract_of=()
while IFS=$'\t' read -r name train extract ridge needs; do
  # shellcheck disable=SC2086  # the commands are shell-quoted by 07_sweep.py
  eval "ridge_args=($ridge)"
  if [ "$extract" = "-" ]; then           # a variance partition: 06 reads the features of `needs`
    ids=()
    for need in ${needs//,/ }; do ids+=("${extract_of[$need]}"); done
    submit ridge_id --job-name "ridge-$name" --dependency "afterok:$(IFS=:; echo "${ids[*]}")" \
      --kill-on-invalid-dep=yes --time 02:00:00 "${ridge_job_args[@]}" slurm/gpu_stage.sbatch \
      "${ridge_args[@]}"
    echo "$name: extract ${ids[*]} -> ridge $ridge_id"
    ridge_ids+=("$ridge_id")
    continue
  fi
  eval "extract_args=($extract)"
  after=()
  if [ "$train" != "-" ]; then            # "-": no model to train (low-level vision, buttons)
    if [ -z "${job_of[$train]:-}" ]; then
      eval "train_args=($train)"
      submit train_id --job-name "train-$name" --gpus-per-node "$gpus" "${train_job_args[@]}" \
        slurm/gpu_stage.sbatch "${train_args[@]}"
      job_of[$train]=$train_id
    fi
    after=(--dependency "afterok:${job_of[$train]}" --kill-on-invalid-dep=yes)
  fi
  if [ -z "${job_of[$extract]:-}" ]; then
    submit extract_id --job-name "extract-$name" "${after[@]}" --time 02:00:00 \
      "${extract_job_args[@]}" slurm/gpu_stage.sbatch "${extract_args[@]}"
    job_of[$extract]=$extract_id
  fi
  extract_of[$name]=${job_of[$extract]}
  submit ridge_id --job-name "ridge-$name" --dependency "afterok:${job_of[$extract]}" --kill-on-invalid-dep=yes \
    --time 01:00:00 "${ridge_job_args[@]}" slurm/gpu_stage.sbatch "${ridge_args[@]}"
  echo "$name: train ${job_of[$train]:-none} -> extract ${job_of[$extract]} -> ridge $ridge_id"
  ridge_ids+=("$ridge_id")
done <<< "$jobs_tsv"

# afterany: the figures job also runs when a chain failed, and says which configurations are missing
submit figures_id --job-name sweep-figures --dependency "afterany:$(IFS=:; echo "${ridge_ids[*]}")" \
  --time 01:00:00 "${figures_job_args[@]}" slurm/cpu_stage.sbatch 07_sweep.py --figures-only "$@"
echo "figures: $figures_id (after ${#ridge_ids[@]} chains)"
echo "A failed job cancels the jobs after it; the figures job then names what is missing and fails." \
     "See them all: sacct -j $(IFS=,; echo "${all_ids[*]}") --format JobID,JobName%40,State,ExitCode." \
     "Then run this command again: finished stages skip."
