"""The alignment of stimuli and scans (paper sections 2.2-2.3): which frames each fMRI volume's window
shows, how the GPT reads a window, and the hook that takes a layer's output.

Every run has a 60 Hz timeline starting at its first volume (docs/CONTRACT.md, "Time conventions"):
a replay's frame i, or the frame a video shows at i / 60 s, sits at round(onset x 60) + i. The
window of volume t is the 32 frames at 15 Hz (every 4th) ending with the last frame shown before the
end of the volume; 06 then predicts volume t from the window of t - 3 (paper/encoding.py).
"""
import math

import numpy as np
import torch

from paper.vqvae import video_from_uint8

# CNeuroMod convention: a bk2 holds one input per 60 Hz emulator step, and stage 01 renders every
# step (the Genesis really runs at 59.92 Hz; the data treat it as 60); 01 puts videos on that clock.
GAMEPLAY_HZ = 60


# --------------------------------------------------------------------------------------------------
# Which frames each volume's window shows
# --------------------------------------------------------------------------------------------------


def window_frame_indices(n_volumes, tr_s, window, frame_step, fps=GAMEPLAY_HZ):
    """(n_volumes, window) int64: the run-timeline index (60 Hz frames from the first volume) of
    each frame of each TR's window. Row t ends with e_t = ceil((t + 1) x TR x fps) - 1, the last
    frame shown before the end of TR t, and steps back frame_step frames at a time. Negative =
    before the run."""
    # round() first: 1.49 x 60 x 100 is 8940.000000000002 in floating point, whose ceil would be
    # one too many
    volume_ends = np.round(np.arange(1, n_volumes + 1) * tr_s * fps, 6)      # (T,) in frames
    ends = np.ceil(volume_ends).astype(np.int64) - 1                                      # (T,)
    steps = frame_step * np.arange(-(window - 1), 1)                                 # (window,)
    return ends[:, None] + steps[None, :]                                         # (T, window)


def repetition_start(onset_s, fps=GAMEPLAY_HZ):
    """Timeline index of a repetition's first frame: its onset rounded to the nearest 60 Hz
    frame."""
    return int(math.floor(onset_s * fps + 0.5))


def gather_frames(indices, repetitions, frame_shape, open_frames, path_key="frames_path"):
    """uint8 (*indices.shape, H, W, 3): the frame shown at each timeline index, black where none is.

    repetitions: list of dicts with `start` (timeline index of frame 0), `n_frames`, `frames_path`
    (None for a black repetition), in onset order. open_frames(path) gives the (N, H, W, 3) array.
    With path_key="buttons_path" and frame_shape (B,): the recorded inputs, 0 where none is."""
    out = np.zeros((*indices.shape, *frame_shape), np.uint8)                # (..., H, W, 3)
    for rep in repetitions:
        if rep.get(path_key) is None:
            continue
        inside = (indices >= rep["start"]) & (indices < rep["start"] + rep["n_frames"])
        if inside.any():
            out[inside] = open_frames(rep[path_key])[indices[inside] - rep["start"]]
    return out


# --------------------------------------------------------------------------------------------------
# How the GPT reads a window (paper 2.3.1.2), and the hook on the layer whose output is the features
# --------------------------------------------------------------------------------------------------
def encode_windows(vqvae, clips):
    """VQ-VAE codes of each window's conditioning clip (first half) and target clip (second half):
    (B, t, h, w) long each, from uint8 clips (B, window, H, W, 3).

    Always in exact fp32 (VQVAE.encode sees to it), whatever --precision says for the GPT: 04
    trained the GPT on codes computed that way. Two encoder calls rather than one of 2B clips, so
    that a hooked VQ-VAE module sees B samples per call: its features are (B, 2, ...), conditioning
    clip then target clip."""
    video = video_from_uint8(clips)                # (B, 3, window, H, W) in [-0.5, 0.5]
    half = video.shape[2] // 2
    return vqvae.encode(video[:, :, :half]), vqvae.encode(video[:, :, half:])


def read_windows(model, clips):
    """Run the model on uint8 clips (B, window, H, W, 3) as it was trained (paper 2.3.1.2): the
    first half of each window is the conditioning clip, the second half the target clip; each goes
    through the frozen VQ-VAE to codes, whose codebook vectors the GPT reads. Returns the logits
    (B, t, h, w, n_codes)."""
    cond_codes, target_codes = encode_windows(model.vqvae, clips)   # (B, t, h, w) each
    lookup = model.vqvae.codebook.dictionary_lookup                  # codes -> (B, t, h, w, D)
    return model(lookup(target_codes), lookup(cond_codes))


class LayerRecorder:
    """Forward hooks on named modules; `outputs[name]` lists what each call returned, detached.

    A module that runs several times per sample (the VQ-VAE's, once per clip) is recorded every
    time.
    Use as a context manager so that the hooks are removed however the block ends."""

    def __init__(self, model, names):
        modules = dict(model.named_modules())
        self.outputs = {name: [] for name in names}
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in names]

    def _hook(self, name):
        def record(module, inputs, output):
            if isinstance(output, dict) and "embeddings" in output:
                # the VQ-VAE's codebook returns a dict: its quantised vectors (B, D, t, h, w) are
                # what the GPT reads (the VQ-VAE-alone control: --layer vqvae.codebook)
                output = output["embeddings"]
            self.outputs[name].append(output.detach() if torch.is_tensor(output) else output)
        return record

    def clear(self):
        for calls in self.outputs.values():
            calls.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


