"""00 — Make the embedded demo: a small CNeuroMod-style dataset with a known, planted encoding signal.

The real data (CNeuroMod Shinobi) cannot ship with the code: its ROM is not distributable and the
fMRI is gigabytes. This script makes a stand-in in the same layout, so that every stage runs on a
fresh machine:

    python 00_make_demo.py --work work                       # ~1 minute on 2 cores
    python 00_make_demo.py --work work --subjects 1 --runs 1 --reps 2 \\
        --rep-seconds 8                                      # tiny, for tests

It writes <work>/demo/ (a BIDS dataset):
  sub-XX/ses-YYY/gamelogs/sub-XX_ses-YYY_task-airstriker_run-NN_level-1_rep-RR.bk2 (--no-sessions:
      no ses-YYY level, here and below)
      real stable-retro replays of Airstriker-Genesis-v0 (its ROM ships with stable-retro), played
      by a seeded scripted policy
  sub-XX/ses-YYY/func/..._events.tsv            one row per repetition: trial_type onset duration
      duration_bk2 level stim_file (stim_file relative to the dataset root; one row says
      "Missing file" as in the real data)
  derivatives/fmriprep/sub-XX/ses-YYY/func/     fMRIPrep-style 4D BOLD (6 mm MNI grid,
      TR 1.49 s), brain mask, desc-confounds_timeseries.tsv/.json (24 motion columns, cosine
      drifts, framewise displacement, ...)
  atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz (+ .tsv)
      a labels atlas of --parcels parcels (and one below the BOLD field of view with
      --parcel-outside-fov)
  ground_truth.json, ground_truth/<run>_signals.tsv   which parcels carry which visual property
  ground_truth/<run>_buttons.tsv                the signal of the parcel that follows the B presses
  demo.json                                     the flags it was made with (a re-run with others
                                                is refused)

The planted signal (what a good encoding model should recover): each planted parcel follows one
visual property of the gameplay frames — mean luminance or motion energy (mean absolute frame
difference) in one screen quadrant — computed on the raw emulator screens, convolved with nilearn's
Glover HRF, sampled at the middle of each volume. Nothing here uses our models. One more parcel
(--planted-buttons) follows the hands: the rate of presses of B (fire), through the same HRF, with
gains drawn as for the others (ground_truth.json's "planted_buttons", apart from the visual
"planted"; 05_extract.py --features buttons finds it). Presses stop between repetitions, where the
screen is black, so the visual features predict it in part too. The other parcels carry only
noise. Every voxel also carries head-motion artefacts (a random mixture of the 6 motion parameters)
and a slow drift (the run's cosine regressor), large enough that confound removal matters, plus a
non-steady-state first volume.
"""
import argparse
import json
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nilearn.glm.first_level import glover_hrf
from sklearn.cluster import KMeans

import common
from paper.alignment import GAMEPLAY_HZ
import movie_demo
from common import (DEFAULT_WORK, InputError, run_folder, run_main, run_stem,
                    write_tsv)

GAME = "Airstriker-Genesis-v0"
TASK = "airstriker"
SPACE = "MNI152NLin2009cAsym"
ATLAS_NAME = f"tpl-{SPACE}_res-06_atlas-demo_dseg"   # atlas/<ATLAS_NAME>.nii.gz and .tsv
VOXEL_MM = 6.0
GRID = (16, 19, 16)  # a coarse MNI-like grid: 96 x 114 x 96 mm
OUTSIDE_SLICES = 3   # --parcel-outside-fov: the atlas's slices below the BOLD grid
QUADRANTS = ("top_left", "top_right", "bottom_left", "bottom_right")
PROPERTIES = tuple(f"luminance_{q}" for q in QUADRANTS) + tuple(f"motion_{q}" for q in QUADRANTS)
BUTTON_PROPERTIES = ("presses_B",)                 # after the visual ones in every per-frame array
ALL_PROPERTIES = PROPERTIES + BUTTON_PROPERTIES
MOTION_PARAMS = ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--out", default=None, help="dataset root (default: <work>/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stimuli", choices=("game", "movie"), default="game",
                   help="game: replays of Airstriker (the paper's kind of data); movie: synthetic "
                        "29.97 fps videos of 'Friends' chunks, in the CNeuroMod BIDS layout and "
                        "the Algonauts 2025 one (<out>/algonauts; movie_demo.py)")
    p.add_argument("--seasons", type=int, default=6,
                   help="--stimuli movie: seasons of 2 chunks each (s01e01a, s01e01b ...), every "
                        "subject watching all, --runs per session; --rep-seconds is a chunk's "
                        "length (default 60 s)")
    p.add_argument("--subjects", type=int, default=2)
    p.add_argument("--sessions", type=int, nargs="+", default=None,
                   help="sessions per subject (default 5), or one number per subject (3 1: sub-02 "
                        "has a single session); ses-004 is validation and ses-005 test in later "
                        "stages")
    p.add_argument("--no-sessions", action="store_true",
                   help="BIDS without a session level: sub-XX/func/sub-XX_task-..._run-NN_...")
    p.add_argument("--runs", type=int, default=2, help="runs per session")
    p.add_argument("--reps", type=int, default=3, help="level repetitions per run")
    p.add_argument("--rep-seconds", type=float, default=None,
                   help="gameplay per repetition (default 20; a repetition ends earlier if the "
                        "game ends)")
    p.add_argument("--tr", type=float, default=1.49, help="repetition time in seconds")
    p.add_argument("--parcels", type=int, default=40, help="parcels in the demo atlas")
    p.add_argument("--planted", type=int, default=10, help="parcels that carry a visual property")
    p.add_argument("--planted-buttons", type=int, default=None,
                   help="other parcels, which follow the player's presses of B (fire) (default "
                        "1; 0 for --stimuli movie)")
    p.add_argument("--parcel-outside-fov", action="store_true",
                   help="one more atlas parcel, below the BOLD field of view (as the cerebellum of "
                        "a scan that stops above it): it has no voxel on the BOLD grid")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                   help="processes recording replays (one emulator per process)")
    p.add_argument("--overwrite", action="store_true", help="remake the demo even if it exists")
    return p.parse_args()


