"""02 — fMRIPrep BOLD to z-scored parcel time series with nilearn (paper sections 2.1.3-2.1.4).

    python 02_prep_fmri.py --work work   # the demo: <work>/demo/derivatives/fmriprep
    python 02_prep_fmri.py --work work --fmriprep /data/shinobi/derivatives/fmriprep \\
        --atlas MIST_ATOM.nii.gz --task shinobi --subjects 01 02 --workers 8
    python 02_prep_fmri.py --work work --confounds motion high_pass wm_csf --fwhm 6 --overwrite
    python 02_prep_fmri.py --work work --algonauts /data/algonauts_2025.competitors
    sbatch --cpus-per-task 8 slurm/cpu_stage.sbatch 02_prep_fmri.py --work work --fmriprep DIR \\
        --atlas ATLAS

For every `sub-*/ses-*/func/*_space-<space>_*desc-preproc_bold.nii.gz` under --fmriprep (or
`sub-*/func/...`: BIDS without sessions), as in the paper:
  1. confounds: nilearn's load_confounds(strategy=("motion", "high_pass"), motion="full") =
     load_confounds' Params24 (6 motion parameters, their derivatives, and the squares of both)
     + fMRIPrep's cosine drift regressors (periods over 128 s by default;
     the paper: "slower than 0.01 Hz");
     the non-steady-state volumes fMRIPrep flags become nilearn's sample_mask;
  2. NiftiLabelsMasker: 8 mm FWHM Gaussian smoothing, mean of the voxels of each atlas parcel,
     confound regression and z-scoring of each parcel over the run
     (standardize="zscore_sample", ddof=1).

Outputs (docs/CONTRACT.md), all written atomically:
    <work>/bold/<sub>/<ses>/<run stem>.npy   float32 (T, P): row t = volume t of the BOLD image,
        column j = the parcel labels.tsv names. Volumes left out by the sample_mask
        (non-steady-state, scrubbed) are NaN rows: valid rows are np.isfinite(Y).all(1). Parcels
        with no usable voxel in a run are 0.0 on the valid rows (and are reported).
    <work>/bold/manifest.tsv   sub ses task run n_volumes tr_s split bold_path kept_volumes
                               empty_parcels
    <work>/bold/splits.tsv     sub ses task run split: the split of every run that 03, 04 and 06
                               follow (--test-sessions / --test-runs / --splits; kept, edits
                               included, when 02 runs again without them); its record splits.json
    <work>/bold/labels.tsv     column label name n_voxels (column of the .npy -> atlas label value)
    <work>/bold/atlas.nii.gz   the atlas as used: resampled (nearest neighbour) to the BOLD grid
    <work>/bold/prep.json      the settings used; a re-run with other settings needs --overwrite

--algonauts ROOT reads the Algonauts 2025 release instead (algonauts.py): its .h5 parcel time series
as they are, each subject's atlas, split by task (--test-tasks, default Friends season 6).

Voxels inside the atlas that hold NaN or are constant over time (outside the brain in fMRIPrep's MNI
outputs, dropout) are left out of their parcel's mean and reported; NaN values are set to 0 before
smoothing. Runs whose .npy exists are skipped unless --overwrite.
"""
import argparse
import json
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pandas as pd
from nilearn.image import resample_img
from nilearn.interfaces.fmriprep import load_confounds
from nilearn.maskers import NiftiLabelsMasker
from tqdm import tqdm

import algonauts
import common
from common import (DEFAULT_WORK, InputError, atomic_path, bids_entities, read_tsv, run_main,
                    save_npy, write_tsv)
from splits import (add_split_arguments, check_split_flags, check_splits_file, plan_splits,
                    write_splits)

STAGE = "02_prep_fmri"
# relative to --work
DEFAULT_ATLAS = "demo/atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz"
CONFOUND_STRATEGIES = ("motion", "high_pass", "wm_csf", "global_signal", "compcor", "scrub")
MOTION_MODELS = ("basic", "power2", "derivatives", "full")
STANDARDIZE = "zscore_sample"  # nilearn 0.14 name:
                               # z-score with the sample (ddof=1) standard deviation
