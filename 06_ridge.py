"""06 — Ridge encoding: predict each parcel's BOLD from delayed features, score it, test it, map it.

Paper sections 2.3.2-2.3.3 and 3. For each subject: features of TR t-3 (05) predict the parcel BOLD
at TR t (02) by ridge regression; the penalty is chosen per parcel by exact leave-one-out on the
training set (the paper, from {0.1, 1, 100}); the score is Pearson's r between predicted and measured
BOLD on the test set. Two defaults differ from the paper, both unsound for fMRI at its scale (its
choices are one flag away): the penalty grid is wide and scaled to the features (--alphas paper:
the paper's), and the penalty is chosen by leave-one-run-out (--cv loo: the paper's leave-one-out,
which autocorrelated TRs make choose penalties far too small).

    python 06_ridge.py --work work --name demo             # every subject in bold/manifest.tsv
    python 06_ridge.py --work work --name demo --alphas paper --cv loo   # the paper's ridge
    python 06_ridge.py --work work --name demo --subjects 01 --delays 1 2 3 4 --cv validation
    python 06_ridge.py --work work --name demo --split random --test-size 0.1 \
        --n-permutations 0                                 # the paper's split
    python 06_ridge.py --work work --name demo --device cuda --n-permutations 1000
    sbatch --gpus-per-node 1 slurm/gpu_stage.sbatch \
        06_ridge.py --work work --name NAME --device cuda

Inputs (docs/CONTRACT.md):
  <work>/bold/manifest.tsv       sub ses task run n_volumes tr_s split bold_path ...;
                                 bold_path -> float32 (T, P), rows of non-steady-state volumes
                                 may be NaN (dropped here); empty_parcels: 0.0 columns, not scored
  <work>/bold/splits.tsv         sub ses task run split (train, validation or test), the split
                                 that 03 and 04 followed too (an older 02's: the manifest's)
  <work>/bold/labels.tsv         column label name: BOLD column -> atlas label value
  <work>/bold/atlas.nii.gz       the labels image on the BOLD grid
  <work>/features/<name>/<layer>/sub-XX/ses-YYY/<run stem>.npy   float16/32 (T, D), row t = TR t
Outputs, per subject, in <work>/results/<name>/sub-XX/ (summary.json is written last and marks
it done):
  r.npy (P,) test Pearson r, alphas.npy (P,) chosen penalty, p_values.npy (P,) permutation p-values,
  significant.npy (P,) bool (FDR q < --fdr), r_map.nii.gz, r_map.png, summary.json;
  and <work>/results/<name>/r_by_subject.png (the subjects made with this run's flags from the
  current inputs; a printed line names those left out).

Conventions: features are standardized with training-set means and standard deviations (the paper
does not say; --no-standardize fits them as they are); an intercept is fitted (X and Y centered with
training means), as scikit-learn's RidgeCV does, so both choose the same alphas. Split `session`
(default) trains on runs whose split is `train` and tests on `test`; `validation` runs are left out
unless --train-on-validation; a subject without both is skipped, and a model that trained on one of
its test runs refused. Split `random` pools every run of the subject and draws
--test-size of the samples at random (paper section 2.3.3; neighbouring TRs are correlated, so its
scores are optimistic, and it gets no p-values: a test TR's neighbours were trained on, and no
circular-shift null accounts for that).
"""
import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import common
from brain_maps import plot_subjects, write_r_map
from ground_truth import planted_recovery, read_planted_labels
from paper.encoding import delayed_design, pearson_r, ridge_loo, split_samples, standardize
from partition import (BAND_GRID, PARTITION_FILES, band_ratio, partition_summary,
                       partition_variance, unique_significance, write_partition)
from ridge_fast import (PENALTY_SELECTION, SOLVER_TEXT, alpha_value, fit_ridge_loo, grid_text,
                        held_out_groups, penalty_grid, products_dtype,
                        warn_if_alphas_at_grid_edge)
from significance import circular_shift_null, permutation_p_values
from common import (DEFAULT_WORK, InputError, load_npy, read_tsv, run_main, run_stem,
                    save_npy)

STAGE = "06_ridge"
# what a subject's folder holds besides summary.json, which lists them with their fingerprints; with
# several feature sets (--with), the variance partition too
OUTPUT_FILES = ("r.npy", "alphas.npy", "p_values.npy", "significant.npy", "r_map.nii.gz",
                "r_map.png", "test_bold.npy", "test_prediction.npy", "test_run.npy")


def parse_args(argv=None):
    """The flags of the stage, checked: a value out of range is a usage error (exit status 2), a
    combination that cannot give valid results an InputError."""
    p = argument_parser()
    args = p.parse_args(argv)
    if min(args.delays) < 0:
        p.error("--delays must be >= 0")
    words = [a for a in args.alphas if isinstance(a, str)]
    if words and len(args.alphas) > 1:
        p.error(f"--alphas {words[0]}: a grid's name stands alone (or give values)")
    if not words and min(args.alphas) <= 0:
        p.error("--alphas must be > 0")
    if not 0 < args.test_size < 1:
        p.error("--test-size must be between 0 and 1")
    common.choose_device(args.device)   # a GPU torch cannot see: one line
    if args.with_sets and args.pca:
        raise InputError("--pca with --with: project each feature set yourself (05 --pool), "
                         "or fit one set")
    if args.cv == "validation" and args.train_on_validation:
        p.error("--cv validation already fits the final model on the validation runs: "
                "leave out --train-on-validation")
    if args.cv == "validation" and args.split == "random":
        p.error("--cv validation needs the validation runs of --split session")
    if args.split == "random" and args.n_permutations > 0:
        # On pure noise with autocorrelated features, the random split gives a median r near 0.8 and
        # a circular-shift null calls every parcel significant: the null cannot model the leak.
        raise InputError("--split random: no valid permutation p-values (its test TRs lie between "
                         "training TRs, whose fit leaks into their r): pass --n-permutations 0, "
                         "or use --split session")
    return args


