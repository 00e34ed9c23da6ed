"""04 — Train VideoGPT's conditioned GPT prior on cached VQ-VAE codes (paper sections 2.3.1.2, 2.4, 3).

    python 04_train_gpt.py --work work                                         # paper config (Table 2)
    python 04_train_gpt.py --work work --precision bf16 --compile              # fast path on a GPU
    python 04_train_gpt.py --work work --train-frames 100000                   # data-size sweep (2.4.1)
    python 04_train_gpt.py --work work --hidden-dim 255                        # model-size sweep (2.4.2)
    python 04_train_gpt.py --work work --layers 4 --heads 8 --name my-run
    python 04_train_gpt.py --work work --resume                                # continue an interrupted run
    torchrun --nproc-per-node 4 04_train_gpt.py --work work --precision fp16 --resume   # 4 GPUs
    sbatch --nodes 2 slurm/gpu_stage.sbatch 04_train_gpt.py --work work --precision fp16   # SLURM, 2 x 4 GPUs
    python 04_train_gpt.py --work work --device cpu --hidden-dim 24 --layers 2 --heads 2 --cond-dim 24 \\
        --batch-size 4 --max-steps 20                                          # tiny, seconds on a CPU

Inputs: <work>/frames/manifest.tsv with its uint8 (N, H, W, 3) frame arrays (stage 01) and the frozen
VQ-VAE <work>/vqvae/ckpt.pt (stage 03; --vqvae takes another, e.g. the authors' Lightning checkpoint).

A sample (paper 2.3.1.2) is 32 frames at 15 Hz (every --frame-step-th 60 Hz frame): the first 16
condition the GPT, which learns to predict the VQ-VAE codes of the last 16. Each repetition is cut into
consecutive, non-overlapping 16-frame clips (clip j = 60 Hz frames 64j, 64j + 4, ..., 64j + 60) and the
samples are the pairs (clip j, clip j + 1), as the authors' data module (stride 16) does. The VQ-VAE is
frozen, so every clip is encoded once, in exact fp32 (no TF32), into a cache of codes named after the VQ-VAE and the
frames it encodes; training then reads codes only (the same loss as encoding at every step).

Splits: repetitions with status ok outside --test-sessions (the encoding test set; `--test-sessions`
with no value includes them, as the authors did); the last --val-reps of them in manifest order are held
out for the validation loss. --train-frames N keeps the first N 60 Hz frames of the remaining training
repetitions (the last one cut), taken in the authors' order (subject, then game level, then session:
their 100k subset is sub-01's level 1 only), as the paper's 10k/100k/1M/6M data sizes (Figure 2);
--subset-order manifest takes them in manifest order instead. The checkpoint's record lists them.

Outputs (<work>/gpt/<name>/, name derived from the configuration unless --name):
    ckpt.pt    model, model_config, optimizer, GradScaler, step, RNG states per rank, args, record
    ckpt.json  the record: flags, fingerprints of the VQ-VAE and frames, the subset, complete or not
    log.csv    step, epoch, lr, train_loss, val_loss, clips_per_s, tokens_per_s, mfu, peak_mem_gb, wall_s
    loss.png   training and validation cross-entropy against steps

Optimisation (the authors'): Adam(3e-4, betas 0.9/0.999), cosine annealing to 0 over --max-steps,
gradient clipping at 1.0, --batch-size 64 samples per optimizer step over all processes (16 per GPU on 4
GPUs). --precision fp16 is autocast + GradScaler as in the paper; bf16 needs no scaler. The run
checkpoints every --ckpt-every steps and on SIGTERM/SIGUSR1 (SLURM's preemption), then exits with status
75; --resume continues it exactly.
"""
import argparse
import functools
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import common
from common import DEFAULT_WORK, InputError, run_main

STAGE = "04_train_gpt"
LOG_FIELDS = ["step", "epoch", "lr", "train_loss", "val_loss", "clips_per_s", "tokens_per_s", "mfu",
              "peak_mem_gb", "wall_s"]
