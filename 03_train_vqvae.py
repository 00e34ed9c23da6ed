"""03 — Train VideoGPT's VQ-VAE on 16-frame gameplay clips (paper section 2.3.1.1).

    python 03_train_vqvae.py --work work                               # paper configuration
    python 03_train_vqvae.py --work work --precision bf16 --channels-last  # GPU: compiled
    python 03_train_vqvae.py --work work --resume                      # continue an interrupted run
    torchrun --nproc-per-node 4 03_train_vqvae.py --work work --resume  # 4 GPUs, one node
    sbatch --nodes 2 slurm/gpu_stage.sbatch \\
        03_train_vqvae.py --work work                                  # SLURM: one process per GPU
    python 03_train_vqvae.py --work work --device cpu --n-hiddens 16 --n-res-layers 1 \\
        --resolution 32 --sequence-length 8 --downsample 2 4 4 --n-codes 32 --embedding-dim 8 \\
        --max-steps 50                                                 # tiny

Input: <work>/frames/manifest.tsv and its uint8 (N, H, W, 3) frame arrays (stage 01). Training uses
the repetitions with status ok outside the encoding test runs (those of bold/splits.tsv, which 02
writes, else of --test-sessions, default 005; the record lists the repetitions trained on); the
last --val-reps of them (in manifest order) are held out to measure reconstruction. A clip is
--sequence-length frames at 15 Hz (every --frame-step-th 60 Hz frame) from a random repetition and
start.

Output (<work>/vqvae/):
    ckpt.pt     model, optimizer, GradScaler, step, RNG states (per rank), args, model_config,
                record
    ckpt.json   the record: flags, fingerprints of the frames, complete or not
                (README: provenance)
    log.csv     step, lr, losses, perplexity, codes_used, val_mse, val_psnr, clips_per_s,
                peak_mem_gb
    recon.png   validation clips (rows: original, reconstruction) at the end of training

Loss (VideoGPT): MSE(x, x_hat) / 0.06 + beta x commitment (eq. 1); the codebook follows an EMA
(eqs. 3-6, Codebook). Adam(3e-4, betas 0.9/0.999), cosine annealing to 0 over --max-steps
(eq. 2; the authors' code kept 3e-4 constant: --lr-schedule constant). --batch-size counts the clips
of one optimizer step over all processes; BatchNorm statistics stay per process
(over --batch-size / N clips with N processes), as in VideoGPT without Lightning's --sync_batchnorm,
so N > 1 is close to, not equal to, one process. The run checkpoints every --ckpt-every steps and
on SIGTERM/SIGUSR1 (SLURM's preemption) or SIGINT (Ctrl-C), then exits with status 75; --resume
continues it exactly (same clips, same losses). One run at a time writes <work>/vqvae/: a second
one stops at once, naming the first's host and pid.
"""
import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import common
from paper.vqvae import Codebook, VQVAE, VQVAE_PAPER_CONFIG, video_from_uint8
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
    common.add_split_flags(data)
    paper = VQVAE_PAPER_CONFIG
    model = p.add_argument_group("model (the authors' configuration by default: "
                                 "Table 2(a)'s parameter counts)")
    model.add_argument("--resolution", type=int, default=paper["resolution"],
                       help="frame height and width in pixels "
                            "(default 128; the paper also used 64)")
    model.add_argument("--sequence-length", type=int, default=paper["sequence_length"],
                       help="frames per clip (default 16: 1.07 s at 15 Hz)")
    model.add_argument("--n-hiddens", type=int, default=paper["n_hiddens"],
                       help="channels of the encoder's and decoder's convolutions and attention "
                            "(default 240)")
    model.add_argument("--n-res-layers", type=int, default=paper["n_res_layers"],
                       help="attention residual blocks in the encoder and in the decoder "
                            "(default 4)")
    model.add_argument("--downsample", nargs=3, type=int, default=list(paper["downsample"]),
                       help="T, H, W downsampling factors, powers of 2 "
                            "(default 4 16 16: a 4 x 8 x 8 code grid)")
    model.add_argument("--embedding-dim", type=int, default=paper["embedding_dim"],
                       help="width of a codebook vector (default 128)")
    model.add_argument("--n-codes", type=int, default=paper["n_codes"],
                       help="codebook size K (default 1024)")
    train = p.add_argument_group("training (paper section 2.3.1.1 and VideoGPT)")
    train.add_argument("--beta", type=float, default=0.25,
                       help="commitment loss weight (eq. 1; default 0.25)")
    train.add_argument("--ema-decay", type=float, default=0.99,
                       help="codebook EMA decay gamma (eqs. 3-4; 0.99)")
    train.add_argument("--batch-size", type=int, default=16,
                       help="clips per optimizer step, over all processes "
                            "(split evenly between them)")
    train.add_argument("--max-steps", type=int, default=50000,
                       help="optimizer steps (cosine period)")
    train.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (paper: 3e-4)")
    train.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine",
                       help="cosine annealing to 0 over --max-steps (the paper, eq. 2) "
                            "or constant (the authors' code)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--precision", default="auto", choices=("auto", *common.PRECISIONS),
                       help="fp32, or mixed precision: fp16 (with loss scaling) or bf16; auto: "
                            f"{common.GPU_PRECISION} on a GPU, fp32 on the CPU")
    common.add_run_flags(p, ["--device", "--workers", "--tf32", "--channels-last",
                             "--cudnn-benchmark", "--compile", "--log-every", "--val-every",
                             "--val-clips", "--ckpt-every", "--resume", "--overwrite"],
                         log_every=50)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Training (paper section 2.3.1.1)
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    # from here on SIGTERM/SIGUSR1/SIGINT ask to stop; they no longer kill
    preemption = common.PreemptionFlag()
    args = parse_args(argv)
    with common.hold_folder(Path(args.work) / "vqvae"):   # a second run there stops at once
        run = plan_run(args)
        if run.checkpoint is not None and run.checkpoint["complete"]:
            common.print0(f"{STAGE}: {run.ckpt_path} is complete ({run.checkpoint['step']} steps, "
                          "same flags and frames); --overwrite to train again")
            return
        common.run_training(train, args, run, preemption)


