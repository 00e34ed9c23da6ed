#!/usr/bin/env bash
# Run the pipeline end to end: 00 -> 06. With no arguments: the embedded demo, on CPU, small models
# (a few minutes on 2 cores), ending with a one-screen summary of the brain scores.
#
#   bash run_all.sh                                   # demo: makes work/demo, then every stage
#   PRESET=small DATA=/data/mygame ATLAS=atlas.nii.gz bash run_all.sh    # your data, tiny CPU models first
#   WORK=/scratch/me/shinobi DATA=/data/shinobi ATLAS=/data/atlas/MIST_ATOM.nii.gz bash run_all.sh
#   GPT_ARGS="--precision bf16 --compile" RIDGE_ARGS="--device cuda" DATA=... ATLAS=... bash run_all.sh
#   STIMULI=movie bash run_all.sh                     # the movie demo (videos, CNeuroMod BIDS layout)
#   STIMULI=movie LAYOUT=algonauts bash run_all.sh    # the same runs in the Algonauts 2025 layout
#   ALGONAUTS=/data/algonauts_2025.competitors bash run_all.sh   # the Algonauts 2025 release
#
# Variables:
#   WORK        working directory (default: work)
#   DATA        BIDS root with events.tsv + .bk2 files (default: the demo, made by 00_make_demo.py)
#   FMRIPREP    fMRIPrep derivatives (default: DATA/derivatives/fmriprep)
#   ATLAS       integer labels NIfTI (required for real data; the demo ships its own)
#   ALGONAUTS   the Algonauts 2025 release (fmri/*.h5, atlases, stimuli/movies): read instead of DATA
#   STIMULI     the demo's: game (replays, the default) or movie (videos, no buttons)
#   LAYOUT      with STIMULI=movie: bids (default) or algonauts (the demo's copy in that layout)
#   PRESET      small: tiny models on CPU, the demo's (default on the demo); paper: the paper's
#               configurations (default with DATA)
#   RESOLUTION  frame size (default: 64 with PRESET=small, 128 = the paper otherwise)
#   WORKERS     processes for the CPU stages (default: the CPUs this job may use: its CPU affinity,
#               SLURM's --cpus-per-task, a container's CPU quota)
#   THREADS     CPU threads per process (default: each stage shares those CPUs between its processes,
#               one thread pool each; OMP_NUM_THREADS works too). On a machine shared with other work,
#               THREADS=1 is fastest
#   NAME        name of the GPT run, its features and its results (default: demo, small or paper)
#   DEMO_ARGS   flags for 00_make_demo.py, e.g. "--subjects 1" for a smaller demo
#   RENDER_ARGS PREP_ARGS VQVAE_ARGS GPT_ARGS EXTRACT_ARGS RIDGE_ARGS
#               extra flags for stages 01, 02, 03, 04, 05, 06 (see `python 0N_....py --help`); they come
#               after this script's own, so they override them.
# PRESET=paper runs the paper's configurations (Table 2; GPU stages pick CUDA when there is one);
# PRESET=small trains tiny models on CPU and widens the ridge penalty grid (see README).
# Each stage skips an output whose record says it was made with the same flags from the same inputs, so
# re-running after a failure or an interruption is cheap and never keeps a stale result; the first stage
# that does not finish stops the script with its own message (and its exit status).
# SIGTERM or Ctrl-C to the script reaches the stage that runs (03 and 04 save a checkpoint); the
# script waits for it to stop.
set -euo pipefail
cd "$(dirname "$0")"

WORK=${WORK:-work}
PYTHON=${PYTHON:-python3}
WORKERS=${WORKERS:-$("$PYTHON" -c 'import common; print(common.available_cpus())')}
if [ -n "${THREADS:-}" ]; then
  export OMP_NUM_THREADS=$THREADS
fi
# Threads that wait for work sleep instead of spinning: on a machine shared with other work, spinning
# OpenMP threads made 03 and 04 3-7x slower (benchmarks/README.md).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
STIMULI=${STIMULI:-game}
if [ -z "${DATA:-}" ] && [ -z "${ALGONAUTS:-}" ]; then
  DEMO=1
  DATA=$WORK/demo
  PRESET=${PRESET:-small}
  ATLAS=${ATLAS:-$DATA/atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz}
  # The demo's runs are short (52 volumes; the paper's have ~400): Params24 + cosines, 02's default,
  # would take half their degrees of freedom, and 02 would warn. The 6 motion parameters instead.
  PRESET_PREP="--motion basic"
  if [ "$STIMULI" = movie ]; then   # 12 chunks of 'Friends' seasons 1-6: season 6 is the test
    PRESET_DEMO="--stimuli movie" PRESET_PREP="$PRESET_PREP --test-tasks s06e01a s06e01b"
    if [ "${LAYOUT:-bids}" = algonauts ]; then
      ALGONAUTS=$DATA/algonauts PRESET_PREP=""   # --algonauts tests Friends season 6 by default
    fi
  fi
