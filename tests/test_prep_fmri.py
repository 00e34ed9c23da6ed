"""02_prep_fmri.py: confound removal, z-scoring, labels, splits, the demo's planted signal, bad input.

The synthetic runs use the real fMRIPrep confounds files that ship with nilearn (30 volumes each), placed
beside a small synthetic BOLD under BIDS names:
  ses-001: test-v21_desc-confounds_timeseries.tsv   (fMRIPrep >= 20.2 name; 3 non-steady-state volumes)
  ses-002: test_desc-confounds_regressors.tsv       (fMRIPrep 20.1 name; 1 non-steady-state volume)
Parcels (labels deliberately not 1..P): 3 follows trans_x (a motion artefact), 7 a planted sinusoid,
10 both, 12 noise only.

30 volumes leave Params24 + cosines (25 to 28 regressors) 0 to 3 degrees of freedom, so most checks use
the 6 motion parameters + cosines (the paper's runs have ~400 volumes); the exact least-squares reference
covers --motion basic, derivatives and full.
"""
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import nilearn
import numpy as np
import pandas as pd
import pytest

import common
from common import InputError
from conftest import load_stage, needs_namespaces, run_confined, run_script

prep = load_stage("02_prep_fmri.py")

CONFOUNDS_DIR = Path(nilearn.__file__).parent / "interfaces/fmriprep/data"
SPACE = "MNI152NLin2009cAsym"
MOTION6 = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"]
MOTION24 = [f"{m}{s}" for m in MOTION6 for s in ("", "_derivative1", "_power2", "_derivative1_power2")]
BOLD_AFFINE = np.array([[4.0, 0, 0, -23.4], [0, 4, 0, -23.4], [0, 0, 4, -23.4], [0, 0, 0, 1]])
ATLAS_AFFINE = np.array([[2.0, 0, 0, -24], [0, 2, 0, -24], [0, 0, 2, -24], [0, 0, 0, 1]])
GRID = (12, 12, 12)
LABELS = {3: "motion", 7: "planted", 10: "both", 12: "noise"}
SESSIONS = {"001": "test-v21_desc-confounds_timeseries", "002": "test_desc-confounds_regressors"}


def zscore(x):
    return (x - x.mean(0)) / x.std(0, ddof=1)


def corr(a, b):
    return np.corrcoef(a, b)[0, 1]


def planted_signal(n):
    return np.sin(2 * np.pi * np.arange(n) / 7.0)


def make_atlas(path, affine=ATLAS_AFFINE):
    """A 2 mm labels atlas (finer than the 4 mm BOLD, so it must be resampled): 4 blocks in a 24^3 grid."""
    atlas = np.zeros((24, 24, 24), np.int32)
    atlas[4:12, 4:12, 4:20] = 3
    atlas[12:20, 4:12, 4:20] = 7
    atlas[4:12, 12:20, 4:20] = 10
    atlas[12:20, 12:20, 4:20] = 12
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(atlas, affine), path)
    pd.DataFrame({"index": list(LABELS), "name": list(LABELS.values())}).to_csv(
        path.with_name(path.name.split(".")[0] + ".tsv"), sep="\t", index=False)
    return path


