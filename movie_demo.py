"""The movie demo of 00_make_demo.py (--stimuli movie): short synthetic "Friends" chunks written
with PyAV, watched by every subject, in the two layouts the pipeline reads.

    <root>/stimuli/movies/friends/s<season>/friends_s<SS>e01<part>.mkv   29.97 fps H.264 videos,
        one per chunk (parts a and b of one episode per season): each screen quadrant has a
        brightness that changes at scene cuts and a texture that moves at a changing speed
    <root>/sub-XX/ses-YYY/func/sub-XX_ses-YYY_task-s<SS>e01<part>_events.tsv + derivatives/fmriprep/
        the CNeuroMod BIDS layout (00's fMRIPrep outputs), one run per chunk, the video from the
        first volume (onset 0)
    <root>/algonauts/   the Algonauts 2025 layout of the same runs: fmri/sub-XX/func/*_bold.h5 (the
        parcel means of the same BOLD, confounds regressed out, z-scored per run), each subject's
        atlas in fmri/sub-XX/atlas/, the videos in stimuli/movies/

The planted parcels follow the luminance or the motion energy of a quadrant (00's properties,
measured on each video frame and held on the 60 Hz timeline while the frame is shown), through the
same HRF as the game's; nothing follows buttons.
"""
import shutil
from fractions import Fraction

import nibabel as nib
import numpy as np
import pandas as pd

import video_frames
from common import run_folder, run_stem, write_tsv
from paper.alignment import GAMEPLAY_HZ

FPS = Fraction(30000, 1001)    # NTSC, as Friends
SIZE = (64, 96)                # (height, width): not square, so that 01 squashes it
SHOW = "friends"
H5_NAME = "sub-{sub}_task-friends_space-MNI152NLin2009cAsym_atlas-demo_desc-s123456_bold.h5"
ATLAS_NAME = "sub-{sub}_space-MNI152NLin2009cAsym_atlas-demo_desc-dseg_parcellation.nii.gz"


def chunks(seasons):
    """The chunk labels, in viewing order: s01e01a, s01e01b, s02e01a ..."""
    return [f"s{season:02d}e01{part}" for season in range(1, seasons + 1) for part in "ab"]


def video_path(chunk):
    """A chunk's video, relative to a dataset root (the release's names)."""
    return f"stimuli/movies/{SHOW}/s{int(chunk[1:3])}/{SHOW}_{chunk}.mkv"


def plan_runs(args, seed_for):
    """Every run: each subject watches every chunk, --runs of them per session, in an order of its
    own. List of dicts (sub ses run stem task reps), reps: the one video from the first volume."""
    runs = []
    for s in range(1, args.subjects + 1):
        sub = f"{s:02d}"
        order = np.random.default_rng(seed_for(args.seed, "viewing order", sub)).permutation(
            chunks(args.seasons))
        for k, chunk in enumerate(order):
            ses = f"{k // args.runs + 1:03d}"
            runs.append({"sub": sub, "ses": ses, "run": None, "task": str(chunk),
                         "stem": run_stem(sub, ses, chunk, None),
                         "reps": [{"bk2": video_path(chunk), "onset": 0.0}]})
    return runs


def quadrant_processes(n_frames, rng):
    """Per frame and quadrant (n_frames, 4): a brightness that jumps at scene cuts (every 1-4 s)
    and a texture speed (pixels per frame) that changes at other times."""
    def piecewise(low, high):
        values, t = np.empty((n_frames, 4)), 0
        while t < n_frames:
            length = int(rng.integers(30, 120))
            values[t:t + length] = rng.uniform(low, high, 4)
            t += length
        return values
    return piecewise(0.1, 0.9), piecewise(0.0, 3.0)


