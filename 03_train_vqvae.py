"""03 — Train VideoGPT's VQ-VAE on 16-frame gameplay clips (paper section 2.3.1.1).

    python 03_train_vqvae.py --work work                                   # paper configuration
    python 03_train_vqvae.py --work work --precision bf16 --channels-last --compile
    python 03_train_vqvae.py --work work --resume                          # continue an interrupted run
    torchrun --nproc-per-node 4 03_train_vqvae.py --work work --resume    # 4 GPUs, one node
    sbatch --nodes 2 slurm/gpu_stage.sbatch 03_train_vqvae.py --work work  # SLURM: one process per GPU
    python 03_train_vqvae.py --work work --device cpu --n-hiddens 16 --n-res-layers 1 --resolution 32 \\
        --sequence-length 8 --downsample 2 4 4 --n-codes 32 --embedding-dim 8 --max-steps 50   # tiny

Input: <work>/frames/manifest.tsv and its uint8 (N, H, W, 3) frame arrays (stage 01). Training uses the
repetitions with status ok outside --test-sessions (the encoding test set); the last --val-reps of them
(in manifest order) are held out to measure reconstruction. A clip is --sequence-length frames at 15 Hz
(every --frame-step-th 60 Hz frame) from a random repetition and start.

Output (<work>/vqvae/):
    ckpt.pt     model, optimizer, GradScaler, step, RNG states (per rank), args, model_config, record
    ckpt.json   the record: flags, fingerprints of the frames, complete or not (README: provenance)
    log.csv     step, lr, losses, perplexity, codes_used, val_mse, val_psnr, clips_per_s, peak_mem_gb
    recon.png   validation clips (rows: original, reconstruction) at the end of training

Loss (VideoGPT): MSE(x, x_hat) / 0.06 + beta x commitment (eq. 1); the codebook follows an EMA (eqs. 3-6,
common.Codebook). Adam(3e-4, betas 0.9/0.999), cosine annealing to 0 over --max-steps (eq. 2; the
authors' code kept 3e-4 constant: --lr-schedule constant). --batch-size counts the clips of one optimizer
step over all processes; BatchNorm statistics stay per process (over --batch-size / N clips with N
processes), as in VideoGPT without Lightning's --sync_batchnorm, so N > 1 is close to, not equal to, one
process. The run checkpoints every --ckpt-every steps and on SIGTERM/SIGUSR1 (SLURM's
preemption), then exits with status 75; --resume continues it exactly (same clips, same losses).
"""
import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common
from common import DEFAULT_WORK, InputError, run_main

STAGE = "03_train_vqvae"
LOG_FIELDS = ["step", "lr", "loss", "recon_loss", "commitment_loss", "perplexity", "codes_used",
              "val_mse", "val_psnr", "clips_per_s", "peak_mem_gb"]