def make_dataset(root, seed=0):
    """fMRIPrep derivatives with two 30-volume runs of sub-01 (task synth) and a 2 mm atlas. Returns paths."""
    rng = np.random.default_rng(seed)
    atlas_path = make_atlas(root / "atlas/tpl-synth_dseg.nii.gz")
    # The atlas on the BOLD grid, computed by hand: BOLD voxel i has centre -23.4 + 4 i mm, the nearest
    # atlas voxel is round((-23.4 + 4 i + 24) / 2) = 2 i (no ties).
    on_grid = np.asarray(nib.load(atlas_path).dataobj)[::2, ::2, ::2]           # (12, 12, 12)
    runs = {}
    for ses, confounds_name in SESSIONS.items():
        func = root / f"fmriprep/sub-01/ses-{ses}/func"
        func.mkdir(parents=True)
        stem = f"sub-01_ses-{ses}_task-synth_run-01"
        suffix = confounds_name.split("desc-")[1]
        for ext in ("tsv", "json"):
            shutil.copy(CONFOUNDS_DIR / f"{confounds_name}.{ext}", func / f"{stem}_desc-{suffix}.{ext}")
        confounds = pd.read_csv(CONFOUNDS_DIR / f"{confounds_name}.tsv", sep="\t", na_values="n/a")
        n = len(confounds)
        motion = zscore(confounds["trans_x"].to_numpy())
        planted = planted_signal(n)
        bold = np.zeros(GRID + (n,), np.float32)
        for label in LABELS:
            inside = on_grid == label
            series = rng.normal(0, 1.0, (inside.sum(), n))                     # (V, T) voxel noise
            if LABELS[label] in ("motion", "both"):
                series += 20 * motion
            if LABELS[label] in ("planted", "both"):
                series += 3 * planted
            bold[inside] = 1000 + series
        nss = confounds.filter(like="non_steady_state").sum(axis=1).to_numpy() > 0
        bold[..., nss] *= 1.5  # T1 not at steady state yet: these volumes must not enter the fit
        image = nib.Nifti1Image(bold, BOLD_AFFINE)
        image.header.set_xyzt_units("mm", "sec")
        image.header["pixdim"][4] = 2.0
        bold_path = func / f"{stem}_space-{SPACE}_desc-preproc_bold.nii.gz"
        nib.save(image, bold_path)
        (func / f"{stem}_space-{SPACE}_desc-preproc_bold.json").write_text(json.dumps({"RepetitionTime": 2.0}))
        runs[ses] = {"bold": bold_path, "confounds": confounds, "stem": stem, "kept": ~nss}
    return {"fmriprep": root / "fmriprep", "atlas": atlas_path, "on_grid": on_grid, "runs": runs}