MANIFEST_COLUMNS = ["sub", "ses", "task", "run", "n_volumes", "tr_s", "split", "bold_path",
                    "kept_volumes", "empty_parcels"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--fmriprep", default=None,
                   help="fMRIPrep derivatives root (default: <work>/demo/derivatives/fmriprep)")
    p.add_argument("--atlas", default=None,
                   help=f"integer labels NIfTI, 0 = background (default: <work>/{DEFAULT_ATLAS}); "
                        "a sibling .tsv with columns index, name gives parcel names")
    p.add_argument("--space", default="MNI152NLin2009cAsym",
                   help="fMRIPrep output space (add _res-2 etc. when several resolutions exist)")
    p.add_argument("--task", default=None, help="only this task (default: every task found)")
    p.add_argument("--subjects", nargs="+", default=None, type=lambda s: s.removeprefix("sub-"),
                   help="only these subject labels, e.g. 01 02")
    p.add_argument("--sessions", nargs="+", default=None, type=common.session_flag,
                   help="only these session labels, e.g. 001 002")
    p.add_argument("--confounds", nargs="+", default=["motion", "high_pass"],
                   choices=CONFOUND_STRATEGIES,
                   help="nilearn load_confounds strategy (paper: motion high_pass)")
    p.add_argument("--motion", default="full", choices=MOTION_MODELS,
                   help="motion model of load_confounds (paper: full = Params24)")
    p.add_argument("--fwhm", type=float, default=8.0,
                   help="Gaussian smoothing FWHM in mm, 0 for none (paper: 8)")
    p.add_argument("--workers", type=int, default=1, help="runs processed in parallel (processes)")
    p.add_argument("--algonauts", metavar="ROOT", default=None,
                   help="read the Algonauts 2025 release instead of fMRIPrep outputs: its .h5 "
                        "parcel time series and each subject's atlas, as released (--fmriprep, "
                        "--atlas, --space, --confounds, --motion and --fwhm do not apply)")
    p.add_argument("--tr", type=float, default=algonauts.TR_S,
                   help=f"with --algonauts: the repetition time (default {algonauts.TR_S}, "
                        "CNeuroMod's; the .h5 files do not hold it)")
    p.add_argument("--overwrite", action="store_true", help="recompute runs whose outputs exist")
    add_split_arguments(p)
    args = p.parse_args(argv)
    check_split_flags(args)
    if "compcor" in args.confounds and "high_pass" not in args.confounds:
        raise InputError("--confounds compcor needs high_pass too "
                         "(fMRIPrep's CompCor assumes high-passed data)")
    return args


# --------------------------------------------------------------------------------------------------
# One run: paper sections 2.1.3-2.1.4 with nilearn
# --------------------------------------------------------------------------------------------------
def parcel_time_series(bold_path, atlas_grid, labels, confounds, sample_mask, tr, fwhm):
    """Denoised, smoothed, parcel-averaged, z-scored BOLD of one run.

    atlas_grid (X, Y, Z) int labels on the BOLD grid; labels (P,) the atlas labels, in column order;
    confounds (T, K) DataFrame; sample_mask (T_kept,) indices of the volumes to keep, or None.
    Returns (Y (T, P) float32 with NaN rows for the volumes not in sample_mask and 0.0 columns for
    the parcels without a usable voxel, notes (list of str to report)).
    """
    image = common.load_nifti(bold_path)
    data = common.nifti_data(image, bold_path)                                  # (X, Y, Z, T)
    usable, notes = usable_voxels(data, atlas_grid, bold_path)
    fill_and_demean(data)
    # --- the paper's denoising: smoothing, parcel means, confound regression, z-scoring over time ---
    # The paper z-scores each voxel and then averages; nilearn's masker averages, cleans, then
    # z-scores each parcel, which is what the encoding model predicts
    # (unit variance per parcel and run).
    masker = NiftiLabelsMasker(
        labels_img=nib.Nifti1Image(atlas_grid, image.affine),
        mask_img=nib.Nifti1Image(usable.astype(np.uint8), image.affine),
        smoothing_fwhm=fwhm or None, strategy="mean", standardize=STANDARDIZE, detrend=False,
        t_r=tr)
    with warnings.catch_warnings():
        # empty parcels: reported below
        warnings.filterwarnings("ignore", message="After applying mask")
        signals = masker.fit_transform(nib.Nifti1Image(data, image.affine), confounds=confounds,
                                       sample_mask=sample_mask)             # (T_kept, P_present)
    # {column: label, "background": 0}; a property rebuilt at each access
    region_ids = masker.region_ids_
    present = [region_ids[i] for i in range(signals.shape[1])]
    series, empty = one_column_per_label(signals, present, labels, data.shape[3], sample_mask)
    on_grid = set(np.unique(atlas_grid).tolist())
    empty = [label for label in empty if label in on_grid]   # the others are said once, by main
    if empty:
        notes.append(f"{bold_path}: {len(empty)} parcel(s) have no usable voxel (each is NaN or "
                     f"constant: outside the acquired field of view or the brain?): labels "
                     f"{' '.join(map(str, empty))}; 0.0 columns, not scored by 06")
    return series, notes


def usable_voxels(data, atlas_grid, bold_path):
    """The voxels that can enter a parcel mean, (X, Y, Z) bool: inside the atlas, finite over the
    whole run and not constant over time; and the notes that report the others. data (X, Y, Z, T)."""
    in_atlas = atlas_grid > 0
    voxels = data[in_atlas]                                                     # (V, T)
    empty_volumes = np.flatnonzero(~np.isfinite(voxels).any(axis=0))
    # a damaged image: every voxel would drop out below, and the atlas get the blame
    if len(empty_volumes):
        raise InputError(f"{bold_path}: volume {empty_volumes[0]} (0-based) is NaN in every voxel "
                         "of the atlas"
                         + (f", and {len(empty_volumes) - 1} other volume(s)"
                            if len(empty_volumes) > 1 else "")
                         + "; the image is damaged")
    has_nan = ~np.isfinite(voxels).all(1)
    constant = ~has_nan & (voxels.max(1) == voxels.min(1))
    notes = []
    if has_nan.any() or constant.any():
        notes.append(f"{bold_path}: {int(has_nan.sum())} voxel(s) inside the atlas hold NaN and "
                     f"{int(constant.sum())} are constant over time; "
                     "left out of their parcel means")
    usable = np.zeros(atlas_grid.shape, bool)
    usable[in_atlas] = ~has_nan & ~constant
    if not usable.any():
        raise InputError(f"{bold_path}: no atlas parcel overlaps the brain data "
                         "(every voxel inside the atlas is constant or NaN): "
                         "is the atlas in the same space as the BOLD?")
    return usable, notes


