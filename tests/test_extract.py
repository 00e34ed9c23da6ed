"""05_extract.py: TR alignment on a timeline whose frames encode their own time, hooks, outputs, bad input."""
import json
import os
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch

import common
from paper import alignment
from paper.gpt import GPTPrior
from paper.vqvae import VQVAE
from conftest import load_stage, needs_namespaces, run_confined, run_script

extract = load_stage("05_extract.py")
TR = 1.49
RES = 16  # frame size of the synthetic runs, the tiny VQ-VAE's resolution
# Tiny models (CPU, milliseconds): clips of 4 frames -> latent (2, 4, 4); windows of 2 x 4 = 8 frames.
TINY_VQVAE = dict(resolution=RES, sequence_length=4, n_hiddens=12, n_res_layers=1, downsample=(2, 4, 4),
                  embedding_dim=6, n_codes=256)
TINY_GPT = dict(latent_shape=(2, 4, 4), embedding_dim=6, n_codes=256, hidden_dim=12, heads=2, layers=2, cond_dim=6)
WINDOW = 8


# --------------------------------------------------------------------------------------------------
# A synthetic work dir: frame i of repetition k shows (k, i % 256, i // 256) in every pixel, so any
# frame a window holds says which repetition and which frame it is; black (0, 0, 0) is no gameplay.
# --------------------------------------------------------------------------------------------------
# run 01 of ses-001 (12 volumes = 17.88 s): rep 1 at 3.5 s (2 s), rep 2 lost ("Missing file") at 6 s,
# rep 3 at 9.25 s (5 s), rep 4 at 16 s running past the end of the run; run 01 of ses-002: one rep at 0 s.
REPS = [  # ses, rep, onset_s, n_frames, status
    ("001", "1", 3.5, 120, "ok"),
    ("001", "2", 6.0, 0, "missing"),
    ("001", "3", 9.25, 300, "ok"),
    ("001", "4", 16.0, 200, "ok"),
    ("002", "1", 0.0, 700, "ok"),
]
RUNS = {"001": 12, "002": 8}  # n_volumes per session


