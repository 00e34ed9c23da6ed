"""01 — Render gameplay frames from .bk2 replays with stable-retro (paper section 2.2).

    python 01_render_frames.py --work work                          # the demo: <work>/demo
    python 01_render_frames.py --work work --bids /data/shinobi --resolution 64 --workers 8
    python 01_render_frames.py --work work --bk2 a.bk2 b.bk2    # explicit replays, no events.tsv
    python 01_render_frames.py --work work --algonauts /data/algonauts_2025.competitors   # movies
    sbatch slurm/cpu_stage.sbatch \
        01_render_frames.py --work work --bids /data/shinobi    # SLURM, CPU only

Each repetition is replayed exactly: every 60 Hz emulator step, with the recorded keys. The whole
224 x 320 screen is squashed (aspect ratio not kept) to a square --resolution by box averaging, and
saved as one uint8 array (N, H, W, 3) per repetition, beside the keys held for each frame:

    <work>/frames/<sub>/<ses>/<bk2 stem>.npy          uint8 (N, H, W, 3): frame i
    <work>/frames/<sub>/<ses>/<bk2 stem>.buttons.npy  uint8 (N, B), 0 or 1: the input that made
        frame i, a column per button (B = 12 on the Genesis: B A MODE START UP DOWN LEFT
        RIGHT C Y X Z)
    <work>/frames/<sub>/<ses>/<bk2 stem>.json         the record of both; `buttons` names columns
    <work>/frames/manifest.tsv      one row per repetition (docs/CONTRACT.md)

05_extract.py --features buttons turns the keys into features per fMRI volume: the button presses
drive motor and somatosensory cortex whatever the screen shows.

First-step convention (the same as stable-retro's playback_movie.py): a bk2 starts with the save
state and one input that stable-retro's reset() consumes; frame i (0-based) is the screen after the
emulator has applied the (i+1)-th recorded input, and row i of the buttons array is that input. A
bk2 of K movie steps gives N = K - 1 frames, so a replay recorded for n env.step() calls gives
exactly those n screens and the n actions passed to env.step().

Videos (an events.tsv stim_file ending in .mkv, .mp4, .mov, .avi or .webm; --algonauts ROOT: the
video of every run of the Algonauts 2025 release, algonauts.py) are decoded with PyAV instead
(video_frames.py): each frame squashed as a screen is, stored at every 60 Hz tick where it is shown,
once per video in frames/videos/<its path>.npy; no buttons. A bad video is a failed row.

Bad input never stops the batch: a corrupt bk2, a missing replay, a game whose ROM is not imported
are recorded in the manifest (status failed/missing, with the reason) and reported; the exit status
is 1 if any replay failed, unless --allow-missing. "Missing file" rows of events.tsv (lost replays,
as in the real dataset) are reported and kept in the manifest as status missing; they are not
failures.
"""
import argparse
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

import common
from paper.alignment import GAMEPLAY_HZ
import video_frames
from common import (DEFAULT_WORK, InputError, bids_entities, read_tsv, run_main,
                    write_tsv)

STAGE = "01_render_frames"
MISSING = "Missing file"
MANIFEST_COLUMNS = ["sub", "ses", "task", "run", "level", "rep", "bk2", "onset_s", "duration_s",
                    "n_frames", "fps", "frames_path", "buttons_path", "status", "error"]
BUTTONS_SUFFIX = ".buttons.npy"   # <bk2 stem>.buttons.npy beside the frames, in <bk2 stem>.json
VIDEO_SHORT_S = 0.5   # a video shorter than its events.tsv duration by more: a failed row


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--bids", default=None,
                   help="BIDS root with events.tsv and bk2 files (default: <work>/demo)")
    p.add_argument("--bk2", nargs="+", default=None,
                   help="replay these .bk2 files instead of a BIDS root")
    p.add_argument("--algonauts", metavar="ROOT", default=None,
                   help="the Algonauts 2025 release (its fmri/ and stimuli/movies/): decode the "
                        "video of every run its .h5 files hold, instead of a BIDS root")
    p.add_argument("--subjects", nargs="+", default=None,
                   help="only these subject labels, e.g. 01 02")
    p.add_argument("--resolution", type=int, default=128,
                   help="output frames are resolution x resolution")
    p.add_argument("--workers", type=int, default=common.available_cpus(),
                   help="replaying processes (each runs one emulator; default: the CPUs this job "
                        "may use)")
    p.add_argument("--overwrite", action="store_true",
                   help="re-render repetitions that already have frames")
    p.add_argument("--allow-missing", action="store_true",
                   help="exit 0 even when some replays could not be rendered")
    return p.parse_args()