def seed_for(*keys):
    """A stable integer seed from any keys (Python's hash() is salted per process)."""
    return zlib.crc32(repr(keys).encode())


# --------------------------------------------------------------------------------------------------
# Gameplay: record .bk2 replays with a scripted policy, and measure the visual properties of each
# frame
# --------------------------------------------------------------------------------------------------
def scripted_actions(n_steps, rng, buttons):
    """A seeded player: holds a direction for 0.3-1.5 s at a time and fires in bursts.
    (n_steps, 12) uint8."""
    index = {name: i for i, name in enumerate(buttons)}
    actions = np.zeros((n_steps, len(buttons)), np.uint8)
    t = 0
    while t < n_steps:
        hold = min(int(rng.integers(20, 90)), n_steps - t)
        for direction in rng.choice(["UP", "DOWN", "LEFT", "RIGHT", None], size=2):
            if direction is not None:
                actions[t:t + hold, index[direction]] = 1
        if rng.random() < 0.7:
            actions[t:t + hold, index["B"]] = (np.arange(hold) // 6) % 2 == 0  # tap fire
        t += hold
    return actions


def button_properties(actions, buttons):
    """The per-frame button property of one repetition from the inputs it played (n, n_buttons)
    uint8: (n, 1) float32, presses_B: 1 in each frame where B (fire) is held and was not in the
    frame before, else 0. Held in frame 0 counts: 05 --features buttons counts presses so too."""
    fire = actions[:, buttons.index("B")].astype(bool)
    return (fire & ~np.r_[False, fire[:-1]]).astype(np.float32)[:, None]


def visual_properties(screen, previous_luminance):
    """Luminance and motion energy per screen quadrant of one (224, 320, 3) uint8 screen.

    Returns (properties (8,), luminance (56, 80)); the frame is subsampled 4x, which is plenty for
    means.
    """
    small = screen[::4, ::4].astype(np.float32) / 255.0                       # (56, 80, 3)
    luminance = small @ np.array([0.299, 0.587, 0.114], np.float32)         # (56, 80)
    motion = np.abs(luminance - previous_luminance)
    h, w = luminance.shape[0] // 2, luminance.shape[1] // 2
    quadrants = [(slice(0, h), slice(0, w)), (slice(0, h), slice(w, None)),
                 (slice(h, None), slice(0, w)), (slice(h, None), slice(w, None))]
    props = [luminance[q].mean() for q in quadrants] + [motion[q].mean() for q in quadrants]
    return np.array(props, np.float32), luminance


_ENV = None  # one emulator per worker process: stable-retro allows only one at a time


def record_repetition(job):
    """Play one repetition from the Level1 state and save it as a .bk2 at job['bk2'].

    Returns (job, properties (n_frames, 9) float32, columns ALL_PROPERTIES): one row per recorded
    input, i.e. per frame that stage 01 will render (the screen after each 60 Hz emulator step).
    """
    global _ENV
    import stable_retro as retro

    if _ENV is None:
        _ENV = retro.make(game=GAME, render_mode=None, use_restricted_actions=retro.Actions.ALL)
    env = _ENV
    rng = np.random.default_rng(job["seed"])
    actions = scripted_actions(job["n_steps"], rng, env.buttons)

    final = Path(job["bk2"])
    tmp_dir = final.parent / f".rec-{final.stem}"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    env.auto_record(str(tmp_dir))  # reset() starts a movie that logs every input we step with
    screen, _ = env.reset()
    luminance = visual_properties(screen, 0.0)[1]
    props = []
    for action in actions:
        screen, _, terminated, truncated, _ = env.step(action)
        row, luminance = visual_properties(screen, luminance)
        props.append(row)
        if terminated or truncated:  # the game is over: the repetition ends, as in the real data
            break
    env.stop_record()  # closes (and so writes) the .bk2
    (recorded,) = tmp_dir.glob("*.bk2")
    os.replace(recorded, final)
    tmp_dir.rmdir()
    played = actions[:len(props)]   # the inputs the bk2 holds (the game may have ended early)
    return job, np.c_[np.stack(props), button_properties(played, env.buttons)]


# --------------------------------------------------------------------------------------------------
# Brain: a coarse MNI grid, a brain mask and a k-means atlas of the mask
# --------------------------------------------------------------------------------------------------
def make_brain(n_parcels, seed):
    """Return (affine (4, 4), mask (X, Y, Z) bool, atlas (X, Y, Z) int32 labels 1..n_parcels)."""
    affine = np.array([[VOXEL_MM, 0, 0, -45.0], [0, VOXEL_MM, 0, -63.0],
                       [0, 0, VOXEL_MM, -33.0], [0, 0, 0, 1]])
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in GRID], indexing="ij"), -1)  # (X, Y, Z, 3)
    centre = (np.array(GRID) - 1) / 2
    radii = np.array(GRID) / 2 - 0.5
    mask = (((ijk - centre) / radii) ** 2).sum(-1) <= 1.0
    kmeans = KMeans(n_clusters=n_parcels, n_init=1, random_state=seed).fit(ijk[mask])
    # Number parcels by position (x, then y, then z of their centres) so labels do not depend on
    # k-means.
    order = np.lexsort(kmeans.cluster_centers_.T[::-1])
    rank = np.empty(n_parcels, int)
    rank[order] = np.arange(n_parcels)
    atlas = np.zeros(GRID, np.int32)
    atlas[mask] = rank[kmeans.labels_] + 1
    return affine, mask, atlas


