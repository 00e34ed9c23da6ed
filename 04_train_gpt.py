"""04 — Train VideoGPT's conditioned GPT prior on cached VQ-VAE codes (paper sections 2.3.1.2, 2.4, 3).

    python 04_train_gpt.py --work work                                 # paper config (Table 2)
    python 04_train_gpt.py --work work --precision bf16                # GPU: compiled by default
    python 04_train_gpt.py --work work --train-frames 100000 --epochs 100   # data size (2.4.1)
    python 04_train_gpt.py --work work --hidden-dim 255                # model-size sweep (2.4.2)
    python 04_train_gpt.py --work work --layers 4 --heads 8 --name my-run
    python 04_train_gpt.py --work work --resume                        # continue an interrupted run
    torchrun --nproc-per-node 4 04_train_gpt.py --work work --precision fp16 --resume   # 4 GPUs
    sbatch --nodes 2 slurm/gpu_stage.sbatch \\
        04_train_gpt.py --work work --precision fp16                   # SLURM, 2 x 4 GPUs
    python 04_train_gpt.py --work work --device cpu --hidden-dim 24 --layers 2 --heads 2 \\
        --cond-dim 24 --batch-size 4 --max-steps 20                    # tiny, seconds on a CPU

Inputs: <work>/frames/manifest.tsv with its uint8 (N, H, W, 3) frame arrays (stage 01) and the
frozen VQ-VAE <work>/vqvae/ckpt.pt (stage 03; --vqvae takes another, e.g. the authors'
Lightning checkpoint).

A sample (paper 2.3.1.2) is 32 frames at 15 Hz (every --frame-step-th 60 Hz frame): the first 16
condition the GPT, which learns to predict the VQ-VAE codes of the last 16. Each repetition is cut
into consecutive, non-overlapping 16-frame clips (clip j = 60 Hz frames 64j, 64j + 4, ..., 64j + 60)
and the samples are the pairs (clip j, clip j + 1), as the authors' data module (stride 16) does.
The VQ-VAE is frozen, so every clip is encoded once, in exact fp32 (no TF32), into a cache of codes
named after the VQ-VAE and the frames it encodes; training then reads codes only
(the same loss as encoding at every step).

Splits: repetitions with status ok outside the encoding test runs (those of bold/splits.tsv, which
02 writes, else of --test-sessions, default 005; `--test-sessions` with no value includes them, as
the authors did, and 06 then refuses to score them); the last --val-reps of them in manifest order
are held out for the validation loss. --train-frames N keeps the first N 60 Hz frames of the
remaining training repetitions (the last one cut), taken in the authors' order (subject, then game
level, then session: their 10k, 100k and 1M subsets hold sub-01's gameplay only), as the paper's
10k/100k/1M/6M data sizes (Figure 2); --subset-order balanced gives every subject an equal share of
the frames (each subject's first ones in the authors' order), so that a data size does not also
change whose gameplay the model saw; --subset-order manifest takes them in manifest order. The
checkpoint's record lists them.

Budget: --max-steps optimizer steps (200,000 by default), or --epochs E passes over the training
samples (the authors' script trains 100 epochs; the paper's loss curves are against epochs), which
makes max_steps = ceil(E x samples / batch size), recorded in the checkpoint.

Outputs (<work>/gpt/<name>/, name derived from the configuration unless --name):
    ckpt.pt    model, model_config, optimizer, GradScaler, step, RNG states per rank, args, record
    ckpt.json  the record: flags, fingerprints of the VQ-VAE and frames, the subset, complete or not
    log.csv    step, epoch, lr, train_loss, val_loss, clips_per_s, tokens_per_s, mfu, peak_mem_gb,
               wall_s
    loss.png   training and validation cross-entropy against steps

Optimisation (the authors'): Adam(3e-4, betas 0.9/0.999), cosine annealing to 0 over --max-steps,
gradient clipping at 1.0, --batch-size 64 samples per optimizer step over all processes
(16 per GPU on 4 GPUs). --precision fp16 is autocast + GradScaler as in the paper; bf16 needs no
scaler. The run checkpoints every --ckpt-every steps and on SIGTERM/SIGUSR1 (SLURM's preemption)
or SIGINT (Ctrl-C), then exits with status 75; --resume continues it exactly. One run at a time
writes <work>/gpt/<name>/: a second one stops at once, naming the first's host and pid.
"""
import argparse
import functools
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
from paper.gpt import GPT_COND_DIM, GPTPrior, autocast_dtype, gpt_loss
from paper.vqvae import video_from_uint8
from common import DEFAULT_WORK, InputError, run_main

STAGE = "04_train_gpt"
LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "val_loss", "clips_per_s", "tokens_per_s", "mfu",
              "peak_mem_gb", "wall_s"]
ADAM_BETAS = (0.9, 0.999)   # paper 2.3.1.2
ENCODE_BATCH = 32           # clips per VQ-VAE forward pass when the code cache is filled
DEFAULT_MAX_STEPS = 200000  # optimizer steps when neither --max-steps nor --epochs is given

