"""Stage 03 and the VQ-VAE of common.py: parameter counts, padding, attention and EMA math against
brute-force references, overfitting, exact resume after a kill, 2-process DDP, strict checkpoint loading."""
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, load_stage, needs_namespaces, run_confined, run_script

import common
from paper.vqvae import AxialAttention, Codebook, DATA_VARIANCE, RESTART_BELOW, SamePadConv3d, SamePadConvTranspose3d, VQVAE, VQVAE_PAPER_CONFIG

vqvae_stage = load_stage("03_train_vqvae.py")
TINY = dict(resolution=32, sequence_length=8, n_hiddens=16, n_res_layers=1, downsample=(2, 4, 4),
            embedding_dim=8, n_codes=32)
TINY_FLAGS = ["--device", "cpu", "--n-hiddens", "16", "--n-res-layers", "1", "--resolution", "32",
              "--sequence-length", "8", "--downsample", "2", "4", "4", "--n-codes", "32",
              "--embedding-dim", "8", "--batch-size", "4", "--val-clips", "4", "--workers", "2"]


@pytest.fixture(autouse=True)
def one_thread_per_process(monkeypatch):
    """One torch thread here and in the scripts we start: on a busy 2-core machine, processes with two
    OpenMP threads each slow down tenfold. Results do not depend on it."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_frames_work(work, sessions=("001", "002", "003", "005"), n_frames=80, resolution=32):
    """A work dir with frames/manifest.tsv and uint8 (N, H, W, 3) arrays: two squares moving across a
    black screen, one repetition per session (stage 01's layout)."""
    rows = []
    for i, ses in enumerate(sessions):
        rel = f"frames/sub-01/ses-{ses}/sub-01_ses-{ses}_task-shinobi_run-01_level-1_rep-{i:02d}.npy"
        frames = np.zeros((n_frames, resolution, resolution, 3), np.uint8)
        for t in range(n_frames):
            x = (t // 2 + 5 * i) % (resolution - 8)
            frames[t, 8:16, x:x + 8] = (200, 50, 50)
            frames[t, 20:28, resolution - 8 - x:resolution - x] = (40, 180, 90)
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(work / rel, frames)
        rows.append(dict(sub="01", ses=ses, task="shinobi", run="01", level=1, rep=i, bk2=f"rep{i}.bk2",
                         onset_s=0.0, n_frames=n_frames, fps=60, frames_path=rel, status="ok", error="n/a"))
    rows.append(dict(rows[0], rep=9, frames_path="n/a", status="missing", error="Missing file"))
    common.write_tsv(work / "frames" / "manifest.tsv", pd.DataFrame(rows))
    return work


def read_log(work):
    return pd.read_csv(work / "vqvae" / "log.csv")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
def test_paper_config_parameter_counts_equal_table_2a():
    model = VQVAE(**VQVAE_PAPER_CONFIG)
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    assert round(count(model.encoder) / 1e6, 1) == 18.7
    assert round(count(model.decoder) / 1e6, 1) == 17.1
    assert count(model.pre_vq_conv) == 30848      # 240 * 128 + 128: "30.8K"
    assert count(model.post_vq_conv) == 30960     # 128 * 240 + 240: "31.0K"
    assert count(model) == 35_826_611
    assert model.latent_shape == (4, 8, 8)


@pytest.mark.parametrize("kernel,stride", [(4, (2, 2, 2)), (4, (1, 2, 2)), (3, 1), (1, 1), (4, 1)])
def test_same_pad_convs_keep_shapes_and_match_videogpt_padding(kernel, stride):
    torch.manual_seed(0)
    strides = stride if isinstance(stride, tuple) else (stride,) * 3
    x = torch.randn(2, 3, 8, 12, 16)                                     # (B, C, T, H, W)
    # VideoGPT's form, written out: pad k - s per axis (odd element in front), last axis first for F.pad.
    pad = sum([((kernel - s) // 2 + (kernel - s) % 2, (kernel - s) // 2) for s in strides[::-1]], ())
    conv = SamePadConv3d(3, 5, kernel, stride=stride)
    out = conv(x)
    assert out.shape == (2, 5, *(n // s for n, s in zip(x.shape[2:], strides)))
    reference = F.conv3d(F.pad(x, pad), conv.conv.weight, conv.conv.bias, stride=strides)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)

    convt = SamePadConvTranspose3d(3, 5, kernel, stride=stride)
    out = convt(x)
    assert out.shape == (2, 5, *(n * s for n, s in zip(x.shape[2:], strides)))
    reference = F.conv_transpose3d(F.pad(x, pad), convt.convt.weight, convt.convt.bias, stride=strides,
                                   padding=kernel - 1)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("axis", [1, 2, 3])
def test_axial_attention_equals_brute_force(axis):
    torch.manual_seed(0)
    attn = AxialAttention(8, n_head=2, axial_dim=axis)
    x = torch.randn(2, 3, 4, 5, 8)                                       # (B, T, H, W, C)
    q, k, v = attn.w_qs(x), attn.w_ks(x), attn.w_vs(x)
    expected = torch.zeros_like(x)
    for index in np.ndindex(*[n for d, n in enumerate(x.shape[:4]) if d != axis]):
        line = list(index)
        line.insert(axis, slice(None))                                   # one line along `axis`
        for h in range(2):
            cols = slice(4 * h, 4 * h + 4)
            qh, kh, vh = q[tuple(line)][:, cols], k[tuple(line)][:, cols], v[tuple(line)][:, cols]
            weights = torch.softmax(qh @ kh.T / 2.0, dim=-1)             # sqrt(d_k) = sqrt(4)
            expected[tuple(line) + (cols,)] = weights @ vh
    torch.testing.assert_close(attn(x), attn.fc(expected), rtol=1e-5, atol=1e-5)


def small_codebook():
    """4 codes in 2-D, trained state (no first-batch init), counts set by hand."""
    codebook = Codebook(4, 2)
    codebook._need_init = False
    codebook.embeddings.copy_(torch.tensor([[0., 0.], [1., 0.], [0., 1.], [5., 5.]]))
    codebook.z_avg.copy_(codebook.embeddings * 2)
    codebook.N.copy_(torch.tensor([2., 2., 2., 2.]))
    return codebook


def test_one_ema_step_equals_hand_computation():
    codebook = small_codebook()
    # 5 encoder outputs, (B=1, D=2, t=1, h=1, w=5): nearest codes 0, 1, 1, 2, 3.
    vectors = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.2, -0.1], [0.1, 0.8], [4.0, 6.0]])
    z = vectors.T.reshape(1, 2, 1, 1, 5)
    out = codebook(z)
    assert out["encodings"].flatten().tolist() == [0, 1, 1, 2, 3]
    # Hand computation of paper eqs. 3-6.
    n_total = np.array([1., 2., 1., 1.])
    encode_sum = np.array([[0.1, 0.1], [2.1, 0.1], [0.1, 0.8], [4.0, 6.0]])
    N = 0.99 * 2 + 0.01 * n_total
    z_avg = 0.99 * np.array([[0., 0.], [2., 0.], [0., 2.], [10., 10.]]) + 0.01 * encode_sum
    n = N.sum()
    weights = (N + 1e-7) / (n + 4 * 1e-7) * n
    np.testing.assert_allclose(codebook.N.numpy(), N, rtol=1e-6)
    np.testing.assert_allclose(codebook.z_avg.numpy(), z_avg, rtol=1e-6)
    np.testing.assert_allclose(codebook.embeddings.numpy(), z_avg / weights[:, None], rtol=1e-6)
    # Commitment loss and the straight-through output use the codes before the update.
    quantized = np.array([[0., 0.], [1., 0.], [1., 0.], [0., 1.], [5., 5.]])
    assert out["commitment_loss"].item() == pytest.approx(0.25 * ((vectors.numpy() - quantized) ** 2).mean())
    np.testing.assert_allclose(out["embeddings"].reshape(2, 5).T.detach().numpy(), quantized, atol=1e-6)
    probs = n_total / 5
    assert out["perplexity"].item() == pytest.approx(math.exp(-(probs * np.log(probs)).sum()), rel=1e-5)


def test_loss_and_codebook_flags_reach_the_model():
    """03's flags for the constants of paper eqs. 1 and 3-4 (beta, EMA decay): one EMA step at decay 0.5,
    beta 0.5, by hand; and the smoothing epsilon at another value than VideoGPT's, through the model's keyword."""
    args = vqvae_stage.parse_args(["--beta", "0.5", "--ema-decay", "0.5"])
    model = VQVAE(embedding_dim=2, n_codes=4, n_hiddens=16, n_res_layers=1, resolution=16,
                         sequence_length=4, downsample=(2, 4, 4), beta=args.beta, ema_decay=args.ema_decay,
                         ema_epsilon=0.1)
    assert model.data_variance == DATA_VARIANCE and model.codebook.restart_below == RESTART_BELOW
    codebook = small_codebook()
    codebook.beta, codebook.decay, codebook.epsilon = (model.codebook.beta, model.codebook.decay,
                                                       model.codebook.epsilon)
    vectors = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.2, -0.1], [0.1, 0.8], [4.0, 6.0]])
    out = codebook(vectors.T.reshape(1, 2, 1, 1, 5))
    N = 0.5 * 2 + 0.5 * np.array([1., 2., 1., 1.])
    z_avg = 0.5 * np.array([[0., 0.], [2., 0.], [0., 2.], [10., 10.]]) + 0.5 * np.array(
        [[0.1, 0.1], [2.1, 0.1], [0.1, 0.8], [4.0, 6.0]])
    weights = (N + 0.1) / (N.sum() + 4 * 0.1) * N.sum()
    np.testing.assert_allclose(codebook.embeddings.numpy(), z_avg / weights[:, None], rtol=1e-6)
    quantized = np.array([[0., 0.], [1., 0.], [1., 0.], [0., 1.], [5., 5.]])
    assert out["commitment_loss"].item() == pytest.approx(0.5 * ((vectors.numpy() - quantized) ** 2).mean())
    with pytest.raises(common.InputError, match="--ema-decay 1.0: must be in"):
        vqvae_stage.model_config(vqvae_stage.parse_args(["--ema-decay", "1"]))