# --------------------------------------------------------------------------------------------------
# fMRI: HRF-convolved properties in planted parcels, noise, motion and drift in every voxel
# --------------------------------------------------------------------------------------------------
def run_timeline(reps, n_volumes, tr):
    """Place each repetition's per-frame properties on the run's 60 Hz timeline (zeros = black
    screen).

    Returns (n_volumes * tr * 60, 9) float32, columns ALL_PROPERTIES.
    """
    n_frames = int(np.ceil(n_volumes * tr * GAMEPLAY_HZ))
    timeline = np.zeros((n_frames, len(ALL_PROPERTIES)), np.float32)
    for rep in reps:
        start = int(round(rep["onset"] * GAMEPLAY_HZ))
        props = rep["props"][: n_frames - start]
        timeline[start:start + len(props)] = props
    return timeline


def planted_signals(timeline, n_volumes, tr):
    """HRF-convolve each property (column) and sample it at mid-volume times (t + 0.5) * TR.
    (n_volumes, K) for a timeline (n_frames, K), z-scored."""
    # (1920,) at 60 Hz, sums to 1
    hrf = glover_hrf(t_r=1.0 / GAMEPLAY_HZ, oversampling=1, time_length=32.0)
    convolved = np.stack([np.convolve(col, hrf)[: len(col)] for col in timeline.T], 1)  # (n, K)
    samples = np.round((np.arange(n_volumes) + 0.5) * tr * GAMEPLAY_HZ).astype(int)
    signals = convolved[np.minimum(samples, len(convolved) - 1)]                       # (T, K)
    std = signals.std(0)
    return (signals - signals.mean(0)) / np.where(std > 0, std, 1.0)


def motion_confounds(n_volumes, rng):
    """fMRIPrep-like head motion: 6 random-walk parameters and their 24-column expansion.
    DataFrame (T, 24)."""
    # mm and radians
    steps = rng.normal(0, 1, (n_volumes, 6)) * [0.05, 0.05, 0.08, 0.001, 0.001, 0.001]
    params = np.cumsum(steps, 0)
    table = {}
    for name, col in zip(MOTION_PARAMS, params.T):
        derivative = np.concatenate([[np.nan], np.diff(col)])
        table[name] = col
        table[f"{name}_derivative1"] = derivative
        table[f"{name}_power2"] = col ** 2
        table[f"{name}_derivative1_power2"] = derivative ** 2
    table = pd.DataFrame(table)
    # Power (2012) framewise displacement: rotations as arc length on a 50 mm sphere.
    fd = (table[[f"{n}_derivative1" for n in MOTION_PARAMS[:3]]].abs().sum(axis=1)
          + 50 * table[[f"{n}_derivative1" for n in MOTION_PARAMS[3:]]].abs().sum(axis=1))
    fd.iloc[0] = np.nan
    table["framewise_displacement"] = fd
    return table