ADAM_BETAS = (0.9, 0.999)   # paper 2.3.1.1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    data = p.add_argument_group("data")
    data.add_argument("--test-sessions", nargs="*", default=["005"],
                      help="sessions left out of training (the encoding test set; none: use all, as the authors)")
    data.add_argument("--val-reps", type=int, default=1,
                      help="last N training repetitions held out for the validation reconstruction error")
    data.add_argument("--val-clips", type=int, default=32, help="validation clips (fixed, drawn once)")
    data.add_argument("--frame-step", type=int, default=4, help="60 Hz frames per clip frame (4: clips at 15 Hz)")
    data.add_argument("--workers", type=int, default=4, help="threads that read clips from disk")
    paper = common.VQVAE_PAPER_CONFIG
    model = p.add_argument_group("model (the authors' configuration by default: Table 2(a)'s parameter counts)")
    model.add_argument("--resolution", type=int, default=paper["resolution"],
                       help="frame height and width in pixels (default 128; the paper also used 64)")
    model.add_argument("--sequence-length", type=int, default=paper["sequence_length"],
                       help="frames per clip (default 16: 1.07 s at 15 Hz)")
    model.add_argument("--n-hiddens", type=int, default=paper["n_hiddens"],
                       help="channels of the encoder's and decoder's convolutions and attention (default 240)")
    model.add_argument("--n-res-layers", type=int, default=paper["n_res_layers"],
                       help="attention residual blocks in the encoder and in the decoder (default 4)")
    model.add_argument("--downsample", nargs=3, type=int, default=list(paper["downsample"]),
                       help="T, H, W downsampling factors, powers of 2 (default 4 16 16: a 4 x 8 x 8 code grid)")
    model.add_argument("--embedding-dim", type=int, default=paper["embedding_dim"],
                       help="width of a codebook vector (default 128)")
    model.add_argument("--n-codes", type=int, default=paper["n_codes"], help="codebook size K (default 1024)")
    train = p.add_argument_group("training (paper section 2.3.1.1 and VideoGPT)")
    train.add_argument("--beta", type=float, default=0.25, help="commitment loss weight (eq. 1; default 0.25)")
    train.add_argument("--ema-decay", type=float, default=0.99, help="codebook EMA decay gamma (eqs. 3-4; 0.99)")
    train.add_argument("--batch-size", type=int, default=16,
                       help="clips per optimizer step, over all processes (split evenly between them)")
    train.add_argument("--max-steps", type=int, default=50000, help="optimizer steps (cosine period)")
    train.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (paper: 3e-4)")
    train.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                       help="cosine annealing to 0 over --max-steps (the paper, eq. 2) or constant (the authors' code)")
    train.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    run.add_argument("--precision", default="fp32", choices=common.PRECISIONS,
                     help="fp32, or mixed precision: fp16 (with loss scaling) or bf16")
    run.add_argument("--tf32", action="store_true", help="TF32 matmuls and convolutions in fp32 (Ampere+)")
    run.add_argument("--channels-last", action="store_true", help="channels_last_3d memory format")
    run.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN pick the fastest kernels")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--log-every", type=int, default=50, help="steps between log.csv rows")
    run.add_argument("--val-every", type=int, default=1000, help="steps between validation passes")
    run.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from <work>/vqvae/ckpt.pt if present")
    run.add_argument("--overwrite", action="store_true", help="start over even if a checkpoint exists")
    args = p.parse_args(argv)
    args.test_sessions = [s.removeprefix("ses-") for s in args.test_sessions]
    return args


# --------------------------------------------------------------------------------------------------
# Training (paper section 2.3.1.1)
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    preemption = common.PreemptionFlag()   # from here on SIGTERM/SIGUSR1 ask to stop; they no longer kill
    args = parse_args(argv)
    work = Path(args.work)
    out_dir = work / "vqvae"
    ckpt_path = out_dir / "ckpt.pt"
    config = model_config(args)
    common.remove_stale_temporaries(out_dir)

    # What this run is made of: its flags and the exact frames it reads. A finished run made the same
    # way is skipped; an unfinished one is resumed (--resume); one made from other frames starts over.
    paths, arrays = read_frames(work, args)
    settings = common.settings_of(args)
    inputs = common.input_fingerprints(work, paths)
    checkpoint, complete = common.checkpoint_to_resume(ckpt_path, STAGE, settings, inputs, args.resume, args.overwrite)
    if complete:
        common.print0(f"{STAGE}: {ckpt_path} is complete ({checkpoint['step']} steps, same flags and frames); "
                      "--overwrite to train again")
        return

    ctx = common.setup_distributed(args.device)
    try:
        if checkpoint is None:
            common.start_over(ckpt_path, ctx)
        args.per_rank_batch = common.split_batch(args.batch_size, ctx, STAGE)
        train(args, config, ctx, out_dir, ckpt_path, checkpoint, arrays,
              dict(stage=STAGE, settings=settings, inputs=inputs), preemption)
    finally:
        common.teardown_distributed()