def test_compile_is_the_default_on_cuda_only():
    """03's --compile: compiled by default on CUDA, not on the CPU; --compile and --no-compile decide."""
    model, cpu = VQVAE(**TINY), common.DistContext(0, 0, 1, torch.device("cpu"))
    for flags, on_cpu, on_cuda in [([], False, True), (["--compile"], True, True), (["--no-compile"], False, False)]:
        args = vqvae_stage.parse_args(flags)
        assert (common.compiles(args.compile, torch.device("cpu")),
                common.compiles(args.compile, torch.device("cuda"))) == (on_cpu, on_cuda), flags
        wrapped = common.wrap_for_training(model, args, cpu)
        assert (wrapped is not model) == on_cpu and isinstance(wrapped, torch.nn.Module), flags


def test_dead_code_is_restarted_from_encoder_outputs():
    codebook = small_codebook()
    codebook.N[3] = 0.5            # after one step without use: 0.495 < 1, so code 3 is dead
    vectors = torch.tensor([[0.1, 0.1], [0.9, 0.2], [1.2, -0.1], [0.1, 0.8], [0.2, 0.3]])
    codebook(vectors.T.reshape(1, 2, 1, 1, 5))
    restarted = codebook.embeddings[3]
    assert any(torch.equal(restarted, v) for v in vectors), restarted
    assert codebook.N[3].item() == pytest.approx(0.495)
    # Live codes keep their EMA value.
    np.testing.assert_allclose(codebook.embeddings[:3].numpy(), (codebook.z_avg[:3] / (
        (codebook.N[:3] + 1e-7) / (codebook.N.sum() + 4e-7) * codebook.N.sum()).unsqueeze(1)).numpy(),
        rtol=1e-6)