# --------------------------------------------------------------------------------------------------
# Replay (paper section 2.2): emulate every recorded input, keep every screen, squash it to a square
# --------------------------------------------------------------------------------------------------
# one emulator per process (stable-retro allows only one at a time)
_ENV = {"game": None, "env": None}


def emulator_for(game):
    """The process's emulator for `game`, created once and reused across repetitions."""
    import stable_retro as retro

    if _ENV["game"] != game:
        if _ENV["env"] is not None:
            _ENV["env"].close()
            _ENV["env"] = None
        try:
            retro.data.get_romfile_path(game)
        except FileNotFoundError:
            raise InputError(f"the ROM of {game} is not imported into stable-retro; import it with "
                             f"`python -m stable_retro.import DIR_WITH_ROMS`") from None
        _ENV["env"] = retro.make(game=game, state=retro.State.NONE,
                                 use_restricted_actions=retro.Actions.ALL, render_mode=None)
        _ENV["game"] = game
    return _ENV["env"]


def squash(screen, resolution):
    """(224, 320, 3) uint8 -> (resolution, resolution, 3) uint8 with PIL's BOX filter: each output
    pixel is the mean of the screen pixels whose centres fall in its footprint (1.75 x 2.5 pixels at
    128 px), so every screen pixel counts once, without the aliasing of point or bilinear
    sampling."""
    return np.asarray(Image.fromarray(screen).resize((resolution, resolution), Image.BOX))


class Replay(NamedTuple):
    """One repetition as replay() gives it: its N frames and the input that made each of them."""
    frames: np.ndarray   # uint8 (N, resolution, resolution, 3), a memmap when written to a file
    buttons: np.ndarray  # uint8 (N, players x B): 1 where button b was held during frame i's step
    names: list          # the column names, stable-retro's ("B", "UP" ...); "P2 B" ... for player 2


def read_movie(bk2_path):
    """Open a bk2 and read every recorded input: (the process's emulator for its game, set to start
    from the movie's save state, and uint8 (N, players, B) where row i is the input that makes
    frame i).

    The movie's first input is consumed by reset() (see the module docstring), so N = K - 1 for a
    movie of K steps. A bad replay (missing, corrupt, empty, a ROM not imported): InputError."""
    import stable_retro as retro

    bk2_path = Path(bk2_path)
    if not bk2_path.is_file():
        raise InputError(f"{bk2_path}: file not found")
    try:
        movie = retro.Movie(str(bk2_path))
    except RuntimeError:
        raise InputError(f"{bk2_path}: corrupt or truncated bk2 "
                         "(stable-retro could not load the movie)") from None
    movie.step()   # the input that reset() consumes
    try:
        env = emulator_for(movie.get_game())
    except InputError as err:
        raise InputError(f"{bk2_path}: {err}") from None
    if movie.players != env.players:
        raise InputError(f"{bk2_path}: {movie.players}-player movie, "
                         f"emulator set up for {env.players}")
    env.initial_state = movie.get_state()
    keys = []
    while movie.step():
        keys.append([[movie.get_key(b, p) for b in range(env.num_buttons)]
                     for p in range(movie.players)])
    if not keys:
        raise InputError(f"{bk2_path}: the replay holds no gameplay input")
    return env, np.array(keys, np.uint8)


def replay(bk2_path, resolution, out_path=None, final=None):
    """Replay one .bk2: a Replay of its frames, uint8 (N, resolution, resolution, 3), and of the
    input that made each frame, uint8 (N, players x B).

    With out_path, frames are written straight into a memory-mapped .npy there (long repetitions do
    not need to fit in RAM) and the frames returned are that memmap; `final` names it in errors. A
    bad replay is an InputError; a file that cannot be written, an OSError.
    """
    env, keys = read_movie(bk2_path)
    env.reset()
    n_frames, players, n_buttons = keys.shape
    shape = (n_frames, resolution, resolution, 3)
    frames = (common.open_npy_for_writing(out_path, np.uint8, shape, final) if out_path
              else np.empty(shape, np.uint8))
    em = env.em
    for i in range(n_frames):
        for p in range(players):
            em.set_button_mask(keys[i, p], p)
        em.step()  # exactly what RetroEnv.step does to the emulator, without the reward bookkeeping
        frames[i] = squash(em.get_screen(), resolution)
    if out_path:
        frames.flush()
    names = list(env.buttons) if players == 1 else \
        [f"P{p + 1} {b}" for p in range(players) for b in env.buttons]
    return Replay(frames, keys.reshape(n_frames, players * n_buttons), names)