# Dense peak throughput (TFLOP/s) for the MFU column, by GPU name and --precision. fp32 is the
# non-tensor-core peak (TF32 is off unless --tf32). On other devices MFU stays empty.
PEAK_TFLOPS = {"H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "fp16": 756.0, "bf16": 756.0},
               "H100": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
               "H200": {"fp32": 66.9, "tf32": 494.7, "fp16": 989.4, "bf16": 989.4},
               "A100": {"fp32": 19.5, "tf32": 156.0, "fp16": 312.0, "bf16": 312.0},
               "V100": {"fp32": 15.7, "tf32": 15.7, "fp16": 125.0, "bf16": 15.7}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--name", help="run folder under <work>/gpt/ (default: from the configuration)")
    p.add_argument("--vqvae", help="frozen VQ-VAE checkpoint (default: <work>/vqvae/ckpt.pt)")
    data = p.add_argument_group("data")
    common.add_split_flags(data)
    data.add_argument("--train-frames", type=int, default=0,
                      help="60 Hz frames of training repetitions to use, "
                           "the first ones in --subset-order (0: all; paper: 10k, 100k, 1M, 6M)")
    data.add_argument("--subset-order", choices=("authors", "balanced", "manifest"),
                      default="authors",
                      help="order in which --train-frames takes repetitions: "
                           "the authors' (subject, then level, then session), balanced (an equal "
                           "share of frames per subject, each in the authors' order) "
                           "or frames/manifest.tsv's (subject, session, run, repetition)")
    model = p.add_argument_group("model (paper configuration by default: "
                                 "Table 2(b), 40,324,768 parameters)")
    model.add_argument("--hidden-dim", type=int, default=576,
                       help="multiple of 3 (paper sweep: 6 ... 1024)")
    model.add_argument("--layers", type=int, default=8,
                       help="attention blocks (paper sweep: 1, 2, 4, 8, 16)")
    model.add_argument("--heads", type=int, default=4,
                       help="attention heads (paper sweep: 1, 2, 4, 8)")
    model.add_argument("--cond-dim", type=int, default=GPT_COND_DIM,
                       help="width of the conditioning features "
                            "(the authors' fixed 240; small for tiny tests)")
    model.add_argument("--dropout", type=float, default=0.2,
                       help="dropout on the residual branches")
    model.add_argument("--attn-dropout", type=float, default=0.3,
                       help="dropout on the attention weights")
    model.add_argument("--checkpoint-activations", action="store_true",
                       help="recompute attention and MLP in the backward pass "
                            "(the authors' default; saves memory)")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=64,
                       help="samples per optimizer step, over all processes "
                            "(the authors': 16 per GPU x 4)")
    train.add_argument("--max-steps", type=int, default=None,
                       help="optimizer steps (cosine period; default 200000 unless --epochs); "
                            "0 saves the initial weights (the untrained control)")
    train.add_argument("--epochs", type=float, default=None,
                       help="or a budget in passes over the training samples (the authors' "
                            "script: 100): max_steps = ceil(epochs x samples / batch size)")
    train.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (paper: 3e-4)")
    train.add_argument("--grad-clip", type=float, default=1.0,
                       help="max gradient norm (the authors': 1; 0: none)")
    train.add_argument("--init-from",
                       help="initial weights: a ckpt.pt of this stage "
                            "or an authors' Lightning .ckpt")
    train.add_argument("--precision", default="auto", choices=("auto", *common.PRECISIONS),
                       help="fp16: autocast + GradScaler (the paper's mixed precision); "
                            f"bf16: autocast; auto: {common.GPU_PRECISION} on a GPU, fp32 on the "
                            "CPU")
    train.add_argument("--seed", type=int, default=0)
    common.add_run_flags(p, ["--device", "--tf32", "--compile", "--log-every", "--val-every",
                             "--val-samples", "--ckpt-every", "--resume", "--overwrite",
                             "--allow-unfinished"])
    return check_flags(p.parse_args(argv))


def check_flags(args):
    """The parsed flags, after checking the values argparse cannot (InputError otherwise)."""
    for flag in ("batch_size", "log_every", "val_every", "ckpt_every", "frame_step"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: "
                             "must be at least 1")
    if args.max_steps is not None and args.max_steps < 0:
        raise InputError(f"--max-steps {args.max_steps}: must not be negative "
                         "(0: the untrained model, a control)")
    if args.epochs is not None and (args.max_steps is not None or not args.epochs > 0):
        raise InputError(f"--epochs {args.epochs}: must be > 0, and is a budget instead of "
                         "--max-steps: give one of them")
    if args.train_frames < 0 or args.val_reps < 0:
        raise InputError("--train-frames and --val-reps must not be negative")
    return args


# --------------------------------------------------------------------------------------------------
# Training (paper sections 2.3.1.2 and 2.4)
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    # from here on SIGTERM/SIGUSR1/SIGINT ask to stop; they no longer kill
    preemption = common.PreemptionFlag()
    args = parse_args(argv)
    # a second run there stops at once (the code cache is shared: each file is written atomically)
    with common.hold_folder(Path(args.work) / "gpt" / run_name(args)):
        run = plan_run(args)
        if run.checkpoint is not None and run.checkpoint["complete"]:
            common.print0(f"{STAGE}: {run.ckpt_path} is complete ({run.checkpoint['step']} steps, "
                          "same flags and inputs); --overwrite to train again")
            return
        common.run_training(train, args, run, preemption)