def fill_and_demean(data):
    """In place, data (X, Y, Z, T): each voxel's mean over time where it is not finite, then each
    voxel's mean removed.

    Smoothing would spread NaN, and a 0 in their place would become a spike of minus the baseline
    once the voxel is demeaned: a voxel (in a parcel or not) takes its own mean over time where it is
    not finite. Every step after is blind to a constant per voxel (the confounds are demeaned, the
    output z-scored), and float32 keeps 7 digits, which a baseline of ~1000 would otherwise spend
    before the fluctuations that matter.
    """
    damaged = ~np.isfinite(data).all(axis=3)                                   # (X, Y, Z)
    if damaged.any():
        series = data[damaged]                                                  # (n_damaged, T)
        finite = np.isfinite(series)
        # 0 if none
        fill = np.where(finite, series, 0.0).sum(axis=1) / np.maximum(finite.sum(axis=1), 1)
        data[damaged] = np.where(finite, series, fill[:, None])
    data -= data.mean(axis=3, keepdims=True)


def one_column_per_label(signals, present, labels, n_volumes, sample_mask):
    """The masker's signals (T_kept, P_present) of the labels `present`, back to one row per volume
    (NaN rows for the volumes left out) and one column per atlas label (P,) (0.0 for a label without
    a usable voxel). Returns (Y (T, P) float32, the labels without a column of their own)."""
    kept = np.arange(n_volumes) if sample_mask is None else np.asarray(sample_mask)
    column_of = {label: j for j, label in enumerate(labels)}
    series = np.full((n_volumes, len(labels)), np.nan, np.float32)             # (T, P)
    series[kept] = 0.0
    series[np.ix_(kept, [column_of[label] for label in present])] = signals
    return series, sorted(set(labels.tolist()) - set(present))


def process_run(job):
    """Worker: compute and save one run, then its record.
    Returns the notes to report (list of str)."""
    # in parallel, here
    inputs = {role: common.hash_file(path) for role, path in job["inputs"].items()}
    series, notes = parcel_time_series(job["bold"], job["atlas_grid"], job["labels"],
                                       job["confounds"], job["sample_mask"], job["tr"], job["fwhm"])
    save_npy(job["out"], series)
    common.write_record(job["out"], common.new_record(STAGE, job["settings"], inputs, job["out"],
                                                      tr_s=job["tr"], nilearn=nilearn.__version__))
    return notes


def run_inputs(run, atlas_path):
    """{role: path} of the files one run's output is made from: the BOLD image, its confounds file
    (the one load_confounds reads) and that file's .json (CompCor's components are listed there),
    the BIDS sidecar with the TR when it exists, and the atlas."""
    stem = run["bold"].name.split("_space-")[0]
    candidates = [run["bold"].parent / f"{stem}_desc-confounds_{kind}.tsv"
                  for kind in ("timeseries", "regressors")]
    confounds = next((c for c in candidates if c.is_file()), candidates[0])
    inputs = {"bold": run["bold"], "confounds": confounds, "atlas": atlas_path}
    for role, sidecar in (("confounds_sidecar", confounds.with_suffix(".json")),
                          ("bold_sidecar", Path(str(run["bold"]).replace(".nii.gz", ".json")))):
        if sidecar.is_file():
            inputs[role] = sidecar
    return inputs


