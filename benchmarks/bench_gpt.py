"""Train-step throughput of the GPT prior (stage 04) at the paper configuration, per precision.

    python benchmarks/bench_gpt.py                                  # CUDA if present: batch 64, fp32/fp16/bf16
    python benchmarks/bench_gpt.py --compile --batch-size 64 128    # torch.compile, two batch sizes
    python benchmarks/bench_gpt.py --fp8                            # adds torchao FP8 (H100) if installed
    python benchmarks/bench_gpt.py --device cpu --batch-size 2 --steps 3         # fp32 only on CPU

One step = what 04_train_gpt.py does per batch: codebook lookups of cached codes, forward, cross-entropy,
backward (GradScaler for fp16), gradient clipping at 1.0, fused Adam. Clips are random codes (the data
path is a GPU gather). Prints clips/s, tokens/s, MFU (known GPUs or --peak-tflops) and peak memory.
The authors' implementation (on-the-fly VQ-VAE encoding, activation checkpointing, explicit attention)
measured 80.5 / 87.9 / 101.8 clips/s (fp32 / fp16 / bf16, batch 16) and 186 clips/s (fp16, batch 64) on
one H100 80GB; the target is >= 4,000 clips/s in bf16 on that card.
"""
import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from paper.gpt import GPTPrior, GPT_COND_DIM

_spec = importlib.util.spec_from_file_location("stage04", REPO / "04_train_gpt.py")
stage04 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stage04)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--batch-size", type=int, nargs="+", help="default: 64 on CUDA, 2 on CPU")
    p.add_argument("--precisions", nargs="+", choices=common.PRECISIONS,
                   help="default: fp32 fp16 bf16 on CUDA; fp32 on CPU (CPU autocast is ~50x slower, not informative)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per setting")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, cuDNN autotune)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--checkpoint-activations", action="store_true", help="as the authors (slower)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls for fp32")
    p.add_argument("--fp8", action="store_true", help="also bf16 + torchao float8 linear layers")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known GPUs)")
    p.add_argument("--hidden-dim", type=int, default=576)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=4)
    return p.parse_args()


def bench(args, device, batch_size, precision, fp8=False):
    """(clips/s, peak memory GB) of the training step."""
    config = dict(latent_shape=(4, 8, 8), embedding_dim=128, n_codes=1024, hidden_dim=args.hidden_dim,
                  heads=args.heads, layers=args.layers, dropout=0.2, attn_dropout=0.3, cond_dim=GPT_COND_DIM)
    torch.manual_seed(0)
    model = GPTPrior(**config, checkpoint_activations=args.checkpoint_activations).to(device).train()
    if fp8:
        from torchao.float8 import convert_to_float8_training
        convert_to_float8_training(model, module_filter_fn=lambda m, name: "fc_out" not in name)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, fused=device.type == "cuda")
    scaler = common.grad_scaler(device, precision)
    step_model = torch.compile(model) if args.compile else model
    codebook = torch.randn(1024, 128, device=device)
    codes = torch.randint(0, 1024, (2, batch_size, 4, 8, 8), device=device)

    # 04's step (eager in one process: the weights cast once per step); torchao's fp8 layers cast
    # their own weights, so there the step sees no unwrapped model to cast for
    state = argparse.Namespace(model=None if fp8 else model, optimizer=optimizer, scaler=scaler)
    step_args = argparse.Namespace(precision=precision, grad_clip=1.0)

    def step():
        stage04.optimizer_step(step_model, state, codebook, codes[0], codes[1], 3e-4, step_args)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1e3) / 1e9
    return args.steps * batch_size / elapsed, peak, config


def main():
    args = parse_args()
    device = common.choose_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    batch_sizes = args.batch_size or ([64] if device.type == "cuda" else [2])
    precisions = args.precisions or (list(common.PRECISIONS) if device.type == "cuda" else ["fp32"])
    settings = [(b, p, False) for b in batch_sizes for p in precisions]
    if args.fp8:
        settings += [(b, "bf16", True) for b in batch_sizes]
    print(f"# GPT prior train step, {name}, torch {torch.__version__}, compile={args.compile}, "
          f"checkpointing={args.checkpoint_activations}, hidden {args.hidden_dim}, {args.layers} layers, "
          f"{args.heads} heads")
    print(f"{'batch':>5} {'precision':>9} {'clips/s':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6} {'peak GB':>8}")
    for batch_size, precision, fp8 in settings:
        label = "bf16+fp8" if fp8 else precision
        try:
            clips_per_s, peak_gb, config = bench(args, device, batch_size, precision, fp8)
        except (ImportError, RuntimeError) as err:
            print(f"{batch_size:>5} {label:>9}  failed: {str(err).splitlines()[0][:80]}")
            continue
        flops = stage04.train_flops_per_sample(config) * clips_per_s
        peak = args.peak_tflops or stage04.peak_tflops(argparse.Namespace(precision=precision, tf32=args.tf32), device)
        mfu = f"{flops / (peak * 1e12):6.1%}" if peak else f"{'n/a':>6}"
        print(f"{batch_size:>5} {label:>9} {clips_per_s:>9.1f} {clips_per_s * 256:>10.0f} {flops / 1e12:>8.2f} "
              f"{mfu} {peak_gb:>8.2f}")


if __name__ == "__main__":
    main()