def movie_frames(n_frames, rng):
    """uint8 (n_frames, H, W, 3): per quadrant, a colour scaled by its brightness, times a drifting
    sine texture (its motion energy follows the speed)."""
    brightness, speed = quadrant_processes(n_frames, rng)
    height, width = SIZE
    h, w = height // 2, width // 2
    colours = rng.uniform(0.5, 1.0, (4, 3))
    x = np.arange(w)[None, :] + np.arange(h)[:, None] * 0.5                        # (h, w)
    phase = np.cumsum(speed, axis=0)                                                # (n, 4)
    frames = np.empty((n_frames, height, width, 3), np.uint8)
    for q, (rows, cols) in enumerate([(slice(0, h), slice(0, w)), (slice(0, h), slice(w, None)),
                                      (slice(h, None), slice(0, w)),
                                      (slice(h, None), slice(w, None))]):
        texture = 0.75 + 0.25 * np.sin(2 * np.pi * (x[None] - phase[:, q, None, None]) / 12)
        value = brightness[:, q, None, None] * texture                             # (n, h, w)
        frames[:, rows, cols] = np.clip(value[..., None] * colours[q] * 255, 0, 255).round()
    return frames


def write_video(path, frames):
    """An H.264 .mkv (yuv420p, as Friends) at FPS, written with PyAV."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "12", "preset": "veryfast"}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def record_videos(args, root, visual_properties, seed_for):
    """Write every chunk's video under root; returns {video path: properties (n_ticks, 9)}: 00's 8
    visual properties of each frame on the 60 Hz timeline (the frame shown at each tick), then 0
    for the button presses (no buttons in a movie)."""
    props = {}
    n_frames = int(round(args.rep_seconds * FPS))
    for chunk in chunks(args.seasons):
        frames = movie_frames(n_frames, np.random.default_rng(seed_for(args.seed, "movie", chunk)))
        path = video_path(chunk)
        write_video(root / path, frames)
        rows, luminance = [], 0.0
        for frame in frames:
            row, luminance = visual_properties(frame, luminance)
            rows.append(row)
        ticks = video_frames.first_ticks(n_frames, FPS)
        per_tick = np.repeat(np.stack(rows), np.diff(ticks), axis=0)
        props[str(root / path)] = np.c_[per_tick, np.zeros((len(per_tick), 1), np.float32)]
    return props


def write_events(root, run, reps):
    """The run's events.tsv: one row, its video from the first volume."""
    rep = reps[0]
    duration = len(rep["props"]) / GAMEPLAY_HZ
    func = root / run_folder(run["sub"], run["ses"]) / "func"
    func.mkdir(parents=True, exist_ok=True)
    write_tsv(func / f"{run['stem']}_events.tsv",
              pd.DataFrame({"trial_type": ["video"], "onset": [rep["onset"]],
                            "duration": [round(duration, 3)], "stim_file": [rep["bk2"]]}))


def parcel_series(bold, confounds, atlas, n_parcels):
    """What the release's preprocessing gives of a run (float32 (T, P)): the mean BOLD of each
    parcel, the motion parameters, cosines and non-steady-state volume regressed out, z-scored."""
    means = np.stack([bold[atlas == label].mean(0) for label in range(1, n_parcels + 1)], 1)
    columns = [c for c in confounds.columns
               if c in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")
               or c.startswith("cosine") or c.startswith("non_steady_state")]
    design = np.c_[np.ones(len(means)), confounds[columns].to_numpy()]
    residual = means - design @ np.linalg.lstsq(design, means, rcond=None)[0]
    return ((residual - residual.mean(0)) / residual.std(0, ddof=1)).astype(np.float32)


def write_algonauts(root, series, brain):
    """root/algonauts: the runs' parcel series ([(run, (T, P))]) in one .h5 per subject (a dataset
    ses-YYY_task-<chunk> per run), each subject's atlas, and a copy of the videos."""
    import h5py

    out = root / "algonauts"
    affine, _, atlas = brain
    for sub in sorted({run["sub"] for run, _ in series}):
        func = out / "fmri" / f"sub-{sub}" / "func"
        func.mkdir(parents=True)
        with h5py.File(func / H5_NAME.format(sub=sub), "w") as f:
            for run, data in series:
                if run["sub"] == sub:
                    f.create_dataset(f"ses-{run['ses']}_task-{run['task']}", data=data)
        atlas_dir = out / "fmri" / f"sub-{sub}" / "atlas"
        atlas_dir.mkdir(parents=True)
        nib.save(nib.Nifti1Image(atlas, affine), atlas_dir / ATLAS_NAME.format(sub=sub))
    shutil.copytree(root / "stimuli", out / "stimuli")