def cosine_drifts(n_volumes, tr, cutoff_s=128.0):
    """fMRIPrep's discrete cosine high-pass basis (periods longer than cutoff_s). (T, K), K >= 1."""
    n_basis = max(1, int(np.floor(2 * n_volumes * tr / cutoff_s)))
    t = np.arange(n_volumes)
    return np.stack([np.sqrt(2 / n_volumes) * np.cos(np.pi * (t + 0.5) * k / n_volumes)
                     for k in range(1, n_basis + 1)], 1)


def synthesize_bold(signals, confounds, drifts, atlas, mask, planted, gains, rng, button_rng):
    """Voxel time series (X, Y, Z, T) float32 in scanner units (mean ~ 600 in the brain, 0 outside).

    Each component is in percent signal change before scaling: planted property (gain ~ 1.2 % per
    unit), parcel-shared AR(1) noise, voxel white noise, a motion artefact, a slow drift, and a
    brighter first (non-steady-state) volume. signals (T, 9) has the columns ALL_PROPERTIES;
    planted maps a label to one of them. The voxel gains of button parcels come from button_rng,
    so that the visual parcels and the noise are what they would be without them.
    """
    n_volumes = len(signals)
    labels = atlas[mask]                                                     # (V,)
    n_vox = labels.size
    percent = np.zeros((n_volumes, n_vox))                                   # (T, V)
    for label, prop in planted.items():
        in_parcel = labels == label
        draw = button_rng if prop in BUTTON_PROPERTIES else rng
        voxel_gain = gains[label] * draw.uniform(0.7, 1.3, in_parcel.sum())
        percent[:, in_parcel] += signals[:, [ALL_PROPERTIES.index(prop)]] * voxel_gain
    shared = np.zeros((n_volumes, atlas.max() + 1))
    innovations = rng.normal(0, 0.6, shared.shape)
    for t in range(n_volumes):
        shared[t] = 0.5 * shared[t - 1] + innovations[t] if t else innovations[t]
    percent += shared[:, labels] + rng.normal(0, 1.0, (n_volumes, n_vox))
    motion = confounds[list(MOTION_PARAMS)].to_numpy()                      # (T, 6)
    motion = (motion - motion.mean(0)) / (motion.std(0) + 1e-12)
    # Artefacts shared within a parcel (so they survive parcel averaging) plus a voxel-specific
    # part.
    motion_loading = (rng.normal(0, 2.0, (6, atlas.max() + 1))[:, labels]
                      + rng.normal(0, 1.0, (6, n_vox)))
    percent += motion @ motion_loading
    drift_loading = rng.normal(0, 8.0, (drifts.shape[1], atlas.max() + 1))[:, labels]
    percent += drifts @ (drift_loading + rng.normal(0, 2.0, drift_loading.shape))
    baseline = rng.uniform(400, 800, n_vox)
    voxels = baseline * (1 + percent / 100)
    voxels[0] *= 1.6  # T1 saturation not yet reached: fMRIPrep flags non_steady_state_outlier00
    bold = np.zeros(mask.shape + (n_volumes,), np.float32)
    bold[mask] = voxels.T
    return bold


# --------------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------------
def plan_runs(args):
    """Every run with its repetitions, onsets and recording jobs. List of dicts."""
    runs = []
    for s in range(1, args.subjects + 1):
        for ses in range(1, sessions_of(args, s) + 1):
            for r in range(1, args.runs + 1):
                sub, run = f"{s:02d}", f"{r:02d}"
                ses_label = None if args.no_sessions else f"{ses:03d}"
                rng = np.random.default_rng(seed_for(args.seed, "onsets", sub, ses_label, run))
                stem = run_stem(sub, ses_label, TASK, run)
                onset, reps = float(np.round(rng.uniform(1.5, 3.0), 3)), []
                for k in range(1, args.reps + 1):
                    bk2 = f"{run_folder(sub, ses_label)}/gamelogs/{stem}_level-1_rep-{k:02d}.bk2"
                    reps.append({"bk2": bk2, "onset": onset,
                                 "seed": seed_for(args.seed, "policy", sub, ses_label, run, k),
                                 "n_steps": int(args.rep_seconds * GAMEPLAY_HZ)})
                    onset += args.rep_seconds + float(np.round(rng.uniform(2.0, 4.0), 3))
                runs.append({"sub": sub, "ses": ses_label, "run": run, "stem": stem, "reps": reps})
    return runs


