"""00_make_demo.py: layout, determinism, and a ground truth that the BOLD really carries."""
import json
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import load_stage, run_script

TINY = ["--subjects", "1", "--sessions", "2", "--runs", "1", "--reps", "2", "--rep-seconds", "3", "--parcels", "12",
        "--planted", "4"]


def demo_fingerprint(root):
    """Everything a stage reads, as comparable Python values (bk2 zips carry timestamps, so read inside)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.suffix == ".bk2":
            with zipfile.ZipFile(path) as z:
                out[rel] = (z.read("Input Log.txt"), z.read("Header.txt"))
        elif path.name.endswith(".nii.gz"):
            out[rel] = nib.load(path).get_fdata().tobytes()
        elif path.is_file():
            out[rel] = path.read_bytes()
    return out


def test_layout_and_events(demo_root):
    truth = json.loads((demo_root / "ground_truth.json").read_text())
    events_files = sorted(demo_root.glob("sub-*/ses-*/func/*_events.tsv"))
    assert len(events_files) == 5
    n_missing = 0
    for events_path in events_files:
        events = pd.read_csv(events_path, sep="\t")
        assert list(events.columns) == ["trial_type", "onset", "duration", "duration_bk2", "level", "stim_file"]
        assert (np.diff(events["onset"]) > events["duration"][:-1]).all(), "repetitions overlap"
        for stim in events["stim_file"]:
            if stim == "Missing file":
                n_missing += 1
            else:
                assert (demo_root / stim).is_file(), stim
        stem = events_path.name.replace("_events.tsv", "")
        sub, ses = stem.split("_")[:2]
        func = demo_root / "derivatives/fmriprep" / sub / ses / "func"
        bold = nib.load(func / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz")
        assert bold.ndim == 4 and bold.header.get_zooms()[3] == pytest.approx(1.49)
        # The scan outlasts the last repetition (the HRF tail is recorded).
        assert bold.shape[3] * 1.49 > (events["onset"] + events["duration"]).max()
        confounds = pd.read_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", na_values="n/a")
        assert len(confounds) == bold.shape[3]
        motion24 = [f"{p}{s}" for p in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
                    for s in ("", "_derivative1", "_power2", "_derivative1_power2")]
        assert set(motion24) <= set(confounds.columns)
        assert {"framewise_displacement", "cosine00", "non_steady_state_outlier00"} <= set(confounds.columns)
    assert n_missing == 1
    assert not (demo_root / truth["missing_file"]).exists()
    atlas = nib.load(demo_root / truth["atlas"]).get_fdata()
    assert set(np.unique(atlas)) == set(range(41))  # background + 40 parcels, all non-empty
    # 10 visual parcels, 1 button parcel apart from them (06 and 07 score "planted" alone), 29 noise
    buttons = {int(label) for label in truth["planted_buttons"]}
    assert len(truth["planted"]) == 10 and list(truth["planted_buttons"].values()) == ["presses_B"]
    assert len(truth["noise_parcels"]) == 29 and len(buttons) == 1
    assert not buttons & {int(label) for label in truth["planted"]}
    assert not buttons & set(truth["noise_parcels"])


def test_deterministic_for_a_seed_kept_on_rerun_and_bad_flags_fail(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_script("00_make_demo.py", "--out", tmp_path / name, "--seed", seed, *TINY)
    a, b, c = (demo_fingerprint(tmp_path / name) for name in "abc")
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    assert any(a[k] != c.get(k) for k in a), "another seed should give another demo"
    before = (tmp_path / "a" / "ground_truth.json").stat().st_mtime_ns
    again = run_script("00_make_demo.py", "--out", tmp_path / "a", "--seed", 0, *TINY)
    assert "nothing to do" in again.stdout
    assert (tmp_path / "a" / "ground_truth.json").stat().st_mtime_ns == before
    other = run_script("00_make_demo.py", "--out", tmp_path / "a", "--seed", 0, *TINY, "--subjects", "2", check=False)
    assert other.returncode == 2 and other.stderr.strip() == (
        f"error: {tmp_path / 'a'}: made with --subjects 1, not 2: pass the same flags, or --overwrite to redo it")
    other = run_script("00_make_demo.py", "--out", tmp_path / "a", "--seed", 0, *TINY,
                       "--planted-buttons", "0", check=False)
    assert other.returncode == 2 and "made with --planted-buttons 1, not 0" in other.stderr
    assert (tmp_path / "a" / "ground_truth.json").stat().st_mtime_ns == before
    bad = run_script("00_make_demo.py", "--out", tmp_path / "e", "--parcels", "3", "--planted", "5", check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --planted 5 is more than --parcels 3"
    bad = run_script("00_make_demo.py", "--out", tmp_path / "e", "--parcels", "3", "--planted", "3",
                     check=False)
    assert bad.returncode == 2 and bad.stderr.strip() == \
        "error: --planted-buttons 1: must be 0 to --parcels minus --planted (0)"
    assert not (tmp_path / "e").exists()


def test_ground_truth_is_in_the_bold(demo_root):
    """After regressing out the confounds fMRIPrep reports, planted parcels follow their property and
    noise parcels do not; before, motion and drift hide much of it (so confound removal matters)."""
    truth = json.loads((demo_root / "ground_truth.json").read_text())
    atlas = nib.load(demo_root / truth["atlas"]).get_fdata().astype(int)
    parcel_means, signals, cleaned, button_signals = [], [], [], []
    for events_path in sorted(demo_root.glob("sub-*/ses-*/func/*_events.tsv")):
        stem = events_path.name.replace("_events.tsv", "")
        sub, ses = stem.split("_")[:2]
        func = demo_root / "derivatives/fmriprep" / sub / ses / "func"
        bold = nib.load(func / f"{stem}_space-MNI152NLin2009cAsym_desc-preproc_bold.nii.gz").get_fdata()
        means = np.stack([bold[atlas == label].mean(0) for label in range(1, atlas.max() + 1)], 1)[1:]  # (T-1, P)
        confounds = pd.read_csv(func / f"{stem}_desc-confounds_timeseries.tsv", sep="\t", na_values="n/a")
        columns = ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z"] + \
            [c for c in confounds.columns if c.startswith("cosine")]
        design = np.c_[np.ones(len(means)), confounds[columns].to_numpy()[1:]]
        residual = means - design @ np.linalg.lstsq(design, means, rcond=None)[0]
        parcel_means.append(means - means.mean(0))
        cleaned.append(residual)
        signals.append(pd.read_csv(demo_root / "ground_truth" / f"{stem}_signals.tsv", sep="\t").iloc[1:])
        button_signals.append(pd.read_csv(demo_root / "ground_truth" / f"{stem}_buttons.tsv",
                                          sep="\t").iloc[1:])
    raw, clean, signal = np.concatenate(parcel_means), np.concatenate(cleaned), pd.concat(signals)

    def r(x, y):
        return np.corrcoef(x, y)[0, 1]

    planted_clean = [r(clean[:, int(label) - 1], signal[prop]) for label, prop in truth["planted"].items()]
    planted_raw = [r(raw[:, int(label) - 1], signal[prop]) for label, prop in truth["planted"].items()]
    noise_clean = [r(clean[:, label - 1], signal[prop]) for label in truth["noise_parcels"]
                   for prop in signal.columns]
    assert min(planted_clean) > 0.3 and np.mean(planted_clean) > 0.5
    (button,) = map(int, truth["planted_buttons"])
    assert r(clean[:, button - 1], pd.concat(button_signals)["presses_B"]) > 0.5
    assert np.mean(np.abs(noise_clean)) < 0.15
    assert np.mean(planted_clean) > np.mean(planted_raw) + 0.15


def test_hrf_convolution_matches_a_hand_computation():
    demo = load_stage("00_make_demo.py")
    tr, n_volumes = 1.5, 20
    timeline = np.zeros((int(n_volumes * tr * 60), 8), np.float32)
    timeline[60:120, 0] = 1.0  # one second of bright screen starting at t = 1 s
    signals = demo.planted_signals(timeline, n_volumes, tr)
    from nilearn.glm.first_level import glover_hrf
    hrf = glover_hrf(t_r=1 / 60, oversampling=1, time_length=32.0)
    t = (np.arange(n_volumes) + 0.5) * tr  # mid-volume times, s
    expected = np.array([hrf[max(0, int(round(s * 60)) - 119): int(round(s * 60)) - 59].sum() if s * 60 >= 60 else 0.0
                         for s in t])
    expected = (expected - expected.mean()) / expected.std()
    np.testing.assert_allclose(signals[:, 0], expected, atol=1e-5)
    assert np.argmax(signals[:, 0]) == np.argmax(expected) and 4 <= np.argmax(expected) * tr <= 8