elif [ -n "${ALGONAUTS:-}" ]; then
  DEMO=0
  PRESET=${PRESET:-paper}
else
  DEMO=0
  PRESET=${PRESET:-paper}
  if [ -z "${ATLAS:-}" ]; then
    echo "run_all.sh: set ATLAS to an integer labels NIfTI (the paper used MIST ATOM)" >&2
    exit 2
  fi
fi
FMRIPREP=${FMRIPREP:-${DATA:-}/derivatives/fmriprep}
PRESET_DEMO=${PRESET_DEMO:-} PRESET_PREP=${PRESET_PREP:-}
case "$PRESET" in
  small)
    RESOLUTION=${RESOLUTION:-64}
    NAME=${NAME:-$([ "$DEMO" = 1 ] && echo demo || echo small)}
    # Tiny models that train in minutes on 2 CPU cores. The VQ-VAE keeps the paper's latent grid
    # (4 x 8 x 8 tokens per 16-frame clip) but is narrow; its higher learning rate matters: at 3e-4 and
    # a few hundred steps it encodes only position on the demo's dark, sparse frames (03 warns of this).
    PRESET_VQVAE="--device cpu --resolution $RESOLUTION --sequence-length 16 --downsample 4 8 8 --n-hiddens 32
      --n-res-layers 1 --n-codes 64 --embedding-dim 16 --batch-size 8 --max-steps 400 --lr 1e-3
      --log-every 50 --val-every 200 --ckpt-every 200 --val-clips 16"
    # The GPT too: at the paper's 3e-4 a 48-wide model barely moves in 150 steps (validation loss 3.35,
    # chance is ln 64 = 4.16); at 3e-3 it learns the game's codes (0.81) in the same minute.
    PRESET_GPT="--device cpu --hidden-dim 48 --layers 2 --heads 2 --cond-dim 48 --batch-size 16 --max-steps 150
      --lr 3e-3 --log-every 25 --val-every 75 --val-samples 64 --ckpt-every 150"
    # A 2-layer model has no block 4 (the paper's layer): read the last block, as the depth sweep does.
    PRESET_EXTRACT="--device cpu --layer last"
    # 06's default penalty grid (wide, scaled to the features) and leave-one-run-out choice. 1,000
    # circular shifts: FDR q < 0.05 over 40 parcels passes a lone parcel only at p <= 0.05 / 40, and p
    # is at least 1 / (shifts + 1).
    PRESET_RIDGE="--n-permutations 1000" ;;
  paper)
    RESOLUTION=${RESOLUTION:-128}
    NAME=${NAME:-paper}
    PRESET_VQVAE="" PRESET_GPT="" PRESET_EXTRACT="" PRESET_RIDGE="" ;;
  *)
    echo "run_all.sh: PRESET=$PRESET: expected small or paper" >&2
    exit 2 ;;
esac
if [ "$DEMO" = 1 ]; then   # 06 reports whether the demo's planted parcels were recovered
  PRESET_RIDGE="$PRESET_RIDGE --ground-truth $DATA/ground_truth.json"
fi

# SIGTERM or SIGINT to this script goes to the stage that runs, which stops where it is safe (03 and
# 04 save a checkpoint and exit 75); the script waits for it, then stops with the stage's status.
# Without this, bash would die at once and leave the stage running on its own. Each stage runs in a
# process group of its own, so that the workers of a stage that died (a process pool's) stop too.
stage_pid="" signalled=""
pass_on() {
  signalled=$1
  if [ -z "$stage_pid" ]; then
    echo "run_all.sh: SIG$1 between stages: stopping" >&2
    exit $((128 + $(kill -l "$1")))
  fi
  echo "run_all.sh: SIG$1: passed to $stage_name (pid $stage_pid); waiting for it to stop" >&2
  kill -s "$1" "$stage_pid" 2>/dev/null || true
}
trap 'pass_on TERM' TERM
trap 'pass_on INT' INT