# --------------------------------------------------------------------------------------------------
# The stage: check every input, then the long part, then the manifest
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work)
    fmriprep = Path(args.fmriprep) if args.fmriprep else work / "demo/derivatives/fmriprep"
    atlas_path = Path(args.atlas) if args.atlas else work / DEFAULT_ATLAS
    out_dir = work / "bold"
    # the flags that shape each run's output (its inputs' contents are compared by fingerprint)
    settings = {"--space": args.space, "--confounds": args.confounds, "--motion": args.motion,
                "--fwhm": args.fwhm}
    common.remove_stale_temporaries(out_dir)
    if args.algonauts:
        prepare_algonauts(args, work, out_dir)
        return

    # --- every input is checked before the long part, so that bad input fails fast ---
    runs = find_runs(fmriprep, args.space, args.task, args.subjects, args.sessions)
    rule, splits = plan_splits(args, runs_to_split(out_dir, work, runs), out_dir)
    check_splits_file(out_dir, splits, args)
    images, trs = read_headers(runs)
    atlas, labels, names = load_atlas(atlas_path)
    atlas_grid, n_voxels = atlas_for_runs(atlas, atlas_path, labels, runs, images, args.space)
    jobs = [job for run in runs
            if (job := run_job(run, work, atlas_path, atlas_grid, labels, settings,
                               images[run["stem"]], trs[run["stem"]], args))]
    warn_if_confounds_take_the_signal(jobs)
    atlas_sha256 = common.file_sha256(atlas_path)
    # after every check: --overwrite removes earlier outputs
    check_settings(out_dir, settings, atlas_path, atlas_sha256, args.overwrite)
    if not jobs and manifest_is_current(out_dir, work, runs, splits):
        write_splits(out_dir, read_tsv(out_dir / "manifest.tsv"), rule)
        print(f"02_prep_fmri: all {len(runs)} run(s) done already ({out_dir / 'manifest.tsv'}); "
              "--overwrite to redo")
        return

    # --- shared outputs first (what the columns mean and how they were made), then one job per run ---
    write_shared_outputs(out_dir, args, fmriprep, atlas_path, atlas_sha256, settings, atlas_grid,
                         images[runs[0]["stem"]].affine, labels, names, n_voxels)
    print(f"{len(runs)} run(s), {len(labels)} parcels; {len(runs) - len(jobs)} already done, "
          f"{len(jobs)} to do")
    for note in process_runs(jobs, args.workers):
        print(f"warning: {note}", file=sys.stderr)
    n_volumes = {stem: image.shape[3] for stem, image in images.items()}
    write_splits(out_dir, write_manifest(out_dir, work, runs, n_volumes, trs, labels, splits), rule)


def prepare_algonauts(args, work, out_dir):
    """--algonauts: bold/ from the release's parcel time series as they are (parcellated, z-scored
    per run by its own preprocessing; algonauts.py reads them), its first subject's atlas as
    bold/atlas.nii.gz (each subject's in bold/sub-XX/atlas.nii.gz), split by task (Friends season
    6 test by default). Every input is checked before anything is written."""
    root = Path(args.algonauts)
    settings = {"--algonauts": "release as is", "--tr": args.tr}
    runs = algonauts.find_runs(root, args.subjects, args.task)
    rule, splits = plan_splits(args, runs_to_split(out_dir, work, runs), out_dir)
    check_splits_file(out_dir, splits, args)
    atlases = {sub: algonauts.subject_atlas(root, sub) for sub in sorted({r["sub"] for r in runs})}
    first = next(iter(atlases.values()))
    atlas, labels, names = load_atlas(first)
    for sub, path in atlases.items():
        if not np.array_equal(load_atlas(path)[1], labels):
            raise InputError(f"{path}: not the parcels of {first} (each subject's atlas must "
                             "label the same parcels)")
        algonauts.check_columns([r for r in runs if r["sub"] == sub], labels, path)
    atlas_sha256 = common.file_sha256(first)
    check_settings(out_dir, settings, first, atlas_sha256, args.overwrite)
    todo = algonauts.runs_to_write(runs, [output_path(work, run) for run in runs], STAGE,
                                   settings, args.overwrite, say=tqdm.write)
    for run, _, _ in todo:   # every value checked before any is written
        algonauts.read_run(run)
    grid = np.asarray(atlas.dataobj)
    common.write_json(out_dir / "prep.json", {
        "stage": STAGE, "settings": settings, "algonauts": str(root.resolve()),
        "atlas": str(first.resolve()), "atlas_sha256": atlas_sha256,
        "source": "the release's parcel time series, copied as float32"})
    write_tsv(out_dir / "labels.tsv", {"column": np.arange(len(labels)), "label": labels,
                                       "name": names if names is not None else [None] * len(labels),
                                       "n_voxels": [(grid == label).sum() for label in labels]})
    for sub, path in [(None, first), *atlases.items()]:   # rewritten only when another
        target = out_dir / ("" if sub is None else f"sub-{sub}") / "atlas.nii.gz"   # (06 reads it)
        image = load_atlas(path)[0]
        if not (target.is_file() and same_image(common.load_nifti(target), image)):
            with atomic_path(target) as tmp:
                nib.save(image, tmp)
    for run, out, inputs in tqdm(todo, desc="runs", unit="run", disable=not todo):
        algonauts.write_run(run, out, STAGE, settings, inputs, args.tr)
    n_volumes = {run["stem"]: run["n_volumes"] for run in runs}
    write_splits(out_dir, write_manifest(out_dir, work, runs, n_volumes,
                                         {run["stem"]: args.tr for run in runs}, labels, splits),
                 rule)


def same_image(a, b):
    """Whether two NIfTI images hold the same voxels on the same grid."""
    return (a.shape == b.shape and np.allclose(a.affine, b.affine)
            and np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)))