def train(args, config, ctx, out_dir, ckpt_path, checkpoint, arrays, provenance, preemption):
    """The training loop, to --max-steps. A signal (`preemption`) stops it at the end of a step, its
    checkpoint saved: common.Interrupted."""
    device = ctx.device
    common.seed_everything(args.seed, ctx.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    train_sampler, val_clips = samplers(arrays, args, ctx)
    model = common.VQVAE(**config, beta=args.beta, ema_decay=args.ema_decay).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    # fused on CUDA: one kernel for all parameters, and GradScaler's inf check stays on the GPU (no sync)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, fused=device.type == "cuda")
    scaler = common.grad_scaler(device, args.precision)
    start_step = resume(checkpoint, model, optimizer, scaler, ctx)
    raw_model = model
    if ctx.world_size > 1:
        # Buffers are not broadcast: the codebook is kept identical by its own all-reduce.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        forward_sync_buffers=False)
    if args.compile:
        model = torch.compile(model)
    log = common.CSVLog(out_dir / "log.csv", LOG_FIELDS, resume_step=start_step) if ctx.is_main else None

    def save(step):
        rng = common.gather_rng_states(ctx)   # a collective: every rank takes part
        if ctx.is_main:
            common.save_checkpoint(ckpt_path, dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                step=step, max_steps=args.max_steps, complete=step >= args.max_steps, rng=rng, args=vars(args),
                model_config=config, kind=STAGE, provenance=provenance))
        common.barrier(ctx)   # no rank exits before the checkpoint is on disk (srun kills the others)

    # --- loop; the bar is closed however it ends, so that an error message stays the last line printed
    with tqdm(total=args.max_steps, initial=start_step, disable=not ctx.is_main, desc="03 vqvae") as progress:
        next_batch = train_sampler.batch_async(args.seed, start_step, args.batch_size, ctx.rank, ctx.world_size)
        interval_start, interval_steps = time.perf_counter(), 0
        step = start_step
        while step < args.max_steps:
            x = to_model_input(next_batch.result(), device, args.channels_last)     # (B, 3, T, H, W)
            if step + 1 < args.max_steps:   # read the next batch while this one trains
                next_batch = train_sampler.batch_async(args.seed, step + 1, args.batch_size, ctx.rank, ctx.world_size)
            lr = learning_rate(step, args)
            common.set_lr(optimizer, lr)

            with common.autocast(device, args.precision):
                recon_loss, _, vq_output = model(x)
                loss = recon_loss + vq_output["commitment_loss"]               # paper eq. 1 (EMA codebook)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            step += 1
            interval_steps += 1
            progress.update(1)

            last = step == args.max_steps
            if ctx.is_main and (step % args.log_every == 0 or last):
                val_mse = val_psnr = ""
                if step % args.val_every == 0 or last:
                    val_mse, val_psnr = validate(raw_model, val_clips, args, device)
                elapsed = time.perf_counter() - interval_start
                log.log(step=step, lr=lr, loss=loss.item(), recon_loss=recon_loss.item(),
                        commitment_loss=vq_output["commitment_loss"].item(),
                        perplexity=vq_output["perplexity"].item(),
                        codes_used=(raw_model.codebook.N >= 1).float().mean().item(), val_mse=val_mse,
                        val_psnr=val_psnr, clips_per_s=interval_steps * args.batch_size / elapsed,
                        peak_mem_gb=common.peak_memory_gb(device))
                progress.set_postfix(loss=f"{loss.item():.4f}", ppl=f"{vq_output['perplexity'].item():.0f}")
                interval_start, interval_steps = time.perf_counter(), 0

            stop = preemption.agreed(ctx)
            if step % args.ckpt_every == 0 or last or stop:
                save(step)
            if stop and not last:
                raise preemption.interrupted(STAGE, f"at step {step} of {args.max_steps}")

    if ctx.is_main:
        save_recon_figure(raw_model, val_clips, out_dir / "recon.png", args, device)
        distinct, n_clips = distinct_code_maps(raw_model, val_clips, args, device)
        print(f"{STAGE}: {step} steps; wrote {ckpt_path}, {out_dir / 'log.csv'}, "
              f"{out_dir / 'recon.png'}; {distinct} of {n_clips} validation clips have distinct code maps")
        if distinct < max(2, n_clips // 4):
            print(f"{STAGE}: warning: the codes hardly depend on the clip ({distinct} distinct code maps "
                  f"for {n_clips} clips): the VQ-VAE has collapsed onto position; train longer or with a "
                  f"higher --lr (--overwrite)", file=sys.stderr)


def learning_rate(step, args):
    """The learning rate of `step`: the paper's cosine annealing to 0 over --max-steps (eq. 2), or the
    constant rate of the authors' VQ-VAE code."""
    return args.lr if args.lr_schedule == "constant" else common.cosine_lr(step, args.max_steps, args.lr)


# --------------------------------------------------------------------------------------------------
# Set-up: flags to model, frames to clips, a checkpoint to resume
# --------------------------------------------------------------------------------------------------
def model_config(args):
    """The VQVAE keywords of the flags, after checking they describe a valid model."""
    config = {name: getattr(args, name) for name in common.VQVAE_PAPER_CONFIG}
    config["downsample"] = tuple(args.downsample)
    size = (args.sequence_length, args.resolution, args.resolution)
    for d, s, axis in zip(args.downsample, size, "THW"):
        if d < 1 or d & (d - 1) or s % d:
            raise InputError(f"--downsample: {axis} factor {d} must be a power of 2 dividing {s}")
    if args.n_hiddens % 4:
        raise InputError(f"--n-hiddens {args.n_hiddens}: must be a multiple of 4 (n/2 channels, 2 heads)")
    if not 0 <= args.ema_decay < 1:
        raise InputError(f"--ema-decay {args.ema_decay}: must be in [0, 1)")
    return config


def read_frames(work, args):
    """The frames of the training repetitions that hold at least one clip: (paths, memory-mapped uint8
    (N, H, W, 3) arrays), in manifest order."""
    clip_span = (args.sequence_length - 1) * args.frame_step + 1   # 60 Hz frames one clip covers
    paths, arrays = [], []
    for rep in common.training_repetitions(work, args.test_sessions):
        path = work / str(rep["frames_path"])
        frames = common.load_npy(path, advice="re-render it with 01_render_frames.py")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (args.resolution, args.resolution, 3):
            raise InputError(f"{path}: expected uint8 frames (N, {args.resolution}, {args.resolution}, 3) for "
                             f"--resolution {args.resolution}, got {frames.dtype} {frames.shape}")
        if len(frames) >= clip_span:
            paths.append(path)
            arrays.append(frames)
    if not arrays:
        raise InputError(f"{work / 'frames' / 'manifest.tsv'}: no ok repetition outside test sessions "
                         f"{args.test_sessions} has the {clip_span} frames one clip needs")
    return paths, arrays


def samplers(arrays, args, ctx):
    """The sampler of training clips and the fixed validation clips uint8 (val_clips, T, H, W, 3): drawn
    once from the last --val-reps repetitions (from the training ones if there are too few)."""
    n_val = args.val_reps if len(arrays) > args.val_reps else 0
    train_sampler = ClipSampler(arrays[:len(arrays) - n_val], args.sequence_length, args.frame_step,
                                args.workers, pin_memory=ctx.device.type == "cuda")
    val_source = ClipSampler(arrays[len(arrays) - n_val:], args.sequence_length, args.frame_step, 1) \
        if n_val else train_sampler
    val_clips = val_source.read(val_source.starts(np.random.default_rng([args.seed, 10**6]), args.val_clips))
    if ctx.is_main and not n_val:
        print(f"{STAGE}: only {len(arrays)} repetition(s): validation clips come from training data",
              file=sys.stderr)
    return train_sampler, val_clips


def resume(checkpoint, model, optimizer, scaler, ctx):
    """Load a checkpoint's weights, optimizer, loss scaler and random generators; returns its step (0
    without a checkpoint)."""
    if checkpoint is None:
        return 0
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if not common.restore_rng_states(checkpoint["rng"], ctx):
        common.print0(f"{STAGE}: {ctx.world_size} processes instead of {len(checkpoint['rng'])}: "
                      "random generators reseeded (the run continues, not bit-for-bit)")
    return checkpoint["step"]


class ClipSampler:
    """Draws clips (B, T, H, W, 3) uint8 from repetitions; clip starts are uniform over all valid starts.

    The global batch of step s depends only on (seed, step), and rank r of N reads its r-th N-th of it:
    a resumed run draws the same clips as an uninterrupted one, on any number of processes, and batches
    can be read ahead by threads.
    """

    def __init__(self, arrays, sequence_length, frame_step, workers, pin_memory=False):
        self.arrays, self.length, self.step, self.pin_memory = arrays, sequence_length, frame_step, pin_memory
        self.span = (sequence_length - 1) * frame_step + 1                  # 60 Hz frames per clip
        self.n_starts = np.array([len(a) - self.span + 1 for a in arrays])
        self.pool = ThreadPoolExecutor(max_workers=workers)   # reads the clips of one batch in parallel
        # Read-ahead gets a thread of its own: a batch read by a `pool` thread waiting on `pool` would
        # deadlock when --workers is 1.
        self.prefetch = ThreadPoolExecutor(max_workers=1)

    def starts(self, rng, n):
        """n (repetition, first frame) pairs."""
        flat = rng.integers(0, self.n_starts.sum(), size=n)
        reps = np.searchsorted(np.cumsum(self.n_starts), flat, side="right")
        firsts = flat - np.concatenate([[0], np.cumsum(self.n_starts)])[reps]
        return list(zip(reps, firsts))

    def read(self, starts):
        """The clips at `starts`, read in parallel: uint8 (B, T, H, W, 3) (in pinned memory for CUDA)."""
        clips = self.pool.map(lambda s: self.arrays[s[0]][s[1]:s[1] + self.span:self.step], starts)
        batch = torch.from_numpy(np.stack(list(clips)))
        return batch.pin_memory() if self.pin_memory else batch

    def batch_async(self, seed, step, global_batch, rank=0, world_size=1):
        """A future of this rank's share, uint8 (global_batch / world_size, T, H, W, 3), of step's batch."""
        per_rank = global_batch // world_size
        starts = self.starts(np.random.default_rng([seed, step]), global_batch)[rank * per_rank:(rank + 1) * per_rank]
        return self.prefetch.submit(self.read, starts)


def to_model_input(clips, device, channels_last):
    """uint8 clips (B, T, H, W, 3) on the host -> the VQ-VAE's input (B, 3, T, H, W) on `device`: the
    uint8 batch travels, the scaling to [-0.5, 0.5] runs on the device."""
    x = common.video_from_uint8(clips.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# Evaluation and figures
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model, clips, args, device):
    """Reconstruction MSE (on [-0.5, 0.5] pixels) and PSNR (dB, peak-to-peak 1) of the validation clips,
    with the model in eval mode (BatchNorm running statistics, no codebook update)."""
    model.eval()
    squared_error, count = 0.0, 0
    for i in range(0, len(clips), args.per_rank_batch):
        x = to_model_input(clips[i:i + args.per_rank_batch], device, args.channels_last)
        with common.autocast(device, args.precision):
            _, x_recon, _ = model(x)
        squared_error += ((x_recon.float().clamp(-0.5, 0.5) - x) ** 2).sum().item()
        count += x.numel()
    model.train()
    mse = squared_error / count
    return mse, 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def distinct_code_maps(model, clips, args, device):
    """How many of the validation clips get a code map (t, h, w) of their own. A VQ-VAE can reach a low
    loss on dark, sparse frames (gameplay on a black background) while encoding only position: every
    clip then gets the same codes and the GPT downstream sees no content at all."""
    model.eval()
    codes = torch.cat([model.encode(to_model_input(clips[i:i + args.per_rank_batch], device, args.channels_last))
                       for i in range(0, len(clips), args.per_rank_batch)])      # (N, t, h, w)
    model.train()
    return len(torch.unique(codes.flatten(1), dim=0)), len(codes)


def save_recon_figure(model, clips, path, args, device, n_clips=4, n_frames=8):
    """recon.png: for each of n_clips clips, a row of originals above a row of reconstructions."""
    model.eval()
    x = to_model_input(clips[:n_clips], device, args.channels_last)
    with common.autocast(device, args.precision):
        _, x_recon, _ = model(x)
    model.train()
    frames = np.linspace(0, x.shape[2] - 1, min(n_frames, x.shape[2])).round().astype(int)
    rows = []
    for original, recon in zip(x, x_recon.float()):
        for video in (original, recon):                              # (3, T, H, W)
            picked = (video[:, frames].clamp(-0.5, 0.5) + 0.5) * 255   # (3, F, H, W)
            rows.append(picked.permute(2, 1, 3, 0).flatten(1, 2))     # (H, F*W, 3)
    grid = torch.cat(rows, 0).round().byte().cpu().numpy()            # (2*n*H, F*W, 3)
    with common.atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


if __name__ == "__main__":
    run_main(main)