def train(args, run, ctx, preemption):
    """Paper 2.3.1.1: Adam on MSE / 0.06 + beta x commitment (eq. 1) with the EMA codebook
    (eqs. 3-6), cosine schedule (eq. 2), to --max-steps. A signal stops it at the end of a step, its
    checkpoint saved: common.Interrupted."""
    device = ctx.device
    common.seed_everything(args.seed, ctx.rank)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    per_rank_batch = common.split_batch(args.batch_size, ctx, STAGE)
    train_sampler, val_clips = samplers(run.data, args, ctx)
    state = start_state(args, run, ctx)
    # buffers are not broadcast: the codebook is kept identical on every rank by its own all-reduce
    model = common.wrap_for_training(state.model, args, ctx, forward_sync_buffers=False)
    log = (common.CSVLog(run.out_dir / "log.csv", LOG_FIELDS, resume_step=state.step)
           if ctx.is_main else None)
    # --- loop; the bar is closed however it ends,
    # so that an error message stays the last line printed
    with tqdm(total=args.max_steps, initial=state.step, disable=not ctx.is_main,
              desc="03 vqvae") as progress:
        next_batch = train_sampler.batch_async(args.seed, state.step, args.batch_size, ctx.rank,
                                               ctx.world_size)
        interval = Interval()
        while state.step < args.max_steps:
            x = to_model_input(next_batch.result(), device, args.channels_last)  # (B, 3, T, H, W)
            if state.step + 1 < args.max_steps:   # read the next batch while this one trains
                next_batch = train_sampler.batch_async(args.seed, state.step + 1, args.batch_size,
                                                       ctx.rank, ctx.world_size)
            lr = learning_rate(state.step, args)
            losses = optimizer_step(model, state, x, lr, args)
            state.step += 1
            interval.steps += 1
            progress.update(1)

            last = state.step == args.max_steps
            if ctx.is_main and (state.step % args.log_every == 0 or last):
                val = validate(state.model, val_clips, per_rank_batch, args, device) \
                    if state.step % args.val_every == 0 or last else ("", "")
                log_row(log, args, state, losses, lr, val, interval)
                progress.set_postfix(loss=f"{losses[0].item():.4f}",
                                     ppl=f"{losses[2]['perplexity'].item():.0f}")
                interval = Interval()
            stop = preemption.agreed(ctx)
            if state.step % args.ckpt_every == 0 or last or stop:
                save(args, run, ctx, state)
            if stop and not last:
                raise preemption.interrupted(STAGE, f"at step {state.step} of {args.max_steps}")
    if ctx.is_main:
        report_finished_model(state.model, val_clips, per_rank_batch, args, run)