def read_headers(runs):
    """The header of every run's BOLD image ({stem: image}, the voxels are read by the workers) and
    its TR ({stem: seconds}), after checking each is a 4D series."""
    images, trs = {}, {}
    for run in runs:
        image = common.load_nifti(run["bold"])
        if image.ndim != 4 or image.shape[3] < 2:
            raise InputError(f"{run['bold']}: image is {image.ndim}D {image.shape}; "
                             "a BOLD run must be 4D (x, y, z, time) with several volumes")
        images[run["stem"]], trs[run["stem"]] = image, repetition_time(run["bold"], image.header)
    return images, trs


def atlas_for_runs(atlas, atlas_path, labels, runs, images, space):
    """The atlas resampled to the runs' shared voxel grid, (X, Y, Z) int labels, and the voxels of
    each label there (P,). Runs on other grids, or an atlas outside the field of view, are
    errors."""
    reference = images[runs[0]["stem"]]
    for run in runs:
        image = images[run["stem"]]
        if (image.shape[:3] != reference.shape[:3]
                or not np.allclose(image.affine, reference.affine, atol=1e-3)):
            raise InputError(f"{run['bold']}: voxel grid differs from {runs[0]['bold'].name}; "
                             "all runs must share one space and resolution "
                             "(pick one with --space, e.g. ..._res-2)")
    atlas_grid = atlas_on_grid(atlas, reference.shape[:3], reference.affine)   # (X, Y, Z)
    voxels_per_label = dict(zip(*np.unique(atlas_grid, return_counts=True)))
    n_voxels = np.array([voxels_per_label.get(label, 0) for label in labels])
    if n_voxels.sum() == 0:
        raise InputError(f"{atlas_path}: no atlas label falls inside the BOLD field of view of "
                         f"{runs[0]['bold'].name}: is the atlas in {space} space?")
    vanished = labels[n_voxels == 0]
    if len(vanished):
        why = {label: why_vanished(atlas, label, reference) for label in vanished}
        print(f"warning: {atlas_path}: {len(vanished)} label(s) have no voxel on the BOLD grid: "
              + "; ".join(f"{' '.join(str(k) for k in why if why[k] == reason)} {reason}"
                          for reason in sorted(set(why.values())))
              + "; their columns are 0.0, and 06 does not score them", file=sys.stderr)
    return atlas_grid, n_voxels


def why_vanished(atlas, label, reference):
    """Why parcel `label` of the atlas image has no voxel on the grid of the BOLD image
    `reference`: none of its voxels' centres lies inside the BOLD grid ("outside the field of
    view", as the cerebellum of a scan that stops above it), or the nearest-neighbour resampling
    passed it over ("too small for the BOLD grid")."""
    ijk = np.argwhere(np.asarray(atlas.dataobj) == label)                        # (V, 3)
    to_bold = np.linalg.inv(reference.affine) @ atlas.affine
    bold_ijk = nib.affines.apply_affine(to_bold, ijk)                             # (V, 3)
    inside = ((bold_ijk > -0.5) & (bold_ijk < np.array(reference.shape[:3]) - 0.5)).all(axis=1)
    return "too small for the BOLD grid" if inside.any() else "outside the BOLD field of view"


def run_job(run, work, atlas_path, atlas_grid, labels, settings, image, tr, args):
    """What a worker needs to make one run's output, or None when its record says it is up to date.
    The run's confounds are read here, so that a run with too many regressors fails before any
    work."""
    out, inputs = output_path(work, run), run_inputs(run, atlas_path)
    record = common.read_record(common.record_path(out))
    if record is not None and out.is_file() and not args.overwrite:
        known = record.get("inputs", {})
        current = {role: common.fingerprint(path, known.get(role)) for role, path in inputs.items()
                   if Path(path).is_file()}
        if common.is_up_to_date(out, record, STAGE, settings, current, False):
            return None
    n_volumes = image.shape[3]
    confounds, sample_mask = load_run_confounds(run["bold"], n_volumes, args.confounds, args.motion)
    n_kept = n_volumes if sample_mask is None else len(sample_mask)
    if n_kept - confounds.shape[1] - 1 < 1:  # the mean is removed too
        raise InputError(f"{run['bold']}: {confounds.shape[1]} confound regressors leave no degree "
                         f"of freedom in {n_kept} kept volumes; use fewer (e.g. --motion basic)")
    return {"bold": run["bold"], "out": out, "atlas_grid": atlas_grid, "inputs": inputs,
            "settings": settings, "labels": labels, "confounds": confounds,
            "sample_mask": sample_mask, "n_kept": n_kept, "tr": tr, "fwhm": args.fwhm}


def warn_if_confounds_take_the_signal(jobs):
    """One line for the runs whose confound regressors number more than a third of their kept
    volumes. Regressing out K of n dimensions removes about K / n of a white signal's variance and
    more of a slow one, which Params24's random walks and the cosines resemble: a signal of the
    HRF's time scale keeps about a third of its variance with Params24 + a cosine (25 regressors)
    in a 60-volume run, half at 80 volumes (benchmarks/README.md); the paper's runs have ~400."""
    short = [job for job in jobs if 3 * job["confounds"].shape[1] > job["n_kept"]]
    if short:
        example = short[0]
        print(f"warning: {len(short)} run(s) have more confound regressors than a third of their "
              f"kept volumes ({example['bold'].name}: {example['confounds'].shape[1]} for "
              f"{example['n_kept']}): regressing them out removes much of the signal too; use "
              "fewer (--motion basic has 6, and the cosines) or longer runs", file=sys.stderr)