def flags(data, work, *extra):
    return ["--work", str(work), "--fmriprep", str(data["fmriprep"]), "--atlas", str(data["atlas"]), *extra]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The synthetic dataset, processed once, 8 mm, 6 motion parameters + cosines (in process: nilearn
    is imported once)."""
    root = tmp_path_factory.mktemp("synth")
    data = make_dataset(root)
    prep.main(flags(data, root / "work", "--motion", "basic", "--validation-sessions", "002", "--workers", "1"))
    return data, root / "work"


def output(work, ses):
    return np.load(work / f"bold/sub-01/ses-{ses}/sub-01_ses-{ses}_task-synth_run-01.npy")


def column(work, label):
    labels = pd.read_csv(work / "bold/labels.tsv", sep="\t")
    return int(labels.loc[labels["label"] == label, "column"].iloc[0])


# --------------------------------------------------------------------------------------------------
# The real nilearn confounds files, 8 mm smoothing
# --------------------------------------------------------------------------------------------------
def test_rows_are_volumes_and_dropped_volumes_are_nan(synthetic):
    data, work = synthetic
    manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
    assert list(manifest.columns) == prep.MANIFEST_COLUMNS
    assert manifest["ses"].tolist() == ["001", "002"] and (manifest["sub"] == "01").all()
    assert manifest["split"].tolist() == ["train", "validation"]
    assert manifest["tr_s"].astype(float).tolist() == [2.0, 2.0]
    for ses, run in data["runs"].items():
        y = output(work, ses)
        row = manifest[manifest["ses"] == ses].iloc[0]
        assert (work / row["bold_path"]).is_file()
        assert y.dtype == np.float32 and y.shape == (len(run["confounds"]), len(LABELS))
        assert int(row["n_volumes"]) == len(y) and int(row["kept_volumes"]) == run["kept"].sum()
        # Non-steady-state volumes (3 in the v21 file, 1 in the older one) are NaN rows, in place.
        assert (np.isfinite(y).all(1) == run["kept"]).all()
        assert (~run["kept"]).sum() == {"001": 3, "002": 1}[ses]


def test_zscored_per_parcel_over_valid_volumes(synthetic):
    _, work = synthetic
    for ses in SESSIONS:
        y = output(work, ses)
        valid = y[np.isfinite(y).all(1)]
        np.testing.assert_allclose(valid.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(valid.std(0, ddof=1), 1, atol=1e-4)


def test_motion_artefact_is_removed(synthetic):
    data, work = synthetic
    for ses, run in data["runs"].items():
        kept = run["kept"]
        trans_x = run["confounds"]["trans_x"].to_numpy()[kept]
        raw = nib.load(run["bold"]).get_fdata()[data["on_grid"] == 3].mean(0)[kept]
        assert abs(corr(raw, trans_x)) > 0.95  # the artefact dominates the raw parcel mean
        for label in (3, 10):
            y = output(work, ses)[kept, column(work, label)]
            assert abs(corr(y, trans_x)) < 0.05


def test_labels_and_atlas_match_the_atlas(synthetic):
    data, work = synthetic
    labels = pd.read_csv(work / "bold/labels.tsv", sep="\t")
    assert list(labels.columns) == ["column", "label", "name", "n_voxels"]
    assert labels["column"].tolist() == [0, 1, 2, 3]
    assert labels["label"].tolist() == sorted(LABELS)
    assert labels["name"].tolist() == [LABELS[k] for k in sorted(LABELS)]
    used = nib.load(work / "bold/atlas.nii.gz")
    np.testing.assert_array_equal(np.asarray(used.dataobj), data["on_grid"])
    np.testing.assert_allclose(used.affine, BOLD_AFFINE)
    assert labels["n_voxels"].tolist() == [(data["on_grid"] == k).sum() for k in sorted(LABELS)]
    prep_json = json.loads((work / "bold/prep.json").read_text())
    assert prep_json["settings"] == {"--space": SPACE, "--confounds": ["motion", "high_pass"], "--motion": "basic",
                                     "--fwhm": 8.0}
    assert prep_json["atlas"] == str(data["atlas"].resolve())
    # each run's record: the flags, and the fingerprint of every file it was made from
    run = data["runs"]["001"]
    npy = work / f"bold/sub-01/ses-001/{run['stem']}.npy"
    record = json.loads(npy.with_suffix(".json").read_text())
    assert record["stage"] == "02_prep_fmri" and record["settings"] == prep_json["settings"]
    assert sorted(record["inputs"]) == ["atlas", "bold", "bold_sidecar", "confounds", "confounds_sidecar"]
    assert record["inputs"]["bold"]["sha256"] == common.file_sha256(run["bold"])
    assert record["output"]["sha256"] == common.file_sha256(npy)


# --------------------------------------------------------------------------------------------------
# Math against an independent reference: no smoothing, numpy least squares on the TSV columns
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("motion, columns", [
    ("basic", MOTION6), ("derivatives", [c for c in MOTION24 if c.endswith(("x", "y", "z", "derivative1"))]),
    ("full", MOTION24)])
def test_matches_least_squares_reference(synthetic, tmp_path, motion, columns):
    data, _ = synthetic
    prep.main(flags(data, tmp_path, "--fwhm", "0", "--motion", motion, "--sessions", "001"))
    run = data["runs"]["001"]
    kept = run["kept"]
    cosines = [c for c in run["confounds"].columns if c.startswith("cosine")]
    design = run["confounds"][columns + cosines].to_numpy()[kept]
    design = np.column_stack([np.ones(kept.sum()), design])                   # (T_kept, 1 + K)
    bold = nib.load(run["bold"]).get_fdata()
    y = output(tmp_path, "001")
    for label in LABELS:
        parcel_mean = bold[data["on_grid"] == label].mean(0)[kept]             # (T_kept,)
        beta, *_ = np.linalg.lstsq(design, parcel_mean, rcond=None)
        expected = zscore(parcel_mean - design @ beta)
        np.testing.assert_allclose(y[kept, column(tmp_path, label)], expected, atol=2e-3)


def test_planted_signal_survives_motion_removal(synthetic):
    # What survives is the planted signal less its projection on the confounds (a chance overlap: 0.56
    # of it in ses-002's file, whose 10 regressors span much of 29 volumes).
    data, work = synthetic
    for ses, run in data["runs"].items():
        kept = run["kept"]
        planted = planted_signal(len(kept))[kept]
        cosines = [c for c in run["confounds"].columns if c.startswith("cosine")]
        design = np.column_stack([np.ones(kept.sum()), run["confounds"][MOTION6 + cosines].to_numpy()[kept]])
        beta, *_ = np.linalg.lstsq(design, planted, rcond=None)
        for label in (7, 10):  # planted alone, and planted under a motion artefact 7 times larger
            y = output(work, ses)[kept, column(work, label)]
            assert corr(y, planted - design @ beta) > 0.95
            if ses == "001":
                assert corr(y, planted) > 0.8


# --------------------------------------------------------------------------------------------------
# Re-runs: idempotent, resumable, no silent mix of settings
# --------------------------------------------------------------------------------------------------
def test_rerun_skips_and_other_settings_need_overwrite(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    work = tmp_path / "work"
    basic = ("--motion", "basic")
    prep.main(flags(data, work, *basic, "--sessions", "001"))
    first = work / "bold/sub-01/ses-001/sub-01_ses-001_task-synth_run-01.npy"
    second = work / "bold/sub-01/ses-002/sub-01_ses-002_task-synth_run-01.npy"
    stamp = first.stat().st_mtime_ns
    prep.main(flags(data, work, *basic, "--sessions", "002"))  # a second batch joins the manifest
    assert first.stat().st_mtime_ns == stamp
    manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
    assert manifest["ses"].tolist() == ["001", "002"] and manifest["run"].tolist() == ["01", "01"]
    capsys.readouterr()
    shared = {p: p.stat().st_mtime_ns for p in (work / "bold").glob("*.*")}   # manifest, labels, atlas, prep.json
    prep.main(flags(data, work, *basic))
    assert "all 2 run(s) done already" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (work / "bold").glob("*.*")} == shared   # nothing rewritten
    with pytest.raises(InputError, match=r"ses-001_task-synth_run-01.npy: made with --fwhm 8.0, not 6.0: pass the "
                                         r"same flags, or --overwrite to redo it$"):
        prep.main(flags(data, work, *basic, "--fwhm", "6"))
    assert first.stat().st_mtime_ns == stamp
    # a BOLD image that changed (fMRIPrep re-run): that run alone is made again
    image = nib.load(data["runs"]["002"]["bold"])
    nib.save(nib.Nifti1Image(image.get_fdata(dtype=np.float32)[..., ::-1], image.affine, image.header),
             data["runs"]["002"]["bold"])
    second_stamp = second.stat().st_mtime_ns
    prep.main(flags(data, work, *basic))
    assert "bold changed since" in capsys.readouterr().out
    assert first.stat().st_mtime_ns == stamp and second.stat().st_mtime_ns != second_stamp
    # the confounds' .json (CompCor's component list) is an input too
    sidecar = next(data["fmriprep"].rglob("sub-01_ses-001_*desc-confounds_*.json"))
    sidecar.write_text(json.dumps({**json.loads(sidecar.read_text()), "edited": True}))
    prep.main(flags(data, work, *basic))
    assert "confounds_sidecar changed since" in capsys.readouterr().out and first.stat().st_mtime_ns != stamp
    stamp = first.stat().st_mtime_ns
    # --overwrite with other settings and a bad input: the error comes before anything is removed
    (confounds,) = [p for p in data["fmriprep"].rglob("*desc-confounds*.tsv") if "ses-002" in p.name]
    confounds.rename(confounds.with_suffix(".hidden"))
    with pytest.raises(InputError, match="confounds file not found"):
        prep.main(flags(data, work, *basic, "--fwhm", "6", "--overwrite"))
    assert first.stat().st_mtime_ns == stamp and second.exists() and (work / "bold/manifest.tsv").exists()
    confounds.with_suffix(".hidden").rename(confounds)
    # --overwrite with other settings: runs made the old way are removed, not listed beside the new ones.
    prep.main(flags(data, work, *basic, "--fwhm", "6", "--overwrite", "--sessions", "001"))
    assert first.stat().st_mtime_ns != stamp and not second.exists()
    assert pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)["ses"].tolist() == ["001"]
    assert json.loads((work / "bold/prep.json").read_text())["settings"]["--fwhm"] == 6.0


def test_split_flags_are_applied_on_a_rerun_and_labels_compare_as_numbers(tmp_path, capsys):
    """Other --validation-sessions / --test-sessions on a finished stage rewrite the manifest's split
    column (nothing else to redo); "2", "002" and "ses-002" name one session, as in 03 and 04."""
    data = make_dataset(tmp_path / "data")
    work = tmp_path / "work"
    prep.main(flags(data, work, "--motion", "basic"))                       # defaults: 004 validation, 005 test

    def splits():
        return pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)["split"].tolist()
    assert splits() == ["train", "train"]
    capsys.readouterr()
    prep.main(flags(data, work, "--motion", "basic", "--validation-sessions", "1", "--test-sessions", "ses-002"))
    assert "done already" not in capsys.readouterr().out
    assert splits() == ["validation", "test"]
    with pytest.raises(InputError, match="share session"):
        prep.main(flags(data, work, "--motion", "basic", "--validation-sessions", "2", "--test-sessions", "002"))


def test_the_split_is_written_once_and_a_hand_edit_is_kept_unless_flags_say_otherwise(tmp_path, capsys):
    """bold/splits.tsv, which 03-06 follow: made from the session flags, refused for a label that names no
    run, kept with its hand edits when 02 runs again without split flags, protected from other flags, and
    taken from a user's file that must list every run."""
    data = make_dataset(tmp_path / "data")
    work = tmp_path / "work"
    path = work / "bold/splits.tsv"

    def splits():
        table = pd.read_csv(path, sep="\t", dtype=str)
        manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
        assert table["split"].tolist() == manifest["split"].tolist()         # the manifest's copy agrees
        return dict(zip(table["ses"], table["split"]))
    prep.main(flags(data, work, "--motion", "basic"))                       # defaults: 005 matches no run
    assert "warning: --test-sessions 005 (the default): no run has that session (sessions found: 001, 002)" \
        in capsys.readouterr().err
    assert splits() == {"001": "train", "002": "train"}
    with pytest.raises(InputError, match=r"^--test-sessions 009: no run has that session \(sessions found: "
                                         r"001, 002\)$"):
        prep.main(flags(data, work, "--motion", "basic", "--test-sessions", "009"))
    with pytest.raises(InputError, match="--test-sessions and --test-runs: choose one way"):
        prep.main(flags(data, work, "--motion", "basic", "--test-runs", "01", "--test-sessions", "002"))
    prep.main(flags(data, work, "--motion", "basic", "--test-sessions", "002", "--validation-sessions"))
    assert splits() == {"001": "train", "002": "test"}
    path.write_text(path.read_text().replace("train", "TEST").replace("test", "train").replace("TEST", "test"))
    prep.main(flags(data, work, "--motion", "basic"))                       # no split flag: the edit is kept
    assert splits() == {"001": "test", "002": "train"}
    with pytest.raises(InputError, match=r"splits\.tsv: edited since 02 wrote it, and the split flags make "
                                         r"another split: keep the edit with --splits"):
        prep.main(flags(data, work, "--motion", "basic", "--test-sessions", "002"))
    mine = tmp_path / "mine.tsv"
    mine.write_text("sub\tses\ttask\trun\tsplit\n01\t1\tsynth\t1\tvalidation\n")     # labels as numbers
    with pytest.raises(InputError, match=r"mine\.tsv: no row for run sub-01_ses-002_task-synth_run-01"):
        prep.main(flags(data, work, "--motion", "basic", "--splits", str(mine)))
    mine.write_text(mine.read_text() + "01\t002\tsynth\t01\ttest\n")
    prep.main(flags(data, work, "--motion", "basic", "--splits", str(mine)))
    assert splits() == {"001": "validation", "002": "test"}
    assert json.loads((work / "bold/splits.json").read_text())["settings"] == {"--splits": str(mine.resolve())}