def optimizer_step(model, state, x, lr, args):
    """One step of Adam on paper eq. 1 for the clips x (B, 3, T, H, W), with loss scaling for fp16
    (the codebook itself follows its EMA, updated in the forward pass).
    Returns (loss, reconstruction loss, the VQ output: commitment loss, perplexity...),
    not synchronised."""
    common.set_lr(state.optimizer, lr)
    with common.autocast(x.device, args.precision):
        recon_loss, _, vq_output = model(x)
        loss = recon_loss + vq_output["commitment_loss"]               # paper eq. 1 (EMA codebook)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss, recon_loss, vq_output


def learning_rate(step, args):
    """The learning rate of `step`: the paper's cosine annealing to 0 over --max-steps (eq. 2), or
    the constant rate of the authors' VQ-VAE code."""
    return (args.lr if args.lr_schedule == "constant"
            else common.cosine_lr(step, args.max_steps, args.lr))


# --------------------------------------------------------------------------------------------------
# Training state, checkpoints, the log
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """The model (unwrapped), its optimizer and loss scaler, and the number of steps taken."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int


@dataclass
class Interval:
    """The steps since the last log row and when they began (for clips per second)."""
    steps: int = 0
    start: float = field(default_factory=time.perf_counter)


def start_state(args, run, ctx):
    """A new VQ-VAE with its optimizer and loss scaler; when resuming, the checkpoint's weights,
    step and random generators."""
    model = VQVAE(**run.model_config, beta=args.beta,
                         ema_decay=args.ema_decay).to(ctx.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    # one kernel for all parameters; GradScaler's check stays on the GPU
    fused = ctx.device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, fused=fused)
    state = TrainState(model, optimizer, common.grad_scaler(ctx.device, args.precision), step=0)
    if run.checkpoint is None:
        return state
    model.load_state_dict(run.checkpoint["model"])
    optimizer.load_state_dict(run.checkpoint["optimizer"])
    state.scaler.load_state_dict(run.checkpoint["scaler"])
    if not common.restore_rng_states(run.checkpoint["rng"], ctx):
        common.print0(f"{STAGE}: {ctx.world_size} processes instead of "
                      f"{len(run.checkpoint['rng'])}: random generators reseeded "
                      "(the run continues, not bit-for-bit)")
    state.step = run.checkpoint["step"]
    return state


def save(args, run, ctx, state):
    """Write the checkpoint of `state` (rank 0; every rank takes part in gathering the random
    states), then wait until it is on disk: srun stops every process once one has exited."""
    rng = common.gather_rng_states(ctx)
    if ctx.is_main:
        common.save_checkpoint(run.ckpt_path, dict(
            model=state.model.state_dict(), optimizer=state.optimizer.state_dict(),
            scaler=state.scaler.state_dict(), step=state.step, max_steps=args.max_steps,
            complete=state.step >= args.max_steps, rng=rng, args=vars(args),
            model_config=run.model_config, kind=STAGE, provenance=run.record))
    common.barrier(ctx)


def log_row(log, args, state, losses, lr, val, interval):
    """Append a row to log.csv: the step's losses (rank 0's), the codebook's use, the validation
    reconstruction (empty between validation passes), throughput and memory."""
    loss, recon_loss, vq_output = losses
    log.log(step=state.step, lr=lr, loss=loss.item(), recon_loss=recon_loss.item(),
            commitment_loss=vq_output["commitment_loss"].item(),
            perplexity=vq_output["perplexity"].item(),
            codes_used=(state.model.codebook.N >= 1).float().mean().item(),
            val_mse=val[0], val_psnr=val[1],
            clips_per_s=interval.steps * args.batch_size / (time.perf_counter() - interval.start),
            peak_mem_gb=common.peak_memory_gb(next(state.model.parameters()).device))


def report_finished_model(model, val_clips, per_rank_batch, args, run):
    """recon.png, and a warning when the codes hardly depend on the clip
    (a collapse onto position)."""
    device = next(model.parameters()).device
    save_recon_figure(model, val_clips, run.out_dir / "recon.png", args, device)
    distinct, n_clips = distinct_code_maps(model, val_clips, per_rank_batch, args, device)
    print(f"{STAGE}: {args.max_steps} steps; wrote {run.ckpt_path}, {run.out_dir / 'log.csv'}, "
          f"{run.out_dir / 'recon.png'}; "
          f"{distinct} of {n_clips} validation clips have distinct code maps")
    if distinct < max(2, n_clips // 4):
        print(f"{STAGE}: warning: the codes hardly depend on the clip "
              f"({distinct} distinct code maps for {n_clips} clips): "
              f"the VQ-VAE has collapsed onto position; "
              f"train longer or with a higher --lr (--overwrite)", file=sys.stderr)


# --------------------------------------------------------------------------------------------------
# Set-up: the run's inputs and record, flags to model, frames to clips
# --------------------------------------------------------------------------------------------------
def plan_run(args):
    """What this run is made of: its flags and the exact frames it reads, and the checkpoint it
    continues. A finished run made the same way is complete (skipped); an unfinished one is resumed
    (--resume); one made from other frames starts over."""
    work = Path(args.work)
    out_dir = work / "vqvae"
    common.remove_stale_temporaries(out_dir)
    config = model_config(args)
    paths, train_arrays, val_arrays, train_reps = read_frames(work, args)
    settings = common.settings_of(args)
    # what auto means on this device (a run of the same precision is the same run, however asked)
    settings["--precision"] = common.resolved_precision(args.precision,
                                                        common.choose_device(args.device))
    inputs = common.input_fingerprints(work, paths)
    checkpoint, _ = common.checkpoint_to_resume(out_dir / "ckpt.pt", STAGE, settings, inputs,
                                                args.resume, args.overwrite)
    # the runs it trained on, which 06 never scores (bold/splits.tsv's test runs)
    trained_on = [common.repetition_record(rep) for rep in train_reps]
    return common.TrainingRun(out_dir, checkpoint, config,
                              dict(stage=STAGE, settings=settings, inputs=inputs,
                                   training_repetitions=trained_on),
                              (train_arrays, val_arrays))


def model_config(args):
    """The VQVAE keywords of the flags, after checking they describe a valid model."""
    config = {name: getattr(args, name) for name in VQVAE_PAPER_CONFIG}
    config["downsample"] = tuple(args.downsample)
    size = (args.sequence_length, args.resolution, args.resolution)
    for d, s, axis in zip(args.downsample, size, "THW"):
        if d < 1 or d & (d - 1) or s % d:
            raise InputError(f"--downsample: {axis} factor {d} must be a power of 2 dividing {s}")
    if args.n_hiddens % 4:
        raise InputError(f"--n-hiddens {args.n_hiddens}: must be a multiple of 4 "
                         "(n/2 channels, 2 heads)")
    if not 0 <= args.ema_decay < 1:
        raise InputError(f"--ema-decay {args.ema_decay}: must be in [0, 1)")
    return config


def read_frames(work, args):
    """The frames of the training and the validation repetitions (the last --val-reps in manifest
    order, as in 04) that hold at least one clip: (paths of both, training arrays, validation
    arrays, training repetitions), the arrays memory-mapped uint8 (N, H, W, 3)."""
    manifest = work / "frames" / "manifest.tsv"
    clip_span = (args.sequence_length - 1) * args.frame_step + 1   # 60 Hz frames one clip covers
    reps = common.training_repetitions(work, args.test_sessions)
    paths, split = [], []
    for part in common.split_validation(reps, args.val_reps, manifest):
        arrays, used = [], []
        for rep in part:
            path = work / str(rep["frames_path"])
            frames = common.load_npy(path, advice="re-render it with 01_render_frames.py")
            if frames.dtype != np.uint8 or frames.ndim != 4 or \
                    frames.shape[1:] != (args.resolution, args.resolution, 3):
                raise InputError(f"{path}: expected uint8 frames "
                                 f"(N, {args.resolution}, {args.resolution}, 3) "
                                 f"for --resolution {args.resolution}, "
                                 f"got {frames.dtype} {frames.shape}")
            if len(frames) >= clip_span:
                paths.append(path)
                arrays.append(frames)
                used.append(rep)
        split.append((arrays, used))
    (train_arrays, train_reps), (val_arrays, _) = split
    if not train_arrays:
        raise InputError(f"{manifest}: no ok repetition outside the test runs and the --val-reps "
                         f"{args.val_reps} held out has the {clip_span} frames one clip needs")
    return paths, train_arrays, val_arrays, train_reps


def samplers(data, args, ctx):
    """The sampler of training clips and the fixed validation clips uint8 (val_clips, T, H, W, 3),
    drawn once from the validation repetitions (from the training ones when none holds a clip)."""
    train_arrays, val_arrays = data
    train_sampler = ClipSampler(train_arrays, args.sequence_length, args.frame_step, args.workers,
                                pin_memory=ctx.device.type == "cuda")
    val_source = (ClipSampler(val_arrays, args.sequence_length, args.frame_step, 1)
                  if val_arrays else train_sampler)
    val_clips = val_source.read(val_source.starts(np.random.default_rng([args.seed, 10**6]),
                                                  args.val_clips))
    if ctx.is_main and not val_arrays:
        print(f"{STAGE}: no validation repetition holds a clip: "
              "validation clips come from training data", file=sys.stderr)
    return train_sampler, val_clips


class ClipSampler:
    """Draws clips (B, T, H, W, 3) uint8 from repetitions;
    clip starts are uniform over all valid starts.

    The global batch of step s depends only on (seed, step), and rank r of N reads its r-th N-th of
    it: a resumed run draws the same clips as an uninterrupted one, on any number of processes, and
    batches can be read ahead by threads.
    """

    def __init__(self, arrays, sequence_length, frame_step, workers, pin_memory=False):
        self.arrays, self.length, self.step, self.pin_memory = (arrays, sequence_length, frame_step,
                                                                pin_memory)
        self.span = (sequence_length - 1) * frame_step + 1                  # 60 Hz frames per clip
        self.n_starts = np.array([len(a) - self.span + 1 for a in arrays])
        # reads the clips of one batch in parallel
        self.pool = ThreadPoolExecutor(max_workers=workers)
        # Read-ahead gets a thread of its own: a batch read by a `pool` thread waiting on `pool`
        # would deadlock when --workers is 1.
        self.prefetch = ThreadPoolExecutor(max_workers=1)

    def starts(self, rng, n):
        """n (repetition, first frame) pairs."""
        flat = rng.integers(0, self.n_starts.sum(), size=n)
        reps = np.searchsorted(np.cumsum(self.n_starts), flat, side="right")
        firsts = flat - np.concatenate([[0], np.cumsum(self.n_starts)])[reps]
        return list(zip(reps, firsts))

    def read(self, starts):
        """The clips at `starts`, read in parallel: uint8 (B, T, H, W, 3)
        (in pinned memory for CUDA)."""
        clips = self.pool.map(lambda s: self.arrays[s[0]][s[1]:s[1] + self.span:self.step], starts)
        batch = torch.from_numpy(np.stack(list(clips)))
        return batch.pin_memory() if self.pin_memory else batch

    def batch_async(self, seed, step, global_batch, rank=0, world_size=1):
        """A future of this rank's share, uint8
        (global_batch / world_size, T, H, W, 3), of step's batch."""
        per_rank = global_batch // world_size
        batch_starts = self.starts(np.random.default_rng([seed, step]), global_batch)
        starts = batch_starts[rank * per_rank:(rank + 1) * per_rank]
        return self.prefetch.submit(self.read, starts)


