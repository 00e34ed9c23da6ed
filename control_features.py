"""Feature sets without a model (beyond the paper), on the same windows as the GPT's: what the screen
shows (low-level vision: luminance and motion on a grid) and what the player does (the button
presses of a replay). 05_extract.py --features lowlevel / buttons writes them; the controls of 07
compare the GPT with them.
"""
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

import common
import video_frames
from common import InputError
from paper.alignment import gather_frames, window_frame_indices


LOWLEVEL_GRID = 8   # the screen as 8 x 8 regions


def lowlevel_rows(clips, grid=LOWLEVEL_GRID):
    """Model-free features of windows uint8 (B, window, H, W, 3): the luminance of every frame on a
    grid x grid of screen regions (mean gray level in [0, 1]), then the motion energy of each region
    (mean absolute difference of consecutive frames over the window).
    Returns float32 (B, window * grid^2 + grid^2)."""
    gray = clips.float().mean(dim=-1) / 255.0                              # (B, window, H, W)
    luminance = F.adaptive_avg_pool2d(gray, grid)                    # (B, window, grid, grid)
    change = (gray[:, 1:] - gray[:, :-1]).abs()                        # (B, window - 1, H, W)
    motion = F.adaptive_avg_pool2d(change, grid)                 # (B, window - 1, grid, grid)
    return torch.cat([luminance.flatten(1), motion.mean(dim=1).flatten(1)], dim=1)


def button_rows(run, window, frame_step, n_buttons):
    """float32 (n_volumes, 2 x B), B = n_buttons: for each button the fraction of the window's 60 Hz
    frames during which it is held, then for each button its number of presses there.

    The window of TR t is the span of every other feature set's clip window: the window x frame_step
    (128) 60 Hz frames ending with e_t = ceil((t + 1) x TR x 60) - 1, the 4 frames each clip frame
    stands for. A press is a frame where the button is held and was not in the frame before: it
    counts in the window that holds that frame, even as the window's first frame (the frame before
    is read too), and a button held since before the window is not pressed in it. Windows of
    consecutive TRs overlap (2.13 s > 1.49 s): a press lies in one or two of them. No input (0)
    where no repetition is, as the screen is black there: held in a repetition's frame 0 is a press.
    """
    span = window * frame_step
    # (T, 1 + span): the frame before each window, then the window
    indices = window_frame_indices(run["n_volumes"], run["tr_s"], span + 1, 1)
    keys = gather_frames(indices, run["repetitions"], (n_buttons,), common.load_npy,
                         path_key="buttons_path").astype(bool)                  # (T, 1 + span, B)
    held = keys[:, 1:]                                                           # (T, span, B)
    presses = held & ~keys[:, :-1]
    return np.concatenate([held.mean(1), presses.sum(1)], axis=1).astype(np.float32)


def button_alignment(window, frame_step):
    """The record's `alignment` of --features buttons."""
    return (f"row t: the inputs of the {window * frame_step} 60 Hz frames ending with frame "
            f"ceil((t+1) x TR x 60) - 1 of the run's timeline (the span of the {window}-frame "
            f"window, every {frame_step}th frame, of the other feature sets); for each button the "
            f"fraction of them it is held, then for each button its presses (held, and not in the "
            f"frame before); repetition frame i at round(onset_s x 60) + i, no input elsewhere")


def recorded_buttons(frames_tsv, rep, where, n_frames, work):
    """{"buttons_path", "buttons" (the column names)} of a rendered repetition (a row of the frames
    manifest), checked against its n_frames frames; InputError saying to re-run 01 when missing."""
    if video_frames.is_video(rep.get("bk2", "")):
        raise InputError(f"{where} is a video ({rep['bk2']}): a movie has no buttons, so "
                         f"--features buttons has nothing to read (--features lowlevel and the "
                         f"models' features do)")
    again = "re-run 01_render_frames.py with the flags it was run with to record them"
    if "buttons_path" not in rep.index:
        raise InputError(f"{frames_tsv}: no buttons_path column (frames rendered by an older "
                         f"01_render_frames.py, without the player's inputs): {again}")
    if pd.isna(rep["buttons_path"]):
        raise InputError(f"{where} was rendered without the player's inputs (an older "
                         f"01_render_frames.py): {again}")
    path = work / str(rep["buttons_path"])
    redo = "re-render it with 01_render_frames.py --overwrite"
    buttons = common.load_npy(path, advice=redo)
    names = (common.read_record(common.record_path(path)) or {}).get("buttons")
    if names is None:
        raise InputError(f"{path}: its record {common.record_path(path)} does not name the buttons "
                         f"({redo})")
    if buttons.shape != (n_frames, len(names)):
        raise InputError(f"{path}: inputs of shape {buttons.shape}, not one row per frame "
                         f"({n_frames}) and one column per button its record names ({len(names)}); "
                         f"{redo}")
    # held or not: anything else (a float array, NaN) would be counted as presses all the same
    if buttons.dtype.kind not in "biu":
        raise InputError(f"{path}: {buttons.dtype} inputs, not integers 0 or 1 (held or not); "
                         f"{redo}")
    if not np.isin(buttons, (0, 1)).all():
        raise InputError(f"{path}: inputs other than 0 and 1 (held or not); {redo}")
    return {"buttons_path": str(path), "buttons": names}


def same_buttons(runs, frames_tsv):
    """The button names of every repetition placed (a list), which must be the same everywhere:
    they name the feature columns. Games of consoles with other buttons are an InputError."""
    seen = {tuple(rep["buttons"]) for run in runs for rep in run["repetitions"]
            if rep.get("buttons")}
    if len(seen) > 1:
        sets = " | ".join(" ".join(map(str, names)) for names in sorted(seen, key=str))
        raise InputError(f"{frames_tsv}: repetitions with different buttons ({sets}): extract them "
                         f"separately (--subjects) or render one game")
    return list(next(iter(seen), []))