def time_coded_frames(rep_number, n_frames, resolution=RES):
    i = np.arange(n_frames)
    code = np.stack([np.full(n_frames, rep_number), i % 256, i // 256], axis=1).astype(np.uint8)  # (N, 3)
    return np.broadcast_to(code[:, None, None, :], (n_frames, resolution, resolution, 3)).copy()


def make_work(root, resolution=RES, reps=REPS, runs=RUNS):
    rows = []
    for ses, rep, onset, n, status in reps:
        path = f"frames/sub-01/ses-{ses}/sub-01_ses-{ses}_task-airstriker_run-01_level-1_rep-{rep}.npy"
        if status == "ok":
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            np.save(root / path, time_coded_frames(int(rep), n, resolution))
        rows.append(dict(sub="01", ses=ses, task="airstriker", run="01", level="1", rep=rep,
                         bk2="Missing file" if status == "missing" else path.replace(".npy", ".bk2"),
                         onset_s=onset, duration_s=n / 60, n_frames=n if status == "ok" else "n/a", fps=60,
                         frames_path=path if status == "ok" else "n/a", status=status, error="n/a"))
    (root / "frames").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(root / "frames/manifest.tsv", sep="\t", index=False)
    bold = [dict(sub="01", ses=ses, task="airstriker", run="01", n_volumes=n, tr_s=TR, split="train",
                 bold_path=f"bold/sub-01/ses-{ses}/sub-01_ses-{ses}_task-airstriker_run-01.npy", kept_volumes=n)
            for ses, n in runs.items()]
    (root / "bold").mkdir(parents=True, exist_ok=True)
    pd.DataFrame(bold).to_csv(root / "bold/manifest.tsv", sep="\t", index=False)
    return root


def expected_window(ses, t, window=32, step=4, shift=0):
    """Brute force, in seconds: slot k of row t shows whatever was on screen just before the time
    (t + 1) x TR - (31 - k) x step / 60; a repetition's frame i is on screen from onset + i / 60 for 1/60 s.
    `shift` moves the window that many clip frames earlier (a wrong convention, for contrast).
    Returns (window, 2) of (repetition number or 0 for black, frame number)."""
    out = np.zeros((window, 2), int)
    for k in range(window):
        when = (t + 1) * TR - (window - 1 - k + shift) * step / 60 - 1e-9
        for _, rep, onset, n, status in (r for r in REPS if r[0] == ses):
            for i in range(n if status == "ok" else 0):
                if onset + i / 60 <= when < onset + (i + 1) / 60:
                    out[k] = (int(rep), i)
    return out


def decode(clip):
    """(window, H, W, 3) time-coded frames -> (window, 2) of (repetition number, frame number)."""
    pixel = clip[:, 0, 0].astype(int)                                         # (window, 3)
    assert (clip == clip[:, :1, :1]).all()  # every pixel of a frame is the same code
    return np.stack([pixel[:, 0], pixel[:, 1] + 256 * pixel[:, 2]], axis=1)


@pytest.fixture()
def synthetic(tmp_path):
    return make_work(tmp_path)


def planned_windows(work, **kw):
    runs = extract.plan_runs(work, None, (RES, RES, 3), 32, 4, False, **kw)
    dataset = extract.TRWindows(runs, (RES, RES, 3))
    return runs, dataset


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------
def test_every_row_holds_the_frames_the_convention_says(synthetic):
    runs, dataset = planned_windows(synthetic)
    assert [(r["ses"], r["n_volumes"]) for r in runs] == [("001", 12), ("002", 8)]
    assert len(dataset) == 20  # exactly n_volumes rows per run
    for k in range(len(dataset)):
        clip, r, t = dataset[k]
        assert clip.shape == (32, RES, RES, 3) and clip.dtype == torch.uint8
        np.testing.assert_array_equal(decode(clip.numpy()), expected_window(runs[r]["ses"], t),
                                      err_msg=f"run {runs[r]['stem']} row {t}")


def test_alignment_landmarks_by_hand(synthetic):
    runs, dataset = planned_windows(synthetic)
    rows = {t: decode(dataset[t][0].numpy()) for t in range(12)}  # ses-001
    # Rows 0-1 end at 1.49 s and 2.98 s, before rep 1 starts (3.5 s): all black, including the frames
    # from before the run's first volume.
    assert (rows[0] == 0).all() and (rows[1] == 0).all()
    # Row 2 ends at 4.47 s = 60 Hz frame 268.2: its last frame is timeline frame 268 = rep 1 frame 58
    # (rep 1 starts at frame 210); going back 4 frames at a time, frames >= 210 are slots 17..31.
    assert tuple(rows[2][31]) == (1, 58) and tuple(rows[2][30]) == (1, 54)
    assert (rows[2][:17] == 0).all() and (rows[2][17:, 0] == 1).all() and tuple(rows[2][17]) == (1, 2)
    # Row 4 (ends at 7.45 s) starts with the end of rep 1 (frames 112, 116 of 120), then black: rep 1
    # ended at 5.5 s and rep 2 (6 s) is a lost replay. Row 5 is all gap.
    assert tuple(rows[4][0]) == (1, 112) and tuple(rows[4][1]) == (1, 116) and (rows[4][2:] == 0).all()
    assert (rows[5] == 0).all()
    # Row 6 (ends at 10.43 s = frame 625.8 -> 625) mixes the gap and rep 3 (from frame 555).
    assert tuple(rows[6][31]) == (3, 70) and (rows[6][:14] == 0).all() and tuple(rows[6][14]) == (3, 2)
    # Last row (ends at 17.88 s = frame 1072.8): rep 4 (from frame 960) frame 112; the run ends there
    # even though rep 4 goes on.
    assert tuple(rows[11][31]) == (4, 112)
    # The first 16 slots (conditioning) come 16 x 4 frames before the target clip's.
    assert tuple(rows[11][15]) == (4, 112 - 64)


def test_window_indices_formula():
    idx = alignment.window_frame_indices(3, TR, 32, 4)
    assert idx.shape == (3, 32)
    assert idx[:, -1].tolist() == [89, 178, 268]  # ceil(89.4 t) - 1
    assert (np.diff(idx, axis=1) == 4).all()
    # A TR end exactly on a 60 Hz frame boundary: 1.5 s = frame 90 begins then, so the window ends at 89.
    assert alignment.window_frame_indices(2, 1.5, 32, 4)[:, -1].tolist() == [89, 179]
    assert alignment.repetition_start(3.508) == 210 and alignment.repetition_start(3.4916) == 209


# --------------------------------------------------------------------------------------------------
# Hooks and pooling on any module
# --------------------------------------------------------------------------------------------------
def test_recorder_sees_what_the_module_computes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.GELU(), torch.nn.Linear(7, 3))
    x = torch.randn(4, 5)
    with alignment.LayerRecorder(model, ["1"]) as recorder:
        model(x)
        model(x)
    # After the block the hook is gone: a third call records nothing.
    model(x)
    assert len(recorder.outputs["1"]) == 2
    reference = torch.nn.functional.gelu(model[0](x))
    torch.testing.assert_close(recorder.outputs["1"][0], reference, rtol=0, atol=0)
    stacked = extract.per_sample_activation("1", recorder.outputs["1"], 4)
    assert stacked.shape == (4, 2, 7)


def test_pooling_finds_the_latent_axes():
    a = torch.arange(2 * 4 * 8 * 8 * 6, dtype=torch.float32).reshape(2, 4, 8, 8, 6)  # (B, T', H', W', C)
    assert extract.pool_activation(a, "none", (4, 8, 8), "x").shape == (2, 4 * 8 * 8 * 6)
    torch.testing.assert_close(extract.pool_activation(a, "space", (4, 8, 8), "x"), a.mean((2, 3)).reshape(2, -1))
    torch.testing.assert_close(extract.pool_activation(a, "time", (4, 8, 8), "x"), a.mean(1).reshape(2, -1))
    heads = torch.randn(2, 4, 4, 8, 8, 3)  # (B, heads, T', H', W', d): the attention's own output
    torch.testing.assert_close(extract.pool_activation(heads, "time", (4, 8, 8), "x"), heads.mean(2).reshape(2, -1))
    first = torch.randn(2, 5, 4, 8, 8)  # channels first (B, C, T', H', W')
    torch.testing.assert_close(extract.pool_activation(first, "space", (4, 8, 8), "x"),
                               first.mean((3, 4)).reshape(2, -1))
    with pytest.raises(extract.InputError, match=r"without the latent"):
        extract.pool_activation(torch.randn(2, 16, 32, 32, 3), "space", (4, 8, 8), "vqvae.encoder.convs.0")


# --------------------------------------------------------------------------------------------------
# Bad input in the manifests
# --------------------------------------------------------------------------------------------------
def test_missing_frames_of_a_rendered_repetition(synthetic):
    (synthetic / "frames/sub-01/ses-001/sub-01_ses-001_task-airstriker_run-01_level-1_rep-3.npy").unlink()
    with pytest.raises(extract.InputError, match=r"rep 3 is listed as rendered but its frames .* do not exist"):
        planned_windows(synthetic)


def test_failed_repetition_stops_unless_allowed(synthetic):
    manifest = pd.read_csv(synthetic / "frames/manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    manifest.loc[2, ["status", "error"]] = ["failed", "corrupt or truncated bk2"]                 # ses-001 rep 3
    manifest.to_csv(synthetic / "frames/manifest.tsv", sep="\t", index=False)
    with pytest.raises(extract.InputError, match=r"rep 3 failed to render \(corrupt or truncated bk2\).*--allow-missing"):
        planned_windows(synthetic)
    runs = extract.plan_runs(synthetic, None, (RES, RES, 3), 32, 4, True)
    dataset = extract.TRWindows(runs, (RES, RES, 3))
    assert decode(dataset[11][0].numpy())[:, 0].tolist().count(3) == 0   # rep 3 is black now
    assert (decode(dataset[8][0].numpy()) == 0).all()                     # row 8 lay inside rep 3


def test_repetition_without_onset_is_refused(synthetic):
    """Frames rendered with 01 --bk2 (no events.tsv) have onset n/a: placing them was a ValueError traceback."""
    manifest = pd.read_csv(synthetic / "frames/manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    manifest.loc[2, "onset_s"] = "n/a"                                                        # ses-001 rep 3
    manifest.to_csv(synthetic / "frames/manifest.tsv", sep="\t", index=False)
    with pytest.raises(extract.InputError, match=r"ses-001_task-airstriker_run-01 rep 3 has no onset_s \(rendered "
                                                 r"from bare \.bk2 files, 01 --bk2, without events\.tsv\)"):
        planned_windows(synthetic)


def test_run_shorter_than_the_window(tmp_path):
    work = make_work(tmp_path, runs={"001": 12, "002": 1})
    with pytest.raises(extract.InputError, match=r"ses-002.* 1 volume\(s\) x 1.49 s = 1.49 s, shorter than one "
                                                 r"32-frame window \(2.13 s\)"):
        planned_windows(work)


# --------------------------------------------------------------------------------------------------
# The stage end to end with tiny models: ours (04's checkpoint format) and the authors' Lightning one
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny VQ-VAE (03's format), a tiny GPT (04's format, pointing to it) and the same weights in
    the authors' Lightning format (`state_dict` with `vqvae.*` keys + `hyper_parameters`)."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    vqvae, gpt = VQVAE(**TINY_VQVAE).eval(), GPTPrior(**TINY_GPT).eval()
    # An untrained codebook maps every clip to one code: take the codes from the encoder outputs of
    # time-coded clips (as VideoGPT's first batch does), so that different windows get different codes.
    clips = np.stack([time_coded_frames(rep, 600)[start::37][:4] for rep in (1, 3) for start in range(0, 400, 25)])
    with torch.no_grad():
        z = vqvae.pre_vq_conv(vqvae.encoder(torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255 - 0.5))
        z = z.movedim(1, -1).reshape(-1, TINY_VQVAE["embedding_dim"])                 # (32 x 2 x 4 x 4, D)
        chosen = z[torch.randperm(len(z))[:TINY_VQVAE["n_codes"]]]
        # Jittered, so that no two codes are nearly equidistant from a clip (a tie would flip with the
        # rounding of the batch size or memory layout, and this test compares to 1e-5)
        vqvae.codebook.embeddings.copy_(chosen + 0.01 * torch.randn_like(chosen))
    vqvae_path = folder / "vqvae" / "ckpt.pt"
    common.save_checkpoint(vqvae_path, dict(model=vqvae.state_dict(), model_config=vqvae.config, kind="vqvae"))
    ours = folder / "gpt" / "tiny" / "ckpt.pt"
    common.save_checkpoint(ours, dict(model=gpt.state_dict(), model_config=gpt.config, kind="gpt",
                                      args={"vqvae": str(vqvae_path), "frame_step": 4},
                                      vqvae_sha256=common.file_sha256(vqvae_path)))
    lightning = folder / "authors.ckpt"
    torch.save({"state_dict": {**{f"vqvae.{k}": v for k, v in vqvae.state_dict().items()}, **gpt.state_dict()},
                "hyper_parameters": {"args": Namespace(heads=2, dropout=0.2, attn_dropout=0.3, resolution=RES,
                                                       sequence_length=4, n_cond_frames=4)},
                "pytorch-lightning_version": "1.9.0"}, lightning)
    return dict(vqvae=vqvae, gpt=gpt, vqvae_path=vqvae_path, ours=ours, lightning=lightning)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, checkpoints):
    """The synthetic work dir after one `05_extract.py` run (subprocess, float32, two layers)."""
    work = make_work(tmp_path_factory.mktemp("work"))
    result = run_script("05_extract.py", "--work", work, "--ckpt", checkpoints["ours"], "--dtype", "float32",
                        "--layer", "attn_stack.attn_nets.0.post_fc_dp", "last", "--batch-size", "3")
    return work, result


def window_clip(code):
    """(window, 2) of (repetition, frame) -> the uint8 (window, H, W, 3) frames they are (black for 0)."""
    return np.stack([time_coded_frames(rep, i + 1)[i] if rep else np.zeros((RES, RES, 3), np.uint8)
                     for rep, i in code])


@torch.no_grad()
def block_outputs(vqvae, gpt, clips):
    """Reference: the MLP-branch output of every block (what post_fc_dp returns in eval mode), from a
    plain forward written out here. clips: uint8 (N, window, H, W, 3) -> per block (N, t, h, w, hidden)."""
    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255 - 0.5    # (N, 3, window, H, W)
    cond_codes, target_codes = vqvae.encode(video[:, :, :4]), vqvae.encode(video[:, :, 4:])  # (N, t, h, w)
    table = vqvae.codebook.embeddings                                              # (n_codes, D)
    cond = gpt.cond_pos_embd(gpt.resnet(table[cond_codes].movedim(-1, 1)).movedim(1, -1))   # (N, t, h, w, 6)
    x = gpt.attn_stack.pos_embd(gpt.attn_stack.right_shift(gpt.fc_in(table[target_codes])))
    outputs = []
    for block in gpt.attn_stack.attn_nets:
        h = block.pre_attn_norm(x)
        x = x + block.attn(h, h)
        x = x + block.enc_attn(block.pre_enc_norm(x), cond)
        mlp = block.fc_block(block.pre_fc_norm(x))
        outputs.append(mlp.numpy())
        x = x + mlp
    return outputs


def test_features_are_the_layer_on_the_conventions_window(extracted, checkpoints):
    work, result = extracted
    assert "2 of 2 run(s) to do" in result.stdout
    folder = work / "features" / "tiny"
    assert sorted(p.name for p in folder.iterdir()) == ["attn_stack.attn_nets.0.post_fc_dp",
                                                        "attn_stack.attn_nets.1.post_fc_dp"]  # 'last' = block 1
    for ses, n_volumes in RUNS.items():
        stem = f"sub-01/ses-{ses}/sub-01_ses-{ses}_task-airstriker_run-01"
        features = [np.load(folder / layer / f"{stem}.npy") for layer in sorted(p.name for p in folder.iterdir())]
        windows = [[expected_window(ses, t, WINDOW, shift=shift) for t in range(n_volumes)] for shift in (0, 1)]
        reference, shifted = (block_outputs(checkpoints["vqvae"], checkpoints["gpt"],
                                            np.stack([window_clip(w) for w in windows[shift]])) for shift in (0, 1))
        for layer, feature in enumerate(features):
            assert feature.shape == (n_volumes, 2 * 4 * 4 * 12) and feature.dtype == np.float32
            np.testing.assert_allclose(feature, reference[layer].reshape(n_volumes, -1), rtol=1e-5, atol=2e-6,
                                       err_msg=f"ses-{ses} block {layer}")
        # The check tells windows apart: had the rows been one 15 Hz frame off, most would fail it (not
        # all: the frames of two windows may get the same codes from this untrained VQ-VAE).
        differs = [not np.array_equal(a, b) for a, b in zip(*windows)]
        detected = np.abs(features[1] - shifted[1].reshape(n_volumes, -1)).max(1) > 1e-4     # (T,)
        assert detected[differs].mean() > 0.8, detected
    npy = folder / "attn_stack.attn_nets.1.post_fc_dp" / "sub-01/ses-001/sub-01_ses-001_task-airstriker_run-01.npy"
    record = common.read_record(npy.with_suffix(".json"))
    assert record["stage"] == "05_extract" and record["output"]["sha256"] == common.file_sha256(npy)
    assert record["settings"] == {"--layer": "attn_stack.attn_nets.1.post_fc_dp", "--pool": "none",
                                  "--dtype": "float32", "--frame-step": 4, "--precision": "fp32"}
    inputs = record["inputs"]
    assert inputs[os.path.relpath(checkpoints["ours"], work)]["sha256"] == common.file_sha256(checkpoints["ours"])
    assert inputs[os.path.relpath(checkpoints["vqvae_path"], work)]["sha256"] == common.file_sha256(
        checkpoints["vqvae_path"])
    frames = sorted(k for k in inputs if k.startswith("frames/"))
    assert frames == [f"frames/sub-01/ses-001/sub-01_ses-001_task-airstriker_run-01_level-1_rep-{i}.npy"
                      for i in (1, 3, 4)]   # rep 2 is "Missing file": black, no input
    assert record["activation_shape"] == [2, 4, 4, 12] and record["n_features"] == 384
    assert record["window_frames"] == 8 and record["n_volumes"] == 12
    assert [r["start"] for r in record["repetitions"]] == [210, 360, 555, 960]


def test_idempotent_and_deterministic(extracted, checkpoints):
    work, _ = extracted
    layer = work / "features/tiny/attn_stack.attn_nets.1.post_fc_dp/sub-01/ses-001"
    first = np.load(layer / "sub-01_ses-001_task-airstriker_run-01.npy")
    mtime = (layer / "sub-01_ses-001_task-airstriker_run-01.npy").stat().st_mtime_ns
    flags = ["--work", str(work), "--ckpt", str(checkpoints["ours"]), "--dtype", "float32", "--layer", "last"]
    extract.main(flags)  # complete: nothing to do
    assert (layer / "sub-01_ses-001_task-airstriker_run-01.npy").stat().st_mtime_ns == mtime
    extract.main(flags + ["--overwrite", "--batch-size", "3"])  # the same computation again: the same bytes
    np.testing.assert_array_equal(np.load(layer / "sub-01_ses-001_task-airstriker_run-01.npy"), first)
    assert not list(work.rglob(".*tmp*"))  # no temp file left behind
    # another --pool for the same feature set: refused, naming the flag
    with pytest.raises(extract.InputError) as error:
        extract.main(flags + ["--pool", "space"])
    assert str(error.value) == (f"{layer / 'sub-01_ses-001_task-airstriker_run-01.npy'}: made with --pool none, "
                                "not space: pass the same flags, or --overwrite to redo it")
    # re-rendered frames of one repetition of run ses-002: that run alone is made again
    other = work / "features/tiny/attn_stack.attn_nets.1.post_fc_dp/sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01.npy"
    other_mtime, other_before = other.stat().st_mtime_ns, np.load(other)
    mtime = (layer / "sub-01_ses-001_task-airstriker_run-01.npy").stat().st_mtime_ns
    frames = work / "frames/sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01_level-1_rep-1.npy"
    np.save(frames, 255 - np.load(frames))
    extract.main(flags)
    assert other.stat().st_mtime_ns != other_mtime
    assert (layer / "sub-01_ses-001_task-airstriker_run-01.npy").stat().st_mtime_ns == mtime
    np.save(frames, 255 - np.load(frames))   # as it was, for the other tests: made again
    extract.main(flags)
    np.testing.assert_array_equal(np.load(other), other_before)


def test_lightning_checkpoint_loads_and_gives_the_same_features(extracted, checkpoints):
    work, _ = extracted
    extract.main(["--work", str(work), "--ckpt", str(checkpoints["lightning"]), "--dtype", "float32",
                  "--layer", "last", "--batch-size", "3"])
    stem = "sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01"
    ours = np.load(work / f"features/tiny/attn_stack.attn_nets.1.post_fc_dp/{stem}.npy")
    theirs = np.load(work / f"features/authors/attn_stack.attn_nets.1.post_fc_dp/{stem}.npy")
    np.testing.assert_array_equal(theirs, ours)
    sidecar = json.loads((work / f"features/authors/attn_stack.attn_nets.1.post_fc_dp/{stem}.json").read_text())
    assert sidecar["checkpoint_format"] == "lightning"


def test_pooling_and_float16_match_the_full_features(extracted, checkpoints):
    work, _ = extracted
    stem = "attn_stack.attn_nets.1.post_fc_dp/sub-01/ses-001/sub-01_ses-001_task-airstriker_run-01.npy"
    full = np.load(work / "features/tiny" / stem).reshape(12, 2, 4, 4, 12)     # (T, t, h, w, C)
    for pool, axes in (("space", (2, 3)), ("time", (1,))):
        extract.main(["--work", str(work), "--ckpt", str(checkpoints["ours"]), "--layer", "last",
                      "--pool", pool, "--name", f"pool-{pool}"])
        pooled = np.load(work / f"features/pool-{pool}" / stem)
        assert pooled.dtype == np.float16
        np.testing.assert_allclose(pooled, full.mean(axes).reshape(12, -1), rtol=2e-3, atol=2e-3)


def test_controls_vqvae_codebook_and_low_level_features(extracted, checkpoints):
    """The two model-light controls against an independent computation on the convention's windows:
    the VQ-VAE alone (the codebook vectors of both clips' codes) and the low-level features (the window's
    luminance on an 8 x 8 grid of screen regions, and each region's mean absolute frame difference)."""
    work, _ = extracted
    extract.main(["--work", str(work), "--ckpt", str(checkpoints["ours"]), "--layer", "vqvae.codebook",
                  "--name", "vqvae", "--dtype", "float32"])
    extract.main(["--work", str(work), "--features", "lowlevel", "--dtype", "float32"])
    vqvae = checkpoints["vqvae"]
    for ses, n_volumes in RUNS.items():
        stem = f"sub-01/ses-{ses}/sub-01_ses-{ses}_task-airstriker_run-01.npy"
        # VQ-VAE alone: (T, 2 clips x D x t x h x w), the vectors of the codes of each window's two halves
        clips = np.stack([window_clip(expected_window(ses, t, WINDOW)) for t in range(n_volumes)])
        video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float() / 255 - 0.5
        with torch.no_grad():
            halves = [vqvae.codebook.embeddings[vqvae.encode(video[:, :, i:i + WINDOW // 2])].movedim(-1, 1)
                      for i in (0, WINDOW // 2)]                                  # 2 x (T, D, t, h, w)
        expected = torch.stack(halves, dim=1).reshape(n_volumes, -1).numpy()
        np.testing.assert_allclose(np.load(work / "features/vqvae/vqvae.codebook" / stem), expected, rtol=1e-6)
        # low level: 32 frames x 64 region luminances, then 64 motion energies
        windows = np.stack([window_clip(expected_window(ses, t)) for t in range(n_volumes)])   # (T, 32, H, W, 3)
        gray = windows.mean(-1) / 255                                                        # (T, 32, 16, 16)
        regions = gray.reshape(n_volumes, 32, 8, 2, 8, 2).mean((3, 5))                        # 2 x 2 pixels each
        motion = np.abs(np.diff(gray, axis=1)).reshape(n_volumes, 31, 8, 2, 8, 2).mean((3, 5)).mean(1)
        features = np.load(work / "features/lowlevel/lowlevel" / stem)
        assert features.shape == (n_volumes, 32 * 64 + 64)
        np.testing.assert_allclose(features, np.concatenate([regions.reshape(n_volumes, -1),
                                                             motion.reshape(n_volumes, -1)], 1), atol=1e-6)
    record = common.read_record(work / "features/lowlevel/lowlevel" / stem.replace(".npy", ".json"))
    assert record["features"] == "lowlevel" and not any(k.endswith(".pt") for k in record["inputs"])


def test_codes_are_computed_in_fp32_whatever_the_precision():
    """04 trains the GPT on codes the VQ-VAE computed in fp32; 05 must read the same codes when the GPT
    runs in reduced precision. Here bf16 autocast of the encoder flips a good share of the codes, and
    VQVAE.encode (used by 04's code cache and by 05) is immune to it, and to the caller's TF32 setting."""
    torch.manual_seed(0)
    vqvae = VQVAE(**{**TINY_VQVAE, "n_codes": 256}).eval()
    clips = torch.randint(0, 256, (16, WINDOW, RES, RES, 3), dtype=torch.uint8)
    video = clips.permute(0, 4, 1, 2, 3).float() / 255 - 0.5                   # (B, 3, window, H, W)
    half = WINDOW // 2
    seen = []   # what the encoder's first layer runs under: (autocast on, cuDNN TF32, matmul TF32)
    vqvae.encoder.register_forward_pre_hook(lambda module, inputs: seen.append(
        (torch.is_autocast_enabled("cpu"), torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)))

    def unguarded(x):   # the encoder as 03 trains it, without encode()'s precision guard
        return vqvae.codebook(vqvae.pre_vq_conv(vqvae.encoder(x)))["encodings"]
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True   # as a --tf32 run
        with torch.no_grad():
            z = vqvae.pre_vq_conv(vqvae.encoder(video[:, :, :half])).movedim(1, -1).reshape(-1, TINY_VQVAE["embedding_dim"])
            vqvae.codebook.embeddings.copy_(z[torch.randperm(len(z))[:256]])  # codes used, some nearly tied
            fp32 = [unguarded(video[:, :, :half]), unguarded(video[:, :, half:])]
            with torch.autocast("cpu", dtype=torch.bfloat16):
                naive = unguarded(video[:, :, :half])
                seen.clear()
                cond, target = alignment.encode_windows(vqvae, clips)
        assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == (True, True)  # restored
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    assert (naive != fp32[0]).float().mean() > 0.05          # the hazard is real
    assert torch.equal(cond, fp32[0]) and torch.equal(target, fp32[1])
    assert seen == [(False, False, False)] * 2                # both clips encoded in exact fp32


def test_list_layers(checkpoints, tmp_path):
    result = run_script("05_extract.py", "--work", tmp_path, "--ckpt", checkpoints["ours"], "--list-layers")
    shapes = {line.split()[0]: line.split(None, 2)[2] for line in result.stdout.splitlines()[1:]}
    assert shapes["attn_stack.attn_nets.1.post_fc_dp"] == "[1, 2, 4, 4, 12]"
    assert shapes["attn_stack.attn_nets.0.attn.attn"] == "[1, 2, 2, 4, 4, 6]"      # (B, heads, t, h, w, d)
    assert shapes["attn_stack.attn_nets.0.fc_block.0"] == "[1, 2, 4, 4, 48]"
    assert shapes["vqvae.pre_vq_conv"] == "[1, 6, 2, 4, 4] + [1, 6, 2, 4, 4]"        # conditioning + target clip
    assert shapes["vqvae.decoder"] == "not run"
    assert len(shapes) == len([n for n, _ in checkpoints["gpt"].named_modules() if n]) + 1 + len(
        [n for n, _ in checkpoints["vqvae"].named_modules() if n])


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming what is wrong, exit status 2
# --------------------------------------------------------------------------------------------------
def error_line(result):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_bad_layers(checkpoints, tmp_path):
    base = ["--work", tmp_path, "--ckpt", checkpoints["ours"], "--layer"]
    line = error_line(run_script("05_extract.py", *base, "attn_stack.attn_nets.1.post_fc", check=False))
    assert "--layer attn_stack.attn_nets.1.post_fc: no such module" in line
    assert "closest: attn_stack.attn_nets.1.post_fc_dp" in line
    line = error_line(run_script("05_extract.py", *base, "attn_stack.attn_nets.0.fc_block.0.weight", check=False))
    assert "a parameter or buffer, not a module (its module is attn_stack.attn_nets.0.fc_block.0)" in line


def test_checkpoint_of_another_architecture(checkpoints, tmp_path):
    line = error_line(run_script("05_extract.py", "--work", tmp_path, "--ckpt", checkpoints["vqvae_path"],
                                 check=False))
    assert str(checkpoints["vqvae_path"]) in line and "not a GPT checkpoint" in line


def test_gpt_checkpoints_that_do_not_fit(checkpoints, tmp_path):
    """A Lightning file without the prior's attention blocks, and a GPT whose weights miss one tensor."""
    state = {k: v for k, v in torch.load(checkpoints["lightning"], weights_only=False)["state_dict"].items()
             if not k.startswith("attn_stack.")}
    torch.save({"state_dict": state, "hyper_parameters": {}}, tmp_path / "partial.ckpt")
    line = error_line(run_script("05_extract.py", "--work", tmp_path, "--ckpt", tmp_path / "partial.ckpt",
                                 check=False))
    assert line == (f"error: {tmp_path / 'partial.ckpt'}: not a VideoGPT prior with embedding conditioning "
                    "(emb_cond): no attn_stack.pos_embd.emb.d_0, attn_stack.attn_nets.* in its state_dict")
    ours = common.load_checkpoint(checkpoints["ours"])
    del ours["model"]["attn_stack.attn_nets.0.fc_block.0.weight"]
    common.save_checkpoint(tmp_path / "gpt.pt", ours)
    line = error_line(run_script("05_extract.py", "--work", tmp_path, "--ckpt", tmp_path / "gpt.pt", check=False))
    assert line.startswith(f"error: {tmp_path / 'gpt.pt'}: weights do not fit a VideoGPT with ")
    assert "attn_stack.attn_nets.0.fc_block.0.weight" in line


def test_bad_runs_through_the_script(checkpoints, tmp_path):
    work = make_work(tmp_path / "a", runs={"001": 12, "002": 1})
    flags = ["--work", work, "--ckpt", checkpoints["ours"], "--layer", "last"]
    line = error_line(run_script("05_extract.py", *flags, "--frame-step", "16", check=False))  # 8 x 16 / 60 s
    assert ("sub-01_ses-002_task-airstriker_run-01 lasts 1 volume(s) x 1.49 s = 1.49 s, shorter than one 8-frame "
            "window (2.13 s)") in line
    work = make_work(tmp_path / "b")
    (work / "frames/sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01_level-1_rep-1.npy").unlink()
    line = error_line(run_script("05_extract.py", *flags[:1], work, *flags[2:], check=False))
    assert "rep 1 is listed as rendered but its frames" in line and "do not exist" in line
    assert not (work / "features").exists()  # nothing half-written


@needs_namespaces
def test_read_only_work_and_full_disk(extracted, checkpoints):
    work, _ = extracted
    flags = ["--work", work, "--ckpt", checkpoints["ours"], "--dtype", "float32", "--layer", "last"]
    result, _ = run_confined("05_extract.py", *flags, "--name", "ro", read_only=work)
    assert error_line_after_progress(result) == f"error: {work / 'features/ro'}: Read-only file system"
    # 12 x 384 float32 features (18 kB) do not fit in 8 kB: without the disk space reserved up front, the
    # memory map would kill the process with SIGBUS, without a word, and leave its temporary file behind
    result, left = run_confined("05_extract.py", *flags, "--name", "full", full=work / "features/full",
                                full_bytes=8 * 1024)
    npy = work / "features/full/attn_stack.attn_nets.1.post_fc_dp/sub-01/ses-001/sub-01_ses-001_task-airstriker_run-01.npy"
    assert error_line_after_progress(result) == f"error: {npy}: cannot write it (No space left on device)"
    assert left == []
    run_script("05_extract.py", *flags, "--name", "full")   # with room on the disk, a re-run finishes
    assert np.load(npy).shape == (12, 384)


def test_truncated_frames_are_named(checkpoints, tmp_path):
    work = make_work(tmp_path)
    frames = work / "frames/sub-01/ses-002/sub-01_ses-002_task-airstriker_run-01_level-1_rep-1.npy"
    frames.write_bytes(frames.read_bytes()[:4000])
    line = error_line(run_script("05_extract.py", "--work", work, "--ckpt", checkpoints["ours"], "--layer", "last",
                                 check=False))
    assert line.startswith(f"error: {frames}: truncated (") and line.endswith(
        "re-render it with 01_render_frames.py --overwrite")
    assert not (work / "features").exists()


def error_line_after_progress(result):
    """The last line on stderr (above it: the progress bar), and exit status 2."""
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_truncated_or_unfinished_checkpoint(checkpoints, tmp_path, extracted):
    work, _ = extracted
    truncated = tmp_path / "gpt.pt"
    truncated.write_bytes(checkpoints["ours"].read_bytes()[:5000])
    line = error_line(run_script("05_extract.py", "--work", work, "--ckpt", truncated, check=False))
    assert line.startswith(f"error: {truncated}: not a readable torch checkpoint (")
    unfinished = common.load_checkpoint(checkpoints["ours"])
    unfinished.update(step=3, max_steps=10, complete=False)
    common.save_checkpoint(tmp_path / "unfinished.pt", unfinished)
    line = error_line(run_script("05_extract.py", "--work", work, "--ckpt", tmp_path / "unfinished.pt", check=False))
    assert line == (f"error: {tmp_path / 'unfinished.pt'}: unfinished training (step 3 of 10): re-run 04_train_gpt.py "
                    "to finish it, or pass --allow-unfinished to use it as it is")


def test_low_level_control_refuses_or_ignores_model_flags_and_records_only_what_it_used(synthetic, capsys):
    """--features lowlevel has no model: --layer, --list-layers and --ckpt are refused; --pool and
    --precision (which a sweep's --extract-args pass to every job) are said to be ignored and left out of
    the record, which must not claim a pooling that never happened."""
    work = synthetic
    for flags in (["--layer", "last"], ["--list-layers"]):
        with pytest.raises(common.InputError, match=f"{flags[0]}: not used by --features lowlevel"):
            extract.main(["--work", str(work), "--features", "lowlevel", "--name", "ll", *flags])
    extract.main(["--work", str(work), "--features", "lowlevel", "--name", "ll", "--pool", "time"])
    assert "--pool ignored by --features lowlevel" in capsys.readouterr().out
    record = common.read_record(next((work / "features/ll/lowlevel").rglob("*.json")))
    assert "--pool" not in record["settings"] and "--precision" not in record["settings"]
    unpooled = np.load(next((work / "features/ll/lowlevel").rglob("*.npy")))
    assert unpooled.shape[1] == 32 * 8 * 8 + 8 * 8                       # every frame's grid: nothing pooled