def process_runs(jobs, workers):
    """Run process_run on every job (in `workers` processes); returns their notes. A bad run stops
    the batch; the runs finished before it stay."""
    if workers <= 1 or len(jobs) <= 1:
        # closed however it ends (a comprehension's frame would keep it open in the traceback), so
        # that an error message starts a line of its own
        with tqdm(jobs, desc="runs", unit="run") as bar:
            return [note for job in bar for note in process_run(job)]
    notes = []
    # each worker's thread pools get its share of the CPUs, not all of them
    with ProcessPoolExecutor(max_workers=workers, initializer=common.limit_threads,
                             initargs=(workers,)) as pool:
        futures = [pool.submit(process_run, job) for job in jobs]
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="runs", unit="run"):
                notes += future.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return notes


# --------------------------------------------------------------------------------------------------
# The shared outputs and the manifest
# --------------------------------------------------------------------------------------------------
def manifest_is_current(out_dir, work, runs, splits):
    """True when every run is listed in bold/manifest.tsv, the shared outputs exist, and the listed
    splits are `splits` (plan_splits'; others: the manifest is rewritten)."""
    manifest_path = out_dir / "manifest.tsv"
    shared = [out_dir / name for name in ("prep.json", "labels.tsv", "atlas.nii.gz",
                                          "manifest.tsv", "splits.tsv")]
    if not all(path.is_file() for path in shared):
        return False
    listed = read_tsv(manifest_path, required=(*common.RUN_ENTITIES, "bold_path", "split"))
    listed_paths = set(listed["bold_path"])
    return (all(str(output_path(work, run).relative_to(work)) in listed_paths for run in runs)
            and listed.apply(common.run_key, axis=1).map(splits).tolist()
            == listed["split"].tolist())


def runs_to_split(out_dir, work, runs):
    """The runs that the manifest will list (this call's and those of earlier calls whose outputs
    are still there), as a DataFrame of their labels: sub ses task run."""
    batch = [str(output_path(work, run).relative_to(work)) for run in runs]
    rows = runs + earlier_rows(out_dir / "manifest.tsv", work, batch)
    return pd.DataFrame([{key: row[key] for key in common.RUN_ENTITIES} for row in rows])


def write_shared_outputs(out_dir, args, fmriprep, atlas_path, atlas_sha256, settings, atlas_grid,
                         affine, labels, names, n_voxels):
    """prep.json (how the runs are made), labels.tsv (column -> atlas label) and atlas.nii.gz
    (the atlas on the BOLD grid)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    common.write_json(out_dir / "prep.json", {
        "stage": STAGE, "settings": settings, "fmriprep": str(fmriprep.resolve()),
        "atlas": str(atlas_path.resolve()), "atlas_sha256": atlas_sha256,
        "confounds": f"nilearn load_confounds(strategy={tuple(args.confounds)}, "
                     f"motion={args.motion!r})",
        "masker": {"strategy": "mean", "standardize": STANDARDIZE, "detrend": False,
                   "smoothing_fwhm": args.fwhm},
        "dropped_volumes": "NaN rows (sample_mask of load_confounds)",
        "empty_parcels": "0.0 on valid rows",
        "nilearn_version": nilearn.__version__})
    write_tsv(out_dir / "labels.tsv", {"column": np.arange(len(labels)), "label": labels,
                                       "name": names if names is not None else [None] * len(labels),
                                       "n_voxels": n_voxels})
    with atomic_path(out_dir / "atlas.nii.gz") as tmp:
        nib.save(nib.Nifti1Image(atlas_grid, affine), tmp)


def write_manifest(out_dir, work, runs, n_volumes, trs, labels, splits):
    """bold/manifest.tsv: this batch's runs, plus the runs of earlier calls (other --subjects), with
    the split of each (`splits`: plan_splits'). Returns it (a DataFrame)."""
    manifest_path = out_dir / "manifest.tsv"
    rows = [manifest_row(run, work, n_volumes[run["stem"]], trs[run["stem"]], labels)
            for run in runs]
    rows += earlier_rows(manifest_path, work, [row["bold_path"] for row in rows])
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS).sort_values("bold_path")
    manifest["split"] = manifest.apply(common.run_key, axis=1).map(splits)
    write_tsv(manifest_path, manifest)
    n_volumes, n_kept = (manifest["n_volumes"].astype(int).sum(),
                         manifest["kept_volumes"].astype(int).sum())
    print(f"wrote {out_dir}: {len(manifest)} run(s), {n_kept} of {n_volumes} volumes kept; splits "
          + ", ".join(f"{k} {v}" for k, v in manifest["split"].value_counts().sort_index().items()))
    return manifest