def test_runs_of_another_atlas_are_not_mixed_into_the_manifest(tmp_path):
    """A second call with another atlas (same labels, other regions) must not list its runs beside the
    first call's: column j would be another region in some runs than in others."""
    data = make_dataset(tmp_path / "data")
    work = tmp_path / "work"
    prep.main(flags(data, work, "--motion", "basic", "--sessions", "001"))
    image = nib.load(data["atlas"])
    other = tmp_path / "other_atlas.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::-1].copy(), image.affine), other)   # regions swapped
    args = ["--work", str(work), "--fmriprep", str(data["fmriprep"]), "--atlas", str(other), "--motion", "basic",
            "--sessions", "002"]
    with pytest.raises(InputError, match=r"prep\.json: the runs in .* were made with another atlas .*--overwrite"):
        prep.main(args)
    assert pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)["ses"].tolist() == ["001"]
    prep.main(args + ["--overwrite"])                                       # the old runs go, the new one stays
    assert pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)["ses"].tolist() == ["002"]
    assert not list((work / "bold/sub-01/ses-001").glob("*.npy"))


# --------------------------------------------------------------------------------------------------
# Bad input: one clear line naming the file
# --------------------------------------------------------------------------------------------------
def expect_error(data, work, pattern, *extra):
    with pytest.raises(InputError) as info:
        prep.main(flags(data, work, *extra))
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message
    assert not list(Path(work).glob("bold/sub-*/*/*.npy")), "no run is written on bad input"
    assert not (Path(work) / "bold/manifest.tsv").exists()
    return message