def train(args, run, ctx, preemption):
    """Paper 2.3.1.2: Adam on the cross-entropy of the next clip's codes (eq. 7), cosine schedule
    (eq. 2), to the run's max_steps (--max-steps or --epochs). A signal stops it at the end of a
    step, its checkpoint saved, or after a repetition of the code cache: common.Interrupted."""
    device = ctx.device
    common.seed_everything(args.seed, ctx.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    per_rank_batch = common.split_batch(args.batch_size, ctx, STAGE)
    # (n_codes, D), ...
    codebook, train_samples, val_samples = code_samples(args, run, ctx, preemption)
    state = start_state(args, run, ctx, codebook)
    # the GPT's only buffers are constants (its LayerNorms' k_powers): nothing to sync each step
    model = common.wrap_for_training(state.model, args, ctx, forward_sync_buffers=False)
    log = (common.CSVLog(run.out_dir / "log.csv", LOG_FIELDS, resume_step=state.step)
           if ctx.is_main else None)
    max_steps = run.data.max_steps
    if max_steps == 0:   # the untrained control: its initial weights are the result
        save(args, run, ctx, state)
    # --- loop; the bar is closed however it ends,
    # so that an error message stays the last line printed
    with tqdm(total=max_steps, initial=state.step, disable=not ctx.is_main,
              desc="04 gpt") as progress:
        while state.step < max_steps:
            index = batch_indices(state.step, len(train_samples), args.batch_size, args.seed,
                                  ctx.rank, ctx.world_size)
            cond, target = train_samples.batch(index.to(device))                 # (B, t, h, w) each
            lr = common.cosine_lr(state.step, max_steps, args.lr)                # paper eq. 2
            loss = optimizer_step(model, state, codebook, cond, target, lr, args)
            state.add_step(loss)
            progress.update(1)

            last = state.step == max_steps
            if state.step % args.log_every == 0 or last:
                val_loss = ""
                if (state.step % args.val_every == 0 or last) and len(val_samples):
                    val_loss = validation_loss(state.model, codebook, val_samples, per_rank_batch,
                                               args, ctx)
                train_loss = log_row(log, args, run, ctx, state, lr, val_loss, len(train_samples))
                progress.set_postfix(loss=f"{train_loss:.4f}")
            stop = preemption.agreed(ctx)
            if state.step % args.ckpt_every == 0 or last or stop:
                save(args, run, ctx, state)
            if stop and not last:
                raise preemption.interrupted(STAGE, f"at step {state.step} of {max_steps}")

    if ctx.is_main:
        save_loss_figure(run.out_dir / "log.csv", run.out_dir / "loss.png",
                         f"GPT {run.out_dir.name}")
        print(f"{STAGE}: {state.step} steps; wrote {run.ckpt_path}, {run.out_dir / 'log.csv'}, "
              f"{run.out_dir / 'loss.png'}")


def optimizer_step(model, state, codebook, cond, target, lr, args):
    """One step of Adam on the batch's loss, with loss scaling (fp16) and gradient clipping; returns
    the loss (a 0-d tensor, not synchronised)."""
    common.set_lr(state.optimizer, lr)
    with common.autocast(cond.device, args.precision):
        dtype = autocast_dtype(cond.device)          # None in fp32
        eager = model is state.model and dtype is not None
        forward = with_weights_cast_once(model, dtype) if eager else model   # one process: see there
        loss = gpt_loss(forward, codebook, cond, target)
    state.optimizer.zero_grad(set_to_none=True)
    state.scaler.scale(loss).backward()
    if args.grad_clip > 0:
        state.scaler.unscale_(state.optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
    state.scaler.step(state.optimizer)
    state.scaler.update()
    return loss.detach()


class _CastOnce(torch.autograd.Function):
    """Parameters (fp32) -> the same in `dtype`, in one kernel (a concatenation, then one cast);
    their gradients, back in fp32, likewise. Autocast casts each weight and bias for its matmul
    and each gradient back, 2 kernels apiece: 234 of a paper-configuration step's eager kernels.
    The numbers are autocast's, bit for bit: a cast is exact or rounds the same wherever it runs."""

    @staticmethod
    def forward(ctx, dtype, *params):
        ctx.param_dtype = params[0].dtype
        flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
        return tuple(part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]),
                                                          params))

    @staticmethod
    def backward(ctx, *grads):
        flat = torch.cat([g.reshape(-1) for g in grads]).to(ctx.param_dtype)
        return (None, *(part.view_as(g) for part, g in zip(flat.split([g.numel() for g in grads]),
                                                             grads)))


def with_weights_cast_once(model, dtype):
    """model as a function of (x, cond) whose Linear and Conv3d weights and biases, the parameters
    autocast casts for its matmuls, are cast once per step (_CastOnce) instead of one kernel each.
    Only for an eager model in one process: torch.compile fuses the casts itself, and under DDP
    every gradient would arrive at the end of the backward pass, too late to overlap the
    all-reduce with it."""
    params = {f"{name}.{kind}": getattr(module, kind) for name, module in model.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d))
              for kind in ("weight", "bias") if getattr(module, kind) is not None}
    cast = dict(zip(params, _CastOnce.apply(dtype, *params.values())))
    return lambda x, cond: torch.func.functional_call(model, cast, (x, cond))


