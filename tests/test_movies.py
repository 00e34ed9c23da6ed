"""Movies as stimuli: video decoding (01), their place on the timeline (05), the Algonauts 2025 layout
(02 --algonauts), the movie demo in both layouts, and bad videos and .h5 files."""
import bisect
import json
import math
from fractions import Fraction

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from conftest import load_stage, run_script

av = pytest.importorskip("av")
NTSC = Fraction(30000, 1001)


def write_video(path, frames, rate=NTSC, codec="ffv1", pix_fmt="bgr0", pts=None):
    """frames uint8 (N, H, W, 3) to a video with PyAV, lossless by default (ffv1 in .mkv); pts: the
    frames' presentation times in 1/rate units (default 0, 1, 2 ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for j, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = int(pts[j]), 1 / Fraction(rate)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


def numbered_frames(n, size=16):
    """uint8 (n, size, size, 3): frame j says j in its first two pixels (j % 256, j // 256)."""
    frames = np.random.default_rng(n).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    frames[:, 0, 0, 0], frames[:, 0, 1, 0] = np.arange(n) % 256, np.arange(n) // 256
    return frames


def frame_number(frames):
    return frames[:, 0, 0, 0].astype(int) + 256 * frames[:, 0, 1, 0].astype(int)


@pytest.fixture(scope="module")
def render():
    return load_stage("01_render_frames.py")


# --------------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------------
def test_lossless_frames_come_back_bit_exact(tmp_path, render):
    import video_frames

    frames = np.random.default_rng(0).integers(0, 256, (30, 48, 48, 3), dtype=np.uint8)
    write_video(tmp_path / "a.mkv", frames, rate=30)
    decoded, timeline = video_frames.decode_on_timeline(tmp_path / "a.mkv", 48, render.squash)
    # 30 fps: frame j fills the 60 Hz ticks 2j and 2j + 1, unchanged at the video's own size
    assert timeline.fps == 30 and timeline.n_frames == 30 and decoded.shape == (60, 48, 48, 3)
    assert np.array_equal(decoded[0::2], frames) and np.array_equal(decoded[1::2], frames)
    small, _ = video_frames.decode_on_timeline(tmp_path / "a.mkv", 16, render.squash)
    assert np.array_equal(small[::2], [render.squash(f, 16) for f in frames])   # the game's squash


def test_frame_at_a_time_is_the_one_its_presentation_time_names(tmp_path, render):
    """Each 60 Hz tick k holds the last frame whose presentation time (read here from the packets'
    pts with exact fractions; .mp4 keeps them exact, in 1/30000 s) is at or before k / 60, and the
    ticks end with the last frame's."""
    import video_frames

    write_video(tmp_path / "ntsc.mp4", numbered_frames(200), codec="png", pix_fmt="rgb24")
    with av.open(str(tmp_path / "ntsc.mp4")) as container:
        stream = container.streams.video[0]
        times = sorted(Fraction(p.pts) * stream.time_base for p in container.demux(stream)
                       if p.pts is not None)
    decoded, timeline = video_frames.decode_on_timeline(tmp_path / "ntsc.mp4", 16, render.squash)
    expected = [bisect.bisect_right(times, Fraction(k, 60)) - 1 for k in range(len(decoded))]
    assert timeline.fps == NTSC and frame_number(decoded).tolist() == expected
    assert len(decoded) == math.ceil((times[-1] + 1 / NTSC) * 60)
    assert {expected.count(j) for j in range(200)} == {2, 3}   # 2 ticks a frame, now and then 3


# --------------------------------------------------------------------------------------------------
# A BIDS dataset of videos, by hand
# --------------------------------------------------------------------------------------------------
def bids_with_videos(root, videos, onset=0.0, duration=None):
    """One run per video (task-x, run-01, 02 ...): its events.tsv shows the video at `onset`."""
    func = root / "sub-01" / "ses-001" / "func"
    func.mkdir(parents=True)
    for k, name in enumerate(videos, start=1):
        row = {"onset": [onset], "duration": [duration if duration else "n/a"],
               "stim_file": [f"stimuli/{name}"]}
        pd.DataFrame(row).to_csv(func / f"sub-01_ses-001_task-x_run-{k:02d}_events.tsv",
                                 sep="\t", index=False)


def test_brightness_steps_change_the_features_at_the_predicted_tr(tmp_path):
    """A video black for 10 s then white, shown from 3 s into the run: 05 --features lowlevel's
    luminance of each slot of each TR's window is white exactly where the time conventions say
    the frame shown at that 60 Hz tick is (computed here with fractions), black before the onset."""
    n_frames, first_white, onset, tr, n_volumes = 600, 300, 3.0, 1.49, 15
    frames = np.zeros((n_frames, 32, 32, 3), np.uint8)
    frames[first_white:] = 255
    write_video(tmp_path / "data" / "stimuli" / "step.mkv", frames)
    bids_with_videos(tmp_path / "data", ["step.mkv"], onset=onset)
    work = tmp_path / "work"
    run_script("01_render_frames.py", "--work", work, "--bids", tmp_path / "data", "--resolution", 16)
    (work / "bold").mkdir()
    pd.DataFrame({"sub": ["01"], "ses": ["001"], "task": ["x"], "run": ["01"], "n_volumes": [n_volumes],
                  "tr_s": [tr]}).to_csv(work / "bold" / "manifest.tsv", sep="\t", index=False)
    run_script("05_extract.py", "--work", work, "--features", "lowlevel")
    rows = np.load(work / "features/lowlevel/lowlevel/sub-01/ses-001/sub-01_ses-001_task-x_run-01.npy")
    luminance = rows[:, :32 * 64].reshape(n_volumes, 32, 64).astype(float).mean(-1)   # (T, slot)
    start = round(onset * 60)                                # the video's first tick on the run's clock
    for t in range(n_volumes):
        end = math.ceil(Fraction(str(tr)) * (t + 1) * 60) - 1    # the last tick before volume t ends
        for slot in range(32):
            tick = end - 4 * (31 - slot)
            shown = bisect.bisect_right([j / NTSC for j in range(n_frames)], Fraction(tick - start, 60)) - 1
            white = tick >= start and first_white <= shown < n_frames
            assert luminance[t, slot] == pytest.approx(1.0 if white else 0.0, abs=1e-3), (t, slot)
    assert 0 < (luminance[:, -1] > 0.5).sum() < n_volumes     # the step is inside the run


BAD = ("empty.mkv", "garbage.mkv", "truncated.mkv", "unknown.mp4", "dropped.mkv", "short.mkv")


def write_bad_videos(stimuli):
    """One video of each kind of BAD, and good.mkv."""
    frames = numbered_frames(60)
    write_video(stimuli / "good.mkv", frames)
    (stimuli / "empty.mkv").write_bytes(b"")
    (stimuli / "garbage.mkv").write_bytes(np.random.default_rng(0).bytes(5000))
    write_video(stimuli / "long.mkv", numbered_frames(300))
    data = (stimuli / "long.mkv").read_bytes()
    (stimuli / "truncated.mkv").write_bytes(data[:len(data) // 2])
    write_video(stimuli / "h264.mp4", frames, codec="libx264", pix_fmt="yuv420p")
    (stimuli / "unknown.mp4").write_bytes((stimuli / "h264.mp4").read_bytes().replace(b"avc1", b"zzz1"))
    write_video(stimuli / "dropped.mkv", frames[:10], pts=[0, 1, 2, 3, 5, 6, 7, 8, 9, 10])
    write_video(stimuli / "short.mkv", frames[:30])


def test_bad_videos_are_failed_rows_naming_the_file(tmp_path):
    write_bad_videos(tmp_path / "data" / "stimuli")
    bids_with_videos(tmp_path / "data", ["good.mkv", *BAD], duration=1.9)
    work = tmp_path / "work"
    result = run_script("01_render_frames.py", "--work", work, "--bids", tmp_path / "data", check=False)
    assert result.returncode == 1 and "error: 6 replay(s) failed" in result.stderr
    manifest = pd.read_csv(work / "frames" / "manifest.tsv", sep="\t", dtype=str)
    assert manifest["status"].tolist() == ["ok"] + ["failed"] * len(BAD)
    reasons = dict(zip(manifest["bk2"].map(lambda p: p.split("/")[-1]), manifest["error"]))
    assert "empty file (0 bytes)" in reasons["empty.mkv"]
    assert "not a readable video" in reasons["garbage.mkv"]
    assert "truncated: its header says 10.01 s, its frames last" in reasons["truncated.mkv"]
    assert "unknown video codec" in reasons["unknown.mp4"]
    assert "variable frame rate: frame 4 is shown at 0.1670 s, not 0.1335 s" in reasons["dropped.mkv"]
    assert "the video lasts 1.02 s, shorter than the 1.90 s of" in reasons["short.mkv"]
    for name, reason in reasons.items():   # each names its file, on one line
        assert name == "good.mkv" or (f"stimuli/{name}" in reason and "\n" not in reason)
    assert manifest["frames_path"].notna().tolist() == [True] + [False] * len(BAD)
    assert sorted(p.name for p in (work / "frames").rglob("*.npy")) == ["good.npy"]   # nothing else
    assert not list(work.rglob(".*.tmp-*"))


# --------------------------------------------------------------------------------------------------
# The Algonauts 2025 layout
# --------------------------------------------------------------------------------------------------
def algonauts_release(root, datasets, atlas_labels=6):
    """A release in the layout of algonauts_2025.competitors: sub-01's friends and movie10 .h5 files
    holding `datasets` ({name: array}), its atlas, and a 1 s video per chunk."""
    func = root / "fmri" / "sub-01" / "func"
    func.mkdir(parents=True)
    names = {"friends": "sub-01_task-friends_space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net_"
                        "desc-s123456_bold.h5",
             "movie10": "sub-01_task-movie10_space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net_"
                        "bold.h5"}
    for kind, name in names.items():
        with h5py.File(func / name, "w") as f:
            for key, data in datasets.items():
                if ("figures" in key) == (kind == "movie10"):
                    f.create_dataset(key, data=data)
    atlas = np.zeros((4, 4, 4), np.int16)
    atlas.flat[:atlas_labels] = np.arange(1, atlas_labels + 1)
    (root / "fmri" / "sub-01" / "atlas").mkdir()
    nib.save(nib.Nifti1Image(atlas, np.eye(4)), root / "fmri" / "sub-01" / "atlas" /
             "sub-01_space-MNI152NLin2009cAsym_atlas-Schaefer18_parcel-1000Par7Net_desc-dseg_parcellation.nii.gz")
    frames = numbered_frames(30)
    write_video(root / "stimuli/movies/friends/s1/friends_s01e02a.mkv", frames)
    write_video(root / "stimuli/movies/friends/s6/friends_s06e01b.mkv", frames)
    write_video(root / "stimuli/movies/movie10/figures/figures01.mkv", frames)


def test_h5_reader_against_h5py(tmp_path):
    rng = np.random.default_rng(1)
    datasets = {"ses-003_task-s01e02a": rng.normal(size=(40, 6)).astype(np.float32),
                "ses-011_task-s06e01b": rng.normal(size=(35, 6)).astype(np.float32),
                "ses-020_task-figures01_run-2": rng.normal(size=(30, 6))}
    algonauts_release(tmp_path / "release", datasets)
    work = tmp_path / "work"
    run_script("02_prep_fmri.py", "--work", work, "--algonauts", tmp_path / "release")
    manifest = pd.read_csv(work / "bold" / "manifest.tsv", sep="\t", dtype=str)
    # the challenge's split by default: Friends season 6 test, the rest (movie10 too) train
    assert manifest[["ses", "task", "run", "n_volumes", "tr_s", "split"]].values.tolist() == [
        ["003", "s01e02a", np.nan, "40", "1.49", "train"], ["011", "s06e01b", np.nan, "35", "1.49", "test"],
        ["020", "figures01", "2", "30", "1.49", "train"]]
    for path, (key, data) in zip(sorted(manifest["bold_path"]), datasets.items()):
        h5_name = "movie10" if "figures" in key else "friends"
        with h5py.File(next((tmp_path / "release/fmri/sub-01/func").glob(f"*{h5_name}*.h5")), "r") as f:
            reference = f[key][()]
        assert path.endswith(f"sub-01_{key}.npy")
        np.testing.assert_array_equal(np.load(work / path), reference.astype(np.float32))
    labels = pd.read_csv(work / "bold" / "labels.tsv", sep="\t")
    assert labels["label"].tolist() == [1, 2, 3, 4, 5, 6] and labels["n_voxels"].tolist() == [1] * 6
    assert (work / "bold" / "sub-01" / "atlas.nii.gz").is_file()
    splits = pd.read_csv(work / "bold" / "splits.tsv", sep="\t", dtype=str)
    assert splits["split"].tolist() == ["train", "test", "train"]
    # other flags, then 01 on the same release: one repetition per run, its video
    run_script("02_prep_fmri.py", "--work", work, "--algonauts", tmp_path / "release",
               "--test-tasks", "figures*", "--validation-tasks", "s01*")
    splits = pd.read_csv(work / "bold" / "splits.tsv", sep="\t", dtype=str)
    assert splits["split"].tolist() == ["validation", "train", "test"]
    run_script("01_render_frames.py", "--work", work, "--algonauts", tmp_path / "release", "--resolution", 8)
    frames = pd.read_csv(work / "frames" / "manifest.tsv", sep="\t", dtype=str)
    assert [p.split("/")[-1] for p in frames["bk2"]] == ["friends_s01e02a.mkv", "friends_s06e01b.mkv",
                                                          "figures01.mkv"]
    assert frames["onset_s"].astype(float).tolist() == [0.0] * 3 and (frames["status"] == "ok").all()


@pytest.mark.parametrize("problem", ["no video", "NaN rows", "columns"])
def test_bad_release_is_one_line_and_nothing_written(tmp_path, problem):
    rng = np.random.default_rng(2)
    datasets = {"ses-003_task-s01e02a": rng.normal(size=(40, 6)), "ses-011_task-s06e01b": rng.normal(size=(35, 6))}
    if problem == "no video":
        datasets["ses-004_task-s01e03a"] = rng.normal(size=(40, 6))
    if problem == "NaN rows":
        datasets["ses-011_task-s06e01b"][[7, 9]] = np.nan
    algonauts_release(tmp_path / "release", datasets, atlas_labels=5 if problem == "columns" else 6)
    work = tmp_path / "work"
    result = run_script("02_prep_fmri.py", "--work", work, "--algonauts", tmp_path / "release", check=False)
    h5 = next((tmp_path / "release/fmri/sub-01/func").glob("*friends*.h5"))
    expected = {"no video": f"error: {h5}: dataset ses-004_task-s01e03a has no video under "
                            f"{tmp_path / 'release' / 'stimuli/movies'} named s01e03a.mkv or friends_s01e03a.mkv",
                "NaN rows": f"error: {h5}: dataset ses-011_task-s06e01b has 2 row(s) with NaN or infinite "
                            "values (first: volume 7)",
                "columns": f"error: {h5}: dataset ses-003_task-s01e02a has 6 parcels, its subject's atlas"}
    assert result.returncode == 2 and result.stderr.strip().startswith(expected[problem]), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (work / "bold").exists() or not list((work / "bold").rglob("*.npy"))
    if problem == "no video":
        again = run_script("01_render_frames.py", "--work", work, "--algonauts", tmp_path / "release", check=False)
        assert again.returncode == 2 and again.stderr.strip().startswith(expected[problem])


# --------------------------------------------------------------------------------------------------
# The movie demo: both layouts, planted parcels recovered from low-level features
# --------------------------------------------------------------------------------------------------
MOVIE_DEMO = ["--stimuli", "movie", "--subjects", "1", "--seasons", "3", "--rep-seconds", "60"]


@pytest.fixture(scope="module")
def movie_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("movie")
    run_script("00_make_demo.py", "--work", work, *MOVIE_DEMO)
    run_script("01_render_frames.py", "--work", work, "--resolution", "32", "--workers", "2")
    return work


@pytest.mark.parametrize("layout", ["bids", "algonauts"])
def test_movie_demo_planted_parcels_recovered(movie_work, tmp_path, layout):
    work = tmp_path / layout
    work.mkdir()
    (work / "frames").symlink_to(movie_work / "frames")
    prep = (["--fmriprep", movie_work / "demo/derivatives/fmriprep",
             "--atlas", movie_work / "demo/atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz"]
            if layout == "bids" else ["--algonauts", movie_work / "demo/algonauts"])
    run_script("02_prep_fmri.py", "--work", work, *prep, "--test-tasks", "s03*")
    run_script("05_extract.py", "--work", work, "--features", "lowlevel")
    run_script("06_ridge.py", "--work", work, "--name", "lowlevel", "--n-permutations", "0",
               "--ground-truth", movie_work / "demo/ground_truth.json")
    truth = json.loads((work / "results/lowlevel/sub-01/summary.json").read_text())["ground_truth"]
    assert truth["recovered"], truth
    buttons = run_script("05_extract.py", "--work", work, "--features", "buttons", check=False)
    assert buttons.returncode == 2 and "is a video" in buttons.stderr and "a movie has no buttons" in buttons.stderr
    assert len(buttons.stderr.strip().splitlines()) == 1


def test_movie_demo_layouts(movie_work):
    root = movie_work / "demo"
    events = sorted(root.glob("sub-01/ses-*/func/*_events.tsv"))
    assert len(events) == 6 and (root / "algonauts/stimuli/movies/friends/s3/friends_s03e01b.mkv").is_file()
    with h5py.File(next((root / "algonauts/fmri/sub-01/func").glob("*_bold.h5")), "r") as f:
        assert sorted(k.split("_task-")[1] for k in f) == [f"s0{s}e01{p}" for s in (1, 2, 3) for p in "ab"]
        series = f[next(iter(f))][()]
    assert np.allclose(series.mean(0), 0, atol=1e-5) and np.allclose(series.std(0, ddof=1), 1, atol=1e-4)
    frames = pd.read_csv(movie_work / "frames" / "manifest.tsv", sep="\t")
    assert np.allclose(frames["fps"], 30000 / 1001) and (frames["n_frames"] == 3600).all()
    truth = json.loads((root / "ground_truth.json").read_text())
    assert truth["planted_buttons"] == {} and truth["stimuli"] == "movie"


def test_sweep_controls_without_buttons_for_a_movie(movie_work):
    """07's controls on movie frames: no button control, a partition with low-level vision alone."""
    result = run_script("07_sweep.py", "--work", movie_work, "--demo", "--experiments", "controls",
                        "--dry-run", "--jobs-tsv")
    jobs = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert "buttons" not in jobs and "lowlevel" in jobs
    assert set(jobs) >= {"h24-l2-a2-fall-fp32+lowlevel", "h24-l2-a2-fall-fp32-untrained+lowlevel"}
    partition = jobs["h24-l2-a2-fall-fp32+lowlevel"]
    assert " --with lowlevel " in partition[3] + " " and partition[4] == "h24-l2-a2-fall-fp32,lowlevel"