def test_codebook_runs_in_fp32_under_autocast():
    codebook = small_codebook()
    z = torch.randn(1, 2, 1, 1, 5, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = codebook(z)
    assert out["embeddings"].dtype == torch.float32 and codebook.embeddings.dtype == torch.float32


def test_tiny_config_overfits_a_few_clips():
    torch.manual_seed(0)
    work = make_frames_work_in_memory()
    model = VQVAE(**TINY)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x = torch.from_numpy(work).permute(0, 4, 1, 2, 3).float() / 255 - 0.5   # (2, 3, 8, 32, 32)
    losses = []
    for _ in range(40):
        recon_loss, _, vq = model(x)
        loss = recon_loss + vq["commitment_loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < losses[0] / 10, (losses[0], losses[-5:])


def make_frames_work_in_memory():
    """Two uint8 clips (2, 8, 32, 32, 3) of moving squares."""
    clips = np.zeros((2, 8, 32, 32, 3), np.uint8)
    for c in range(2):
        for t in range(8):
            clips[c, t, 8:16, 3 * t + 4 * c:3 * t + 4 * c + 8] = (220, 60, 40)
    return clips


# --------------------------------------------------------------------------------------------------
# Checkpoints: strict loading of VideoGPT-named weights, ours and the authors' Lightning files
# --------------------------------------------------------------------------------------------------
# Names and shapes of VideoGPT's VQ-VAE for TINY (videogpt/vqvae.py): a sample of every module kind.
VIDEOGPT_KEYS = {
    "encoder.convs.0.conv.weight": (16, 3, 4, 4, 4), "encoder.convs.1.conv.bias": (16,),
    "encoder.conv_last.conv.weight": (16, 16, 3, 3, 3),
    "encoder.res_stack.0.block.0.running_var": (16,), "encoder.res_stack.0.block.2.conv.weight": (8, 16, 3, 3, 3),
    "encoder.res_stack.0.block.5.conv.weight": (16, 8, 1, 1, 1),
    "encoder.res_stack.0.block.8.attn_t.w_qs.weight": (16, 16), "encoder.res_stack.0.block.8.attn_w.fc.bias": (16,),
    "encoder.res_stack.1.num_batches_tracked": (),
    "decoder.res_stack.0.block.8.attn_h.w_vs.weight": (16, 16), "decoder.convts.0.convt.weight": (16, 16, 4, 4, 4),
    "decoder.convts.1.convt.weight": (16, 3, 4, 4, 4),
    "pre_vq_conv.conv.weight": (8, 16, 1, 1, 1), "post_vq_conv.conv.bias": (16,),
    "codebook.embeddings": (32, 8), "codebook.N": (32,), "codebook.z_avg": (32, 8),
}


def test_module_and_buffer_names_are_videogpt_names():
    state = VQVAE(**TINY).state_dict()
    for key, shape in VIDEOGPT_KEYS.items():
        assert key in state, key
        assert tuple(state[key].shape) == shape, key
    assert not any(key.startswith("decoder.convts.2") or "bias" in key and ".block.2." in key for key in state)


def lightning_state(model, prefix=""):
    return {prefix + k: v.clone() for k, v in model.state_dict().items()}


def test_lightning_vqvae_checkpoint_loads_strictly_without_pytorch_lightning(tmp_path, monkeypatch):
    torch.manual_seed(1)
    source = VQVAE(**TINY)
    source.codebook.N.fill_(3.0)
    # A class of a package that is not installed when loading (like pytorch_lightning's callbacks).
    (tmp_path / "fake_lightning.py").write_text("class ModelCheckpoint:\n    def __init__(self):\n"
                                                "        self.best = 1.0\n\n"
                                                "class AttributeDict(dict):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import fake_lightning
    args = Namespace(embedding_dim=8, n_codes=32, n_hiddens=16, n_res_layers=1, downsample=[2, 4, 4],
                     resolution=32, sequence_length=8, batch_size=4)
    path = tmp_path / "vqvae.ckpt"
    torch.save({"state_dict": lightning_state(source),
                "hyper_parameters": fake_lightning.AttributeDict(args=args),
                "callbacks": {"ModelCheckpoint": fake_lightning.ModelCheckpoint()}}, path)
    monkeypatch.delitem(sys.modules, "fake_lightning")
    (tmp_path / "fake_lightning.py").unlink()

    loaded = common.load_vqvae(path)
    assert not loaded.training and loaded.config == dict(TINY)
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    # A loaded codebook is never re-initialised from a batch, even in training mode.
    assert loaded.codebook._need_init is False
    x = torch.rand(2, 3, 8, 32, 32) - 0.5
    codes, embeddings = loaded.encode(x, include_embeddings=True)
    assert codes.shape == (2, 4, 8, 8) and codes.dtype == torch.long
    assert embeddings.shape == (2, 8, 4, 8, 8)
    torch.testing.assert_close(loaded.codebook.dictionary_lookup(codes).movedim(-1, 1), embeddings)
    assert loaded.decode(codes).shape == x.shape


def test_authors_gpt_checkpoint_gives_its_vqvae(tmp_path):
    source = VQVAE(**TINY)
    state = lightning_state(source, prefix="vqvae.")
    # The GPT's own weights; its position embeddings have one row per latent position (t, h, w).
    state.update({"attn_stack.pos_embd.emb.d_0": torch.zeros(4, 4), "attn_stack.pos_embd.emb.d_1": torch.zeros(8, 4),
                  "attn_stack.pos_embd.emb.d_2": torch.zeros(8, 4), "fc_out.weight": torch.zeros(32, 12)})
    args = Namespace(vqvae="vqvae.ckpt", resolution=32, sequence_length=8, hidden_dim=12, heads=2)
    torch.save({"state_dict": state, "hyper_parameters": {"args": args}}, tmp_path / "gpt.ckpt")
    loaded = common.load_vqvae(tmp_path / "gpt.ckpt")
    assert loaded.config["downsample"] == (2, 4, 4) and loaded.latent_shape == (4, 8, 8)
    torch.testing.assert_close(loaded.codebook.embeddings, source.codebook.embeddings)


def test_checkpoint_with_wrong_weights_fails_with_one_line(tmp_path):
    state = lightning_state(VQVAE(**TINY))
    del state["decoder.convts.1.convt.bias"]
    args = Namespace(**TINY)
    torch.save({"state_dict": state, "hyper_parameters": {"args": args}}, tmp_path / "bad.ckpt")
    with pytest.raises(common.InputError, match=r"bad.ckpt: weights do not fit a VQ-VAE .*convts.1.convt.bias"):
        common.load_vqvae(tmp_path / "bad.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(common.InputError, match=r"junk.ckpt: not a readable torch checkpoint"):
        common.load_vqvae(tmp_path / "junk.ckpt")


def test_csv_log_drops_rows_after_the_resumed_checkpoint(tmp_path):
    log = common.CSVLog(tmp_path / "log.csv", ["step", "loss"])
    for step in range(1, 6):
        log.log(step=step, loss=1.0 / step)
    common.CSVLog(tmp_path / "log.csv", ["step", "loss"], resume_step=3).log(step=4, loss=9.0)
    table = pd.read_csv(tmp_path / "log.csv")
    assert list(table["step"]) == [1, 2, 3, 4] and list(table["loss"]) == [1.0, 0.5, 0.333333, 9.0]
    common.CSVLog(tmp_path / "log.csv", ["step", "loss"])       # a fresh run starts a fresh log
    assert pd.read_csv(tmp_path / "log.csv").empty


def test_constant_schedule_of_the_authors_vqvae(tmp_path):
    work = make_frames_work(tmp_path)
    run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--max-steps", "4", "--log-every", "1",
               "--lr-schedule", "constant", "--lr", "2e-4")
    assert read_log(work)["lr"].tolist() == [2e-4] * 4
    args = Namespace(lr_schedule="cosine", lr=1e-3, max_steps=10)
    assert vqvae_stage.learning_rate(0, args) == 1e-3 and vqvae_stage.learning_rate(5, args) == pytest.approx(5e-4)


def test_cosine_schedule_matches_torch_cosine_annealing():
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([parameter], lr=3e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=20)
    for step in range(20):
        assert common.cosine_lr(step, 20, 3e-4) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        scheduler.step()


# --------------------------------------------------------------------------------------------------
# The stage script, end to end
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [1, 3])
def test_clip_sampler_reads_ahead_with_any_number_of_workers(workers):
    """Regression: with --workers 1 the read-ahead task waited on the only reader thread (deadlock)."""
    arrays = [np.arange(n * 2 * 2 * 3, dtype=np.uint8).reshape(n, 2, 2, 3) % 251 for n in (40, 25)]
    sampler = vqvae_stage.ClipSampler(arrays, sequence_length=4, frame_step=3, workers=workers)
    batch = sampler.batch_async(seed=0, step=5, global_batch=6).result(timeout=30)    # (B, T, H, W, 3)
    assert batch.shape == (6, 4, 2, 2, 3)
    starts = sampler.starts(np.random.default_rng([0, 5]), 6)
    expected = np.stack([arrays[r][f:f + 10:3] for r, f in starts])
    np.testing.assert_array_equal(batch.numpy(), expected)
    # the global batch: 3 processes read 2 clips each, together the batch one process reads alone
    shares = [sampler.batch_async(0, 5, 6, rank, 3).result(timeout=30) for rank in range(3)]
    np.testing.assert_array_equal(torch.cat(shares).numpy(), expected)


def test_script_trains_writes_outputs_and_skips_when_done(tmp_path):
    work = make_frames_work(tmp_path)
    # A broken array in the test session proves that session is never read.
    np.save(work / "frames/sub-01/ses-005/sub-01_ses-005_task-shinobi_run-01_level-1_rep-03.npy",
            np.zeros((80, 16, 16, 3), np.uint8))
    flags = [*TINY_FLAGS, "--max-steps", "12", "--lr", "2e-3"]
    first = run_script("03_train_vqvae.py", "--work", work, *flags, "--log-every", "6", "--val-every", "6")
    assert "of 4 validation clips have distinct code maps" in first.stdout
    log = read_log(work)
    assert list(log["step"]) == [6, 12]
    assert list(log.columns) == ["step", "lr", "loss", "recon_loss", "commitment_loss", "perplexity",
                                 "codes_used", "val_mse", "val_psnr", "clips_per_s", "peak_mem_gb"]
    assert log["loss"].iloc[-1] < log["loss"].iloc[0]
    np.testing.assert_allclose(log["val_psnr"], 10 * np.log10(1 / log["val_mse"]), rtol=1e-4)
    assert ((log["codes_used"] > 0) & (log["codes_used"] <= 1)).all()
    from PIL import Image
    assert Image.open(work / "vqvae/recon.png").size == (8 * 32, 4 * 2 * 32)    # 8 frames x (4 clips x 2)
    model = common.load_vqvae(work / "vqvae/ckpt.pt")
    assert model.config == dict(TINY)
    # the same flags and frames: skipped (other log intervals and workers do not matter)
    again = run_script("03_train_vqvae.py", "--work", work, *flags, "--log-every", "3", "--workers", "1")
    assert "is complete (12 steps, same flags and frames)" in again.stdout
    assert common.read_record(work / "vqvae/ckpt.json")["complete"] is True
    # another model flag: refused with the flag named, nothing changed
    other = [*flags]
    other[other.index("--n-codes") + 1] = "64"
    before = (work / "vqvae/ckpt.pt").stat().st_mtime_ns
    line = last_error_line(run_script("03_train_vqvae.py", "--work", work, *other, check=False))
    assert line == (f"error: {work / 'vqvae/ckpt.pt'}: made with --n-codes 32, not 64: pass the same flags, or "
                    "--overwrite to redo it")
    assert (work / "vqvae/ckpt.pt").stat().st_mtime_ns == before
    # other frames (a re-rendered repetition): trained again from step 0, and said
    path = work / "frames/sub-01/ses-001/sub-01_ses-001_task-shinobi_run-01_level-1_rep-00.npy"
    frames = np.load(path)
    np.save(path, 255 - frames)
    retrained = run_script("03_train_vqvae.py", "--work", work, *flags)
    assert "changed since" in retrained.stdout and "training from step 0" in retrained.stdout
    assert common.load_checkpoint(work / "vqvae/ckpt.pt")["provenance"]["inputs"][
        str(path.relative_to(work))]["sha256"] == common.file_sha256(path)


def test_resume_after_sigterm_reproduces_uninterrupted_losses(tmp_path):
    flags = [*TINY_FLAGS, "--max-steps", "30", "--log-every", "1", "--val-every", "1000", "--ckpt-every", "1000",
             "--batch-size", "2"]
    straight = make_frames_work(tmp_path / "straight")
    run_script("03_train_vqvae.py", "--work", straight, *flags)

    killed = make_frames_work(tmp_path / "killed")
    process = subprocess.Popen([sys.executable, "03_train_vqvae.py", "--work", str(killed), *flags], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = killed / "vqvae" / "log.csv"
    deadline = time.time() + 60
    while time.time() < deadline and (not log_path.exists() or len(log_path.read_text().splitlines()) < 4):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)         # what SLURM sends before preemption
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == common.EXIT_INTERRUPTED == 75, stderr   # not 0: a chain must not go on
    interrupted = common.load_checkpoint(killed / "vqvae/ckpt.pt")
    stopped_at = interrupted["step"]
    assert 3 <= stopped_at < 30, "the run was not interrupted: the kill came too late"
    assert interrupted["complete"] is False and common.read_record(killed / "vqvae/ckpt.json")["complete"] is False
    assert stderr.strip().splitlines()[-1] == (f"03_train_vqvae: interrupted at step {stopped_at} of 30 by SIGTERM; "
                                               "checkpoint saved: re-run to resume")

    not_resumed = run_script("03_train_vqvae.py", "--work", killed, *flags, check=False)
    assert not_resumed.returncode == 2
    assert not_resumed.stderr.strip().splitlines()[-1] == (
        f"error: {killed / 'vqvae/ckpt.pt'}: an unfinished run ({stopped_at} of 30 steps) exists: pass --resume "
        "to continue it or --overwrite to start over")
    # the next stage refuses the unfinished VQ-VAE
    gpt = run_script("04_train_gpt.py", "--work", killed, "--device", "cpu", "--hidden-dim", "24", "--cond-dim", "24",
                     "--layers", "1", "--heads", "2", "--max-steps", "2", check=False)
    assert last_error_line(gpt) == (f"error: {killed / 'vqvae/ckpt.pt'}: unfinished training (step {stopped_at} of 30): "
                                    "re-run 03_train_vqvae.py to finish it, or pass --allow-unfinished to use it as it is")

    run_script("03_train_vqvae.py", "--work", killed, *flags, "--resume")
    a, b = read_log(straight), read_log(killed)
    assert list(b["step"]) == list(range(1, 31))
    for column in ["loss", "recon_loss", "commitment_loss", "perplexity", "codes_used", "lr"]:
        np.testing.assert_allclose(b[column], a[column], rtol=1e-5, err_msg=column)
    sa = common.load_checkpoint(straight / "vqvae/ckpt.pt")["model"]
    sb = common.load_checkpoint(killed / "vqvae/ckpt.pt")["model"]
    for key in sa:
        torch.testing.assert_close(sb[key], sa[key], rtol=1e-5, atol=1e-6, msg=key)


def test_a_run_holds_its_folder_and_ctrl_c_checkpoints_it(tmp_path):
    """A second run on the folder of a run in progress stops at once, naming the holder (both used to
    train, and log the same steps twice); Ctrl-C (SIGINT) is taken like SIGTERM: checkpoint, one line,
    75 (it was a KeyboardInterrupt traceback); the kernel frees the folder when the holder ends."""
    work = make_frames_work(tmp_path)
    flags = [*TINY_FLAGS, "--max-steps", "100000", "--log-every", "1", "--val-every", "100000", "--batch-size", "2"]
    holder = subprocess.Popen([sys.executable, "03_train_vqvae.py", "--work", str(work), *flags], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log_path = work / "vqvae" / "log.csv"
    deadline = time.time() + 60
    while time.time() < deadline and (not log_path.exists() or len(log_path.read_text().splitlines()) < 3):
        time.sleep(0.05)
    try:
        second = subprocess.run([sys.executable, "03_train_vqvae.py", "--work", str(work), *flags, "--resume"],
                                cwd=REPO, capture_output=True, text=True, timeout=60)
        assert last_error_line(second) == (f"error: {work / 'vqvae'}: in use by {common.HOST} pid {holder.pid}, "
                                           "another run of this stage: wait for it to end, or stop it, before "
                                           "running it again")
    finally:
        holder.send_signal(signal.SIGINT)          # Ctrl-C
        _, stderr = holder.communicate(timeout=60)
    assert holder.returncode == common.EXIT_INTERRUPTED, stderr
    step = common.read_record(work / "vqvae/ckpt.json")["step"]
    assert stderr.strip().splitlines()[-1] == (f"03_train_vqvae: interrupted at step {step} of 100000 by SIGINT; "
                                               "checkpoint saved: re-run to resume")
    with common.hold_folder(work / "vqvae"):     # free again
        pass


TORCHRUN_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {repo!r})
    import common
    from paper.vqvae import VQVAE

    def check(ctx):
        common.seed_everything(0, ctx.rank)
        model = torch.nn.parallel.DistributedDataParallel(VQVAE(**{tiny!r}), forward_sync_buffers=False)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(2):
            x = torch.rand(2, 3, 8, 32, 32) - 0.5          # different clips on each rank (seed + rank)
            recon_loss, _, vq = model(x)
            optimizer.zero_grad(); (recon_loss + vq["commitment_loss"]).backward(); optimizer.step()
        codebook = model.module.codebook
        for name in ("embeddings", "N", "z_avg"):
            gathered = [torch.zeros_like(getattr(codebook, name)) for _ in range(2)]
            dist.all_gather(gathered, getattr(codebook, name))
            assert torch.equal(gathered[0], gathered[1]), name
        # the batches differ, so identity comes from the all-reduce, not from identical inputs
        gathered = [torch.zeros_like(x) for _ in range(2)]
        dist.all_gather(gathered, x)
        assert not torch.equal(gathered[0], gathered[1])
        common.print0("codebooks identical")

    ctx = common.setup_distributed("cpu")
    check(ctx)   # in a function: the DDP module is gone before its process group (gloo aborts otherwise)
    common.teardown_distributed(wait_for_all=True)
""")


def test_two_process_gloo_torchrun(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(TORCHRUN_WORKER.format(repo=str(REPO), tiny=TINY))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([*torchrun, str(worker)], cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "codebooks identical" in result.stdout

    work = make_frames_work(tmp_path / "work")
    result = subprocess.run([*torchrun, "03_train_vqvae.py", "--work", str(work), *TINY_FLAGS,
                             "--max-steps", "4", "--log-every", "2", "--val-every", "4", "--batch-size", "2"],
                            cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = read_log(work)
    assert list(log["step"]) == [2, 4]                       # rank 0 alone writes the log
    assert common.load_checkpoint(work / "vqvae/ckpt.pt")["step"] == 4
    assert len(common.load_checkpoint(work / "vqvae/ckpt.pt")["rng"]) == 2   # one RNG state per rank


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the file or flag, exit status 2
# --------------------------------------------------------------------------------------------------
def last_error_line(result):
    assert result.returncode == 2, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_training_leaves_out_the_test_runs_of_bold_splits_tsv(tmp_path):
    """03 (and 04: the same common.training_repetitions) follows 02's bold/splits.tsv: its test run, ses-002
    here (not the default 005), is never read; the record lists the repetitions trained on (06 checks them
    against the test runs); a --test-sessions that disagrees with the file is refused."""
    sessions = ("001", "002", "003", "005", "006")
    work = make_frames_work(tmp_path, sessions=sessions)
    common.write_tsv(work / "bold/splits.tsv", [dict(sub="01", ses=ses, task="shinobi", run="01",
                                                     split="test" if ses == "002" else "train") for ses in sessions])
    # A broken array in the test run proves it is never read.
    np.save(work / "frames/sub-01/ses-002/sub-01_ses-002_task-shinobi_run-01_level-1_rep-01.npy",
            np.zeros((80, 16, 16, 3), np.uint8))
    run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--max-steps", "2", "--val-reps", "1")
    trained = common.read_record(work / "vqvae/ckpt.json")["training_repetitions"]
    assert [(rep["ses"], rep["task"], rep["run"]) for rep in trained] == [
        ("001", "shinobi", "01"), ("003", "shinobi", "01"), ("005", "shinobi", "01")]   # 006: validation
    line = last_error_line(run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--test-sessions", "005",
                                      check=False))
    assert line == (f"error: --test-sessions 005: {work / 'bold/splits.tsv'} makes run "
                    "sub-01_ses-002_task-shinobi_run-01 test: leave the flag out to follow the file, or remake "
                    "the file with 02's split flags")


def test_missing_manifest(tmp_path):
    result = run_script("03_train_vqvae.py", "--work", tmp_path, *TINY_FLAGS, check=False)
    assert last_error_line(result) == f"error: {tmp_path / 'frames/manifest.tsv'}: file not found"


def test_frames_of_the_wrong_resolution(tmp_path):
    work = make_frames_work(tmp_path, resolution=16)
    result = run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, check=False)
    line = last_error_line(result)
    assert line.startswith("error: ") and "ses-001" in line
    assert line.endswith("expected uint8 frames (N, 32, 32, 3) for --resolution 32, got uint8 (80, 16, 16, 3)")


def test_listed_frames_file_missing(tmp_path):
    work = make_frames_work(tmp_path)
    (work / "frames/sub-01/ses-002/sub-01_ses-002_task-shinobi_run-01_level-1_rep-01.npy").unlink()
    line = last_error_line(run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, check=False))
    assert line.startswith(f"error: {work / 'frames/manifest.tsv'}: frames file ") and line.endswith(
        "rep-01.npy is listed as ok but does not exist (re-run 01_render_frames.py)")


def test_repetitions_too_short_for_a_clip(tmp_path):
    work = make_frames_work(tmp_path, n_frames=20)      # a clip of 8 frames at step 4 spans 29 frames
    line = last_error_line(run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, check=False))
    assert line == (f"error: {work / 'frames/manifest.tsv'}: no ok repetition outside the test runs "
                    "and the --val-reps 2 held out has the 29 frames one clip needs")


def test_bad_downsample_flag(tmp_path):
    flags = [f for f in TINY_FLAGS]
    i = flags.index("--downsample")
    flags[i + 1:i + 4] = ["3", "4", "4"]
    line = last_error_line(run_script("03_train_vqvae.py", "--work", tmp_path, *flags, check=False))
    assert line == "error: --downsample: T factor 3 must be a power of 2 dividing 8"


@needs_namespaces
def test_read_only_work_and_full_disk(tmp_path):
    work = make_frames_work(tmp_path)
    result, _ = run_confined("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--max-steps", "2", read_only=work)
    assert last_error_line(result) == f"error: {work / 'vqvae'}: Read-only file system"
    # room for the log, not for the checkpoint (torch reports a full disk as a RuntimeError of its zip writer)
    result, left = run_confined("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--max-steps", "2",
                                full=work / "vqvae", full_bytes=64 * 1024)
    assert last_error_line(result) == f"error: {work / 'vqvae/ckpt.pt'}: cannot write it (No space left on device)"
    assert left == [".lock", "log.csv"]   # the folder's lock, the log of what ran; no checkpoint, no temporary
    run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--max-steps", "2")   # a re-run with room
    assert common.read_record(work / "vqvae/ckpt.json")["complete"] is True


def test_truncated_checkpoint_is_named_by_03_and_04(tmp_path):
    work = make_frames_work(tmp_path)
    run_script("03_train_vqvae.py", "--work", work, *TINY_FLAGS, "--max-steps", "2")
    ckpt = work / "vqvae/ckpt.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:20000])
    for script, extra in (("03_train_vqvae.py", TINY_FLAGS), ("04_train_gpt.py", ["--device", "cpu"])):
        line = last_error_line(run_script(script, "--work", work, *extra, "--max-steps", "2", check=False))
        assert line.startswith(f"error: {ckpt}: not a readable torch checkpoint ("), script


def test_benchmark_counts_no_flops_on_the_decoders_zero_padding():
    """bench_vqvae's FLOPs: a padded SamePadConvTranspose3d (stride 1 in time, as the decoder's last layer)
    costs what the same transposed convolution costs on the unpadded input, forward and backward."""
    bench = load_stage("benchmarks/bench_vqvae.py")
    from torch.utils.flop_counter import FlopCounterMode
    layer = SamePadConvTranspose3d(6, 3, 4, stride=(1, 2, 2))
    assert layer.pad_input is not None
    x = torch.randn(2, 6, 5, 7, 7, requires_grad=True)                     # (B, C, T, H, W)

    def padded_step():
        layer(x).sum().backward()
    plain = torch.nn.ConvTranspose3d(6, 3, 4, stride=(1, 2, 2))            # no padding anywhere
    counter = FlopCounterMode(display=False)
    with counter:
        plain(x).sum().backward()
    # forward 2 x B x C_in x C_out x 4^3 x T x H x W, backward twice that (input and weight gradients)
    assert counter.get_total_flops() == 3 * 2 * 2 * 6 * 3 * 64 * 5 * 7 * 7
    assert bench.useful_flops(layer, padded_step) == pytest.approx(counter.get_total_flops(), rel=1e-12)
    whole = FlopCounterMode(display=False)
    with whole:
        padded_step()
    assert whole.get_total_flops() > 1.5 * counter.get_total_flops()      # what torch's counter alone says
