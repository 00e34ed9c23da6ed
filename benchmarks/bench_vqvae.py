"""Benchmark: VQ-VAE training-step throughput (clips/s), TFLOP/s and peak memory, per precision.

    python benchmarks/bench_vqvae.py                                  # paper config, batch 16, this device
    python benchmarks/bench_vqvae.py --device cpu --config tiny paper --batch-size 2 --steps 3
    python benchmarks/bench_vqvae.py --channels-last --compile --tf32 # the speed flags of 03_train_vqvae.py

One step = forward, loss, backward and Adam update on random clips, exactly as 03_train_vqvae.py does it
(EMA codebook included). FLOPs per clip are counted by torch.utils.flop_counter on one step (convolutions,
matmuls and attention; forward + backward), less the work on the zeros that the decoder's last layer is
padded with. Reference: the authors' implementation on one H100 80GB: 28.8 clips/s fp32 (no TF32), 70.5
fp16, 70.4 bf16, 740 GFLOP per clip; target >= 250 clips/s.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402
from paper.vqvae import SamePadConvTranspose3d, VQVAE, VQVAE_PAPER_CONFIG

CONFIGS = {
    "paper": VQVAE_PAPER_CONFIG,
    "tiny": dict(resolution=32, sequence_length=8, n_hiddens=16, n_res_layers=1, downsample=(2, 4, 4),
                 embedding_dim=8, n_codes=32),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--config", nargs="+", default=["paper"], choices=list(CONFIGS))
    p.add_argument("--precisions", nargs="+", default=list(common.PRECISIONS), choices=common.PRECISIONS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotune, compile)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in fp32 (off: the reference had none)")
    p.add_argument("--cudnn-benchmark", action="store_true")
    return p.parse_args()


def useful_flops(model, run):
    """FLOPs that torch's counter finds in run() (a forward + backward through `model`), less the work on
    zeros that VideoGPT's SamePadConvTranspose3d pads its input with (its stride-1 axes: the decoder's
    last layer). The counter charges a transposed convolution for every input element, padding included,
    which overstates the paper VQ-VAE's step by about a fifth; the padding's share of that layer's forward
    and backward convolutions (the input volume's) is removed."""
    shares = {}   # module name -> unpadded / padded input volume

    def record(name):
        def hook(module, inputs):
            t, h, w = inputs[0].shape[2:]                           # (B, C, T, H, W)
            wl, wr, hl, hr, tl, tr = module.pad_input
            shares[name] = t * h * w / ((t + tl + tr) * (h + hl + hr) * (w + wl + wr))
        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in model.named_modules()
             if isinstance(module, SamePadConvTranspose3d) and module.pad_input is not None]
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            run()
    finally:
        for hook in hooks:
            hook.remove()
    counts = counter.get_flop_counts()                              # {module path: {op: FLOPs}}
    padding = 0.0
    for name, share in shares.items():
        layer = ".".join(filter(None, (type(model).__name__, name, "convt")))   # "VQVAE.decoder.convts.2.convt"
        padding += sum(counts[layer].values()) * (1 - share)
    return counter.get_total_flops() - padding


def flops_per_clip(config, device, batch_size):
    """Useful FLOPs of one training step (forward + backward) divided by the batch size, in fp32."""
    model = VQVAE(**config).to(device)
    x = torch.rand(batch_size, 3, config["sequence_length"], config["resolution"], config["resolution"],
                   device=device) - 0.5

    def step():
        recon_loss, _, vq_output = model(x)
        (recon_loss + vq_output["commitment_loss"]).backward()
    return useful_flops(model, step) / batch_size


def time_steps(config, device, precision, args):
    """(clips/s, peak memory GB or None) of the training step."""
    torch.manual_seed(0)
    model = VQVAE(**config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = common.grad_scaler(device, precision)
    step_model = torch.compile(model) if args.compile else model
    shape = (args.batch_size, config["sequence_length"], config["resolution"], config["resolution"], 3)
    clips = torch.randint(0, 256, shape, dtype=torch.uint8, device=device)   # (B, T, H, W, 3)

    def step():
        x = clips.permute(0, 4, 1, 2, 3).float() / 255.0 - 0.5             # (B, 3, T, H, W)
        with common.autocast(device, precision):
            recon_loss, _, vq_output = step_model(x)
            loss = recon_loss + vq_output["commitment_loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    return args.steps * args.batch_size / elapsed, peak


def main():
    args = parse_args()
    device = common.choose_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
        name = torch.cuda.get_device_name(device)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
    flags = [f for f in ("channels_last", "compile", "tf32", "cudnn_benchmark") if getattr(args, f)]
    print(f"# VQ-VAE train step on {name}; torch {torch.__version__}; batch {args.batch_size}; "
          f"{args.steps} timed steps; flags: {', '.join(flags) or 'none'}")
    print(f"{'config':<7} {'precision':<9} {'GFLOP/clip':>10} {'clips/s':>9} {'TFLOP/s':>8} {'peak GB':>8}")
    for config_name in args.config:
        config = CONFIGS[config_name]
        gflop = flops_per_clip(config, device, min(args.batch_size, 2)) / 1e9
        for precision in args.precisions:
            try:
                clips_per_s, peak = time_steps(config, device, precision, args)
            except RuntimeError as err:   # e.g. an op without a kernel for this dtype on this device
                print(f"{config_name:<7} {precision:<9} {'':>10} failed: {str(err).splitlines()[0][:60]}")
                continue
            peak_text = f"{peak:8.2f}" if peak is not None else f"{'n/a':>8}"
            print(f"{config_name:<7} {precision:<9} {gflop:10.1f} {clips_per_s:9.2f} "
                  f"{clips_per_s * gflop / 1e3:8.3f} {peak_text}", flush=True)


if __name__ == "__main__":
    main()
