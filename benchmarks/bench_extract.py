"""Stage 05 speed: feature rows (TRs) per second at the paper configuration (VQ-VAE 128 px + GPT 576 x 8).

    python benchmarks/bench_extract.py                       # GPU if there is one: fp32, fp16, bf16
    python benchmarks/bench_extract.py --device cpu          # CPU, fp32, a few TRs
    python benchmarks/bench_extract.py --batch-size 64 --trs 1024 --precisions fp16

Random weights (the speed does not depend on them), a synthetic 128 px run on disk, and 05_extract.py's
own pieces: TRWindows + DataLoader gather the 32-frame windows from the memory-mapped frames, layer_rows
runs the VQ-VAE and the GPT under autocast and hooks attn_stack.attn_nets.4.post_fc_dp (147,456 values per
TR), rows are cast to float16 and copied to the host, as the stage does. "model only" times the forward
pass on windows already on the device; "end to end" includes gathering the frames.
"""
import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
from common import load_stage  # noqa: E402
from paper import alignment  # noqa: E402
from paper.gpt import PAPER_LAYER, GPTPrior
from paper.vqvae import VQVAE


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cuda, cpu (auto: cuda when available)")
    parser.add_argument("--precisions", nargs="+", default=None, help="default: fp32 fp16 bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, default=None, help="TR windows per forward (default 32 GPU, 2 CPU)")
    parser.add_argument("--trs", type=int, default=None, help="TRs timed per case (default 512 GPU, 4 CPU)")
    parser.add_argument("--workers", type=int, default=None, help="frame-gathering processes (default 4 GPU, 0 CPU)")
    return parser.parse_args()


def synthetic_run(folder, n_trs, frame_shape):
    """A run of random frames (one repetition covering every window, TR 1.49 s) as 05 reads it."""
    tr_s, n_frames = 1.49, int((n_trs + 1) * 1.49 * 60) + 1
    path = Path(folder) / "frames.npy"
    frames = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_frames, *frame_shape))
    rng = np.random.default_rng(0)
    for start in range(0, n_frames, 1024):
        frames[start:start + 1024] = rng.integers(0, 256, (min(1024, n_frames - start), *frame_shape), np.uint8)
    frames.flush()
    del frames
    return dict(sub="01", ses="001", task="bench", run="01", stem="bench", n_volumes=n_trs, tr_s=tr_s,
                repetitions=[dict(rep="1", status="ok", onset_s=0.0, start=0, n_frames=n_frames,
                                  frames_path=str(path))],
                windows=alignment.window_frame_indices(n_trs, tr_s, 32, 4))


def time_precision(extract, model, dataset, recorder, precision, setup):
    """(TR/s end to end, TR/s of the model alone, peak GiB, feature width) at one precision."""
    device, batch_size, workers, n_trs = setup
    gpu, layer, latent = device.type == "cuda", PAPER_LAYER, model.vqvae.latent_shape
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, pin_memory=gpu)

    def step(clips):
        out = extract.layer_rows(model, clips, recorder, "none", latent, device, precision)
        return out[layer][0].to(torch.float16).cpu()                   # (B, 147456), as the stage writes

    warm = next(iter(loader))[0]
    step(warm)                                                           # warm-up (cudnn autotuning, allocator)
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    done = 0
    for clips, _, _ in loader:
        width = step(clips).shape[1]
        done += len(clips)
    end_to_end = done / (time.perf_counter() - start)

    on_device = warm.to(device)
    n_model = max(1, n_trs // batch_size)
    start = time.perf_counter()
    for _ in range(n_model):
        step(on_device)
    model_only = n_model * len(warm) / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")
    return end_to_end, model_only, peak, width


def main():
    args = parse_args()
    extract = load_stage("05_extract.py")
    device = common.choose_device(args.device)
    gpu = device.type == "cuda"
    precisions = args.precisions or (["fp32", "fp16", "bf16"] if gpu else ["fp32"])
    batch_size = args.batch_size or (32 if gpu else 2)
    n_trs = args.trs or (512 if gpu else 4)
    workers = args.workers if args.workers is not None else (4 if gpu else 0)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True

    # --- the paper's models (random weights), hooked at the paper's layer ---------------------------
    torch.manual_seed(0)
    model = GPTPrior().eval()
    model.vqvae = VQVAE().eval()
    model.to(device)
    frame_shape = (model.vqvae.config["resolution"],) * 2 + (3,)

    with tempfile.TemporaryDirectory() as tmp:
        dataset = extract.TRWindows([synthetic_run(tmp, n_trs, frame_shape)], frame_shape)
        one = dataset[0][0][None]                                        # (1, 32, H, W, 3)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            alignment.read_windows(model, one.to(device))
        gflop_per_tr = counter.get_total_flops() / 1e9
        rows = []
        with alignment.LayerRecorder(model, [PAPER_LAYER]) as recorder:
            for precision in precisions:
                e2e, model_only, peak, width = time_precision(extract, model, dataset, recorder, precision,
                                                              (device, batch_size, workers, n_trs))
                rows.append((precision, e2e, model_only, model_only * gflop_per_tr / 1e3, peak, width))

    name = torch.cuda.get_device_name(device) if gpu else (platform.processor() or platform.machine())
    print(f"# bench_extract: {name}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"batch {batch_size}, {n_trs} TRs, {workers} loader workers, layer {PAPER_LAYER}, "
          f"{gflop_per_tr:.0f} GFLOP per TR")
    print(f"{'precision':<10} {'TR/s end to end':>16} {'TR/s model only':>16} {'TFLOP/s':>8} {'peak GiB':>9} {'D':>8}")
    for precision, e2e, model_only, tflops, peak, width in rows:
        print(f"{precision:<10} {e2e:>16.2f} {model_only:>16.2f} {tflops:>8.2f} {peak:>9.2f} {width:>8}")


if __name__ == "__main__":
    main()