def argument_parser():
    """The stage's command line (parse_args checks the values it parses)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--name", required=True, help="feature set: <work>/features/<name>/")
    p.add_argument("--results-name", default=None,
                   help="results folder <work>/results/<results-name>/ (default: --name; one per "
                        "layer when several layers of a feature set are encoded)")
    p.add_argument("--layer", default=None,
                   help="feature layer folder "
                        "(default: the only layer present; needed when there are several)")
    p.add_argument("--with", dest="with_sets", nargs="+", default=[], metavar="NAME[:LAYER]",
                   help="more feature sets, fitted jointly with --name (banded ridge: a penalty "
                        "per set) and compared by variance partitioning, "
                        "e.g. --with lowlevel buttons")
    p.add_argument("--band-grid", type=band_ratio, nargs="+", default=list(BAND_GRID), metavar="U",
                   help="with --with: the weights of the sets tried, log10 of each set's weight "
                        "relative to another's, from -15 to 15 (default -2 -1 0 1 2; a set may "
                        "also be left out)")
    p.add_argument("--subjects", nargs="+", default=None, type=lambda s: s.removeprefix("sub-"),
                   help="subject labels, e.g. 01 02 (default: all)")
    add_model_flags(p)
    p.add_argument("--n-permutations", type=int, default=1000,
                   help="circular time shifts in the null distribution of r (0: no p-values)")
    p.add_argument("--fdr", type=float, default=0.05,
                   help="Benjamini-Hochberg level of the significance mask")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: float64 throughout; cuda: float32 products, float64 decomposition")
    p.add_argument("--parcel-batch", type=int, default=256, help="parcels solved at once")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute subjects whose summary.json exists")
    p.add_argument("--ground-truth", metavar="JSON",
                   help="the demo's ground_truth.json (00_make_demo.py): report whether its "
                        "planted parcels score above its noise parcels")
    return p


def add_model_flags(p):
    """The flags of the encoding model: delays, penalty grid and choice, split, features."""
    p.add_argument("--delays", type=int, nargs="+", default=[3],
                   help="feature delays in TRs: 3 = features of TR t-3 predict TR t (paper); "
                        "several = FIR")
    p.add_argument("--alphas", type=alpha_value, nargs="+", default=["wide"], metavar="ALPHA",
                   help="ridge penalty grid: wide (default: 10^-3 ... 10^5 times the features' "
                        "mean eigenvalue, half-decade steps), paper (the paper's 0.1 1 100), "
                        "or values")
    p.add_argument("--cv", choices=("runs", "validation", "loo"), default="runs",
                   help="how the penalty is chosen: leave-one-run-out over the training runs "
                        "(default), the error on the validation runs of the model fitted without "
                        "them (the final model then fits both), or exact leave-one-out (the "
                        "paper's; autocorrelated TRs make it choose too small penalties)")
    p.add_argument("--split", choices=("session", "random"), default="session",
                   help="session: manifest split column (paper 2.1.4); "
                        "random: paper 2.3.3's 90/10 split")
    p.add_argument("--test-size", type=float, default=0.1, help="test fraction for --split random")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random split, PCA and null shifts")
    p.add_argument("--train-on-validation", action="store_true",
                   help="with --split session, also train on the runs whose split is `validation`")
    p.add_argument("--allow-trained-on-test", action="store_true",
                   help="score test runs whose stimuli the model trained on (03/04 "
                        "--test-sessions with no value, as the authors did); refused by default")
    p.add_argument("--no-standardize", action="store_true",
                   help="fit the features as they are instead of z-scoring them with training "
                        "statistics (the paper does not say; z-scoring changes what an alpha of "
                        "the grid means)")
    p.add_argument("--pca", type=int, default=None, metavar="K",
                   help="replace the standardized features by their first K principal components")
    p.add_argument("--solver", choices=("fast", "paper"), default="fast",
                   help="fast: ridge_fast.py's BLAS/LAPACK solvers; paper: paper/encoding.py's one "
                        "eigendecomposition in torch (the same fit, slower)")


# --------------------------------------------------------------------------------------------------
# The stage: one subject after the other (data, fit, scores, null, maps)
# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    work = Path(args.work)
    stage = read_stage_inputs(args, work)
    names = [name for name, _ in stage.feature_sets]
    results_dir = work / "results" / (args.results_name or "+".join(names))
    # What a subject's results are made of: these flags, and the exact bytes of every BOLD and
    # feature file of the runs used (fingerprints from 02's and 05's records), the atlas and its
    # labels. Finished subjects made the same way are skipped; a changed input makes them again.
    settings = common.settings_of(args, {"work", "name", "results_name", "subjects", "device",
                                         "parcel_batch", "overwrite", "ground_truth", "layer",
                                         "with_sets", "allow_trained_on_test"})
    settings["--layer"] = stage.feature_sets[0][1]
    if args.with_sets:
        settings["--with"] = [f"{name}:{layer}" for name, layer in stage.feature_sets[1:]]
    else:   # a single set's record as before: no band grid either
        settings.pop("--band-grid")
    shared = [work / "bold" / "labels.tsv", stage.atlas_path, *filter(None, [args.ground_truth])]
    feature_dirs = [work / "features" / name / layer for name, layer in stage.feature_sets]
    inputs_of = functools.partial(subject_inputs, work, args, stage.manifest, shared, feature_dirs)
    skipped = subjects_without_split(args, stage)
    stage.subjects = [sub for sub in stage.subjects if sub not in skipped]
    fitted = 0
    for sub in stage.subjects:
        out_dir = results_dir / f"sub-{sub}"
        earlier = common.read_record(out_dir / "summary.json")
        files, inputs = inputs_of(sub, earlier)
        refuse_trained_on_test(args, work, sub, stage.manifest, files)
        if subject_is_done(out_dir, earlier, settings, inputs, len(stage.feature_sets),
                           args.overwrite):
            print(f"sub-{sub}: done already with these flags and inputs "
                  f"({out_dir / 'summary.json'}); --overwrite to redo")
            continue
        summary = encode_subject(args, sub, files, stage, out_dir, (settings, inputs))
        fitted += 1
        print(f"sub-{sub}: {summary['n_train_samples']} train / "
              f"{summary['n_test_samples']} test samples, "
              f"{summary['n_features']} features, r max {score_text(summary['r_max'])}, median "
              f"{score_text(summary['r_median'])}, "
              f"significant {significant_text(summary)}, "
              f"penalty on the grid's edges in {summary['parcels_at_smallest_alpha']} (smallest) "
              f"and {summary['parcels_at_largest_alpha']} (largest) parcels, "
              f"{summary['seconds']} s")
    update_subjects_figure(results_dir, stage, settings, inputs_of, redraw=fitted > 0)
    print_summary(results_dir, stage.subjects, skipped)


@dataclass
class StageInputs:
    """What every subject shares: bold/manifest.tsv (a DataFrame), the atlas label of each BOLD
    column, the atlas on the BOLD grid, the demo's planted labels (or None) and those planted on
    something else (its button parcel: not noise), the feature sets [(name, layer)] (--name first,
    then --with), the subjects; the labels without a voxel on the BOLD grid (02's 0.0 columns)."""
    manifest: object
    labels: list
    atlas_path: Path
    planted_labels: set | None
    other_signal: set
    feature_sets: list
    subjects: list
    off_grid: set


def read_stage_inputs(args, work):
    """StageInputs, after checking them before any subject is fitted (a mismatch leaves no
    results)."""
    manifest_path = work / "bold" / "manifest.tsv"
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: file not found (run 02_prep_fmri.py)")
    manifest = read_tsv(manifest_path, required=("sub", "ses", "task", "run", "split", "bold_path"))
    manifest["split"] = split_of_runs(work, manifest)
    labels, atlas_path, off_grid = read_parcels(work)
    planted_labels = read_planted_labels(args.ground_truth) if args.ground_truth else None
    other_signal = (read_planted_labels(args.ground_truth, "planted_buttons")
                    if args.ground_truth else set())
    named = ([(args.name, args.layer)]
             + [tuple(f"{spec}:".split(":")[:2]) for spec in args.with_sets])
    feature_sets = [(name, find_layer(work / "features" / name, layer or None))
                    for name, layer in named]
    if len(set(feature_sets)) < len(feature_sets):
        raise InputError(f"--with {' '.join(args.with_sets)}: a feature set is given twice")
    subjects = sorted(manifest["sub"].unique())
    if args.subjects:
        absent = [s for s in args.subjects if s not in subjects]
        if absent:
            raise InputError(f"{manifest_path}: no runs of sub-{absent[0]}")
        subjects = args.subjects
    return StageInputs(manifest, labels, atlas_path, planted_labels, other_signal, feature_sets,
                       subjects, off_grid)


def read_parcels(work):
    """(the atlas label of each BOLD column, the atlas on the BOLD grid, the labels 02 found no
    voxel of on that grid: their columns are 0.0 and they are not scored), after checking that
    the atlas holds every other label."""
    table = read_tsv(work / "bold" / "labels.tsv", required=("column", "label")).sort_values("column")
    labels = table["label"].astype(int).tolist()
    # labels.tsv of an older 02 has no n_voxels column: every label then has voxels
    empty = (table["n_voxels"] == 0).to_numpy() if "n_voxels" in table else np.zeros(len(table), bool)
    off_grid = set(table.loc[empty, "label"].astype(int))
    atlas_path = work / "bold" / "atlas.nii.gz"
    if not atlas_path.is_file():
        raise InputError(f"{atlas_path}: file not found (run 02_prep_fmri.py)")
    atlas = common.load_nifti(atlas_path)
    unknown = sorted(set(labels) - off_grid
                     - set(np.unique(common.nifti_data(atlas, atlas_path)).tolist()))
    if unknown:
        raise InputError(f"{atlas_path}: has no parcel with label {unknown[0]:g} "
                         "listed in bold/labels.tsv")
    return labels, atlas_path, off_grid


def split_of_runs(work, manifest):
    """The split of each run of the manifest: bold/splits.tsv's, the one split that 03 and 04
    follow too (the manifest's own column when an older 02 wrote no such file)."""
    path = common.splits_path(work)
    if not path.is_file():
        return manifest["split"]
    table = common.read_splits(path)
    split = manifest.apply(common.run_key, axis=1).map(
        dict(zip(table.apply(common.run_key, axis=1), table["split"])))
    if split.isna().any():
        row = manifest[split.isna()].iloc[0]
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        raise InputError(f"{path}: no row for run {stem}, which bold/manifest.tsv lists "
                         "(re-run 02_prep_fmri.py, or add it)")
    return split


def subjects_without_split(args, stage):
    """{subject: why} of the subjects that --split session cannot split (no training or no test
    run: a single-session subject, say), each said on one line: they are skipped, the others
    fitted. InputError when no subject is left."""
    if args.split == "random":
        return {}
    training = {"train", "validation"} if args.train_on_validation else {"train"}
    why = {}
    for sub in stage.subjects:
        splits = stage.manifest.loc[stage.manifest["sub"] == sub, "split"]
        lacking = [name for name, wanted in (("training", training), ("test", {"test"}))
                   if not splits.isin(wanted).any()]
        runs = ", ".join(f"{n} {split}" for split, n in splits.value_counts().items())
        if lacking:
            why[sub] = f"no {' and no '.join(lacking)} run in the split (its runs: {runs})"
        elif args.cv == "runs" and splits.isin(training).sum() < 2:
            why[sub] = (f"one training run: --cv runs leaves one out to choose the penalty (its "
                        f"runs: {runs}; --cv loo chooses by leave-one-out)")
        elif args.cv == "validation" and not (splits == "validation").any():
            why[sub] = f"no validation run for --cv validation (its runs: {runs})"
        if sub in why:
            print(f"{STAGE}: sub-{sub}: skipped: {why[sub]}", file=sys.stderr)
    if len(why) == len(stage.subjects):
        raise InputError(f"{common.splits_path(args.work)}: no subject can be fitted as asked "
                         f"(sub-{stage.subjects[0]}: {why[stage.subjects[0]]}): choose the split "
                         "with 02's --test-sessions, --test-runs or --splits, or another --cv")
    return why


def refuse_trained_on_test(args, work, sub, manifest, files):
    """InputError when a model whose features predict the BOLD (04's GPT, 03's VQ-VAE, as the
    first run's features record lists them) trained on the stimuli of one of the subject's test
    runs: its r there would measure memory, not encoding. --allow-trained-on-test lets it pass."""
    if args.allow_trained_on_test or args.split == "random":
        return
    runs = manifest[(manifest["sub"] == sub) & (manifest["split"] == "test")]
    test = {common.run_key(row): run_stem(row["sub"], row["ses"], row["task"], row["run"])
            for _, row in runs.iterrows()}
    for path in files[0][3]:
        record = common.read_record(common.record_path(path))
        for key, model_record in common.runs_trained_on(work, record).items():
            if key in test:
                raise InputError(f"{model_record}: trained on the stimuli of test run {test[key]} "
                                 f"of sub-{sub} ({common.splits_path(work)}): train it without "
                                 "them (03 and 04 follow that file), or pass "
                                 "--allow-trained-on-test")


def update_subjects_figure(results_dir, stage, settings, inputs_of, redraw):
    """r_by_subject.png compares subjects, so it shows only those made as this run makes them; the
    folder's other subjects (from a run with other --subjects and flags, or from inputs that changed
    since) are left out, with a line saying why. Refusing would stop this run over results it did
    not make, and that it does not need: a run that reaches them refuses other flags and remakes
    changed inputs. A re-run of finished subjects rewrites nothing, unless the figure may show other
    runs'."""
    made = sorted(path.parent.name.removeprefix("sub-")
                  for path in results_dir.glob("sub-*/summary.json"))
    others = [sub for sub in made if sub not in stage.subjects]   # this run's: checked above
    left_out = subjects_not_current(results_dir, others, stage.manifest, settings, inputs_of)
    if redraw or left_out or not (results_dir / "r_by_subject.png").is_file():
        plot_subjects(results_dir, [sub for sub in made if sub not in left_out])
    if left_out:
        print(f"{STAGE}: {results_dir / 'r_by_subject.png'} leaves out "
              + ", ".join(f"sub-{sub} ({why})" for sub, why in left_out.items()))


def score_text(value):
    """An r for a person to read: 0.524, or nan (every parcel's r NaN)."""
    return "nan" if value is None else f"{value:.3f}"


def subject_is_done(out_dir, record, settings, inputs, n_sets, overwrite):
    """common.is_up_to_date for a subject's summary.json, which must also list every output this
    version writes (results of an older 06 lack the test time course that 07's intervals
    resample)."""
    if not common.is_up_to_date(out_dir / "summary.json", record, STAGE, settings, inputs,
                                overwrite):
        return False
    missing = [name for name in output_files(n_sets) if name not in record.get("outputs", {})]
    if missing:
        print(f"{STAGE}: {out_dir} has no {missing[0]} (an older 06_ridge.py): making it again")
        return False
    if n_sets > 1 and "unique_test" not in record.get("partition", {}):
        print(f"{STAGE}: {out_dir}: its unique parts were tested by circular shifts (an older "
              "06_ridge.py, anti-conservative there): making it again")
        return False
    return True


def subject_inputs(work, args, manifest, shared, feature_dirs, sub, earlier=None):
    """(files, inputs) of one subject: run_files(...) of the runs it uses, and the inputs of its
    record (fingerprints of the `shared` files and of every run's BOLD and features, reusing those
    of the `earlier` record's inputs where they vouch, and each run's split). InputError for a
    missing file."""
    files = run_files(work, runs_used(args, manifest[manifest["sub"] == sub]), feature_dirs)
    for stem, _, bold_path, feature_paths in files:
        if not bold_path.is_file():
            raise InputError(f"{bold_path}: BOLD file of run {stem} not found")
        for path in feature_paths:
            if not path.is_file():
                raise InputError(f"{path}: features missing for run {stem}")
    paths = [*shared, *(p for _, _, bold, features in files for p in (bold, *features))]
    inputs = common.input_fingerprints(work, paths, (earlier or {}).get("inputs"))
    inputs["splits"] = {stem: split for stem, split, _, _ in files}
    return files, inputs


def subjects_not_current(results_dir, subjects, manifest, settings, inputs_of):
    """{subject: why, in a few words} for those of `subjects` (labels, "01") whose results in
    `results_dir` were not made as this run makes them: with `settings`, from the inputs
    `inputs_of(subject, its record)` gives; 06's rule, common.is_up_to_date."""
    why = {}
    for sub in subjects:
        path = results_dir / f"sub-{sub}" / "summary.json"
        record = common.read_record(path)
        if sub not in set(manifest["sub"]):
            why[sub] = "not in bold/manifest.tsv"
            continue
        try:
            inputs = inputs_of(sub, record)[1]
        except InputError:
            why[sub] = "its BOLD or features are missing"
            continue
        try:
            if common.is_up_to_date(path, record, STAGE, settings, inputs, False,
                                    say=lambda line: None):
                continue
        except InputError:   # other flags
            why[sub] = f"made with other {', '.join(common.changed_settings(record, settings))}"
            continue
        changed = common.changed_inputs(record or {}, inputs)
        why[sub] = ("no record of how it was made" if record is None else
                    f"{changed[0]} changed since" if changed else
                    "its files changed since it was made")
    return why


def encode_subject(args, sub, files, stage, out_dir, record):
    """Fit, score, test and map one subject; write its outputs, then summary.json (its record:
    `record` is (settings, inputs) as main computed them). files: run_files(...) of the runs
    used."""
    start = time.time()
    rng = np.random.default_rng(args.seed)
    design = subject_design(args, sub, files, stage.labels, rng)
    partition = None
    if len(design.X_train) == 1:   # the paper's model: one feature set
        fit = fit_one_set(args, design)
    else:                          # --with: banded ridge of all the sets, the variance partition
        fit, partition = partition_variance(design, args)
    r = pearson_r(design.Y_test, fit["test_prediction"])  # (P,)
    if design.all_constant:
        r[:] = np.nan   # a constant prediction has no correlation, whatever rounding leaves in it
    not_scored = parcels_not_scored(stage, sub, files)
    r[np.isin(stage.labels, list(not_scored))] = np.nan   # no data there: NaN, not a score of 0.0s
    p_values, significant, null = significance(args, design, fit["test_prediction"], r, rng)
    if partition is not None:
        partition |= unique_significance(args, design, fit, partition)
    warn_if_alphas_at_grid_edge(args, sub, fit["alpha_index"], significant, design.all_constant)
    names = [name for name, _ in stage.feature_sets]
    if not design.all_constant:                   # (else there is no r to test)
        warn_if_too_few_shifts(args, sub, null["n_permutations"], "parcel's r", significant)

    # --- outputs (summary.json last: it is the subject's record, and marks it as done) ---
    common.remove_stale_temporaries(out_dir)
    # a subject is all or nothing: a failed write (full disk) removes what this attempt wrote
    with common.all_or_nothing([out_dir / name
                                for name in (*output_files(len(names)), "summary.json")]):
        save_npy(out_dir / "r.npy", r.astype(np.float32))
        save_npy(out_dir / "alphas.npy", fit["alpha"])
        save_npy(out_dir / "p_values.npy", p_values)
        save_npy(out_dir / "significant.npy", significant)
        save_test_time_course(out_dir, design, fit["test_prediction"])
        best = score_text(np.nanmax(r) if np.isfinite(r).any() else None)
        write_r_map(r, significant, args.n_permutations > 0, stage.labels, stage.atlas_path,
                    out_dir, f"sub-{sub} {'+'.join(names)}: test r (max {best})")
        if partition is not None:
            write_partition(out_dir, fit, partition, names, stage, sub)
        summary = subject_summary(args, sub, r, significant, null, fit, design, files, record,
                                  start)
        if partition is not None:
            summary["partition"] = partition_summary(partition, names, args)
        summary["parcels_not_scored"] = {str(label): why for label, why in not_scored.items()}
        if stage.planted_labels is not None:
            summary["ground_truth"] = planted_recovery(r, significant, stage.labels,
                                                       stage.planted_labels, stage.other_signal)
        summary["outputs"] = {name: common.hash_file(out_dir / name)
                              for name in output_files(len(names))}
        common.write_json(out_dir / "summary.json", summary)
    return summary


def parcels_not_scored(stage, sub, files):
    """{atlas label: why} of the parcels that have no data in a run the subject uses (02's 0.0
    columns: no voxel on the BOLD grid, or none usable in that run): carried as NaN, listed in the
    summary, never a stop."""
    why = {label: "no voxel on the BOLD grid (outside the field of view, or too small)"
           for label in stage.off_grid}
    used = {stem for stem, *_ in files}
    runs = stage.manifest[stage.manifest["sub"] == sub]
    for row in runs.itertuples():
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        if stem in used and common.has_label(getattr(row, "empty_parcels", None)):
            for label in str(row.empty_parcels).split():
                why.setdefault(int(label), f"no usable voxel in {stem}")
    return why


def output_files(n_sets):
    """What a subject's folder holds besides summary.json (which lists them with their
    fingerprints)."""
    return OUTPUT_FILES + (PARTITION_FILES if n_sets > 1 else ())


def fit_one_set(args, design):
    """The paper's model, one feature set: ridge with the penalty chosen per parcel (--alphas, --cv),
    by ridge_fast's solvers (--solver fast) or paper.encoding's (--solver paper, one
    eigendecomposition in torch: the clearest form, checked equal)."""
    alphas, relative = penalty_grid(args.alphas)
    if args.solver == "paper":
        device = torch.device(args.device)
        fit = ridge_loo(*(torch.as_tensor(a, device=device) for a in
                          (design.X_train[0], design.Y_train, design.X_test[0])),
                        alphas, design.groups, relative)
        return {key: value.cpu().numpy() for key, value in fit.items()} | {"solver": "paper"}
    return fit_ridge_loo(design.X_train[0], design.Y_train, design.X_test[0], alphas,
                         groups=design.groups, device=args.device,
                         dtype=products_dtype(args.device), parcel_batch=args.parcel_batch,
                         relative=relative)


def save_test_time_course(out_dir, design, prediction):
    """test_bold.npy and test_prediction.npy (m, P) float32 and test_run.npy (m,) int: the test time
    course, for intervals that resample it (07's block bootstrap: blocks of TRs within a run)."""
    save_npy(out_dir / "test_bold.npy", design.Y_test.astype(np.float32))
    save_npy(out_dir / "test_prediction.npy", prediction.astype(np.float32))
    save_npy(out_dir / "test_run.npy", np.array([g for g, _ in design.test_ids], np.int32))


@dataclass
class Design:
    """One subject's regression: X_train [(n, D_s)] and X_test [(m, D_s)] float32, one per feature
    set (delayed, standardized or projected), Y_train (n, P) and Y_test (m, P) float64 BOLD; the
    samples, (run index, index among the run's samples) for each row; the runs (load_runs); groups
    (n,) the training run of each row for --cv runs, else None; n_constant features constant over
    the training samples (all sets)."""
    X_train: list
    X_test: list
    Y_train: np.ndarray
    Y_test: np.ndarray
    train_ids: list
    test_ids: list
    runs: list
    groups: np.ndarray | None
    n_constant: int

    @property
    def train_runs(self):   # (n,) the run of each training row
        return np.array([g for g, _ in self.train_ids])

    @property
    def n_features(self):
        return sum(X.shape[1] for X in self.X_train)

    @property
    def all_constant(self):   # e.g. every window black: nothing to predict the BOLD from
        return self.n_constant == self.n_features


def subject_design(args, sub, files, labels, rng):
    """The subject's Design: runs read, samples split (--split), features delayed (--delays),
    standardized with training statistics (unless --no-standardize), projected (--pca)."""
    runs = load_runs(files, args.delays)
    train_splits = {"train", "validation"} if fits_validation(args) else {"train"}
    train_ids, test_ids = split_samples(runs, args.split, args.test_size, train_splits, rng)
    if not train_ids or not test_ids:
        raise InputError(f"{Path(args.work) / 'bold' / 'manifest.tsv'}: sub-{sub} has "
                         f"{len(train_ids)} training and {len(test_ids)} test samples "
                         f"with --split {args.split}")
    sets = range(len(runs[0]["features"]))
    X_train = [delayed_design(runs, train_ids, args.delays, s) for s in sets]  # (n, D_s * delays)
    X_test = [delayed_design(runs, test_ids, args.delays, s) for s in sets]    # (m, D_s * delays)
    X_train, X_test = without_constant_features(sub, files, X_train, X_test)
    Y_train = np.stack([runs[g]["bold"][k] for g, k in train_ids]).astype(np.float64)  # (n, P)
    Y_test = np.stack([runs[g]["bold"][k] for g, k in test_ids]).astype(np.float64)    # (m, P)
    if Y_train.shape[1] != len(labels):
        raise InputError(f"{Path(args.work) / 'bold' / 'labels.tsv'}: lists {len(labels)} parcels "
                         f"but the BOLD of sub-{sub} has {Y_train.shape[1]} columns")
    n_constant = sum(standardize(X, X_test_s, scale=not args.no_standardize)
                     for X, X_test_s in zip(X_train, X_test))
    if n_constant == sum(X.shape[1] for X in X_train):
        print(f"{STAGE}: warning: sub-{sub}: all {n_constant} features are constant over the "
              "training samples: no prediction is possible, r is NaN for every parcel",
              file=sys.stderr)
    if args.pca:   # one set (parse_args refuses --pca with --with)
        if args.pca >= min(X_train[0].shape):
            raise InputError(f"--pca {args.pca}: must be below min(samples, features) = "
                             f"{min(X_train[0].shape)}")
        X_train[0], X_test[0] = principal_components(X_train[0], X_test[0], args.pca, args.device,
                                                     args.seed)
    groups = held_out_groups(args, sub, runs, train_ids)
    return Design(X_train, X_test, Y_train, Y_test, train_ids, test_ids, runs, groups, n_constant)


def without_constant_features(sub, files, X_train, X_test):
    """With several feature sets (--with), each set's design without its columns that are constant
    over the training samples, said in a warning. A set constant everywhere is an InputError: the
    banded ridge would give it a unique part all the same (its weight rescales the others' penalty)
    and r NaN where it alone is chosen. One set is left as it is (all constant: r NaN, said)."""
    if len(X_train) < 2:
        return X_train, X_test
    kept_train, kept_test = [], []
    for s, (X, X_test_s) in enumerate(zip(X_train, X_test)):
        folder = files[0][3][s].parents[2]                       # features/<name>/<layer>
        varies = X.max(axis=0) > X.min(axis=0)                    # (D_s * delays,)
        if not varies.any():
            raise InputError(f"{folder}: every feature is constant over the training samples of "
                             f"sub-{sub}: nothing to fit (leave the set out of --name and --with)")
        if not varies.all():
            print(f"{STAGE}: warning: sub-{sub}: {folder}: {int((~varies).sum())} of {len(varies)} "
                  "features constant over the training samples, left out", file=sys.stderr)
            X, X_test_s = X[:, varies], X_test_s[:, varies]
        kept_train.append(X)
        kept_test.append(X_test_s)
    return kept_train, kept_test


def significance(args, design, prediction, r, rng):
    """p-values (P,), the FDR mask (P,) and the null's summary (its size and the 95th percentile of
    the max and median null r over parcels: the chance level of the scores; None without a null)."""
    if args.n_permutations == 0:
        return (np.full(len(r), np.nan), np.zeros(len(r), bool),
                {"n_permutations": 0, "levels": None})
    # whole runs, in time order (split_samples)
    test_run = np.array([g for g, _ in design.test_ids])
    null = circular_shift_null(design.Y_test, prediction, test_run, args.n_permutations, rng)
    p_values, _, significant = permutation_p_values(r, null, args.fdr)
    levels = None
    if np.isfinite(null).any(axis=1).all():
        levels = {"max_r_95": float(np.quantile(np.nanmax(null, axis=1), 0.95)),
                  "median_r_95": float(np.quantile(np.nanmedian(null, axis=1), 0.95)),
                  "n_permutations": len(null)}
    return p_values, significant, {"n_permutations": len(null), "levels": levels}


def warn_if_too_few_shifts(args, sub, n_null, what, significant):
    """Benjamini-Hochberg passes the k-th smallest of P p-values only when it is at most k q / P,
    and a permutation p-value is at least 1 / (n_null + 1): with few shifts and many parcels,
    parcels pass only in groups. When none passed (significant (P,) all False), say so, and what a
    single parcel would need; a lone effect (one parcel's unique part) is otherwise never found.
    n_null: the null's size (fewer than --n-permutations when the test runs allow no more)."""
    if n_null == 0 or significant.any():
        return
    n_parcels = significant.size
    smallest_group = int(np.ceil(n_parcels / (args.fdr * (n_null + 1))))
    if smallest_group <= 1:
        return
    needed = int(np.ceil(n_parcels / args.fdr)) - 1    # 1 / (n_null + 1) <= q / P
    hint = (f"--n-permutations {needed}" if n_null == args.n_permutations
            else f"longer or more test runs (these allow {n_null} circular shifts)")
    print(f"{STAGE}: warning: sub-{sub}: no {what} is significant, but with {n_null} circular "
          f"shifts the smallest p-value is {1 / (n_null + 1):.2g}, and FDR q < {args.fdr:g} over "
          f"{n_parcels} parcels passes parcels only {smallest_group} or more at a time; for a single "
          f"one: {hint}", file=sys.stderr)


def subject_summary(args, sub, r, significant, null, fit, design, files, record, start):
    """summary.json without its outputs' fingerprints: scores, significance, method, data,
    record."""
    finite = np.isfinite(r).any()
    values, counts = np.unique(fit["alpha"], return_counts=True)
    n_alphas = len(penalty_grid(args.alphas)[0])
    settings, inputs = record
    return {
        "stage": STAGE, "subject": f"sub-{sub}",
        "r_max": float(np.nanmax(r)) if finite else None,
        "r_median": float(np.nanmedian(r)) if finite else None,
        "r_mean": float(np.nanmean(r)) if finite else None,
        "n_parcels": int(len(r)), "n_parcels_nan_r": int(np.isnan(r).sum()),
        "n_significant": int(significant.sum()),
        "significance": (f"one-sided permutation p-value against {null['n_permutations']} "
                         f"circular shifts of the features within each run, "
                         f"Benjamini-Hochberg q < {args.fdr}"
                         if args.n_permutations else "not computed (--n-permutations 0)"),
        "null": null["levels"],
        "alphas_chosen": {f"{v:.3g}": int(c) for v, c in zip(values, counts)},
        "alpha_grid": grid_text(args, fit),
        "penalty_selection": PENALTY_SELECTION[args.cv],
        **{f"parcels_at_{side}_alpha": int((fit["alpha_index"] == edge).sum())
           for edge, side in ((n_alphas - 1, "largest"), (0, "smallest"))},
        "parcels_significant_at_an_edge": int((significant & np.isin(fit["alpha_index"],
                                                                   [0, n_alphas - 1])).sum()),
        "standardization": standardization_text(args, design.n_constant),
        "n_train_samples": len(design.train_ids), "n_test_samples": len(design.test_ids),
        "n_features": int(design.n_features),
        "solver": SOLVER_TEXT[fit["solver"]],
        "train_runs": sorted({design.runs[g]["stem"] for g, _ in design.train_ids}),
        "test_runs": sorted({design.runs[g]["stem"] for g, _ in design.test_ids}),
        "layer": files[0][3][0].parents[2].name,
        "seconds": round(time.time() - start, 1),
        "settings": settings, "inputs": inputs,
    }


def standardization_text(args, n_constant):
    """How the features entered the ridge, in words (summary.json)."""
    text = (f"features z-scored with training-set means and standard deviations "
            f"({n_constant} constant features set to 0)" if not args.no_standardize
            else "features as 05 wrote them (--no-standardize)")
    text += "; intercept fitted (X and BOLD centered with training means)"
    if args.pca:
        text += f"; then the first {args.pca} principal components of the training features"
    return text


def runs_used(args, runs_table):
    """The manifest rows of one subject that --split uses (session: train and test runs, plus
    validation runs with --train-on-validation or --cv validation; random: every run)."""
    if args.split == "session":
        used = {"train", "test"} | ({"validation"} if fits_validation(args) else set())
        runs_table = runs_table[runs_table["split"].isin(used)]
    return runs_table


def fits_validation(args):
    """Whether the final model is fitted on the validation runs too (--split session)."""
    return args.train_on_validation or args.cv == "validation"


# --------------------------------------------------------------------------------------------------
# Inputs: BOLD runs (02) and feature runs (05), matched run by run through the manifest
# --------------------------------------------------------------------------------------------------
def find_layer(features_root, layer):
    """The layer folder: --layer if given, else the only layer present. With several, --layer is
    needed, even when the paper's layer is among them: another layer extracted later (run_all.sh's
    EXTRACT_ARGS) would otherwise be passed over silently for the paper's."""
    if not features_root.is_dir():
        raise InputError(f"{features_root}: feature folder not found (run 05_extract.py)")
    if layer is not None:
        if not (features_root / layer).is_dir():
            raise InputError(f"{features_root / layer}: layer folder not found")
        return layer
    present = sorted(d.name for d in features_root.iterdir() if d.is_dir())
    if len(present) == 1:
        return present[0]
    raise InputError(f"{features_root}: holds layers {present or 'none'}; choose one with --layer")


def run_files(work, runs, feature_dirs):
    """[(stem, split, BOLD path, [feature path of each set])] of the manifest rows `runs`, in
    manifest order; feature_dirs: the folder of each feature set, <work>/features/<name>/<layer>."""
    files = []
    for row in runs.itertuples():
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        features = [folder / common.run_folder(row.sub, row.ses) / f"{stem}.npy"
                    for folder in feature_dirs]
        files.append((stem, row.split, work / row.bold_path, features))
    return files


def load_runs(files, delays):
    """Read each run's BOLD and features; return the samples each run gives to the delayed design.

    files: run_files(...), whose files subject_inputs found. A sample is a TR t with finite BOLD
    and t >= max(delays): its design row is the concatenation of the features of TRs t - d for d in
    delays, all from the same run (shifts never cross run boundaries). Returns a list of dicts:
    stem, split, bold (T_valid, P) float32, features [one (T, D_s) memory-mapped array per feature
    set], rows (T_valid,).
    """
    loaded = []
    for stem, split, bold_path, feature_paths in files:
        bold = np.array(load_npy(bold_path, advice="re-run 02_prep_fmri.py --overwrite"))
        if bold.ndim != 2:
            raise InputError(f"{bold_path}: expected a 2-D (T, P) array")
        require_numbers(bold, bold_path, "re-run 02_prep_fmri.py --overwrite")
        features = [run_features(path, stem, bold_path, len(bold)) for path in feature_paths]
        if np.isinf(bold).any():
            raise InputError(f"{bold_path}: BOLD contains inf")
        nan_rows = np.isnan(bold).all(axis=1)  # non-steady-state volumes, left out by stage 02
        if np.isnan(bold[~nan_rows]).any():
            raise InputError(f"{bold_path}: BOLD has NaN in some parcels of a volume "
                             "(only whole NaN rows, for non-steady-state volumes, are allowed)")
        if len(bold) <= max(delays):
            raise InputError(f"run {stem}: {len(bold)} volumes, not more than the largest delay "
                             f"{max(delays)}: no sample left")
        rows = np.flatnonzero(~nan_rows & (np.arange(len(bold)) >= max(delays)))  # (T_valid,)
        loaded.append(dict(stem=stem, split=split, bold=bold[rows], features=features, rows=rows))
    for s, path in enumerate(files[0][3]):
        widths = {run["features"][s].shape[1] for run in loaded}
        if len(widths) > 1:
            raise InputError(f"{path.parents[2]}: runs have different feature sizes "
                             f"{sorted(widths)}")
    return loaded


def run_features(path, stem, bold_path, n_volumes):
    """One run's features of one set, (T, D) memory-mapped, after checking them against its BOLD
    (subject_inputs found the file)."""
    features = load_npy(path, advice="re-run 05_extract.py --overwrite")
    if features.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (T, D) array")
    require_numbers(features, path, "re-run 05_extract.py --overwrite")
    if len(features) != n_volumes:
        raise InputError(f"run {stem}: features have {len(features)} rows ({path}) but BOLD has "
                         f"{n_volumes} volumes ({bold_path})")
    if not np.isfinite(features).all():
        raise InputError(f"{path}: features contain NaN or inf")
    return features


def require_numbers(array, path, advice):
    """Refuse an array of anything but integers or floats (strings, booleans), which the checks of
    finite values could not even read."""
    if array.dtype.kind not in "iuf":
        raise InputError(f"{path}: an array of {array.dtype}, not numbers; {advice}")


def principal_components(X_train, X_test, k, device, seed):
    """Both projected on the first k principal axes of the training features: (n, k), (m, k)
    float32.

    The axes are those of the centred training features (z-scoring centred them, --no-standardize
    did not; center=True subtracts the means inside the products, without a centred copy of the
    (n, p) matrix). The projections keep a constant offset, which the ridge's intercept absorbs."""
    torch.manual_seed(seed)
    # (n, p), float32: not copied on CPU
    train_t = torch.as_tensor(X_train, device=device)
    _, _, components = torch.pca_lowrank(train_t, q=k, center=True)         # (p, k)
    return ((train_t @ components).cpu().numpy(),
            (torch.as_tensor(X_test, device=device) @ components).cpu().numpy())


# --------------------------------------------------------------------------------------------------
# Outputs: brain map, figures, the demo's ground truth, the summary
# --------------------------------------------------------------------------------------------------


def print_summary(results_dir, subjects, skipped):
    """One screen: per subject, max and median r, significant parcels, and the planted parcels if
    known; the subjects `skipped` ({subject: why}) last."""
    print(f"\n06_ridge: test Pearson r per parcel in {results_dir}")
    print(f"{'subject':<9}{'r max':>7}{'r median':>10}{'significant':>13}   planted parcels (demo)")
    for sub in subjects:
        path = results_dir / f"sub-{sub}" / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        r_max, r_median = score_text(s["r_max"]), score_text(s["r_median"])
        line = f"{s['subject']:<9}{r_max:>7}{r_median:>10}{significant_text(s):>13}   "
        truth = s.get("ground_truth")
        if truth:
            line += (f"{'recovered' if truth['recovered'] else 'NOT recovered'}: "
                     f"median r {truth['planted_r_median']:.2f} "
                     f"vs {truth['noise_r_median']:.2f} (noise), "
                     f"beats noise in {truth['planted_beats_noise']:.0%} of pairs")
            if tested(s):
                line += (f", {truth['planted_significant']}/{truth['n_planted']} significant "
                         f"({truth['noise_significant']}/{truth['n_noise']} noise)")
        print(line)
        reasons = {}
        for label, why in s.get("parcels_not_scored", {}).items():
            reasons.setdefault(why, []).append(label)
        for why, labels in reasons.items():
            print(f"{'':<9}not scored: parcel(s) {' '.join(labels)}: {why}")
    for sub, why in skipped.items():
        print(f"{'sub-' + sub:<9}skipped: {why}")


def tested(summary):
    """Whether a subject's parcels were tested for significance (--n-permutations above 0)."""
    return summary["settings"].get("--n-permutations", 0) > 0


def significant_text(summary):
    """"k/P" of the P parcels scored, k significant; or "not tested" (--n-permutations 0)."""
    scored = summary["n_parcels"] - len(summary.get("parcels_not_scored", {}))
    return f"{summary['n_significant']}/{scored}" if tested(summary) else "not tested"


if __name__ == "__main__":
    run_main(main)