def sessions_of(args, subject):
    """The number of sessions of subject `subject` (1, 2 ...): --sessions, one for all or per
    subject."""
    return args.sessions[0] if len(args.sessions) == 1 else args.sessions[subject - 1]


def choose_planted(args):
    """Which parcels carry what: ({label: visual property}, {label: button property}). The button
    parcels are drawn among the others with a seed of their own, so that the visual ones are what
    they were before button parcels existed."""
    rng = np.random.default_rng(seed_for(args.seed, "planted"))
    planted_labels = sorted(rng.choice(np.arange(1, args.parcels + 1), args.planted,
                                       replace=False).tolist())
    planted = {label: PROPERTIES[i % len(PROPERTIES)] for i, label in enumerate(planted_labels)}
    rng = np.random.default_rng(seed_for(args.seed, "planted buttons"))
    others = [label for label in range(1, args.parcels + 1) if label not in planted]
    chosen = rng.choice(others, args.planted_buttons, replace=False).tolist()
    return planted, {label: BUTTON_PROPERTIES[0] for label in sorted(chosen)}


def write_demo(args, root):
    """The dataset under root: the replays, the atlas, and for every run its events.tsv,
    ground-truth signals and fMRIPrep outputs; then ground_truth.json (main writes demo.json)."""
    runs = plan_runs(args)
    # The real data has "Missing file" rows (lost replays): drop the 2nd repetition of the 2nd
    # run recorded (or the last one of a tiny demo). Its gameplay still drives the BOLD, as in
    # real life.
    missing_run = runs[min(1, len(runs) - 1)]
    missing_rep = missing_run["reps"][min(1, len(missing_run["reps"]) - 1)]
    missing_rep["missing"] = True
    props = record_replays(runs, root, args.workers)

    # --- brain, atlas, which parcels carry what, and how strongly in each subject ---
    brain = make_brain(args.parcels, args.seed)                   # affine, mask, atlas
    planted, planted_buttons = choose_planted(args)
    carried = {**planted, **planted_buttons}             # {label: property}: visual, then buttons
    write_atlas(root, brain, args.parcels, args.parcel_outside_fov)
    subjects = sorted({run["sub"] for run in runs})
    gains = {sub: {label: np.random.default_rng(seed_for(args.seed, "gain", sub, label))
                   .uniform(1.0, 1.5) for label in carried} for sub in subjects}

    # --- one run at a time: events.tsv, ground-truth signals, BOLD, mask, confounds ---
    (root / "ground_truth").mkdir()
    for run in runs:
        reps = [dict(rep, props=props[str(root / rep["bk2"])]) for rep in run["reps"]]
        write_events(root, run, reps)
        signals = write_signals(root, run, reps, args.tr)                          # (T, 9)
        bold, confounds, n_cosines = synthesize_run(args, run, signals, brain, carried,
                                                    gains[run["sub"]])
        write_fmriprep(root, run, bold, confounds, n_cosines, brain, args.tr)

    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "Airstriker demo (synthetic fMRI, real stable-retro replays)",
         "BIDSVersion": "1.9.0", "DatasetType": "raw",
         "GeneratedBy": [{"Name": "00_make_demo.py"}]}, indent=1))
    truth = ground_truth(args, planted, planted_buttons, gains, missing_rep["bk2"], subjects)
    (root / "ground_truth.json").write_text(json.dumps(truth, indent=1))


def write_movie_demo(args, root):
    """--stimuli movie (movie_demo.py): the videos, then, as write_demo, every run's events.tsv,
    ground-truth signals and fMRIPrep outputs, and the same runs in the Algonauts layout."""
    runs = movie_demo.plan_runs(args, seed_for)
    props = movie_demo.record_videos(args, root, visual_properties, seed_for)
    brain = make_brain(args.parcels, args.seed)
    planted, _ = choose_planted(args)
    write_atlas(root, brain, args.parcels, args.parcel_outside_fov)
    subjects = sorted({run["sub"] for run in runs})
    gains = {sub: {label: np.random.default_rng(seed_for(args.seed, "gain", sub, label))
                   .uniform(1.0, 1.5) for label in planted} for sub in subjects}
    (root / "ground_truth").mkdir()
    series = []
    for run in runs:
        reps = [dict(rep, props=props[str(root / rep["bk2"])]) for rep in run["reps"]]
        movie_demo.write_events(root, run, reps)
        signals = write_signals(root, run, reps, args.tr)                          # (T, 9)
        bold, confounds, n_cosines = synthesize_run(args, run, signals, brain, planted,
                                                    gains[run["sub"]])
        write_fmriprep(root, run, bold, confounds, n_cosines, brain, args.tr)
        series.append((run, movie_demo.parcel_series(bold, confounds, brain[2], args.parcels)))
    movie_demo.write_algonauts(root, series, brain)
    (root / "dataset_description.json").write_text(json.dumps(
        {"Name": "Movie demo (synthetic fMRI, synthetic 'Friends' videos)", "BIDSVersion": "1.9.0",
         "DatasetType": "raw", "GeneratedBy": [{"Name": "00_make_demo.py --stimuli movie"}]},
        indent=1))
    truth = dict(ground_truth(args, planted, {}, gains, None, subjects), stimuli="movie",
                 task="one per chunk: s01e01a ...",
                 videos=sorted(movie_demo.video_path(c) for c in movie_demo.chunks(args.seasons)))
    del truth["game"]
    (root / "ground_truth.json").write_text(json.dumps(truth, indent=1))