# --------------------------------------------------------------------------------------------------
# Plumbing: find the runs, their TR, their confounds, and where their outputs go
# --------------------------------------------------------------------------------------------------
def find_runs(fmriprep, space, task, subjects, sessions):
    """Every preprocessed BOLD run under fmriprep that passes the filters. List of dicts, sorted."""
    if not fmriprep.is_dir():
        raise InputError(f"{fmriprep}: fMRIPrep derivatives directory not found")
    pattern = f"sub-*/ses-*/func/*_space-{space}_*desc-preproc_bold.nii.gz"
    runs = []
    # BIDS with sessions, and without: sub-*/func/...
    for bold in sorted([*fmriprep.glob(pattern), *fmriprep.glob(pattern.replace("ses-*/", ""))]):
        names = bids_entities(bold)
        if task and names.get("task") != task:
            continue
        stem = bold.name.split(f"_space-{space}")[0]  # sub-01_ses-001_task-airstriker_run-01
        twin = next((r["bold"] for r in runs if r["stem"] == stem), None)
        if twin is not None:  # e.g. _space-X_desc-preproc_bold and _space-X_res-2_desc-preproc_bold
            raise InputError(f"{bold}: a second BOLD image of run {stem} (with {twin.name}) "
                             f"matches --space {space}: pick one resolution, "
                             f"e.g. --space {space}_res-2")
        runs.append({"sub": names.get("sub"), "ses": names.get("ses"), "task": names.get("task"),
                     "run": names.get("run"), "stem": stem, "bold": bold})
    what = f"{pattern} or sub-*/func/..." + (f" with task {task}" if task else "")
    if not runs:
        raise InputError(f"{fmriprep}: no runs found ({what})")
    for flag, key, wanted in (("--subjects", "sub", subjects), ("--sessions", "ses", sessions)):
        if wanted:
            found = sorted({r[key] for r in runs if r[key]})
            unknown = [w for w in wanted if w not in found]
            if unknown:
                raise InputError(f"{fmriprep}: {flag} {' '.join(unknown)} not found "
                                 f"(found: {', '.join(found) or 'none'})")
            runs = [r for r in runs if r[key] in wanted]
    return runs


def repetition_time(bold_path, header):
    """TR in seconds: the BIDS sidecar's RepetitionTime, else the NIfTI header's 4th zoom."""
    sidecar = Path(str(bold_path).replace(".nii.gz", ".json"))
    if sidecar.is_file():
        try:
            tr = json.loads(sidecar.read_text()).get("RepetitionTime")
        except json.JSONDecodeError as err:
            raise InputError(f"{sidecar}: not valid JSON ({err})") from None
        if tr:
            return float(tr)
    tr = float(header.get_zooms()[3]) if len(header.get_zooms()) > 3 else 0.0
    if header.get_xyzt_units()[1] == "msec":
        tr /= 1000.0
    if tr <= 0:
        raise InputError(f"{bold_path}: no RepetitionTime in a .json sidecar "
                         "and no TR in the NIfTI header")
    return tr


def load_run_confounds(bold_path, n_volumes, strategy, motion):
    """nilearn's load_confounds for one run:
    (confounds DataFrame (T, K), sample_mask (T_kept,) int or None).

    fMRIPrep's non_steady_state_outlier* columns (and, with "scrub", motion outliers) become the
    sample_mask: the indices of the volumes to keep.
    """
    stem = bold_path.name.split("_space-")[0]
    # fMRIPrep >= 20.2 name, else the older one (nilearn reads both);
    # the first is reported when neither exists
    candidates = [bold_path.parent / f"{stem}_desc-confounds_{kind}.tsv"
                  for kind in ("timeseries", "regressors")]
    expected = next((c for c in candidates if c.is_file()), candidates[0])
    try:
        with warnings.catch_warnings():   # "All volumes were marked as motion outliers": said below
            warnings.filterwarnings("ignore", "All volumes were marked", RuntimeWarning)
            confounds, sample_mask = load_confounds(str(bold_path), strategy=tuple(strategy),
                                                    motion=motion)
    except ValueError as err:
        message = str(err).replace("\n", " ")
        if "Could not find associated confound file" in message:
            raise InputError(f"{expected}: confounds file not found (fMRIPrep writes it beside "
                             f"{bold_path.name})") from None
        if "missing" in message:
            missing = message.split("missing:")[-1].split(". You may")[0].strip()
            raise InputError(f"{expected}: missing confound column(s) for --confounds "
                             f"{' '.join(strategy)} --motion {motion}: {missing}") from None
        raise InputError(f"{expected}: {message}") from None
    except KeyError as err:  # some strategies (scrub) index the columns they need directly
        raise InputError(f"{expected}: missing confound column(s) for "
                         f"--confounds {' '.join(strategy)}: {err}") from None
    if len(confounds) != n_volumes:
        raise InputError(f"{expected}: {len(confounds)} rows but {bold_path.name} "
                         f"has {n_volumes} volumes")
    if sample_mask is not None and len(sample_mask) == 0:   # (nilearn then leaves its columns NaN)
        raise InputError(f"{expected}: every volume is marked as an outlier (non-steady-state, or "
                         f"scrubbed with --confounds scrub): no usable volume in {bold_path.name}")
    not_finite = confounds.columns[~np.isfinite(confounds.to_numpy(dtype=float)).all(0)]
    # nilearn fills the first row of derivatives only; a hole elsewhere is an error
    if len(not_finite):
        raise InputError(f"{expected}: n/a or infinite values in column(s) {', '.join(not_finite)}")
    return confounds, sample_mask