def to_model_input(clips, device, channels_last):
    """uint8 clips (B, T, H, W, 3) on the host -> the VQ-VAE's input (B, 3, T, H, W) on `device`:
    the uint8 batch travels, the scaling to [-0.5, 0.5] runs on the device."""
    x = video_from_uint8(clips.to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last_3d if channels_last
                        else torch.contiguous_format)


# --------------------------------------------------------------------------------------------------
# Evaluation and figures
# --------------------------------------------------------------------------------------------------
@torch.no_grad()
def validate(model, clips, per_rank_batch, args, device):
    """Reconstruction MSE (on [-0.5, 0.5] pixels) and PSNR (dB, peak-to-peak 1) of the validation
    clips, with the model in eval mode (BatchNorm running statistics, no codebook update)."""
    model.eval()
    squared_error, count = 0.0, 0
    for i in range(0, len(clips), per_rank_batch):
        x = to_model_input(clips[i:i + per_rank_batch], device, args.channels_last)
        with common.autocast(device, args.precision):
            _, x_recon, _ = model(x)
        squared_error += ((x_recon.float().clamp(-0.5, 0.5) - x) ** 2).sum().item()
        count += x.numel()
    model.train()
    mse = squared_error / count
    return mse, 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def distinct_code_maps(model, clips, per_rank_batch, args, device):
    """How many of the validation clips get a code map (t, h, w) of their own. A VQ-VAE can reach a
    low loss on dark, sparse frames (gameplay on a black background) while encoding only position:
    every clip then gets the same codes and the GPT downstream sees no content at all."""
    model.eval()
    codes = torch.cat([model.encode(to_model_input(clips[i:i + per_rank_batch], device,
                                                   args.channels_last))
                       for i in range(0, len(clips), per_rank_batch)])      # (N, t, h, w)
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