ADAM_BETAS = (0.9, 0.999)   # paper 2.3.1.2
ENCODE_BATCH = 32           # clips per VQ-VAE forward pass when the code cache is filled

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
    data.add_argument("--test-sessions", nargs="*", default=["005"],
                      help="sessions kept out of training (the encoding test set); none: use every session")
    data.add_argument("--val-reps", type=int, default=2,
                      help="last N repetitions (manifest order) held out for the validation loss")
    data.add_argument("--train-frames", type=int, default=0,
                      help="60 Hz frames of training repetitions to use, the first ones in --subset-order (0: all; "
                           "paper: 10k, 100k, 1M, 6M)")
    data.add_argument("--subset-order", choices=("authors", "manifest"), default="authors",
                      help="order in which --train-frames takes repetitions: the authors' (subject, then level, "
                           "then session) or frames/manifest.tsv's (subject, session, run, repetition)")
    data.add_argument("--frame-step", type=int, default=4, help="60 Hz frames per clip frame (4: clips at 15 Hz)")
    model = p.add_argument_group("model (paper configuration by default: Table 2(b), 40,324,768 parameters)")
    model.add_argument("--hidden-dim", type=int, default=576, help="multiple of 3 (paper sweep: 6 ... 1024)")
    model.add_argument("--layers", type=int, default=8, help="attention blocks (paper sweep: 1, 2, 4, 8, 16)")
    model.add_argument("--heads", type=int, default=4, help="attention heads (paper sweep: 1, 2, 4, 8)")
    model.add_argument("--cond-dim", type=int, default=common.GPT_COND_DIM,
                       help="width of the conditioning features (the authors' fixed 240; small for tiny tests)")
    model.add_argument("--dropout", type=float, default=0.2, help="dropout on the residual branches")
    model.add_argument("--attn-dropout", type=float, default=0.3, help="dropout on the attention weights")
    model.add_argument("--checkpoint-activations", action="store_true",
                       help="recompute attention and MLP in the backward pass (the authors' default; saves memory)")
    train = p.add_argument_group("training")
    train.add_argument("--batch-size", type=int, default=64,
                       help="samples per optimizer step, over all processes (the authors': 16 per GPU x 4 GPUs)")
    train.add_argument("--max-steps", type=int, default=200000,
                       help="optimizer steps (cosine period); 0 saves the initial weights (the untrained control)")
    train.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate (paper: 3e-4)")
    train.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (the authors': 1; 0: none)")
    train.add_argument("--init-from", help="initial weights: a ckpt.pt of this stage or an authors' Lightning .ckpt")
    train.add_argument("--allow-unfinished", action="store_true",
                       help="use a VQ-VAE whose training was interrupted (refused by default)")
    train.add_argument("--seed", type=int, default=0)
    run = p.add_argument_group("run")
    run.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    run.add_argument("--precision", default="fp32", choices=common.PRECISIONS,
                     help="fp16: autocast + GradScaler (the paper's mixed precision); bf16: autocast")
    run.add_argument("--tf32", action="store_true", help="TF32 matmuls in fp32 (Ampere and later)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument("--log-every", type=int, default=100, help="steps between log.csv rows")
    run.add_argument("--val-every", type=int, default=1000, help="steps between validation passes")
    run.add_argument("--val-samples", type=int, default=2048, help="validation samples per pass (0: all)")
    run.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    run.add_argument("--resume", action="store_true", help="continue from <work>/gpt/<name>/ckpt.pt if present")
    run.add_argument("--overwrite", action="store_true", help="start over even if a checkpoint exists")
    args = p.parse_args(argv)
    args.test_sessions = [s.removeprefix("ses-") for s in args.test_sessions]
    if args.name is None:
        args.name = f"h{args.hidden_dim}-l{args.layers}-a{args.heads}"
        if args.train_frames:
            args.name += f"-f{args.train_frames}"
        if args.precision != "fp32":
            args.name += f"-{args.precision}"
    for flag in ("batch_size", "log_every", "val_every", "ckpt_every", "frame_step"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.max_steps < 0:
        raise InputError(f"--max-steps {args.max_steps}: must not be negative (0: the untrained model, a control)")
    if args.train_frames < 0 or args.val_reps < 0:
        raise InputError("--train-frames and --val-reps must not be negative")
    return args


# --------------------------------------------------------------------------------------------------
# Training (paper sections 2.3.1.2 and 2.4)
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    preemption = common.PreemptionFlag()   # from here on SIGTERM/SIGUSR1 ask to stop; they no longer kill
    args = parse_args(argv)
    work = Path(args.work)
    vqvae_path = Path(args.vqvae or work / "vqvae" / "ckpt.pt")
    args.vqvae = str(vqvae_path)   # saved in the checkpoint's args: 05 finds the VQ-VAE there
    out_dir = work / "gpt" / args.name
    ckpt_path = out_dir / "ckpt.pt"
    common.remove_stale_temporaries(out_dir)
    common.remove_stale_temporaries(work / "gpt" / "codes")

    # What this run is made of: its flags, the frozen VQ-VAE, the frames of its repetitions and the initial
    # weights. A finished run made the same way is skipped; an unfinished one is resumed (--resume); one
    # made from other inputs starts over.
    vqvae = common.load_vqvae(vqvae_path, allow_unfinished=args.allow_unfinished)
    config = model_config(args, vqvae)
    train_reps, val_reps, used = training_data(work, args)
    frames_paths = [work / str(r["frames_path"]) for r in train_reps + val_reps]
    settings = common.settings_of(args, common.RUN_CONTROL_FLAGS | {"vqvae", "init_from"})
    inputs = common.input_fingerprints(work, [vqvae_path, *frames_paths, *([args.init_from] if args.init_from else [])])
    checkpoint, complete = common.checkpoint_to_resume(ckpt_path, STAGE, settings, inputs, args.resume, args.overwrite)
    if complete:
        common.print0(f"{STAGE}: {ckpt_path} is complete ({checkpoint['step']} steps, same flags and inputs); "
                      "--overwrite to train again")
        return
    data = dict(vqvae=vqvae, vqvae_sha256=inputs[os.path.relpath(vqvae_path, work)]["sha256"], train_reps=train_reps,
                val_reps=val_reps, used=used,
                frames_sha256=[inputs[os.path.relpath(p, work)]["sha256"] for p in frames_paths])
    # the record says which frames this data size means, repetition by repetition
    subset = [{"frames_path": str(r["frames_path"]), "sub": r["sub"], "ses": r["ses"], "frames_used": n,
               "level": r["level"] if isinstance(r.get("level"), str) else None} for r, n in zip(train_reps, used)]

    ctx = common.setup_distributed(args.device)
    try:
        if checkpoint is None:
            common.start_over(ckpt_path, ctx)
        args.per_rank_batch = common.split_batch(args.batch_size, ctx, STAGE)
        train(args, ctx, work, out_dir, ckpt_path, checkpoint, config, data,
              dict(stage=STAGE, settings=settings, inputs=inputs, training_repetitions=subset), preemption)
    finally:
        common.teardown_distributed()


def train(args, ctx, work, out_dir, ckpt_path, checkpoint, config, data, provenance, preemption):
    """The training loop, to --max-steps. A signal (`preemption`) stops it at the end of a step, its
    checkpoint saved, or after the code cache's current repetition: common.Interrupted."""
    device = ctx.device
    common.seed_everything(args.seed, ctx.rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    codebook, train_samples, val_samples = code_samples(args, ctx, work, data, preemption)  # (n_codes, D), ...
    model = common.VideoGPT(**config, checkpoint_activations=args.checkpoint_activations).to(device)
    if args.init_from and checkpoint is None:
        load_initial_weights(model, args.init_from, config, codebook)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=ADAM_BETAS, fused=device.type == "cuda")
    scaler = common.grad_scaler(device, args.precision)
    # loss_sum, interval_steps: the train_loss of a log row averages the steps since the previous row,
    # also across a resume
    start_step, wall_before, loss_sum, interval_steps = resume(checkpoint, model, optimizer, scaler, ctx)
    raw_model = model
    if ctx.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    flops_per_sample, peak = train_flops_per_sample(config), peak_tflops(args, device)
    # for the reader of the record (and 07's scaling laws): the model's size and the compute of one sample
    provenance.update(n_parameters=sum(p.numel() for p in raw_model.parameters()),
                      train_flops_per_sample=flops_per_sample)
    tokens_per_sample = math.prod(config["latent_shape"])
    log = common.CSVLog(out_dir / "log.csv", LOG_FIELDS, resume_step=start_step) if ctx.is_main else None
    run_start = time.perf_counter()

    def save(step):
        rng = common.gather_rng_states(ctx)   # collectives: every rank takes part
        interval_loss = loss_sum.clone()
        if ctx.world_size > 1:
            torch.distributed.all_reduce(interval_loss)
        if ctx.is_main:
            common.save_checkpoint(ckpt_path, dict(
                model=raw_model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                step=step, max_steps=args.max_steps, complete=step >= args.max_steps, rng=rng, args=vars(args),
                model_config=config, kind=STAGE, provenance=provenance, vqvae_sha256=data["vqvae_sha256"],
                train_frames=sum(data["used"]), train_samples=len(train_samples),
                log_interval={"loss_sum": interval_loss.item(), "steps": interval_steps},
                wall_s=wall_before + time.perf_counter() - run_start))
        common.barrier(ctx)   # no rank exits before the checkpoint is on disk (srun kills the others)

    if args.max_steps == 0:   # the untrained control: its initial weights are the result
        save(0)
    # --- loop; the bar is closed however it ends, so that an error message stays the last line printed
    with tqdm(total=args.max_steps, initial=start_step, disable=not ctx.is_main, desc="04 gpt") as progress:
        interval_start = time.perf_counter()
        step = start_step
        while step < args.max_steps:
            index = batch_indices(step, len(train_samples), args.batch_size, args.seed, ctx.rank, ctx.world_size)
            cond, target = train_samples.batch(index.to(device))                 # (B, t, h, w) each
            lr = common.cosine_lr(step, args.max_steps, args.lr)                 # paper eq. 2
            common.set_lr(optimizer, lr)
            with common.autocast(device, args.precision):
                loss = gpt_loss(model, codebook, cond, target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach()
            step += 1
            interval_steps += 1
            progress.update(1)

            last = step == args.max_steps
            if step % args.log_every == 0 or last:
                val_loss = ""
                if step % args.val_every == 0 or last:
                    val_loss = validation_loss(raw_model, codebook, val_samples, args, ctx) if len(val_samples) else ""
                if ctx.world_size > 1:
                    torch.distributed.all_reduce(loss_sum)
                train_loss = loss_sum.item() / interval_steps / ctx.world_size
                elapsed = time.perf_counter() - interval_start
                clips_per_s = interval_steps * args.batch_size / elapsed
                if ctx.is_main:
                    log.log(step=step, epoch=step * args.batch_size / len(train_samples), lr=lr,
                            train_loss=train_loss, val_loss=val_loss, clips_per_s=clips_per_s,
                            tokens_per_s=clips_per_s * tokens_per_sample,
                            mfu=clips_per_s * flops_per_sample / (peak * 1e12 * ctx.world_size) if peak else "",
                            peak_mem_gb=common.peak_memory_gb(device),
                            wall_s=wall_before + time.perf_counter() - run_start)
                    progress.set_postfix(loss=f"{train_loss:.4f}")
                loss_sum.zero_()
                interval_start, interval_steps = time.perf_counter(), 0

            stop = preemption.agreed(ctx)
            if step % args.ckpt_every == 0 or last or stop:
                save(step)
            if stop and not last:
                raise preemption.interrupted(STAGE, f"at step {step} of {args.max_steps}")

    if ctx.is_main:
        save_loss_figure(out_dir / "log.csv", out_dir / "loss.png", f"GPT {args.name}")
        print(f"{STAGE}: {step} steps; wrote {ckpt_path}, {out_dir / 'log.csv'}, {out_dir / 'loss.png'}")


def gpt_loss(model, codebook, cond_codes, target_codes):
    """Paper eq. 7: mean cross-entropy of the target clip's codes (B, t, h, w), each predicted from the
    codes before it (causal attention) and from the conditioning clip's codes (cross-attention). The GPT
    reads codebook vectors, codes (B, t, h, w) -> (B, t, h, w, D), as the authors' emb_cond model does."""
    logits = model(F.embedding(target_codes, codebook), F.embedding(cond_codes, codebook))  # (B, t, h, w, n_codes)
    return F.cross_entropy(logits.flatten(0, -2).float(), target_codes.flatten().long())


# --------------------------------------------------------------------------------------------------
# Set-up: flags to model, the training data, a checkpoint to resume, initial weights
# --------------------------------------------------------------------------------------------------
def model_config(args, vqvae):
    """The VideoGPT keywords of the flags and the VQ-VAE, after checking they describe a valid model."""
    if args.hidden_dim % 3 or args.hidden_dim < 3:
        raise InputError(f"--hidden-dim {args.hidden_dim}: must be a positive multiple of 3 "
                         "(one position table per latent axis t, h, w; paper 2.4.2)")
    if args.cond_dim % 3 or args.cond_dim < 3:
        raise InputError(f"--cond-dim {args.cond_dim}: must be a positive multiple of 3")
    if not 1 <= args.heads <= min(args.hidden_dim, args.cond_dim):
        raise InputError(f"--heads {args.heads}: must be between 1 and min(--hidden-dim, --cond-dim) so that "
                         "every head has a channel")
    if args.layers < 1:
        raise InputError(f"--layers {args.layers}: must be at least 1")
    return dict(latent_shape=tuple(vqvae.latent_shape), embedding_dim=vqvae.embedding_dim, n_codes=vqvae.n_codes,
                hidden_dim=args.hidden_dim, heads=args.heads, layers=args.layers, dropout=args.dropout,
                attn_dropout=args.attn_dropout, cond_dim=args.cond_dim)


def training_data(work, args):
    """(training repetitions in --subset-order, validation repetitions, leading 60 Hz frames used of each
    training repetition): rows of frames/manifest.tsv as dicts. Validation is the last --val-reps in
    manifest order, the same whatever the data size."""
    reps = common.training_repetitions(work, args.test_sessions)
    if len(reps) <= args.val_reps:
        raise InputError(f"{work / 'frames' / 'manifest.tsv'}: {len(reps)} usable repetition(s), not enough to "
                         f"hold out --val-reps {args.val_reps} and still train")
    train_reps, val_reps = reps[:len(reps) - args.val_reps], reps[len(reps) - args.val_reps:]
    train_reps = in_subset_order(train_reps, args.subset_order)
    used = select_training_frames([int(r["n_frames"]) for r in train_reps], args.train_frames)
    return [r for r, n in zip(train_reps, used) if n > 0], val_reps, [n for n in used if n > 0]


def natural_key(label):
    """A sort key that orders '2' before '10' and keeps text labels comparable: 'level-10' -> ('level-', 10, '')."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(label)))


def in_subset_order(reps, order):
    """The training repetitions in the order --train-frames takes them. "authors": the authors' cumulative
    data-size subsets (paper Figure 2), subject, then game level, then session (then run and repetition):
    their 100k-frame subset is sub-01's level 1 only. "manifest": frames/manifest.tsv's order (subject,
    session, run, repetition), which mixes levels."""
    if order == "manifest":
        return list(reps)
    return sorted(reps, key=lambda r: tuple(natural_key(r.get(k, "")) for k in ("sub", "level", "ses", "run", "rep")))


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
        raise InputError(f"--train-frames {train_frames}: the training repetitions hold only {total} frames")
    used, left = [], train_frames
    for n in n_frames:
        used.append(min(int(n), left))
        left -= used[-1]
    return used


def resume(checkpoint, model, optimizer, scaler, ctx):
    """Load a checkpoint's weights, optimizer, loss scaler and random generators. Returns (step, wall
    seconds trained before, loss sum (a tensor) and steps of the log interval in progress); zeros
    without a checkpoint."""
    loss_sum = torch.zeros((), device=ctx.device)
    if checkpoint is None:
        return 0, 0.0, loss_sum, 0
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    if ctx.is_main:   # the saved sum covers every rank: it enters the next all-reduce once
        loss_sum += checkpoint["log_interval"]["loss_sum"]
    if not common.restore_rng_states(checkpoint["rng"], ctx):
        common.print0(f"{STAGE}: {ctx.world_size} processes instead of {len(checkpoint['rng'])}: "
                      "random generators reseeded (the run continues, not bit-for-bit)")
    return checkpoint["step"], checkpoint.get("wall_s", 0.0), loss_sum, checkpoint["log_interval"]["steps"]


def load_initial_weights(model, path, config, codebook):
    """--init-from: start from the weights of another GPT checkpoint (ours, or the authors' Lightning
    one) of the same architecture; its dropout rates may differ."""
    init_config, init_state, extra = common.load_gpt_checkpoint(path)
    if {k: v for k, v in init_config.items() if "dropout" not in k} != \
            {k: v for k, v in config.items() if "dropout" not in k}:
        raise InputError(f"{path}: a model {init_config}, but the flags and VQ-VAE ask for {config}")
    common.load_weights(model, init_state, path, f"a VideoGPT with {config}")
    their_codebook = extra.get("vqvae_state", {}).get("codebook.embeddings")
    if their_codebook is not None and not torch.allclose(their_codebook.float().to(codebook.device), codebook):
        common.print0(f"{STAGE}: warning: {path} was trained with another VQ-VAE codebook than this run's")


# --------------------------------------------------------------------------------------------------
# Data: the code cache and the samples
# --------------------------------------------------------------------------------------------------
def code_samples(args, ctx, work, data, preemption):
    """The frozen VQ-VAE's codebook (n_codes, D) on the device, and the training and validation samples
    (CodeSamples) from the cached codes of their repetitions (encoded now where the cache lacks them)."""
    vqvae = data.pop("vqvae").to(ctx.device).eval()
    codebook = vqvae.codebook.embeddings.detach().clone().float()                # (n_codes, D)
    train_reps, val_reps, used = data["train_reps"], data["val_reps"], data["used"]
    cache_dir = cache_directory(work, data["vqvae_sha256"], args.frame_step)
    span = vqvae.config["sequence_length"] * args.frame_step                     # 60 Hz frames per clip
    codes = cached_codes(work, train_reps + val_reps, data["frames_sha256"], vqvae, cache_dir, args, ctx,
                         preemption)
    train_samples = CodeSamples(codes[:len(train_reps)], used, span, ctx.device)
    val_samples = CodeSamples(codes[len(train_reps):], [int(r["n_frames"]) for r in val_reps], span, ctx.device)
    if len(train_samples) == 0:
        raise InputError(f"--train-frames {args.train_frames}: no training sample (a sample needs two "
                         f"consecutive clips, {2 * span} frames of one repetition)")
    common.print0(f"{STAGE}: {sum(used)} training frames from {len(train_reps)} repetitions -> "
                  f"{len(train_samples)} samples; {len(val_samples)} validation samples "
                  f"({len(val_reps)} repetitions); codes in {cache_dir}")
    return codebook.to(ctx.device), train_samples, val_samples


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
    """VQ-VAE codes (n_clips, t, h, w) int64 of the consecutive clips of one repetition's frames, in fp32."""
    sequence_length = vqvae.config["sequence_length"]
    n_clips = len(frames) // (sequence_length * frame_step)
    codes = []
    for i in range(0, n_clips, batch):
        clips = clips_of_frames(frames, range(i, min(i + batch, n_clips)), sequence_length, frame_step)  # (B, T, H, W, 3)
        codes.append(vqvae.encode(common.video_from_uint8(torch.as_tensor(clips).to(device))).cpu())  # (B, t, h, w)
    return torch.cat(codes) if codes else torch.zeros((0, *vqvae.latent_shape), dtype=torch.long)


def cached_codes(work, reps, frames_sha256, vqvae, cache_dir, args, ctx, preemption):
    """Codes (n_clips, t, h, w) uint16 of each repetition, from the cache (encoded on first use).

    A cache file is named after the sha256 of the frames it encodes, <sub>/<ses>/<stem>.<sha256[:16]>.npy
    under a folder named after the VQ-VAE, so re-rendered frames or another VQ-VAE never meet old codes.
    The ranks share the encoding (repetition i goes to rank i % world size), then wait for each other.
    A signal stops the encoding after the current repetition (common.Interrupted): the files written are
    kept, and the re-run encodes the rest.
    """
    resolution = vqvae.config["resolution"]
    paths = []
    for rep, digest in zip(reps, frames_sha256):
        frames_path = work / str(rep["frames_path"])
        relative = Path(str(rep["frames_path"]))
        relative = relative.relative_to("frames") if relative.parts[0] == "frames" else Path(relative.name)
        paths.append((frames_path, cache_dir / relative.with_name(f"{relative.name.split('.')[0]}.{digest[:16]}.npy")))
    # by position in the list, not among the missing files: a rank that looks later, after another has
    # written some, must not get another share (repetitions would then be encoded by no rank)
    mine = [(f, c) for i, (f, c) in enumerate(paths) if i % ctx.world_size == ctx.rank and not c.is_file()]
    for frames_path, code_path in tqdm(mine, desc="04 encode clips", disable=not ctx.is_main or not mine):
        if preemption.name:
            break
        frames = common.load_npy(frames_path, advice="re-render it with 01_render_frames.py")
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (resolution, resolution, 3):
            raise InputError(f"{frames_path}: expected uint8 frames (N, {resolution}, {resolution}, 3) for the "
                             f"VQ-VAE's resolution {resolution}, got {frames.dtype} {frames.shape}")
        codes = encode_repetition(vqvae, frames, args.frame_step, ctx.device)
        common.save_npy(code_path, codes.numpy().astype(np.uint16))
    if preemption.agreed(ctx):   # a collective, as the barrier it replaces: every rank waits here
        cached = sum(c.is_file() for _, c in paths)
        raise preemption.interrupted(STAGE, "while caching codes", f"{cached} of {len(paths)} repetitions cached")
    return [common.load_npy(c, mmap=False, advice="delete it: it is a cache") for _, c in paths]


class CodeSamples:
    """Samples (clip j, clip j + 1) of the repetitions: `codes` (n_clips_total, t, h, w) int32 on the
    device, `starts` (n_samples,) the index of each sample's conditioning clip in `codes`.

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
        self.starts = torch.as_tensor(np.concatenate(starts) if starts else np.zeros(0, np.int64)).to(device)

    def __len__(self):
        return len(self.starts)

    def batch(self, index):
        """(conditioning codes, target codes), each (B, t, h, w), of the samples `index` (B,)."""
        first = self.starts[index]
        return self.codes[first], self.codes[first + 1]


@functools.lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, n_samples):
    """The order (n_samples,) of the samples in one epoch: the same on every rank, fresh each epoch."""
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
        model = common.VideoGPT(**config)
        x = torch.zeros(1, *config["latent_shape"], config["embedding_dim"])
        targets = torch.zeros(1, *config["latent_shape"], dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        logits = model(x, x)
        F.cross_entropy(logits.flatten(0, -2), targets.flatten()).backward()
    return counter.get_total_flops()


def peak_tflops(args, device):
    """The device's dense peak TFLOP/s at --precision (PEAK_TFLOPS), or None where it is not listed."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    precision = "tf32" if args.precision == "fp32" and args.tf32 else args.precision
    for key, peaks in PEAK_TFLOPS.items():      # "H100 PCIe" is listed before "H100"
        if key in name:
            return peaks[precision]
    return None


@torch.no_grad()
def validation_loss(model, codebook, samples, args, ctx):
    """Mean cross-entropy over a fixed, evenly spread subset of the validation samples (all ranks share
    the work; model in eval mode: no dropout)."""
    n = len(samples) if args.val_samples == 0 else min(args.val_samples, len(samples))
    chosen = torch.as_tensor(np.linspace(0, len(samples) - 1, n).round().astype(np.int64))[ctx.rank::ctx.world_size]
    model.eval()
    total = torch.zeros(2, device=ctx.device, dtype=torch.float64)          # (loss sum, count)
    for index in chosen.split(args.per_rank_batch):
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