def render_repetition(task):
    """Worker: render one repetition to its .npy and its inputs to .buttons.npy (each atomically),
    then the record of both; a video's frames alone (render_video). Returns the manifest row."""
    rep, out, resolution, settings, inputs = task
    out = Path(out)
    if video_frames.is_video(rep["bk2"]):
        return render_video(rep, out, resolution, settings, inputs)
    buttons = buttons_path_for(out)
    row = dict(rep, n_frames=np.nan, fps=GAMEPLAY_HZ, frames_path=str(out),
               buttons_path=str(buttons), status="ok", error=np.nan)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = common.temporary_path(out)
    try:
        try:
            rendered = replay(rep["bk2"], resolution, out_path=tmp, final=out)
        except InputError as err:   # a bad replay: a failed row, and the batch goes on
            return dict(row, status="failed", error=str(err), frames_path=np.nan,
                        buttons_path=np.nan)
        row["n_frames"], names = len(rendered.frames), rendered.names
        common.save_npy(buttons, rendered.buttons)   # a write that fails (full disk): InputError
        del rendered                # closes the frames' memory map
        os.replace(tmp, out)        # a write that fails (full disk) stops the stage: OSError
        # one record for both files: `output` is the frames (what 03 and 04 fingerprint), `outputs`
        # the inputs, so that a damaged or deleted buttons file is rendered again too
        details = dict(n_frames=row["n_frames"], bk2=rep["bk2"],
                       stable_retro=version("stable-retro"), buttons=names,
                       outputs={buttons.name: common.hash_file(buttons)})
        common.write_record(out, common.new_record(STAGE, settings, inputs, out, **details))
    finally:
        tmp.unlink(missing_ok=True)
    return check_duration(row)


def render_video(rep, out, resolution, settings, inputs):
    """Worker: decode one video onto the run's 60 Hz timeline (video_frames: the frame shown at
    every 1/60 s tick, each squashed as a replay's screen) into its .npy atomically, then its
    record. A bad video is a failed row. Returns the manifest row, `fps` the video's own rate."""
    row = dict(rep, n_frames=np.nan, fps=np.nan, frames_path=str(out), buttons_path=np.nan,
               status="ok", error=np.nan)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = common.temporary_path(out)
    try:
        try:
            short = too_short(rep, video_frames.read_timeline(rep["bk2"]).n_ticks / GAMEPLAY_HZ)
            if short:   # said before any frame is written
                raise InputError(short)
            frames, timeline = video_frames.decode_on_timeline(rep["bk2"], resolution, squash,
                                                               out_path=tmp, final=out)
        except InputError as err:
            return dict(row, status="failed", error=str(err), frames_path=np.nan)
        row.update(n_frames=len(frames), fps=float(timeline.fps))
        del frames                  # closes the memory map
        os.replace(tmp, out)
        details = dict(n_frames=row["n_frames"], bk2=rep["bk2"], fps=row["fps"],
                       frame_rate=str(timeline.fps), video_frames=timeline.n_frames,
                       video_size=[timeline.width, timeline.height], codec=timeline.codec,
                       av=version("av"))
        common.write_record(out, common.new_record(STAGE, settings, inputs, out, **details))
    finally:
        tmp.unlink(missing_ok=True)
    return check_duration(row)


def check_duration(row):
    """Flag a rendered repetition whose length disagrees with events.tsv's duration_bk2 by over
    1 s; a video shorter than events.tsv's duration (by over VIDEO_SHORT_S) fails: the run would
    show black where the events say the movie plays."""
    expected = row.get("duration_s")
    short = row["status"] == "ok" and too_short(row, row["n_frames"] / GAMEPLAY_HZ)
    if short:
        return dict(row, status="failed", frames_path=np.nan, error=short)
    if (row["status"] == "ok" and pd.notna(expected)
            and abs(row["n_frames"] / GAMEPLAY_HZ - expected) > 1.0):
        row["error"] = (f"warning: {row['n_frames']} frames = "
                        f"{row['n_frames'] / GAMEPLAY_HZ:.1f} s, "
                        f"events.tsv says duration_bk2 = {expected:.1f} s")
    return row


