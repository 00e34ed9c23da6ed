"""The player's inputs as a feature set: 01 records them beside the frames, 05 --features buttons
turns them into rows per TR, and the demo's button parcel is found with them alone."""
import json
import shutil
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import stable_retro as retro

import common
from conftest import TINY_DEMO_FLAGS, load_stage, run_script
from test_extract import REPS, RUNS, TR, make_work

extract = load_stage("05_extract.py")
demo = load_stage("00_make_demo.py")
GENESIS = retro.get_system_info("Genesis")["buttons"]   # B A MODE START UP DOWN LEFT RIGHT C Y X Z
# run_all.sh's demo ridge (DEMO_RIDGE there, less the ground truth)
DEMO_RIDGE = ["--alphas", "1e2", "1e3", "1e4", "1e5", "1e6", "1e7", "1e8",
              "--n-permutations", "200"]


def movie_inputs(bk2):
    """Every recorded input of a bk2 after the first (which reset() consumes), read with
    stable-retro's Movie API alone: uint8 (K - 1, 12) for a one-player Genesis movie of K steps."""
    movie = retro.Movie(str(bk2))
    movie.step()
    rows = []
    while movie.step():
        rows.append([movie.get_key(b, 0) for b in range(len(GENESIS))])
    return np.array(rows, np.uint8)


def extract_error(work):
    """The InputError of `05_extract.py --work work --features buttons`, run in this process."""
    with pytest.raises(common.InputError) as error:
        extract.main(["--work", str(work), "--features", "buttons"])
    return str(error.value)


# --------------------------------------------------------------------------------------------------
# 01: the inputs of every frame, beside the frames
# --------------------------------------------------------------------------------------------------
def test_render_records_the_input_of_every_frame(rendered_work):
    manifest = common.read_tsv(rendered_work / "frames/manifest.tsv")
    first = manifest.iloc[0]
    frames = np.load(rendered_work / first["frames_path"], mmap_mode="r")
    buttons = np.load(rendered_work / first["buttons_path"])
    assert buttons.dtype == np.uint8
    assert buttons.shape == (len(frames), len(GENESIS)) == (first["n_frames"], 12)
    np.testing.assert_array_equal(buttons, movie_inputs(first["bk2"]))
    # ... which are the demo player's actions, passed to env.step() one per frame
    assert TINY_DEMO_FLAGS == "--subjects 1 --sessions 5 --runs 1 --reps 2 --rep-seconds 15".split()
    tiny = Namespace(seed=0, subjects=1, sessions=[5], no_sessions=False, runs=1, reps=2, rep_seconds=15.0)
    plan = demo.plan_runs(tiny)
    job = plan[0]["reps"][0]
    actions = demo.scripted_actions(job["n_steps"], np.random.default_rng(job["seed"]), GENESIS)
    np.testing.assert_array_equal(buttons, actions[:len(buttons)])
    assert buttons[:, GENESIS.index("B")].any() and not buttons[:, GENESIS.index("START")].any()
    # the frames' record names the columns and covers the file
    record = common.read_record(common.record_path(rendered_work / first["frames_path"]))
    assert record["buttons"] == GENESIS
    path = rendered_work / first["buttons_path"]
    assert record["outputs"] == {path.name: common.hash_file(path)}
    missing = manifest[manifest["status"] == "missing"]
    assert len(missing) == 1 and missing["buttons_path"].isna().all()