@pytest.fixture
def data(tmp_path):
    return make_dataset(tmp_path / "data")


def test_missing_confounds_file(data, tmp_path):
    run = data["runs"]["001"]
    (run["bold"].parent / f"{run['stem']}_desc-confounds_timeseries.tsv").unlink()
    expect_error(data, tmp_path, rf"{run['stem']}_desc-confounds_timeseries\.tsv: confounds file not found")


def test_missing_confound_columns(data, tmp_path):
    path = data["runs"]["002"]["bold"].parent / "sub-01_ses-002_task-synth_run-01_desc-confounds_regressors.tsv"
    table = pd.read_csv(path, sep="\t", na_values="n/a")
    table = table.drop(columns=[c for c in table.columns if c.startswith("rot_z")])
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    message = expect_error(data, tmp_path, rf"{path.name}: missing confound column")
    assert "rot_z" in message


def test_confounds_with_holes(data, tmp_path):
    path = data["runs"]["001"]["bold"].parent / "sub-01_ses-001_task-synth_run-01_desc-confounds_timeseries.tsv"
    table = pd.read_csv(path, sep="\t", na_values="n/a")
    table.loc[10, "trans_y"] = np.nan  # nilearn fills the first row of derivatives only
    table.to_csv(path, sep="\t", index=False, na_rep="n/a")
    expect_error(data, tmp_path, rf"{path.name}: n/a or infinite values in column\(s\) trans_y$")