def record_replays(runs, root, workers):
    """Record every repetition to its .bk2 under root, in `workers` processes (the slow part:
    ~1,500 emulator steps/s per process). Returns {bk2 path: properties (n_frames, 9)}."""
    jobs = [dict(rep, bk2=str(root / rep["bk2"])) for run in runs for rep in run["reps"]]
    for job in jobs:
        Path(job["bk2"]).parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        props = {job["bk2"]: p for job, p in pool.map(record_repetition, jobs)}
    return props


def write_atlas(root, brain, n_parcels, outside_fov):
    """atlas/<ATLAS_NAME>.nii.gz, the labels image of brain = make_brain(...), and its .tsv. With
    outside_fov, the atlas reaches OUTSIDE_SLICES slices below the BOLD grid, where parcel
    n_parcels + 1 lies."""
    affine, _, atlas = brain
    if outside_fov:
        below = np.zeros((*atlas.shape[:2], OUTSIDE_SLICES), np.int32)
        x, y = (n // 2 for n in atlas.shape[:2])
        below[x - 2:x + 2, y - 2:y + 2, :] = n_parcels + 1
        atlas = np.concatenate([below, atlas], axis=2)
        affine = affine.copy()
        affine[2, 3] -= OUTSIDE_SLICES * VOXEL_MM
    labels = range(1, n_parcels + 1 + outside_fov)
    atlas_dir = root / "atlas"
    atlas_dir.mkdir(parents=True)
    nib.save(nib.Nifti1Image(atlas, affine), atlas_dir / f"{ATLAS_NAME}.nii.gz")
    write_tsv(atlas_dir / f"{ATLAS_NAME}.tsv",
              {"index": labels, "name": [f"parcel-{i:02d}" for i in labels]})


def write_events(root, run, reps):
    """The run's events.tsv, one row per repetition (reps: with their properties `props`); the
    replay of the repetition marked missing is deleted, its row says "Missing file"."""
    sub, ses, stem = run["sub"], run["ses"], run["stem"]
    events = pd.DataFrame({
        "trial_type": "gym-retro_game",
        "onset": [rep["onset"] for rep in reps],
        "duration": [len(rep["props"]) / GAMEPLAY_HZ for rep in reps],
        "duration_bk2": [len(rep["props"]) / GAMEPLAY_HZ for rep in reps],
        "level": "1",
        "stim_file": ["Missing file" if rep.get("missing") else rep["bk2"] for rep in reps],
    })
    func = root / run_folder(sub, ses) / "func"
    func.mkdir(parents=True, exist_ok=True)
    write_tsv(func / f"{stem}_events.tsv", events)
    for rep in reps:
        if rep.get("missing"):
            (root / rep["bk2"]).unlink()


def write_signals(root, run, reps, tr):
    """The planted signals of the run, (T, 9) z-scored, columns ALL_PROPERTIES, also written to
    ground_truth/<run>_signals.tsv (visual) and <run>_buttons.tsv. The run lasts until 8 s after
    its last repetition ends."""
    stem = run["stem"]
    last_offset = max(rep["onset"] + len(rep["props"]) / GAMEPLAY_HZ for rep in reps)
    n_volumes = int(np.ceil((last_offset + 8.0) / tr))  # 8 s tail: the HRF of the last seconds
    signals = planted_signals(run_timeline(reps, n_volumes, tr), n_volumes, tr)
    table = pd.DataFrame(signals, columns=ALL_PROPERTIES).round(6)
    write_tsv(root / "ground_truth" / f"{stem}_signals.tsv", table[list(PROPERTIES)])
    write_tsv(root / "ground_truth" / f"{stem}_buttons.tsv", table[list(BUTTON_PROPERTIES)])
    return signals


def synthesize_run(args, run, signals, brain, planted, gains):
    """One run's BOLD (X, Y, Z, T) float32 and its fMRIPrep confounds (DataFrame (T, .): motion,
    cosine drifts, global signal, CSF, white matter, the non-steady-state volume), from its planted
    signals (T, 9), with the run's own seeds; and the number of cosine regressors. planted
    {label: property}, gains {label: percent per unit} of the run's subject."""
    _, mask, atlas = brain
    n_volumes = len(signals)
    rng = np.random.default_rng(seed_for(args.seed, "bold", run["sub"], run["ses"], run["run"]))
    button_rng = np.random.default_rng(seed_for(args.seed, "button voxels", run["sub"],
                                                run["ses"], run["run"]))
    confounds = motion_confounds(n_volumes, rng)
    drifts = cosine_drifts(n_volumes, args.tr)
    bold = synthesize_bold(signals, confounds, drifts, atlas, mask, planted, gains, rng,
                           button_rng)
    for k, col in enumerate(drifts.T):
        confounds[f"cosine{k:02d}"] = col
    voxels = bold[mask]                                                      # (V, T)
    confounds["global_signal"] = voxels.mean(0)
    confounds["csf"] = rng.normal(600, 5, n_volumes)
    confounds["white_matter"] = rng.normal(600, 5, n_volumes)
    confounds["non_steady_state_outlier00"] = (np.arange(n_volumes) == 0).astype(float)
    return bold, confounds, drifts.shape[1]


def write_fmriprep(root, run, bold, confounds, n_cosines, brain, tr):
    """The run's fMRIPrep derivatives: preprocessed BOLD (+ .json), brain mask, confounds (+ .json
    describing the n_cosines cosine regressors)."""
    affine, mask, _ = brain
    stem = run["stem"]
    deriv = root / "derivatives/fmriprep" / run_folder(run["sub"], run["ses"]) / "func"
    deriv.mkdir(parents=True, exist_ok=True)
    prefix = f"{stem}_space-{SPACE}"
    image = nib.Nifti1Image(bold, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.header["pixdim"][4] = tr
    nib.save(image, deriv / f"{prefix}_desc-preproc_bold.nii.gz")
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine),
             deriv / f"{prefix}_desc-brain_mask.nii.gz")
    (deriv / f"{prefix}_desc-preproc_bold.json").write_text(
        json.dumps({"RepetitionTime": tr, "TaskName": run.get("task", TASK),
                    "SkullStripped": False}, indent=1))
    write_tsv(deriv / f"{stem}_desc-confounds_timeseries.tsv", confounds.round(8))
    (deriv / f"{stem}_desc-confounds_timeseries.json").write_text(json.dumps(
        {f"cosine{k:02d}": {"Method": "Discrete cosine basis", "Cutoff": 128.0}
         for k in range(n_cosines)}, indent=1))