def too_short(rep, lasts):
    """What is wrong with a video that lasts `lasts` seconds, shorter than the duration its
    events.tsv gives (by over VIDEO_SHORT_S), or None."""
    expected = rep.get("duration_s")
    if (video_frames.is_video(rep["bk2"]) and pd.notna(expected)
            and lasts < expected - VIDEO_SHORT_S):
        return (f"{rep['bk2']}: the video lasts {lasts:.2f} s, shorter than the {expected:.2f} s "
                f"of {rep.get('source', 'events.tsv')}")
    return None


def plan_repetition(rep, work, resolution, overwrite):
    """What to do with one repetition: ("row", manifest row) when nothing needs rendering (a
    "Missing file" row, or frames whose record says they came from this bk2 at this --resolution),
    else ("render", the task for render_repetition). Frames of another --resolution are an
    InputError."""
    if rep["bk2"] == MISSING:
        return "row", dict(rep, n_frames=np.nan, fps=GAMEPLAY_HZ, frames_path=np.nan,
                           buttons_path=np.nan, status="missing",
                           error=f"{rep['source']} says '{MISSING}': no replay to render")
    out = frames_path_for(rep, work)
    settings = {"--resolution": resolution}
    record = common.read_record(common.record_path(out))
    inputs = {}
    if Path(rep["bk2"]).is_file():   # a missing replay fails in the worker, with its message
        inputs["bk2"] = common.fingerprint(rep["bk2"], (record or {}).get("inputs", {}).get("bk2"))
    if common.is_up_to_date(out, record, STAGE, settings, inputs, overwrite,
                            say=lambda line: tqdm.write(line)):
        if video_frames.is_video(rep["bk2"]):   # no inputs: a movie has no buttons
            return "row", check_duration(dict(rep, n_frames=record["n_frames"], fps=record["fps"],
                                              frames_path=str(out), buttons_path=np.nan,
                                              status="ok", error=np.nan))
        buttons = buttons_path_for(out)
        if buttons.name in record.get("outputs", {}):   # is_up_to_date checked that file too
            return "row", check_duration(dict(rep, n_frames=record["n_frames"], fps=GAMEPLAY_HZ,
                                              frames_path=str(out), buttons_path=str(buttons),
                                              status="ok", error=np.nan))
        tqdm.write(f"{STAGE}: {out} was made without the player's inputs (an older 01): "
                   "rendering it again")
    return "render", (rep, str(out), resolution, settings, inputs)