def test_3d_image(data, tmp_path):
    bold = data["runs"]["002"]["bold"]
    nib.save(nib.Nifti1Image(np.ones(GRID, np.float32), BOLD_AFFINE), bold)
    expect_error(data, tmp_path, rf"{bold.name}: image is 3D .*must be 4D")


def test_atlas_outside_the_field_of_view(data, tmp_path):
    shifted = ATLAS_AFFINE.copy()
    shifted[:3, 3] += 500.0
    make_atlas(data["atlas"], shifted)
    expect_error(data, tmp_path, rf"{data['atlas'].name}: no atlas label falls inside the BOLD field of view")


def test_atlas_over_empty_voxels(data, tmp_path):
    for run in data["runs"].values():  # a brain image whose data lie where the atlas has no label
        image = nib.load(run["bold"])
        bold = image.get_fdata(dtype=np.float32)
        bold[data["on_grid"] > 0] = 0.0
        bold[0, 0, 0] = np.arange(bold.shape[3])
        nib.save(nib.Nifti1Image(bold, image.affine), run["bold"])
    expect_error(data, tmp_path, r"ses-001.*desc-preproc_bold\.nii\.gz: no atlas parcel overlaps the brain data",
                 "--motion", "basic")


def test_unknown_subject_session_and_no_runs(data, tmp_path):
    expect_error(data, tmp_path, r"fmriprep: --subjects 09 not found \(found: 01\)", "--subjects", "09")
    expect_error(data, tmp_path, r"fmriprep: --sessions 007 not found \(found: 001, 002\)", "--sessions", "007")
    expect_error(data, tmp_path, r"fmriprep: no runs found .*task shinobi", "--task", "shinobi")
    expect_error(data, tmp_path, r"fmriprep: no runs found .*space-T1w", "--space", "T1w")


def test_a_parcel_too_small_for_the_bold_grid_is_said_so(data, tmp_path, capsys):
    """One 2 mm atlas voxel at odd indices, which the 4 mm BOLD grid's nearest neighbours pass over (they
    sample atlas voxels 2i): "too small", not "outside the field of view" (test_own_data.py has that one)."""
    image = nib.load(data["atlas"])
    atlas = np.asarray(image.dataobj).copy()
    atlas[5, 5, 5] = 20
    nib.save(nib.Nifti1Image(atlas, image.affine), data["atlas"])
    prep.main(flags(data, tmp_path, "--motion", "basic", "--sessions", "001"))
    assert (f"warning: {data['atlas']}: 1 label(s) have no voxel on the BOLD grid: 20 too small for the BOLD grid; "
            "their columns are 0.0, and 06 does not score them") in capsys.readouterr().err.splitlines()
    y = output(tmp_path, "001")
    assert (y[np.isfinite(y).all(1), column(tmp_path, 20)] == 0).all()


def test_two_resolutions_of_one_run_are_refused(data, tmp_path):
    run = data["runs"]["001"]
    twin = run["bold"].with_name(run["bold"].name.replace("_desc-preproc", "_res-2_desc-preproc"))
    shutil.copy(run["bold"], twin)
    expect_error(data, tmp_path / "work", rf"a second BOLD image of run {run['stem']} .*--space {SPACE}_res-2")


