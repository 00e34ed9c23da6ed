"""Your own data, as 00_make_demo.py makes it in variants (conftest.VARIANT_FLAGS: a single-session subject,
TR 2.0 s, a parcel outside the field of view; BIDS without sessions), through the stages as a user runs them:
02 -> 05 (low-level features: no model to train) -> 06."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from conftest import load_stage, run_script


def copy_of(variant_work, work):
    """A work directory of its own with the variant's dataset and frames (01's outputs)."""
    for folder in ("demo", "frames"):
        shutil.copytree(variant_work / folder, work / folder)
    return work


def prep_extract_ridge(work, *split_flags, ridge_flags=()):
    """02 with `split_flags`, 05 --features lowlevel, 06 without a null: the CompletedProcess of 02 and 06."""
    prep = run_script("02_prep_fmri.py", "--work", work, "--motion", "basic", *split_flags)
    run_script("05_extract.py", "--work", work, "--features", "lowlevel")
    ridge = run_script("06_ridge.py", "--work", work, "--name", "lowlevel", "--n-permutations", "0", *ridge_flags)
    return prep, ridge


def summary_of(work, sub):
    return json.loads((work / "results/lowlevel" / f"sub-{sub}" / "summary.json").read_text())


@pytest.fixture(scope="module")
def by_session(variant_work, tmp_path_factory):
    """The variant split by session, ses-003 test: (work, 02's CompletedProcess, 06's)."""
    work = copy_of(variant_work, tmp_path_factory.mktemp("by_session"))
    return work, *prep_extract_ridge(work, "--test-sessions", "003", "--validation-sessions")


def test_a_subject_that_cannot_be_split_by_session_is_skipped_and_the_others_finish(by_session):
    work, prep, ridge = by_session
    assert "note: sub-02: no test run in this split: 06 will skip it" in prep.stderr.splitlines()
    why = "no test run in the split (its runs: 2 train)"
    assert f"06_ridge: sub-02: skipped: {why}" in ridge.stderr.splitlines()
    assert f"sub-02   skipped: {why}" in ridge.stdout.splitlines()
    assert summary_of(work, "01")["test_runs"] == [f"sub-01_ses-003_task-airstriker_run-0{r}" for r in (1, 2)]
    assert not (work / "results/lowlevel/sub-02").exists()


def test_a_split_by_run_splits_the_single_session_subject_and_remakes_what_changed(by_session, tmp_path):
    """Run 02 of every session is test: sub-01's results are made again from the new split
    (bold/splits.tsv's runs are in the results' record); sub-02 has one training run left, which 06's
    default leave-one-run-out cannot leave out: skipped with one line, and fitted with --cv loo."""
    work = tmp_path / "work"
    shutil.copytree(by_session[0], work)
    _, ridge = prep_extract_ridge(work, "--test-runs", "02", "--validation-runs")
    assert "splits changed since" in ridge.stdout
    assert ("06_ridge: sub-02: skipped: one training run: --cv runs leaves one out to choose the penalty (its "
            "runs: 1 train, 1 test; --cv loo chooses by leave-one-out)") in ridge.stderr.splitlines()
    _, ridge = prep_extract_ridge(work, "--test-runs", "02", "--validation-runs",
                                  ridge_flags=("--cv", "loo", "--overwrite"))
    assert "skipped" not in ridge.stdout + ridge.stderr
    for sub, sessions in (("01", ("001", "002", "003")), ("02", ("001",))):
        assert summary_of(work, sub)["test_runs"] == [f"sub-{sub}_ses-{ses}_task-airstriker_run-02"
                                                      for ses in sessions]


def test_a_parcel_outside_the_field_of_view_is_said_and_carried_as_nan(by_session):
    """Parcel 41 lies below the BOLD grid: 02 says so (not "too small") and keeps a 0.0 column; 06 scores the
    other parcels, gives it NaN and lists it, instead of stopping."""
    work, prep, ridge = by_session
    atlas = work / "demo/atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz"
    assert (f"warning: {atlas}: 1 label(s) have no voxel on the BOLD grid: 41 outside the BOLD field of view; "
            "their columns are 0.0, and 06 does not score them") in prep.stderr.splitlines()
    labels = pd.read_csv(work / "bold/labels.tsv", sep="\t")
    r = np.load(work / "results/lowlevel/sub-01/r.npy")
    outside = labels["label"] == 41
    assert np.isnan(r[outside]).all() and np.isfinite(r[~outside]).all()
    why = "no voxel on the BOLD grid (outside the field of view, or too small)"
    assert summary_of(work, "01")["parcels_not_scored"] == {"41": why}
    assert f"         not scored: parcel(s) 41: {why}" in ridge.stdout.splitlines()


def test_bids_without_sessions_runs_from_00_to_06(tmp_path):
    """BIDS without a session level (00 --no-sessions): 01 and 02 read it, every output is named as the dataset
    names its runs (no ses- anywhere), and a split by run scores the test run."""
    run_script("00_make_demo.py", "--work", tmp_path, "--no-sessions", "--subjects", "1", "--runs", "3",
               "--reps", "1", "--rep-seconds", "15")
    run_script("01_render_frames.py", "--work", tmp_path, "--resolution", "32", "--workers", "2")
    prep_extract_ridge(tmp_path, "--test-runs", "03")
    stems = [f"sub-01_task-airstriker_run-0{r}" for r in (1, 2, 3)]
    manifest = pd.read_csv(tmp_path / "bold/manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert manifest["ses"].tolist() == ["n/a"] * 3
    assert manifest["bold_path"].tolist() == [f"bold/sub-01/{stem}.npy" for stem in stems]
    assert all((tmp_path / "features/lowlevel/lowlevel/sub-01" / f"{stem}.npy").is_file() for stem in stems)
    assert summary_of(tmp_path, "01")["test_runs"] == [stems[2]]
    assert not list((tmp_path / "bold").rglob("*ses-*")) and not list((tmp_path / "features").rglob("*ses-*"))


def test_a_warning_when_confound_regressors_take_a_short_run(tmp_path, capsys):
    """One run of 2 x 35 s (51 volumes, 50 kept): Params24 + a cosine are 25 regressors, which would take
    most of an HRF-paced signal with the noise; 02 used to warn below 10 degrees of freedom only, and these
    leave 24. The 6 motion parameters and the cosine do not warn."""
    run_script("00_make_demo.py", "--work", tmp_path, "--subjects", "1", "--sessions", "1", "--runs", "1",
               "--reps", "2", "--rep-seconds", "35")
    prep = load_stage("02_prep_fmri.py")
    prep.main(["--work", str(tmp_path)])
    warning = ("warning: 1 run(s) have more confound regressors than a third of their kept volumes "
               "(sub-01_ses-001_task-airstriker_run-01_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz: 25 for "
               "50): regressing them out removes much of the signal too; use fewer (--motion basic has 6, and the "
               "cosines) or longer runs")
    assert warning in capsys.readouterr().err.splitlines()
    prep.main(["--work", str(tmp_path), "--motion", "basic", "--overwrite"])
    assert "confound regressors" not in capsys.readouterr().err