# stage NAME SCRIPT ARGS...: run one stage; stop here unless it finished. Exit statuses (common.py):
# 0 done, 1 some items failed, 2 bad input, 75 training interrupted by a signal (resumable), 130
# Ctrl-C elsewhere.
stage() {
  stage_name=$1
  shift
  echo "=== $stage_name: $PYTHON $*"
  local name=$stage_name start=$SECONDS status
  # In the background: bash runs a trap only once a foreground command ends, but a trap ends `wait`.
  # Job control for the start only: a process group of its own, SIGINT not ignored, no job reports.
  set -m
  "$PYTHON" "$@" &
  stage_pid=$!
  set +m
  while :; do
    status=0
    wait "$stage_pid" || status=$?
    kill -0 "$stage_pid" 2>/dev/null || break   # still running: a signal interrupted the wait
  done
  if [ -n "$signalled" ]; then   # what the stage left running (a pool's workers) stops with it
    kill -s TERM -- "-$stage_pid" 2>/dev/null || true
  fi
  stage_pid=""
  if [ "$status" = 75 ]; then
    echo "run_all.sh: $name interrupted at $(progress_of "$name"): re-run to resume" >&2
    exit 75
  elif [ -n "$signalled" ]; then   # stopped, or finished before the signal reached it: stop here
    [ "$status" != 0 ] || status=$((128 + $(kill -l "$signalled")))
    echo "run_all.sh: SIG$signalled: stopped after $name (exit $status): re-run to go on:" \
      "finished stages are skipped" >&2
    exit "$status"
  elif [ "$status" != 0 ]; then
    echo "run_all.sh: stage $name failed (exit $status; its message is above); fix it and re-run:" \
      "finished stages are skipped" >&2
    exit "$status"
  fi
  echo "=== $name done in $((SECONDS - start)) s"
}

# progress_of NAME: "step k of N" from the record beside the checkpoint of training stage NAME
progress_of() {
  local record=$WORK/vqvae/ckpt.json
  [ "$1" = 04_train_gpt ] && record=$WORK/gpt/$NAME/ckpt.json
  "$PYTHON" -c 'import json, sys; r = json.load(open(sys.argv[1])); print("step", r["step"], "of", r["max_steps"])' \
    "$record" 2>/dev/null || echo "an unknown step"
}

# shellcheck disable=SC2086  # the *_ARGS variables are lists of flags: word splitting is intended
{
if [ "$DEMO" = 1 ]; then
  stage 00_make_demo 00_make_demo.py --work "$WORK" --workers "$WORKERS" $PRESET_DEMO ${DEMO_ARGS:-}
fi
if [ -n "${ALGONAUTS:-}" ]; then   # the release's .h5 parcel time series and the videos of their runs
  stage 01_render_frames 01_render_frames.py --work "$WORK" --algonauts "$ALGONAUTS" \
    --resolution "$RESOLUTION" --workers "$WORKERS" ${RENDER_ARGS:-}
  stage 02_prep_fmri 02_prep_fmri.py --work "$WORK" --algonauts "$ALGONAUTS" $PRESET_PREP ${PREP_ARGS:-}
else
  # The demo has one "Missing file" row by design; real datasets have many: reported, not fatal.
  stage 01_render_frames 01_render_frames.py --work "$WORK" --bids "$DATA" --resolution "$RESOLUTION" \
    --workers "$WORKERS" ${RENDER_ARGS:-}
  stage 02_prep_fmri 02_prep_fmri.py --work "$WORK" --fmriprep "$FMRIPREP" --atlas "$ATLAS" \
    --workers "$WORKERS" $PRESET_PREP ${PREP_ARGS:-}
fi
stage 03_train_vqvae 03_train_vqvae.py --work "$WORK" --resume $PRESET_VQVAE ${VQVAE_ARGS:-}
stage 04_train_gpt 04_train_gpt.py --work "$WORK" --name "$NAME" --resume $PRESET_GPT ${GPT_ARGS:-}
stage 05_extract 05_extract.py --work "$WORK" --ckpt "$WORK/gpt/$NAME/ckpt.pt" --name "$NAME" \
  $PRESET_EXTRACT ${EXTRACT_ARGS:-}
stage 06_ridge 06_ridge.py --work "$WORK" --name "$NAME" $PRESET_RIDGE ${RIDGE_ARGS:-}
}

echo
echo "run_all.sh: done in $SECONDS s. Results: $WORK/results/$NAME/ (per subject: r.npy, r_map.png, summary.json;"
echo "r_by_subject.png), training logs: $WORK/vqvae/ and $WORK/gpt/$NAME/, features: $WORK/features/$NAME/."