def output_path(work, run):
    return work / "bold" / common.run_folder(run["sub"], run["ses"]) / f"{run['stem']}.npy"


# --------------------------------------------------------------------------------------------------
# Atlas (paper section 2.1.4: MIST ATOM): count its labels, resample it to the BOLD grid
# --------------------------------------------------------------------------------------------------
def load_atlas(path):
    """Return (atlas image, labels (P,) int sorted, names (P,) str or None)
    of an integer labels NIfTI."""
    image = common.load_nifti(path)
    data = common.nifti_data(image, path, dtype=np.float64)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: atlas has shape {data.shape}; --atlas needs a 3D image of "
                         "integer labels (a 4D atlas holds probabilistic maps)")
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise InputError(f"{path}: atlas values are not integers; "
                         "--atlas needs integer labels (0 = background)")
    labels = np.unique(data[data != 0]).astype(int)
    if labels.size == 0:
        raise InputError(f"{path}: atlas has no non-zero label")
    atlas = nib.Nifti1Image(data.astype(np.int32), image.affine)
    names = None
    sidecar = path.with_name(path.name.split(".")[0] + ".tsv")
    if sidecar.is_file():
        table = read_tsv(sidecar, required=("index", "name"))
        names = table.set_index("index")["name"].reindex(labels).to_numpy(dtype=object)
    return atlas, labels, names


def atlas_on_grid(atlas, shape, affine):
    """The atlas resampled to a BOLD grid with nearest neighbour,
    so labels stay labels. (X, Y, Z) int32."""
    resampled = resample_img(atlas, target_affine=affine, target_shape=shape,
                             interpolation="nearest", force_resample=True, copy_header=True)
    return np.asarray(resampled.dataobj).round().astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Settings and manifest: outputs made with other flags are never mixed in silently
# --------------------------------------------------------------------------------------------------
def check_settings(out_dir, settings, atlas_path, atlas_sha256, overwrite):
    """Compare with bold/prep.json, the record of the flags and the atlas the existing outputs were
    made with. Other flags or another atlas: an InputError naming the first difference, or with
    --overwrite, remove every earlier run output (a manifest must describe runs made one way:
    column j of every run is the same parcel)."""
    prep_json = out_dir / "prep.json"
    before = common.read_record(prep_json)
    if before is None:
        return
    changed = common.changed_settings(before, settings)
    # unrecorded before: not known
    other_atlas = before.get("atlas_sha256", atlas_sha256) != atlas_sha256
    if not changed and not other_atlas:
        return
    if not overwrite:
        if changed:
            raise common.flags_differ_error(prep_json, before, settings, changed)
        raise InputError(f"{prep_json}: the runs in {out_dir} were made with another atlas "
                         f"({before.get('atlas')}), not {atlas_path}: pass that atlas, "
                         "or --overwrite to redo every run with this one")
    changed = changed + (["--atlas"] if other_atlas else [])
    stale = sorted(out_dir.glob("sub-*/**/*.npy")) + sorted(out_dir.glob("sub-*/**/*.json")) \
        + [out_dir / "manifest.tsv"]
    print(f"flags changed ({', '.join(changed)}): removing the earlier outputs in {out_dir}")
    for path in stale:
        path.unlink(missing_ok=True)


def manifest_row(run, work, n_volumes, tr, labels):
    """The manifest row of a run whose .npy is written
    (valid rows and empty parcels read from it)."""
    series = common.load_npy(output_path(work, run), mmap=False)                 # (T, P)
    valid = np.isfinite(series).all(1)
    empty = labels[valid.any() & (series[valid] == 0).all(0)]
    return {"sub": run["sub"], "ses": run["ses"], "task": run["task"], "run": run["run"],
            "n_volumes": n_volumes, "tr_s": tr, "split": None,
            "bold_path": str(output_path(work, run).relative_to(work)),
            "kept_volumes": int(valid.sum()),
            "empty_parcels": " ".join(map(str, empty)) or None}


def earlier_rows(manifest_path, work, batch_paths):
    """Rows of an existing manifest for runs outside this batch whose .npy still exists
    (other --subjects)."""
    if not manifest_path.is_file():
        return []
    earlier = pd.read_csv(manifest_path, sep="\t", dtype=str, keep_default_na=False,
                          na_values=["n/a"])
    if set(MANIFEST_COLUMNS) - set(earlier.columns):
        raise InputError(f"{manifest_path}: not a manifest of this stage (columns differ); "
                         "use --overwrite")
    keep = (~earlier["bold_path"].isin(batch_paths)
            & earlier["bold_path"].map(lambda p: (work / p).is_file()))
    return earlier[keep].to_dict("records")


if __name__ == "__main__":
    run_main(main)
