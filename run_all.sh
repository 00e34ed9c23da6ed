#!/usr/bin/env bash
# Run the pipeline end to end. With no arguments: the embedded demo, on CPU, small models.
#
#   bash run_all.sh                                   # demo: makes work/demo, then every stage
#   WORK=/scratch/me/shinobi DATA=/data/shinobi RESOLUTION=128 bash run_all.sh
#
# Variables: WORK (working directory, default work), DATA (BIDS root with events.tsv + bk2 files and
# derivatives/fmriprep; default: the demo, made by 00_make_demo.py), RESOLUTION (frame size; default 64 on
# the demo, 128 otherwise), WORKERS (processes for CPU stages; default: all cores), FMRIPREP (fMRIPrep
# derivatives; default DATA/derivatives/fmriprep), ATLAS (integer labels NIfTI; required for real data).
# Each stage skips outputs that are already complete, so re-running after a failure or an interruption is
# cheap; the first stage that fails stops the script with its own error message.
set -euo pipefail
cd "$(dirname "$0")"

WORK=${WORK:-work}
WORKERS=${WORKERS:-$(nproc)}
if [ -z "${DATA:-}" ]; then
  DATA=$WORK/demo
  RESOLUTION=${RESOLUTION:-64}
  DEMO=1
else
  RESOLUTION=${RESOLUTION:-128}
  DEMO=0
fi
PYTHON=${PYTHON:-python3}

stage() {
  local name=$1
  shift
  echo "=== $name: $*"
  local start=$SECONDS
  if ! "$PYTHON" "$@"; then
    echo "run_all.sh: stage $name failed (its message is above); fix it and re-run: finished stages are skipped" >&2
    exit 1
  fi
  echo "=== $name done in $((SECONDS - start)) s"
}

if [ "$DEMO" = 1 ]; then
  stage 00_make_demo 00_make_demo.py --work "$WORK" --workers "$WORKERS"
fi
# The demo has one "Missing file" row by design; real datasets have many: they are reported, not fatal.
stage 01_render_frames 01_render_frames.py --work "$WORK" --bids "$DATA" --resolution "$RESOLUTION" \
  --workers "$WORKERS"

if [ "$DEMO" = 1 ]; then
  FMRIPREP=${FMRIPREP:-$DATA/derivatives/fmriprep}
  ATLAS=${ATLAS:-$DATA/atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz}
fi
stage 02_prep_fmri 02_prep_fmri.py --work "$WORK" --fmriprep "${FMRIPREP:-$DATA/derivatives/fmriprep}" \
  ${ATLAS:+--atlas "$ATLAS"} --workers "$WORKERS"

echo
echo "Results are under $WORK/ (frames/manifest.tsv lists every repetition)."