# --------------------------------------------------------------------------------------------------
# The stage: plan every repetition, render the rest in parallel, write the manifest
# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    work = Path(args.work)
    if args.resolution < 8:
        raise InputError(f"--resolution {args.resolution}: must be at least 8")
    if args.bk2:
        reps = repetitions_from_files(args.bk2)
    elif args.algonauts:
        reps = repetitions_from_algonauts(args.algonauts, args.subjects)
    else:
        root = Path(args.bids) if args.bids else work / "demo"
        if not root.is_dir():
            raise InputError(f"{root}: dataset root does not exist "
                             "(run 00_make_demo.py, or pass --bids DIR)")
        reps = repetitions_from_bids(root, args.subjects)

    common.remove_stale_temporaries(work / "frames")
    # Every repetition is planned before any is rendered: a flag that disagrees with earlier frames
    # stops the stage here, with nothing written.
    plans = once_per_output([plan_repetition(rep, work, args.resolution, args.overwrite)
                             for rep in reps])
    tasks = [plan for kind, plan in plans if kind == "render"]
    workers = max(1, min(args.workers, len(tasks)))
    print(f"{STAGE}: {len(reps)} repetitions, {len(tasks)} to render at {args.resolution} px, "
          f"{workers} worker(s)")
    rows = render_all(plans, tasks, workers)
    # this call's replays decide the exit status
    n_failed = sum(row["status"] == "failed" for row in rows)
    manifest = write_manifest(rows, work, {rep["sub"] for rep in reps})
    counts = manifest["status"].value_counts().to_dict()
    print(f"{STAGE}: wrote {work / 'frames' / 'manifest.tsv'}: "
          + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    if n_failed and not args.allow_missing:
        print(f"error: {n_failed} replay(s) failed "
              "(see the manifest's error column; --allow-missing to accept)", file=sys.stderr)
        sys.exit(common.EXIT_SOME_FAILED)


def once_per_output(plans):
    """The plans with a repetition whose frames another one renders (one video shown in several
    runs: subjects, repeated movies) as ("same", (rep, output)): render_all copies that row."""
    rendering = set()
    for k, (kind, plan) in enumerate(plans):
        if kind == "render":
            rep, out = plan[0], plan[1]
            if out in rendering:
                plans[k] = ("same", (rep, out))
            rendering.add(out)
    return plans


def render_all(plans, tasks, workers):
    """The manifest row of every planned repetition, in order: the rows planned as they are, the
    `tasks` rendered by `workers` processes (a progress bar of frames; failures and warnings are
    said as they come)."""
    # the bar counts frames; its total comes from events.tsv's durations when every replay has one
    durations = [rep["duration_s"] for rep, *_ in tasks]
    expected = (round(GAMEPLAY_HZ * sum(durations)) if durations and all(pd.notna(durations))
                else None)
    rows, n_rendered, rendered_rows = [], 0, {}
    with ProcessPoolExecutor(max_workers=workers, initializer=common.limit_threads,
                             initargs=(workers,)) as pool, \
            tqdm(total=expected, unit="frame", unit_scale=True, desc="render", file=sys.stderr,
                 disable=not tasks) as bar:
        rendered = pool.map(render_repetition, tasks)
        for kind, plan in plans:
            if kind == "row":
                rows.append(plan)
                continue
            if kind == "same":   # the frames another repetition rendered, and their status
                rep, out = plan
                rows.append(check_duration(dict(rep, **{k: rendered_rows[out][k] for k in (
                    "n_frames", "fps", "frames_path", "buttons_path", "status", "error")})))
                continue
            row = next(rendered)
            rendered_rows[plan[1]] = row
            rows.append(row)
            n_rendered += 1
            bar.update(0 if pd.isna(row["n_frames"]) else int(row["n_frames"]))
            bar.set_postfix(reps=f"{n_rendered}/{len(tasks)}")
            if row["status"] != "ok" or str(row["error"]).startswith("warning"):
                tqdm.write(f"{row['status']}: {row['error']}", file=sys.stderr)
        bar.total = bar.n  # the durations are rounded: end at 100%
        bar.refresh()
    return rows


def write_manifest(rows, work, subjects):
    """frames/manifest.tsv: this call's rows (paths relative to work) and an earlier manifest's
    rows of other subjects. Returns the manifest written (a DataFrame)."""
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for column in ("frames_path", "buttons_path"):
        ok = manifest[column].notna()
        manifest.loc[ok, column] = [os.path.relpath(p, work) for p in manifest.loc[ok, column]]
    # one manifest for subjects rendered in separate calls, in the order one call over all of them
    # gives; read only now, so that jobs rendering other subjects at the same time have most likely
    # finished
    manifest_path = work / "frames" / "manifest.tsv"
    earlier = rows_of_other_subjects(manifest_path, subjects)
    manifest = pd.concat([earlier, manifest]) if len(earlier) else manifest
    manifest = manifest.sort_values("sub", kind="stable", na_position="last")
    manifest["n_frames"] = manifest["n_frames"].astype("Int64")
    write_tsv(manifest_path, manifest)
    return manifest


# --------------------------------------------------------------------------------------------------
# Which repetitions to render: events.tsv rows of a BIDS dataset, or an explicit list of bk2 files
# --------------------------------------------------------------------------------------------------
def repetitions_from_bids(root, subjects):
    """One dict per gameplay row of every sub-*/ses-*/func/*_events.tsv under root (or
    sub-*/func/*_events.tsv: BIDS without sessions)."""
    events_files = (sorted(root.glob("sub-*/ses-*/func/*_events.tsv"))
                    + sorted(root.glob("sub-*/func/*_events.tsv")))
    if not events_files:
        raise InputError(f"{root}: no sub-*/ses-*/func/*_events.tsv files, nor sub-*/func/... "
                         "without sessions (is this a BIDS dataset root?)")
    reps = []
    for events_path in events_files:
        run = bids_entities(events_path)
        if subjects and run.get("sub") not in subjects:
            continue
        events = read_tsv(events_path, required=("onset", "stim_file"))
        events = events[events["stim_file"].notna()]  # other event types have no replay
        for k, (_, row) in enumerate(events.iterrows(), start=1):
            stim = str(row["stim_file"])
            if stim != MISSING and not stim.endswith(".bk2") and not video_frames.is_video(stim):
                continue
            if pd.isna(row["onset"]):   # 05 could not place this repetition on the run's timeline
                raise InputError(f"{events_path}: row {k} ({Path(stim).name}) has onset n/a; "
                                 "every gameplay row needs its onset in seconds")
            bk2 = None if stim == MISSING else resolve_stim_file(stim, root, events_path)
            names = bids_entities(bk2) if bk2 else {}
            duration = row.get("duration_bk2", row.get("duration", np.nan))
            reps.append({
                "source": f"{events_path} row {k}",
                "sub": run.get("sub"), "ses": run.get("ses"), "task": run.get("task"),
                "run": run.get("run"), "level": row.get("level", names.get("level")),
                "rep": names.get("rep", f"{k:02d}"), "bk2": str(bk2) if bk2 else MISSING,
                "onset_s": row["onset"], "duration_s": duration,
                "video_key": video_key(bk2, root) if bk2 and video_frames.is_video(bk2) else None,
            })
    if subjects and not reps:
        raise InputError(f"{root}: no events.tsv for subject(s) {', '.join(subjects)}")
    return reps


def resolve_stim_file(stim, root, events_path):
    """stim_file is relative to the dataset root in CNeuroMod; also accept absolute paths and paths
    relative to the events file, never the current directory (another copy of the dataset may be
    there). A path that exists nowhere is kept (root-relative) and fails later."""
    candidates = [root / stim, events_path.parent / stim,    # root / an absolute path = that path
                  events_path.parent.parent / "gamelogs" / Path(stim).name]
    return next((c for c in candidates if c.is_file()), root / stim)


def video_key(path, root):
    """What names a video's frames: its path in the dataset root (else the absolute path), so that
    every run that shows it reads one copy and two videos never share one."""
    path = Path(path).absolute()
    inside = path.is_relative_to(Path(root).absolute())
    return str(path.relative_to(Path(root).absolute() if inside else path.anchor))


def repetitions_from_algonauts(root, subjects):
    """One repetition per run of the Algonauts 2025 release (algonauts.find_runs): its video, from
    the run's first volume (the challenge's convention)."""
    import algonauts

    return [{"source": f"{run['h5']} dataset {run['key']}", "sub": run["sub"], "ses": run["ses"],
             "task": run["task"], "run": run["run"], "level": None, "rep": "01",
             "bk2": str(run["video"]), "onset_s": 0.0, "duration_s": np.nan,
             "video_key": video_key(run["video"], root)}
            for run in algonauts.find_runs(Path(root), subjects, with_videos=True)]


def repetitions_from_files(paths):
    reps = []
    for path in paths:
        names = bids_entities(path)
        reps.append({"sub": names.get("sub"), "ses": names.get("ses"), "task": names.get("task"),
                     "run": names.get("run"), "level": names.get("level"), "rep": names.get("rep"),
                     "bk2": str(path), "onset_s": np.nan, "duration_s": np.nan})
    return reps


def frames_path_for(rep, work):
    """frames/<sub>/<ses>/<bk2 stem>.npy; a video's frames once for every run that shows it,
    frames/videos/<its path in the dataset, without suffix>.npy."""
    if rep.get("video_key"):
        return work / "frames" / "videos" / Path(rep["video_key"]).with_suffix(".npy")
    sub = f"sub-{rep['sub']}" if rep["sub"] else "sub-unknown"
    ses = f"ses-{rep['ses']}" if rep["ses"] else "ses-unknown"
    return work / "frames" / sub / ses / f"{Path(rep['bk2']).name.split('.')[0]}.npy"


def buttons_path_for(frames_path):
    """<bk2 stem>.buttons.npy beside <bk2 stem>.npy: common.record_path gives both one record."""
    return Path(frames_path).with_suffix(BUTTONS_SUFFIX)


# --------------------------------------------------------------------------------------------------
# Earlier calls: manifest rows of other subjects (plumbing)
# --------------------------------------------------------------------------------------------------
def rows_of_other_subjects(manifest_path, subjects):
    """Rows of an existing manifest for subjects outside this call (a DataFrame, maybe empty)."""
    if not manifest_path.is_file():
        return pd.DataFrame(columns=MANIFEST_COLUMNS)
    earlier = read_tsv(manifest_path)
    if "buttons_path" not in earlier.columns:   # written before 01 recorded the inputs: n/a there
        earlier.insert(MANIFEST_COLUMNS.index("buttons_path"), "buttons_path", np.nan)
    if list(earlier.columns) != MANIFEST_COLUMNS:
        raise InputError(f"{manifest_path}: not a manifest of this stage (columns differ); "
                         "delete it")
    return earlier[~earlier["sub"].fillna("").isin({s or "" for s in subjects})]


if __name__ == "__main__":
    run_main(main)