def test_nan_and_constant_voxels_are_left_out_and_reported(data, tmp_path, capsys):
    run = data["runs"]["001"]
    image = nib.load(run["bold"])
    bold = image.get_fdata(dtype=np.float32)
    planted_voxels = np.argwhere(data["on_grid"] == 7)
    bold[tuple(planted_voxels[0])][5] = np.nan                                  # one NaN sample
    bold[tuple(planted_voxels[1])] = 1000.0                                     # one flat voxel
    bold[data["on_grid"] == 12] = 0.0                                           # a parcel without data
    nib.save(nib.Nifti1Image(bold, image.affine), run["bold"])
    prep.main(flags(data, tmp_path, "--motion", "basic", "--sessions", "001"))
    err = capsys.readouterr().err
    assert "1 voxel(s) inside the atlas hold NaN and" in err and "are constant over time" in err
    assert ("1 parcel(s) have no usable voxel (each is NaN or constant: outside the acquired field of view or "
            "the brain?): labels 12; 0.0 columns, not scored by 06") in err
    y = output(tmp_path, "001")[run["kept"]]
    assert np.isfinite(y).all()
    assert (y[:, column(tmp_path, 12)] == 0).all()
    assert corr(y[:, column(tmp_path, 7)], planted_signal(len(run["kept"]))[run["kept"]]) > 0.8
    manifest = pd.read_csv(tmp_path / "bold/manifest.tsv", sep="\t", dtype=str)
    assert manifest["empty_parcels"].tolist() == ["12"]


def test_a_voxel_with_nan_samples_spreads_no_spike_through_the_smoothing(tmp_path):
    """A voxel next to a parcel (outside the atlas) with NaN in some volumes: after 8 mm smoothing, the
    parcels equal those of the same run where that voxel holds its own mean in those volumes."""
    outputs = []
    for name in ("nan", "filled"):
        data = make_dataset(tmp_path / name)
        run = data["runs"]["001"]
        image = nib.load(run["bold"])
        bold = image.get_fdata(dtype=np.float32)
        voxel = (1, 3, 5)                                                       # label 0, beside label 3's block
        assert data["on_grid"][voxel] == 0 and data["on_grid"][2, 3, 5] == 3
        bold[voxel] = 1000 + np.random.default_rng(1).normal(0, 5, bold.shape[3])
        holes = [4, 11, 20]
        bold[voxel][holes] = np.nan if name == "nan" else np.nanmean(np.delete(bold[voxel], holes))
        nib.save(nib.Nifti1Image(bold, image.affine, image.header), run["bold"])
        prep.main(flags(data, tmp_path / name / "work", "--motion", "basic", "--sessions", "001"))
        outputs.append(output(tmp_path / name / "work", "001"))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)