def test_frames_of_an_older_01_are_rendered_again_with_their_inputs(tmp_path, demo_root):
    """Frames rendered before 01 recorded the inputs (no buttons file, no `outputs` in the record,
    no buttons_path column) stop 05 --features buttons with one line; a re-run of 01 records them,
    and keeps the rows of other subjects of the old manifest."""
    bk2 = tmp_path / "sub-02_ses-001_task-x_run-01_level-1_rep-01.bk2"
    shutil.copy(next(demo_root.glob("sub-01/ses-001/gamelogs/*.bk2")), bk2)
    work = make_work(tmp_path / "work")   # an older work folder: no buttons_path column
    manifest = work / "frames/manifest.tsv"
    again = "re-run 01_render_frames.py with the flags it was run with to record them"
    assert extract_error(work) == (
        f"{manifest}: no buttons_path column (frames rendered by an older "
        f"01_render_frames.py, without the player's inputs): {again}")
    run_script("01_render_frames.py", "--work", work, "--bk2", bk2, "--resolution", "16")
    npy = work / "frames/sub-02/ses-001/sub-02_ses-001_task-x_run-01_level-1_rep-01.npy"
    record = common.read_record(npy.with_suffix(".json"))   # as an older 01 wrote it
    for key in ("outputs", "buttons"):
        del record[key]
    common.write_json(npy.with_suffix(".json"), record)
    npy.with_suffix(".buttons.npy").unlink()
    rerun = run_script("01_render_frames.py", "--work", work, "--bk2", bk2, "--resolution", "16")
    assert f"{npy} was made without the player's inputs (an older 01): rendering it again" \
        in rerun.stdout
    np.testing.assert_array_equal(np.load(npy.with_suffix(".buttons.npy")), movie_inputs(bk2))
    updated = common.read_tsv(manifest)
    assert updated["sub"].tolist() == ["01"] * len(REPS) + ["02"]   # the old rows are kept ...
    assert updated["buttons_path"].isna().tolist() == [True] * len(REPS) + [False]   # ... as were
    assert extract_error(work) == (
        f"{manifest}: sub-01_ses-001_task-airstriker_run-01 rep 1 was rendered without the "
        f"player's inputs (an older 01_render_frames.py): {again}")


# --------------------------------------------------------------------------------------------------
# 05 --features buttons on the synthetic runs of test_extract.py, against a brute force in seconds
# --------------------------------------------------------------------------------------------------
NAMES = ["B", "UP", "X"]


@pytest.fixture()
def with_buttons(tmp_path):
    """test_extract's synthetic work folder, with random inputs (holds of 1 to 40 frames) recorded
    for every rendered repetition as 01 records them. Returns (work, {(ses, rep): uint8 (N, 3)})."""
    work = make_work(tmp_path)
    manifest = pd.read_csv(work / "frames/manifest.tsv", sep="\t", dtype=str)
    rng = np.random.default_rng(7)
    inputs, paths = {}, []
    for (ses, rep, _, n, status), frames_path in zip(REPS, manifest["frames_path"]):
        if status != "ok":
            paths.append("n/a")
            continue
        holds = np.repeat(rng.integers(0, 2, (n, len(NAMES))), rng.integers(1, 40, n), axis=0)[:n]
        inputs[ses, rep] = holds.astype(np.uint8)
        if (ses, rep) == ("001", "3"):   # TR 8's window: timeline frames 677 ... 804; rep 3 at 555
            inputs[ses, rep][121:123, :2] = [[0, 1], [1, 1]]   # B pressed on 677, UP held before
        paths.append(frames_path.replace(".npy", ".buttons.npy"))
        np.save(work / paths[-1], inputs[ses, rep])
        common.write_json(work / frames_path.replace(".npy", ".json"),
                          {"stage": "01_render_frames", "settings": {}, "buttons": NAMES})
    manifest.insert(list(manifest.columns).index("frames_path") + 1, "buttons_path", paths)
    manifest.to_csv(work / "frames/manifest.tsv", sep="\t", index=False)
    return work, inputs


def expected_buttons(inputs, ses, t, span=128):
    """Brute force, in seconds: the keys held just before each of the 129 times
    (t + 1) x TR - k / 60, k = 128 ... 0 (a repetition's frame i is on screen from onset + i / 60
    for 1/60 s, with its input); then per button the fraction of the last 128 held, and the
    presses among them (held, and not held just before). Returns float (2 x 3,)."""
    held = np.zeros((span + 1, len(NAMES)), bool)
    for k in range(span + 1):
        when = (t + 1) * TR - (span - k) / 60 - 1e-9
        for _, rep, onset, n, status in (r for r in REPS if r[0] == ses and r[4] == "ok"):
            i = int(np.floor((when - onset) * 60))
            if 0 <= i < n:
                held[k] = inputs[ses, rep][i]
    presses = [sum(held[k, b] and not held[k - 1, b] for k in range(1, span + 1))
               for b in range(len(NAMES))]
    return np.concatenate([held[1:].mean(0), presses])