def ground_truth(args, planted, planted_buttons, gains, missing_bk2, subjects):
    """ground_truth.json: which parcels carry which property (planted: visual; planted_buttons:
    the B presses), with which gain in each subject, how the signals were made, the lost replay."""
    return {
        "game": GAME, "task": TASK, "tr_s": args.tr, "seed": args.seed,
        "atlas": f"atlas/{ATLAS_NAME}.nii.gz",
        "properties": {
            **{f"luminance_{q}": f"mean luminance (0.299 R + 0.587 G + 0.114 B, in [0, 1]) of the "
                                 f"{q.replace('_', ' ')} quadrant of the 224 x 320 screen"
               for q in QUADRANTS},
            **{f"motion_{q}": f"mean absolute luminance change from the previous 60 Hz frame, "
                              f"{q.replace('_', ' ')} quadrant" for q in QUADRANTS}},
        "signal_model": "property on the run's 60 Hz timeline (0 = black screen), convolved with "
                        "nilearn's Glover HRF, sampled at (t + 0.5) * TR, z-scored per run; "
                        "ground_truth/<run>_signals.tsv",
        "planted": {str(label): prop for label, prop in planted.items()},
        "planted_gain_percent": {sub: {str(k): round(g[k], 4) for k in planted}
                                 for sub, g in gains.items()},
        # apart from "planted" (the visual parcels, whose recovery 06 and 07 report); not noise
        "button_properties": {
            "presses_B": "presses of B (fire): 1 in each 60 Hz frame where B is held and was not "
                         "in the frame before (frame 0 of a repetition counts), else 0 (and 0 "
                         "outside gameplay); same signal model; ground_truth/<run>_buttons.tsv"},
        "planted_buttons": {str(label): prop for label, prop in planted_buttons.items()},
        "planted_buttons_gain_percent": {sub: {str(k): round(g[k], 4) for k in planted_buttons}
                                         for sub, g in gains.items()},
        "noise_parcels": [label for label in range(1, args.parcels + 1)
                          if label not in planted and label not in planted_buttons],
        "outside_fov": [args.parcels + 1] if args.parcel_outside_fov else [],
        "missing_file": missing_bk2,
        "non_steady_state_volumes": [0],
        "subjects": subjects,
    }