def test_damaged_images_are_named(data, tmp_path):
    bold = data["runs"]["002"]["bold"]
    content = bold.read_bytes()
    bold.write_bytes(np.random.default_rng(0).bytes(len(content)))      # not a NIfTI at all
    expect_error(data, tmp_path / "a", rf"{bold.name}: not a readable NIfTI image", "--motion", "basic")
    # the header reads, the voxels do not: found while the runs are processed (reading every voxel twice
    # would double the stage's I/O), so the run before it is finished and kept, the damaged one is not
    bold.write_bytes(content[:len(content) * 2 // 3])
    with pytest.raises(InputError, match=rf"{bold.name}: cannot read its voxels \(truncated or damaged"):
        prep.main(flags(data, tmp_path / "b", "--motion", "basic", "--workers", "1"))
    written = sorted(p.name for p in (tmp_path / "b/bold").rglob("*") if p.is_file() and p.parent.name.startswith("ses"))
    assert written == ["sub-01_ses-001_task-synth_run-01.json", "sub-01_ses-001_task-synth_run-01.npy"]
    data["atlas"].write_bytes(b"\x1f\x8b" + b"0" * 100)                 # a gzip header, then garbage
    expect_error(data, tmp_path / "c", rf"{data['atlas'].name}: not a readable NIfTI image")


def test_volume_of_nan_is_named(data, tmp_path):
    run = data["runs"]["001"]
    image = nib.load(run["bold"])
    bold = image.get_fdata(dtype=np.float32)
    bold[..., 17] = np.nan
    nib.save(nib.Nifti1Image(bold, image.affine, image.header), run["bold"])
    expect_error(data, tmp_path, rf"{run['bold'].name}: volume 17 \(0-based\) is NaN in every voxel of the atlas; "
                                 r"the image is damaged$", "--motion", "basic", "--sessions", "001")


def test_more_confounds_than_volumes(data, tmp_path):
    # The older nilearn file: 24 motion + 4 cosine regressors and the mean, 29 kept volumes.
    expect_error(data, tmp_path, r"ses-002.*bold\.nii\.gz: 28 confound regressors leave no degree of freedom "
                                 r"in 29 kept volumes", "--sessions", "002")


def test_command_line_error_is_one_line_and_exit_2(data, tmp_path):
    result = run_script("02_prep_fmri.py", *flags(data, tmp_path, "--subjects", "09"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {data['fmriprep']}: --subjects 09 not found (found: 01)"]


# --------------------------------------------------------------------------------------------------
# The demo, end to end as a user runs it
# --------------------------------------------------------------------------------------------------
def test_demo_end_to_end_keeps_planted_signal(demo_work, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(demo_work / "demo", work / "demo")
    # The tiny demo has ~30 volumes per run: Params24 + cosines would leave ~3 degrees of freedom, so the
    # planted-signal check uses the 6 motion parameters (the demo's artefacts are mixtures of those 6).
    run_script("02_prep_fmri.py", "--work", work, "--motion", "basic", "--workers", "2")
    truth = json.loads((work / "demo/ground_truth.json").read_text())
    manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
    sessions = sorted(p.name[4:] for p in (work / "demo/derivatives/fmriprep/sub-01").glob("ses-*"))
    assert manifest["ses"].tolist() == sessions
    assert manifest["split"].tolist() == ["train"] * (len(sessions) - 2) + ["validation", "test"]
    labels = pd.read_csv(work / "bold/labels.tsv", sep="\t")
    atlas = np.asarray(nib.load(work / "demo" / truth["atlas"]).dataobj)
    assert labels["label"].tolist() == np.unique(atlas[atlas > 0]).tolist()
    col = dict(zip(labels["label"], labels["column"]))
    ys, signals = [], []
    for _, row in manifest.iterrows():
        y = np.load(work / row["bold_path"])
        truth_signals = pd.read_csv(work / "demo/ground_truth" / f"{Path(row['bold_path']).stem}_signals.tsv",
                                    sep="\t")
        assert len(y) == int(row["n_volumes"]) == len(truth_signals)
        valid = np.isfinite(y).all(1)
        assert valid.tolist() == [t not in truth["non_steady_state_volumes"] for t in range(len(y))]
        ys.append(y[valid])
        signals.append(truth_signals[valid])
    y, signals = np.concatenate(ys), pd.concat(signals)
    planted_r = [corr(y[:, col[int(label)]], signals[prop]) for label, prop in truth["planted"].items()]
    noise_r = [abs(corr(y[:, col[label]], signals[prop])) for label in truth["noise_parcels"]
               for prop in set(truth["planted"].values())]
    assert min(planted_r) > 0.3 and np.mean(noise_r) < 0.15, (planted_r, np.mean(noise_r))


@needs_namespaces
def test_read_only_work(data, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    result, _ = run_confined("02_prep_fmri.py", *flags(data, work, "--motion", "basic"), read_only=work)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {work / 'bold'}: Read-only file system"


def test_every_volume_an_outlier_is_said_as_such(data, tmp_path):
    """Every volume marked non-steady-state: 02 blamed 'n/a or infinite values' in confound columns that
    hold none (nilearn leaves them NaN when it keeps no volume)."""
    run = data["runs"]["001"]
    path = run["bold"].parent / f"{run['stem']}_desc-confounds_timeseries.tsv"
    table = pd.read_csv(path, sep="\t", na_values="n/a")
    table = table.drop(columns=[c for c in table.columns if c.startswith("non_steady_state")])
    names = [f"non_steady_state_outlier{i:02d}" for i in range(len(table))]
    outliers = pd.DataFrame(np.eye(len(table)), columns=names)                  # one per volume
    pd.concat([table, outliers], axis=1).to_csv(path, sep="\t", index=False, na_rep="n/a")
    expect_error(data, tmp_path, rf"{path.name}: every volume is marked as an outlier \(non-steady-state, or "
                                 rf"scrubbed with --confounds scrub\): no usable volume in {run['bold'].name}$",
                 "--motion", "basic", "--sessions", "001")


def test_an_error_starts_a_line_of_its_own_after_the_progress_bar(data, tmp_path):
    """A damaged run stopped 02 (one process) with its `error:` printed on the unfinished progress bar's
    line, where `grep '^error:'` does not find it."""
    bold = data["runs"]["002"]["bold"]
    bold.write_bytes(bold.read_bytes()[:bold.stat().st_size * 2 // 3])     # the header reads, the voxels not
    result = run_script("02_prep_fmri.py", *flags(data, tmp_path, "--motion", "basic", "--workers", "1"),
                        check=False)
    assert result.returncode == 2
    errors = [line for line in result.stderr.split("\n") if "error: " in line]   # "\r" ends no line for grep
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert f"{bold.name}: cannot read its voxels (truncated or damaged" in result.stderr