def test_button_rows_are_the_held_fraction_and_presses_of_the_window(with_buttons):
    work, inputs = with_buttons
    extract.main(["--work", str(work), "--features", "buttons"])
    out = work / "features/buttons/buttons/sub-01"
    for ses, n_volumes in RUNS.items():
        features = np.load(out / f"ses-{ses}/sub-01_ses-{ses}_task-airstriker_run-01.npy")
        assert features.shape == (n_volumes, 2 * len(NAMES)) and features.dtype == np.float16
        expected = np.stack([expected_buttons(inputs, ses, t) for t in range(n_volumes)])
        np.testing.assert_allclose(features, expected, rtol=1e-3)   # float16: k / 128, counts exact
    # ses-001: TR 0 ends before rep 1 (3.5 ... 5.5 s); TR 5 (6.81 ... 8.94 s) lies between rep 1 and
    # rep 3 (9.25 s), where rep 2 is "Missing file": no input, zeros
    run = np.load(out / "ses-001/sub-01_ses-001_task-airstriker_run-01.npy")
    assert not run[0].any() and not run[5].any() and run[2].any()
    # TR 8: B pressed on the window's first frame counts, UP held since the frame before does not
    before_and_window = inputs["001", "3"][121:250].astype(int)   # frames 676, then 677 ... 804
    assert before_and_window[:2, :2].tolist() == [[0, 1], [1, 1]]
    np.testing.assert_array_equal(run[8, 3:], (np.diff(before_and_window, axis=0) == 1).sum(0))
    record = common.read_record(out / "ses-001/sub-01_ses-001_task-airstriker_run-01.json")
    assert record["settings"] == {"--layer": "buttons", "--dtype": "float16", "--frame-step": 4}
    assert sorted(record["inputs"]) == [
        f"frames/sub-01/ses-001/sub-01_ses-001_task-airstriker_run-01_level-1_rep-{rep}.buttons.npy"
        for rep in (1, 3, 4)] + ["timeline"]
    assert record["model"] == {"features": "buttons", "buttons": NAMES}
    assert record["activation_shape"] == [2, 3]


def test_buttons_refuse_model_flags_and_inputs_that_do_not_fit(with_buttons):
    work, _ = with_buttons
    for flags in (["--layer", "last"], ["--list-layers"], ["--ckpt", "x.pt"]):
        with pytest.raises(common.InputError, match=f"^{flags[0]}: not used by --features buttons"):
            extract.main(["--work", str(work), "--features", "buttons", *flags])
    buttons = work / "frames/sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01_level-1_rep-1.npy"
    buttons = buttons.with_suffix(".buttons.npy")
    np.save(buttons, np.zeros((699, 3), np.uint8))                   # a row short of the 700 frames
    with pytest.raises(common.InputError, match=r"shape \(699, 3\), not one row per frame \(700\)"):
        extract.main(["--work", str(work), "--features", "buttons"])
    np.save(buttons, np.zeros((700, 3), np.uint8))
    common.write_json(common.record_path(buttons),
                      {"stage": "01_render_frames", "settings": {}, "buttons": ["B", "UP", "Y"]})
    with pytest.raises(common.InputError, match=r"repetitions with different buttons"):
        extract.main(["--work", str(work), "--features", "buttons"])


def test_inputs_other_than_those_01_recorded_are_refused(with_buttons):
    """Another repetition's buttons or frames of the same shape in place of the right ones were read,
    though 01's record lists another sha256 (and 06 --with then fitted them); a float buttons array with
    NaN was read as presses."""
    work, _ = with_buttons
    frames = work / "frames/sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01_level-1_rep-1.npy"
    buttons = frames.with_suffix(".buttons.npy")
    record = common.read_record(common.record_path(frames))      # as 01 writes it: both files' fingerprints
    common.write_record(frames, dict(record, output=common.hash_file(frames),
                                     outputs={buttons.name: common.hash_file(buttons)}))
    extract.main(["--work", str(work), "--features", "buttons"])   # what the record lists: accepted
    np.save(buttons, np.roll(np.load(buttons), 1, axis=0))         # the same shape, other inputs
    assert extract_error(work) == (
        f"{buttons}: not the file its record {common.record_path(frames)} lists (other bytes: replaced or "
        "changed since 01_render_frames wrote it); re-run 01_render_frames.py, which renders it again")
    np.save(frames, np.roll(np.load(frames), 1, axis=0))
    with pytest.raises(common.InputError, match=rf"^{frames}: not the file its record .* lists"):
        extract.main(["--work", str(work), "--features", "lowlevel"])
    for other, message in ((np.full((700, 3), np.nan), "float64 inputs, not integers 0 or 1"),
                           (np.full((700, 3), 2, np.uint8), "inputs other than 0 and 1")):
        np.save(buttons, other)
        common.write_record(frames, record)                      # (no fingerprints: its bytes are not checked)
        assert extract_error(work) == f"{buttons}: {message} (held or not); re-render it with " \
                                      "01_render_frames.py --overwrite"