def check_flags(args):
    """The flags, after checking the values argparse cannot (InputError otherwise), with --sessions
    filled in: 5, or 1 without a session level; the defaults of --stimuli movie."""
    movie = args.stimuli == "movie"
    args.rep_seconds = args.rep_seconds or (60.0 if movie else 20.0)
    args.planted_buttons = (0 if movie else 1) if args.planted_buttons is None else \
        args.planted_buttons
    if movie and (args.planted_buttons or args.no_sessions or args.sessions):
        raise InputError("--stimuli movie: a movie has no buttons (--planted-buttons 0), and "
                         "every subject watches every chunk, --runs per session (no --sessions, "
                         "--no-sessions)")
    if args.seasons < 1:
        raise InputError(f"--seasons {args.seasons}: must be at least 1")
    if args.planted > args.parcels:
        raise InputError(f"--planted {args.planted} is more than --parcels {args.parcels}")
    if not 0 <= args.planted_buttons <= args.parcels - args.planted:
        raise InputError(f"--planted-buttons {args.planted_buttons}: must be 0 to --parcels minus "
                         f"--planted ({args.parcels - args.planted})")
    if args.no_sessions and args.sessions not in (None, [1]):
        raise InputError("--no-sessions: a dataset without a session level has one session's "
                         "runs: leave --sessions out")
    args.sessions = args.sessions or [1 if args.no_sessions else 5]
    if min(args.subjects, *args.sessions, args.runs, args.reps) < 1 or args.rep_seconds <= 0:
        raise InputError("--subjects, --sessions, --runs, --reps and --rep-seconds "
                         "must be positive")
    if len(args.sessions) not in (1, args.subjects):
        raise InputError(f"--sessions {' '.join(map(str, args.sessions))}: one number, or one per "
                         f"subject ({args.subjects})")
    return args


def demo_settings(args):
    """The flags that shape the demo, recorded in demo.json: a demo made with other flags is not
    reused (one made before --planted-buttons existed lacks it: "made with --planted-buttons
    (unset)", to be remade with --overwrite). The variants' flags are recorded when set, and one
    --sessions as a number, so that the demos made before them stay valid."""
    settings = {f"--{k.replace('_', '-')}": getattr(args, k) for k in
                ("seed", "subjects", "sessions", "runs", "reps", "rep_seconds", "tr", "parcels",
                 "planted", "planted_buttons")}
    settings.update({f"--{k.replace('_', '-')}": True for k in ("parcel_outside_fov", "no_sessions")
                     if getattr(args, k)})
    if args.stimuli == "movie":
        settings.update({"--stimuli": "movie", "--seasons": args.seasons})
        del settings["--reps"], settings["--sessions"]
    if len(args.sessions) == 1:
        settings["--sessions"] = args.sessions[0]
    return settings


def main():
    args = check_flags(parse_args())
    root = Path(args.out) if args.out else Path(args.work) / "demo"
    settings = demo_settings(args)
    if root.exists() and not args.overwrite:
        record = common.read_record(root / "demo.json")
        if record is None:
            raise InputError(f"{root}: exists but has no demo.json (made by an older "
                             "00_make_demo.py, or not a demo): --overwrite to remake it")
        changed = common.changed_settings(record, settings)
        if changed:
            raise common.flags_differ_error(root, record, settings, changed)
        print(f"{root} exists, made with these flags: nothing to do (--overwrite to remake it)")
        return
    # Build in a temporary folder and rename at the end: a demo folder that exists is complete.
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        (write_movie_demo if args.stimuli == "movie" else write_demo)(args, tmp)
        common.write_json(tmp / "demo.json", {"stage": "00_make_demo", "settings": settings})
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    truth = json.loads((root / "ground_truth.json").read_text())
    n_bk2 = len(list(root.glob("sub-*/**/gamelogs/*.bk2")) + list(root.glob("stimuli/**/*.mkv")))
    print(f"demo written to {root}: {len(truth['subjects'])} subject(s), {n_bk2} "
          f"{'videos' if args.stimuli == 'movie' else 'replays'}, "
          f"{len(truth['planted'])} planted parcels of {args.parcels} "
          f"(+ {len(truth['planted_buttons'])} following the button presses)")


if __name__ == "__main__":
    run_main(main)