# --------------------------------------------------------------------------------------------------
# Training state: what changes step by step, what a checkpoint saves, what a log row reports
# --------------------------------------------------------------------------------------------------
@dataclass
class TrainState:
    """The model (unwrapped), its optimizer and loss scaler, the step, and the log interval in
    progress: the training loss summed over its steps (this rank's; rank 0 also holds a resumed
    run's saved sum, which covers every rank) and their number, kept across a resume so that a
    resumed run logs as an uninterrupted one. `wall_before`: seconds trained by the earlier runs of
    this checkpoint."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    step: int
    loss_sum: torch.Tensor
    interval_steps: int
    wall_before: float
    run_start: float = field(default_factory=time.perf_counter)
    interval_start: float = field(default_factory=time.perf_counter)

    def add_step(self, loss):
        self.loss_sum += loss
        self.step += 1
        self.interval_steps += 1

    def wall_s(self):
        return self.wall_before + time.perf_counter() - self.run_start


def start_state(args, run, ctx, codebook):
    """A new model with its optimizer and loss scaler, from --init-from's weights or a fresh draw,
    then the checkpoint's weights, step, log interval and random generators when resuming."""
    model = GPTPrior(**run.model_config, checkpoint_activations=args.checkpoint_activations)
    model = model.to(ctx.device)
    if args.init_from and run.checkpoint is None:
        load_initial_weights(model, args.init_from, run.model_config, codebook)
    # one kernel for all parameters; GradScaler's check stays on the GPU
    fused = ctx.device.type == "cuda"
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, fused=fused)
    state = TrainState(model, optimizer, common.grad_scaler(ctx.device, args.precision), step=0,
                       loss_sum=torch.zeros((), device=ctx.device), interval_steps=0,
                       wall_before=0.0)
    checkpoint = run.checkpoint
    if checkpoint is None:
        return state
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    state.scaler.load_state_dict(checkpoint["scaler"])
    if ctx.is_main:   # the saved sum covers every rank: it enters the next all-reduce once
        state.loss_sum += checkpoint["log_interval"]["loss_sum"]
    if not common.restore_rng_states(checkpoint["rng"], ctx):
        common.print0(f"{STAGE}: {ctx.world_size} processes instead of {len(checkpoint['rng'])}: "
                      "random generators reseeded (the run continues, not bit-for-bit)")
    state.step, state.interval_steps = checkpoint["step"], checkpoint["log_interval"]["steps"]
    state.wall_before = checkpoint.get("wall_s", 0.0)
    return state


def save(args, run, ctx, state):
    """Write the checkpoint of `state` (rank 0; every rank takes part in the collectives), then wait
    until it is on disk: srun stops every process once one has exited."""
    rng = common.gather_rng_states(ctx)
    interval_loss = state.loss_sum.clone()
    if ctx.world_size > 1:
        torch.distributed.all_reduce(interval_loss)
    if ctx.is_main:
        data = run.data
        common.save_checkpoint(run.ckpt_path, dict(
            model=state.model.state_dict(), optimizer=state.optimizer.state_dict(),
            scaler=state.scaler.state_dict(), step=state.step, max_steps=data.max_steps,
            complete=state.step >= data.max_steps, rng=rng,
            args=dict(vars(args), vqvae=str(data.vqvae_path)),   # 05 finds the VQ-VAE there
            model_config=run.model_config, kind=STAGE, provenance=run.record,
            vqvae_sha256=data.vqvae_sha256, train_frames=sum(data.frames_used),
            log_interval={"loss_sum": interval_loss.item(), "steps": state.interval_steps},
            wall_s=state.wall_s()))
    common.barrier(ctx)


def log_row(log, args, run, ctx, state, lr, val_loss, n_samples):
    """Append the log interval's row to log.csv (rank 0), start the next interval; returns its mean
    training loss over every rank."""
    if ctx.world_size > 1:
        torch.distributed.all_reduce(state.loss_sum)
    train_loss = state.loss_sum.item() / state.interval_steps / ctx.world_size
    elapsed = time.perf_counter() - state.interval_start
    clips_per_s = state.interval_steps * args.batch_size / elapsed
    flops, peak = run.record["train_flops_per_sample"], peak_tflops(args, ctx.device)
    if ctx.is_main:
        log.log(step=state.step, epoch=state.step * args.batch_size / n_samples, lr=lr,
                train_loss=train_loss, val_loss=val_loss, clips_per_s=clips_per_s,
                tokens_per_s=clips_per_s * math.prod(run.model_config["latent_shape"]),
                mfu=clips_per_s * flops / (peak * 1e12 * ctx.world_size) if peak else "",
                peak_mem_gb=common.peak_memory_gb(ctx.device), wall_s=state.wall_s())
    state.loss_sum.zero_()
    state.interval_steps, state.interval_start = 0, time.perf_counter()
    return train_loss


# --------------------------------------------------------------------------------------------------
# Set-up: the run's inputs and record, flags to model, the training data, initial weights
# --------------------------------------------------------------------------------------------------
@dataclass
class GPTData:
    """The frozen VQ-VAE (the model, its path and sha256) and the repetitions: training ones in
    --subset-order with the leading 60 Hz frames used of each, validation ones, and the sha256 of
    the frames of both (training first), which name their code cache files; the training samples
    those frames give and the optimizer steps of the run (--max-steps, or --epochs of them)."""
    vqvae: torch.nn.Module
    vqvae_path: Path
    vqvae_sha256: str
    train_reps: list
    frames_used: list
    val_reps: list
    frames_sha256: list
    n_samples: int
    max_steps: int