# --------------------------------------------------------------------------------------------------
# The demo: 00's button parcel, as 01 records the presses, found by the buttons features alone
# --------------------------------------------------------------------------------------------------
def test_demo_button_signal_is_the_presses_01_recorded(rendered_work):
    """ground_truth/<run>_buttons.tsv, recomputed from 01's buttons arrays (runs without a "Missing
    file" repetition, whose presses 01 cannot see)."""
    truth = json.loads((rendered_work / "demo/ground_truth.json").read_text())
    manifest = common.read_tsv(rendered_work / "frames/manifest.tsv")
    checked = 0
    for (sub, ses), reps in manifest.groupby(["sub", "ses"]):
        if (reps["status"] != "ok").any():
            continue
        stem = common.run_stem(sub, ses, reps["task"].iloc[0], reps["run"].iloc[0])
        signal = pd.read_csv(rendered_work / f"demo/ground_truth/{stem}_buttons.tsv", sep="\t")
        timeline = np.zeros((int(np.ceil(len(signal) * truth["tr_s"] * 60)), 1), np.float32)
        for _, rep in reps.iterrows():
            fire = np.load(rendered_work / rep["buttons_path"])[:, GENESIS.index("B")].astype(int)
            # 00 places a repetition at Python's round(onset x 60), half to even; 05's
            # repetition_start rounds half up: a frame apart when onset x 60 ends in .5 (ses-003)
            start = round(rep["onset_s"] * 60)
            timeline[start:start + len(fire), 0] = np.diff(fire, prepend=0) == 1
        convolved = demo.planted_signals(timeline, len(signal), truth["tr_s"])[:, 0]
        np.testing.assert_allclose(convolved, signal["presses_B"], atol=1e-5)
        checked += 1
    assert checked == 4


def test_demo_button_parcel_is_found_by_the_buttons_features(rendered_work, tmp_path):
    """02 (6 motion regressors, no smoothing: the tiny demo's 30-volume runs, as in test_ridge.py),
    05 --features buttons, then 06 with run_all.sh's demo flags: the button parcel has a clearly
    positive test r, above every noise parcel. Measured: r = 0.54, noise parcels at most 0.36 (27
    test volumes; p = 1/27, the smallest their circular shifts allow, so FDR over 40 parcels cannot
    call it significant)."""
    for folder in ("demo", "frames"):
        (tmp_path / folder).symlink_to(rendered_work / folder)
    run_script("02_prep_fmri.py", "--work", tmp_path, "--motion", "basic", "--fwhm", "0",
               "--workers", "1")
    extract.main(["--work", str(tmp_path), "--features", "buttons"])
    truth = tmp_path / "demo/ground_truth.json"
    run_script("06_ridge.py", "--work", tmp_path, "--name", "buttons", *DEMO_RIDGE,
               "--ground-truth", truth)
    truth = json.loads(truth.read_text())
    labels = pd.read_csv(tmp_path / "bold/labels.tsv", sep="\t")["label"].tolist()
    r = np.load(tmp_path / "results/buttons/sub-01/r.npy")
    (label,) = map(int, truth["planted_buttons"])
    assert label not in map(int, truth["planted"]) and label not in truth["noise_parcels"]
    button = labels.index(label)
    noise = [labels.index(n) for n in truth["noise_parcels"]]
    assert r[button] > 0.4 and r[button] > np.nanmax(r[noise]) + 0.1
    assert np.load(tmp_path / "results/buttons/sub-01/p_values.npy")[button] < 0.05