def plan_run(args):
    """What this run is made of: its flags, the frozen VQ-VAE, the frames of its repetitions and the
    initial weights, and the checkpoint it continues. A finished run made the same way is complete
    (skipped); an unfinished one is resumed (--resume); one made from other inputs starts over."""
    work = Path(args.work)
    out_dir = work / "gpt" / run_name(args)
    common.remove_stale_temporaries(out_dir)
    common.remove_stale_temporaries(work / "gpt" / "codes")
    vqvae_path = Path(args.vqvae or work / "vqvae" / "ckpt.pt")
    vqvae = common.load_vqvae(vqvae_path, allow_unfinished=args.allow_unfinished)
    config = model_config(args, vqvae)
    train_reps, val_reps, used = training_data(work, args)
    warn_if_vqvae_saw_validation(work, vqvae_path, val_reps)
    frames_paths = [work / str(r["frames_path"]) for r in train_reps + val_reps]
    span = vqvae.config["sequence_length"] * args.frame_step                 # 60 Hz frames per clip
    n_samples = sum(max(0, n // span - 1) for n in used)    # (clip j, clip j + 1) pairs
    max_steps = training_steps(args, n_samples)
    settings = common.settings_of(args, common.NOT_RECORDED | {"vqvae", "init_from", "epochs"})
    # the budget as steps (a run with --epochs is the same run as one with the steps it gives), the
    # precision as auto makes it on this device
    settings["--max-steps"] = max_steps
    settings["--precision"] = precision_of(args)
    if args.epochs is not None:
        settings["--epochs"] = args.epochs
    inputs = common.input_fingerprints(work, [vqvae_path, *frames_paths,
                                              *filter(None, [args.init_from])])
    checkpoint, _ = common.checkpoint_to_resume(out_dir / "ckpt.pt", STAGE, settings, inputs,
                                                args.resume, args.overwrite)
    sha256 = lambda path: inputs[os.path.relpath(path, work)]["sha256"]  # noqa: E731
    data = GPTData(vqvae, vqvae_path, sha256(vqvae_path), train_reps, used, val_reps,
                   [sha256(p) for p in frames_paths], n_samples, max_steps)
    with torch.device("meta"):   # the model's size, without its memory
        n_parameters = sum(p.numel() for p in GPTPrior(**config).parameters())
    # the record says which frames this data size means, repetition by repetition, and (for 07's
    # scaling laws) the model's size and the compute of one training sample
    subset = [{**common.repetition_record(r), "frames_used": n,
               "level": r["level"] if isinstance(r.get("level"), str) else None}
              for r, n in zip(train_reps, used)]
    record = dict(stage=STAGE, settings=settings, inputs=inputs, training_repetitions=subset,
                  n_parameters=n_parameters, train_flops_per_sample=train_flops_per_sample(config),
                  n_train_samples=n_samples)
    return common.TrainingRun(out_dir, checkpoint, config, record, data)


def training_steps(args, n_samples):
    """The run's optimizer steps: --max-steps, or --epochs passes over the n_samples training
    samples at --batch-size per step (200,000 when neither is given)."""
    if args.epochs is None:
        return DEFAULT_MAX_STEPS if args.max_steps is None else args.max_steps
    return math.ceil(args.epochs * n_samples / args.batch_size)


def run_name(args):
    """The run's folder under <work>/gpt/: --name, or one spelled from the configuration."""
    if args.name:
        return args.name
    return (f"h{args.hidden_dim}-l{args.layers}-a{args.heads}"
            + (f"-f{args.train_frames}" if args.train_frames else "")
            + (f"-{precision_of(args)}" if precision_of(args) != "fp32" else ""))


def precision_of(args):
    """--precision on --device: fp32, fp16 or bf16 (auto made one of them)."""
    return common.resolved_precision(args.precision, common.choose_device(args.device))


def warn_if_vqvae_saw_validation(work, vqvae_path, val_reps):
    """Say so when the frozen VQ-VAE trained on some of the GPT's validation repetitions (03 run
    with other --val-reps or --test-sessions): the validation loss then reads codes of clips it has
    seen."""
    record = common.read_record(common.record_path(vqvae_path))
    settings = (record or {}).get("settings", {})
    if "--val-reps" not in settings or "--test-sessions" not in settings:
        return   # not trained by 03 (the authors' checkpoint): nothing to compare
    reps = common.training_repetitions(work, settings["--test-sessions"])
    held_out = {str(r["frames_path"]) for r in reps[len(reps) - settings["--val-reps"]:]}
    seen = [str(r["frames_path"]) for r in val_reps if str(r["frames_path"]) not in held_out]
    if seen:
        test_sessions = settings["--test-sessions"]
        common.print0(f"{STAGE}: warning: the VQ-VAE {vqvae_path} trained on {len(seen)} of the "
                      f"{len(val_reps)} validation repetitions "
                      f"(its --val-reps {settings['--val-reps']}"
                      + ("" if test_sessions is None
                         else f", --test-sessions {' '.join(test_sessions)}")
                      + "): pass the same to both stages")


def model_config(args, vqvae):
    """The VideoGPT keywords of the flags and the VQ-VAE,
    after checking they describe a valid model."""
    if args.hidden_dim % 3 or args.hidden_dim < 3:
        raise InputError(f"--hidden-dim {args.hidden_dim}: must be a positive multiple of 3 "
                         "(one position table per latent axis t, h, w; paper 2.4.2)")
    if args.cond_dim % 3 or args.cond_dim < 3:
        raise InputError(f"--cond-dim {args.cond_dim}: must be a positive multiple of 3")
    if not 1 <= args.heads <= min(args.hidden_dim, args.cond_dim):
        raise InputError(f"--heads {args.heads}: must be between 1 and "
                         "min(--hidden-dim, --cond-dim) so that every head has a channel")
    if args.layers < 1:
        raise InputError(f"--layers {args.layers}: must be at least 1")
    return dict(latent_shape=tuple(vqvae.latent_shape), embedding_dim=vqvae.embedding_dim,
                n_codes=vqvae.n_codes, hidden_dim=args.hidden_dim, heads=args.heads,
                layers=args.layers, dropout=args.dropout, attn_dropout=args.attn_dropout,
                cond_dim=args.cond_dim)


def training_data(work, args):
    """(training repetitions in --subset-order, validation repetitions, leading 60 Hz frames used of
    each training repetition): rows of frames/manifest.tsv as dicts. Validation is the last
    --val-reps in manifest order, the same whatever the data size."""
    reps = common.training_repetitions(work, args.test_sessions)
    train_reps, val_reps = common.split_validation(reps, args.val_reps,
                                                   work / "frames" / "manifest.tsv")
    train_reps = in_subset_order(train_reps, args.subset_order)
    n_frames = [int(r["n_frames"]) for r in train_reps]
    if args.subset_order == "balanced":
        used = select_balanced_frames(n_frames, [r["sub"] for r in train_reps], args.train_frames)
    else:
        used = select_training_frames(n_frames, args.train_frames)
    return [r for r, n in zip(train_reps, used) if n > 0], val_reps, [n for n in used if n > 0]


def natural_key(label):
    """A sort key that orders '2' before '10' and keeps text labels comparable:
    'level-10' -> ('level-', 10, '')."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(label)))


def in_subset_order(reps, order):
    """The training repetitions in the order --train-frames takes them. "authors": the authors'
    cumulative data-size subsets (paper Figure 2), subject, then game level, then session
    (then run and repetition): their 100k-frame subset is sub-01's level 1 only. "manifest":
    frames/manifest.tsv's order (subject, session, run, repetition), which mixes levels."""
    if order == "manifest":
        return list(reps)   # "balanced" takes each subject's repetitions in the authors' order
    return sorted(reps, key=lambda r: tuple(natural_key(r.get(k, ""))
                                            for k in ("sub", "level", "ses", "run", "rep")))


def select_training_frames(n_frames, train_frames):
    """How many leading 60 Hz frames of each training repetition to use.

    n_frames: frame counts of the training repetitions in --subset-order. train_frames: the budget
    (0: everything). Returns a list of the same length summing to exactly `train_frames`: whole
    repetitions first, the last one used cut to what remains, the rest unused (0).
    """
    total = int(sum(n_frames))
    if train_frames == 0:
        return [int(n) for n in n_frames]
    if train_frames > total:
        raise InputError(f"--train-frames {train_frames}: the training repetitions hold only "
                         f"{total} frames")
    used, left = [], train_frames
    for n in n_frames:
        used.append(min(int(n), left))
        left -= used[-1]
    return used


def select_balanced_frames(n_frames, subjects, train_frames):
    """select_training_frames with an equal share of the budget per subject: each subject's
    repetitions (in the given order) give train_frames / S frames (the first subjects one more when
    it does not divide), so every data size holds every subject's gameplay. n_frames, subjects:
    per training repetition; returns the frames used of each."""
    if train_frames == 0:
        return [int(n) for n in n_frames]
    names = list(dict.fromkeys(subjects))                      # in order of first appearance
    shares = [train_frames // len(names) + (k < train_frames % len(names))
              for k in range(len(names))]
    used = [0] * len(n_frames)
    for name, share in zip(names, shares):
        mine = [i for i, s in enumerate(subjects) if s == name]
        total = sum(n_frames[i] for i in mine)
        if share > total:
            raise InputError(f"--train-frames {train_frames} --subset-order balanced: sub-{name}'s "
                             f"training repetitions hold only {total} frames, not {share}")
        for i, n in zip(mine, select_training_frames([n_frames[i] for i in mine], share)):
            used[i] = n
    return used


def load_initial_weights(model, path, config, codebook):
    """--init-from: start from the weights of another GPT checkpoint (ours, or the authors'
    Lightning one) of the same architecture; its dropout rates may differ."""
    init_config, init_state, extra = common.load_gpt_checkpoint(path)
    if {k: v for k, v in init_config.items() if "dropout" not in k} != \
            {k: v for k, v in config.items() if "dropout" not in k}:
        raise InputError(f"{path}: a model {init_config}, "
                         f"but the flags and VQ-VAE ask for {config}")
    common.load_weights(model, init_state, path, f"a VideoGPT with {config}")
    their_codebook = extra.get("vqvae_state", {}).get("codebook.embeddings")
    if (their_codebook is not None
            and not torch.allclose(their_codebook.float().to(codebook.device), codebook)):
        common.print0(f"{STAGE}: warning: {path} was trained with another VQ-VAE codebook "
                      "than this run's")


# --------------------------------------------------------------------------------------------------
# Data: the code cache and the samples
# --------------------------------------------------------------------------------------------------
def code_samples(args, run, ctx, preemption):
    """The frozen VQ-VAE's codebook (n_codes, D) on the device, and the training and validation
    samples (CodeSamples) from the cached codes of their repetitions
    (encoded now where the cache lacks them)."""
    data, work = run.data, Path(args.work)
    vqvae = data.vqvae.to(ctx.device).eval()
    codebook = vqvae.codebook.embeddings.detach().clone().float()            # (n_codes, D)
    cache_dir = cache_directory(work, data.vqvae_sha256, args.frame_step)
    span = vqvae.config["sequence_length"] * args.frame_step                 # 60 Hz frames per clip
    codes = cached_codes(work, data.train_reps + data.val_reps, data.frames_sha256, vqvae,
                         cache_dir, args, ctx, preemption)
    n_train = len(data.train_reps)
    train_samples = CodeSamples(codes[:n_train], data.frames_used, span, ctx.device)
    val_samples = CodeSamples(codes[n_train:], [int(r["n_frames"]) for r in data.val_reps], span,
                              ctx.device)
    if len(train_samples) == 0:
        raise InputError(f"--train-frames {args.train_frames}: no training sample (a sample needs "
                         f"two consecutive clips, {2 * span} frames of one repetition)")
    common.print0(f"{STAGE}: {sum(data.frames_used)} training frames from {n_train} repetitions -> "
                  f"{len(train_samples)} samples; {len(val_samples)} validation samples "
                  f"({len(data.val_reps)} repetitions); codes in {cache_dir}")
    return codebook, train_samples, val_samples


def cache_directory(work, vqvae_sha256, frame_step):
    """<work>/gpt/codes/<first 16 hex digits of the VQ-VAE checkpoint's sha256>-step<frame step>."""
    return work / "gpt" / "codes" / f"{vqvae_sha256[:16]}-step{frame_step}"


def clips_of_frames(frames, start_clips, sequence_length, frame_step):
    """uint8 clips (B, sequence_length, H, W, 3): clip j = frames j*span, j*span + step, ... with
    span = sequence_length * frame_step (consecutive, non-overlapping clips)."""
    span = sequence_length * frame_step
    return np.stack([frames[j * span:(j + 1) * span:frame_step] for j in start_clips])


@torch.no_grad()
def encode_repetition(vqvae, frames, frame_step, device, batch=ENCODE_BATCH):
    """VQ-VAE codes (n_clips, t, h, w) int64 of the consecutive clips
    of one repetition's frames, in fp32."""
    sequence_length = vqvae.config["sequence_length"]
    n_clips = len(frames) // (sequence_length * frame_step)
    codes = []
    for i in range(0, n_clips, batch):
        start_clips = range(i, min(i + batch, n_clips))
        clips = clips_of_frames(frames, start_clips, sequence_length, frame_step)  # (B, T, H, W, 3)
        video = video_from_uint8(torch.as_tensor(clips).to(device))
        codes.append(vqvae.encode(video).cpu())                                  # (B, t, h, w)
    return torch.cat(codes) if codes else torch.zeros((0, *vqvae.latent_shape), dtype=torch.long)


def cached_codes(work, reps, frames_sha256, vqvae, cache_dir, args, ctx, preemption):
    """Codes (n_clips, t, h, w) uint16 of each repetition, from the cache (encoded on first use).

    A cache file is named after the sha256 of the frames it encodes,
    <sub>/<ses>/<stem>.<sha256[:16]>.npy under a folder named after the VQ-VAE, so re-rendered
    frames or another VQ-VAE never meet old codes. The ranks share the encoding (repetition i goes
    to rank i % world size), then wait for each other. A signal stops the encoding after the current
    repetition (common.Interrupted): the files written are kept, and the re-run encodes the rest.
    """
    resolution = vqvae.config["resolution"]
    paths = []
    for rep, digest in zip(reps, frames_sha256):
        frames_path = work / str(rep["frames_path"])
        relative = Path(str(rep["frames_path"]))
        relative = (relative.relative_to("frames") if relative.parts[0] == "frames"
                    else Path(relative.name))
        cache_name = f"{relative.name.split('.')[0]}.{digest[:16]}.npy"
        paths.append((frames_path, cache_dir / relative.with_name(cache_name)))
    # by position in the list, not among the missing files: a rank that looks later, after another
    # has written some, must not get another share (repetitions would then be encoded by no rank)
    mine = [(f, c) for i, (f, c) in enumerate(paths)
            if i % ctx.world_size == ctx.rank and not c.is_file()]
    for frames_path, code_path in tqdm(mine, desc="04 encode clips",
                                       disable=not ctx.is_main or not mine):
        if preemption.name:
            break
        frames = common.load_npy(frames_path, advice="re-render it with 01_render_frames.py")
        if frames.dtype != np.uint8 or frames.ndim != 4 or \
                frames.shape[1:] != (resolution, resolution, 3):
            raise InputError(f"{frames_path}: expected uint8 frames "
                             f"(N, {resolution}, {resolution}, 3) for the VQ-VAE's resolution "
                             f"{resolution}, got {frames.dtype} {frames.shape}")
        codes = encode_repetition(vqvae, frames, args.frame_step, ctx.device)
        common.save_npy(code_path, codes.numpy().astype(np.uint16))
    if preemption.agreed(ctx):   # a collective, as the barrier it replaces: every rank waits here
        cached = sum(c.is_file() for _, c in paths)
        raise preemption.interrupted(STAGE, "while caching codes",
                                     f"{cached} of {len(paths)} repetitions cached")
    return [common.load_npy(c, mmap=False, advice="delete it: it is a cache") for _, c in paths]


class CodeSamples:
    """Samples (clip j, clip j + 1) of the repetitions: `codes` (n_clips_total, t, h, w) int32 on
    the device, `starts` (n_samples,) the index of each sample's conditioning clip in `codes`.

    per_rep_codes: list of (n_clips, t, h, w) arrays; used_frames: leading 60 Hz frames of each
    repetition that may be read (a clip is usable when all its `span` frames are among them).
    """

    def __init__(self, per_rep_codes, used_frames, span, device):
        kept, starts, offset = [], [], 0
        for codes, frames in zip(per_rep_codes, used_frames):
            n = min(len(codes), frames // span)          # clips inside the used frames
            if n >= 2:
                kept.append(codes[:n])
                starts.append(offset + np.arange(n - 1))
                offset += n
        self.codes = torch.as_tensor(np.concatenate(kept).astype(np.int32) if kept else
                                     np.zeros((0, 1, 1, 1), np.int32)).to(device)
        self.starts = torch.as_tensor(np.concatenate(starts) if starts else
                                      np.zeros(0, np.int64)).to(device)

    def __len__(self):
        return len(self.starts)

    def batch(self, index):
        """(conditioning codes, target codes), each (B, t, h, w), of the samples `index` (B,)."""
        first = self.starts[index]
        return self.codes[first], self.codes[first + 1]


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, n_samples):
    """The order (n_samples,) of the samples in one epoch:
    the same on every rank, fresh each epoch."""
    return torch.as_tensor(np.random.default_rng([seed, epoch]).permutation(n_samples))


def batch_indices(step, n_samples, global_batch, seed, rank=0, world_size=1):
    """The sample indices (global_batch / world_size,) of this rank at `step`: a step takes the next
    global_batch samples of the epoch's permutation and each rank its slice. A function of the step
    alone, so a resumed run reads the same batches, and the same on any number of processes."""
    per_rank = global_batch // world_size
    epoch, position = divmod(step, max(1, n_samples // global_batch))
    start = position * global_batch + rank * per_rank
    return epoch_permutation(seed, epoch, n_samples)[(start + torch.arange(per_rank)) % n_samples]


# --------------------------------------------------------------------------------------------------
# Measurements: FLOPs per sample (for MFU), validation loss, loss figure
# --------------------------------------------------------------------------------------------------
def train_flops_per_sample(config):
    """FLOPs of one training sample (forward + backward), counted by torch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = GPTPrior(**config)
        x = torch.zeros(1, *config["latent_shape"], config["embedding_dim"])
        targets = torch.zeros(1, *config["latent_shape"], dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        logits = model(x, x)
        F.cross_entropy(logits.flatten(0, -2), targets.flatten()).backward()
    return counter.get_total_flops()


def peak_tflops(args, device):
    """The device's dense peak TFLOP/s at --precision (PEAK_TFLOPS),
    or None where it is not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = common.resolved_precision(args.precision, device)
    precision = "tf32" if precision == "fp32" and args.tf32 else precision
    for key, peaks in PEAK_TFLOPS.items():      # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks[precision]
    return None


@torch.no_grad()
def validation_loss(model, codebook, samples, per_rank_batch, args, ctx):
    """Mean cross-entropy over a fixed, evenly spread subset of the validation samples (all ranks
    share the work; model in eval mode: no dropout)."""
    n = len(samples) if args.val_samples == 0 else min(args.val_samples, len(samples))
    evenly_spread = np.linspace(0, len(samples) - 1, n).round().astype(np.int64)
    chosen = torch.as_tensor(evenly_spread)[ctx.rank::ctx.world_size]
    model.eval()
    total = torch.zeros(2, device=ctx.device, dtype=torch.float64)          # (loss sum, count)
    for index in chosen.split(per_rank_batch):
        cond, target = samples.batch(index.to(ctx.device))
        with common.autocast(ctx.device, args.precision):
            total[0] += gpt_loss(model, codebook, cond, target).double() * len(index)
        total[1] += len(index)
    model.train()
    if ctx.world_size > 1:
        torch.distributed.all_reduce(total)
    return (total[0] / total[1]).item()


def save_loss_figure(log_path, figure_path, title):
    """loss.png: training and validation cross-entropy (nats per code) against optimizer steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd
    log = pd.read_csv(log_path)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(log["step"], log["train_loss"], label="train")
    val = log.dropna(subset=["val_loss"])
    ax.plot(val["step"], val["val_loss"], "o-", label="validation")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy (nats per code)", title=title)
    ax.legend()
    fig.tight_layout()
    with common.atomic_path(figure_path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
