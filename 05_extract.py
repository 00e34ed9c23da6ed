"""05 — Brain features per TR from any layer of a VideoGPT checkpoint (paper sections 2.3, 2.4.2, appendix A).

    python 05_extract.py --work work --ckpt work/gpt/h576-l8-a4/ckpt.pt        # the paper's layer
    python 05_extract.py --work work --ckpt work/gpt/h576-l8-a4/ckpt.pt \\
        --list-layers                                                # what can be hooked
    python 05_extract.py --work work --ckpt work/gpt/h576-l4-a4/ckpt.pt \\
        --layer last                                                 # depth sweep (Table 3)
    python 05_extract.py --work work --ckpt authors_gpt.ckpt --name authors \\
        --layer attn_stack.attn_nets.4.post_fc_dp attn_stack.attn_nets.4.fc_block.0 --pool space
    python 05_extract.py --work work --ckpt ... --device cpu --batch-size 4    # no GPU (demo)
    python 05_extract.py --work work --ckpt ... --layer vqvae.codebook \\
        --name vqvae                                                 # control: the VQ-VAE alone
    python 05_extract.py --work work --features lowlevel             # control: no model at all
    python 05_extract.py --work work --features buttons   # the player's key presses, no model
    sbatch --gpus-per-node 1 slurm/gpu_stage.sbatch \\
        05_extract.py --work work --ckpt work/gpt/h576-l8-a4/ckpt.pt

Every fMRI run of <work>/bold/manifest.tsv gets one feature row per volume, from the activation of
one (or several) modules of the GPT prior while it reads the gameplay the subject saw just before.

Alignment (docs/CONTRACT.md, "Time conventions"; t counts volumes from 0, TR in seconds):
  - the run's 60 Hz timeline starts at its first volume; frame i (0-based) of a repetition is 60 Hz
    frame round(onset_s x 60) + i, shown from that frame's time for 1/60 s. Frames before the run,
    between repetitions, after the last one, and of repetitions whose replay is "Missing file" are
    black (a later repetition overwrites an earlier one where rounding makes them overlap by a
    frame);
  - row t is the window of 32 frames (2 x the VQ-VAE's sequence_length) at 15 Hz (every --frame-step
    = 4th 60 Hz frame) whose last frame is the last one shown before the end of volume t, at time
    (t + 1) x TR: 60 Hz frames e_t - 4 x 31, ..., e_t - 4, e_t with
    e_t = ceil((t + 1) x TR x 60) - 1. Its first 16 frames condition the GPT, the last 16 are the
    target clip it reads (paper 2.3.1.2). No haemodynamic delay here: 06 applies it.

Outputs, for each --layer (written atomically; a run whose record says it was made from the same
checkpoint, frames and timeline with the same flags is skipped, one made from other inputs is made
again):
    <work>/features/<name>/<layer>/sub-XX/ses-YYY/<run stem>.npy   float16 (T, D),
        T = n_volumes of the run;
        D = 147,456 = 4 x 8 x 8 x 576 for attn_stack.attn_nets.4.post_fc_dp of the paper's model
        (activation flattened in C order from its (T', H', W', C) shape); --pool space/time
        averages the latent space (H', W') or time (T') axes first. vqvae.codebook: the codebook
        vectors of the window's two clips, (2, D, t, h, w). lowlevel: 32 x 8 x 8 luminances and
        8 x 8 motion energies.
        buttons: D = 2 x B (B = 12 on the Genesis), from the inputs 01 recorded beside the
        frames: for each button the fraction of the window's 128 60 Hz frames (32 x --frame-step)
        it is held, then for each button its presses there (see button_rows); `06_ridge.py --name
        buttons` reads them.
    <work>/features/<name>/<layer>/sub-XX/ses-YYY/<run stem>.json  its record: flags,
        fingerprints of the checkpoint, VQ-VAE and frames, per-TR activation shape, alignment, the
        repetitions placed.
"""
import argparse
import contextlib
import difflib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import common
from common import DEFAULT_WORK, InputError, read_tsv, run_main, run_stem
from control_features import (LOWLEVEL_GRID, button_alignment, button_rows, lowlevel_rows,
                              recorded_buttons, same_buttons)
from paper.alignment import (GAMEPLAY_HZ, LayerRecorder, gather_frames, read_windows,
                             repetition_start, window_frame_indices)
from paper.gpt import PAPER_LAYER

STAGE = "05_extract"
BLOCK_OUTPUT = "post_fc_dp"                 # --layer last = attn_stack.attn_nets.<L-1>.post_fc_dp
FRAMES_COLUMNS = ("sub", "ses", "task", "run", "rep", "onset_s", "n_frames", "frames_path",
                  "status")
BOLD_COLUMNS = ("sub", "ses", "task", "run", "n_volumes", "tr_s")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--ckpt", help="GPT checkpoint: ours (<work>/gpt/<name>/ckpt.pt) "
                                  "or the authors' Lightning .ckpt")
    p.add_argument("--features", choices=("model", "lowlevel", "buttons"), default="model",
                   help="model: a layer of the GPT (or its VQ-VAE); lowlevel: a control without "
                        "any model, the window's frames as a grayscale grid and their motion "
                        "energy (no --ckpt); buttons: the player's inputs over the window, held "
                        "fraction and presses per button (no --ckpt)")
    p.add_argument("--name", default=None,
                   help="features/<name>/ (default: the folder of ckpt.pt, "
                        "else the checkpoint's file stem)")
    p.add_argument("--layer", nargs="+", default=[PAPER_LAYER],
                   help=f"module name(s) to hook (default {PAPER_LAYER}); "
                        f"'last' = the last block's {BLOCK_OUTPUT}")
    p.add_argument("--list-layers", action="store_true",
                   help="print every hookable module and its output shape")
    p.add_argument("--pool", choices=("none", "space", "time"), default="none",
                   help="average the activation over latent space (H', W') or time (T') "
                        "(default none, as the paper)")
    p.add_argument("--dtype", choices=("float16", "float32"), default="float16",
                   help="dtype of the saved features")
    p.add_argument("--vqvae", default=None,
                   help="VQ-VAE checkpoint for one of our GPT checkpoints "
                        "(default: the one it was trained with)")
    p.add_argument("--frame-step", type=int, default=None,
                   help="60 Hz frames per clip frame "
                        "(default: the GPT's training value, else 4: clips at 15 Hz)")
    p.add_argument("--batch-size", type=int, default=32, help="TR windows per forward pass")
    p.add_argument("--precision", choices=("auto", *common.PRECISIONS), default="auto",
                   help="autocast of the GPT's forward pass (auto: "
                        f"{common.GPU_PRECISION} on a GPU, fp32 on the CPU, as 03 and 04); the "
                        "VQ-VAE always encodes in fp32, as 04 did")
    p.add_argument("--device", default="auto",
                   help="cuda, cpu, cuda:1 ... (auto: cuda when available)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes gathering frames "
                        "(default 4 on GPU, 0 = in the main process on CPU)")
    p.add_argument("--subjects", nargs="+", default=None,
                   help="only these subject labels, e.g. 01 02")
    p.add_argument("--allow-missing", action="store_true",
                   help="treat repetitions that 01 failed to render as black instead of stopping")
    p.add_argument("--allow-unfinished", action="store_true",
                   help="use a GPT or VQ-VAE whose training was interrupted (refused by default)")
    p.add_argument("--overwrite", action="store_true", help="recompute features that already exist")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Extraction: every TR's window through the model, the hooked rows into each run's file
# --------------------------------------------------------------------------------------------------
def main(argv=None):
    args = parse_args(argv)
    work = Path(args.work)
    ckpt = check_flags(args)
    device, precision = choose_device(args)
    threads = common.limit_threads()   # one process (its loader's workers take one thread each)
    name = args.name or (args.features if ckpt is None else ckpt.parent.name
                         if ckpt.name == "ckpt.pt" else ckpt.name.split(".")[0])

    common.remove_stale_temporaries(work / "features" / name)
    if args.features != "model":
        model, info = None, model_free_info(work, args.features)
    else:
        model, info = load_model(ckpt, args.vqvae, work, device, args.allow_unfinished)
    if args.list_layers:   # with a model only: check_flags refused it for the others
        list_layers(model, info, device, precision)
        return

    # --- plan: which runs still need features -----------------------------------------------------
    frame_step = args.frame_step or info["frame_step"] or 4
    layers = ([args.features] if model is None
              else resolve_layers(model, args.layer, info["n_layers"]))
    runs = plan_runs(work, args.subjects, info["frame_shape"], info["window"], frame_step,
                     args.allow_missing, args.features == "buttons")
    if args.features == "buttons":
        info["config"]["buttons"] = same_buttons(runs, work / "frames" / "manifest.tsv")
    extractor = Extractor(ckpt, model, info, device, precision, frame_step, layers)
    todo = runs_to_do(args, work, name, extractor, runs)
    print(f"{STAGE}: {ckpt or '--features ' + args.features} -> {work / 'features' / name}: "
          f"{len(layers)} layer(s) {', '.join(layers)}; "
          f"{len(todo)} of {len(runs)} run(s) to do, "
          f"{sum(r['n_volumes'] for r, _, _ in todo)} TRs; "
          f"{device} ({threads} CPU thread(s)), {precision}, batch {args.batch_size}")
    if not todo:
        return

    # --- extract: the rows of every run to do, into its files -------------------------------------
    if args.features == "buttons":   # no frames, no model: every row of a run at once
        write_button_features(extractor, todo, np.dtype(args.dtype))
        print(f"{STAGE}: wrote {len(todo)} run(s) under {work / 'features' / name}")
        return
    extract(args, extractor, todo)
    print(f"{STAGE}: wrote {len(todo)} run(s) x {len(layers)} layer(s) "
          f"under {work / 'features' / name}")


def check_flags(args):
    """The checkpoint (a Path; None without a model), once the flags agree with --features: a
    model's flags are refused without one (or said to be ignored: those a sweep passes to every
    job)."""
    if args.features == "model" and not args.ckpt:
        raise InputError("--ckpt: required for --features model (the GPT whose layers are read)")
    if args.features != "model":   # no model: its flags would be ignored, so refused or said so
        given = [flag for flag, used in (("--ckpt", args.ckpt),
                                         ("--layer", args.layer != [PAPER_LAYER]),
                                         ("--list-layers", args.list_layers)) if used]
        if given:
            raise InputError(f"{' '.join(given)}: not used by --features {args.features} "
                             f"(features without a model)")
        # a sweep's --extract-args reach every job: a note, not an error, and not recorded
        ignored = [flag for flag, used in (("--pool", args.pool != "none"),
                                           ("--precision", args.precision != "auto")) if used]
        if ignored:
            print(f"{STAGE}: note: {' '.join(ignored)} ignored by --features {args.features} "
                  f"(no model to pool or run)")
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is not None and not ckpt.is_file():
        raise InputError(f"{ckpt}: checkpoint not found")
    if (args.frame_step is not None and args.frame_step < 1) or args.batch_size < 1:
        raise InputError("--frame-step and --batch-size must be at least 1")
    return ckpt


def choose_device(args):
    """(torch.device, precision) of --device and --precision (common's choices: auto is a GPU when
    torch sees one, and on it mixed precision)."""
    device = common.choose_device(args.device)
    return device, common.resolved_precision(args.precision, device)


def list_layers(model, info, device, precision):
    """--list-layers: every module of the model, with its output for one (black) window."""
    names = [n for n, _ in model.named_modules() if n]
    black = torch.zeros((1, info["window"], *info["frame_shape"]), dtype=torch.uint8)
    with LayerRecorder(model, names) as recorder:
        run_model(model, black, device, precision)
    modules = dict(model.named_modules())
    print(f"{'module':<48} {'type':<28} output shape for one window")
    for n in names:
        calls = recorder.outputs[n]
        shape = ("not run" if not calls else
                 " + ".join(str(list(c.shape)) if torch.is_tensor(c) else type(c).__name__
                            for c in calls))
        print(f"{n:<48} {type(modules[n]).__name__:<28} {shape}")


@dataclass
class Extractor:
    """What every run's features are made with, decided before any run: the checkpoint and the model
    (None for --features lowlevel and buttons), its description (load_model or model_free_info:
    window, frame shape, config ...), the device and --precision it runs at, the 60 Hz frames per
    clip frame and the layers read (one output folder each)."""
    ckpt: Path | None
    model: torch.nn.Module | None
    info: dict
    device: torch.device
    precision: str
    frame_step: int
    layers: list


def runs_to_do(args, work, name, extractor, runs):
    """[(run, {layer: output path}, {layer: (settings, inputs, details) of its record})] of the runs
    of plan_runs whose features are not up to date. A run's features are skipped when their record
    says they were made with these flags from these exact inputs: the checkpoint, its VQ-VAE, the
    frames of the run's repetitions and its timeline."""
    model_settings = ({} if extractor.model is None    # lowlevel, buttons: unused, so not recorded
                      else {"--pool": args.pool, "--precision": extractor.precision})
    settings = {layer: {"--layer": layer, **model_settings, "--dtype": args.dtype,
                        "--frame-step": extractor.frame_step} for layer in extractor.layers}
    models = ({} if extractor.model is None else
              common.input_fingerprints(work, [extractor.ckpt, extractor.info["vqvae_path"]]))
    alignment = (button_alignment if args.features == "buttons"
                 else window_alignment)(extractor.info["window"], extractor.frame_step)
    todo = []
    for run in runs:
        inputs = {**models, **run_inputs(work, run, args.features)}
        paths = {layer: output_path(work, name, layer, run) for layer in extractor.layers}
        if not all(common.is_up_to_date(path, common.read_record(common.record_path(path)), STAGE,
                                         settings[layer], inputs, args.overwrite)
                   for layer, path in paths.items()):
            details = run_details(run, extractor.ckpt, extractor.info, args.features, alignment)
            todo.append((run, paths, {layer: (settings[layer], inputs, details)
                                      for layer in extractor.layers}))
    return todo


def run_inputs(work, run, features):
    """The inputs of a run's record besides the model: the fingerprints of the files its features
    come from (its repetitions' frames; their inputs for --features buttons) and its timeline. A
    file that is not the one 01's record lists (another repetition's, of the same shape) is an
    InputError: its features would be another repetition's, recorded as this one's."""
    read = "buttons_path" if features == "buttons" else "frames_path"
    files = sorted({rep[read] for rep in run["repetitions"] if rep.get(read)})
    redo = "re-run 01_render_frames.py, which renders it again"
    return {**{os.path.relpath(f, work): common.vouched_fingerprint(f, redo) for f in files},
            "timeline": {"n_volumes": run["n_volumes"], "tr_s": run["tr_s"],
                         "repetitions": [{k: rep[k] for k in ("rep", "status", "start", "n_frames")}
                                         for rep in run["repetitions"]]}}


def extract(args, extractor, todo):
    """Batches of TR windows through the model (or the low-level control), every layer's rows into
    their runs' files (todo: runs_to_do's); a run's files and records are written with its last
    row."""
    model, device, info = extractor.model, extractor.device, extractor.info
    dataset = TRWindows([run for run, _, _ in todo], info["frame_shape"])
    workers = args.workers if args.workers is not None else (4 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=False,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    writers = [RunWriter(run, paths, np.dtype(args.dtype)) for run, paths, _ in todo]
    rows_left = [run["n_volumes"] for run, _, _ in todo]
    hooks = (LayerRecorder(model, extractor.layers) if model is not None
             else contextlib.nullcontext())
    try:
        with hooks as recorder, \
                tqdm(total=len(dataset), unit="TR", desc="extract", file=sys.stderr) as bar:
            for clips, run_index, t in loader:                  # clips (B, window, H, W, 3) uint8
                if model is None:                               # the low-level control: no model
                    rows = lowlevel_rows(clips.to(device))
                    features = {"lowlevel": (rows, tuple(rows.shape[1:]))}
                else:
                    features = layer_rows(model, clips, recorder, args.pool, info["latent_shape"],
                                          device, extractor.precision)
                write_batch(writers, features, run_index, t, args.dtype, extractor.precision)
                for r in run_index.numpy():
                    rows_left[r] -= 1
                    if rows_left[r] == 0:
                        writers[r].close(todo[r][2])
                bar.update(len(clips))
    finally:
        for writer in writers:
            writer.discard()


def write_button_features(extractor, todo, dtype):
    """--features buttons: every row of each run to do at once, from its repetitions' inputs."""
    n_buttons = len(extractor.info["config"]["buttons"])
    for run, paths, records in todo:
        rows = button_rows(run, extractor.info["window"], extractor.frame_step, n_buttons)
        write_rows(run, paths, rows, (2, rows.shape[1] // 2), dtype, records)


def write_batch(writers, features, run_index, t, dtype, precision):
    """Every layer's rows of a batch into the writers of their runs, as `dtype`: features
    {layer: ((B, D) rows, activation shape)}; run_index and t (B,) the run and TR of each row."""
    for layer, (rows, activation_shape) in features.items():
        rows = rows.to(getattr(torch, dtype)).cpu().numpy()          # (B, D)
        if not np.isfinite(rows).all():
            raise InputError(f"--layer {layer}: non-finite features (overflow in {dtype} or "
                             f"{precision}? try --dtype float32 --precision fp32)")
        for r in np.unique(run_index.numpy()):
            mine = (run_index == r).numpy()
            writers[r].write(layer, t.numpy()[mine], rows[mine], activation_shape)


def model_free_info(work, features):
    """What the alignment needs without a model (--features lowlevel or buttons): the frames' shape
    (from the first rendered repetition), the window of the paper's GPT (2 x 16 frames) and its
    frame step (4: 15 Hz)."""
    frames_tsv = work / "frames" / "manifest.tsv"
    manifest = read_tsv(frames_tsv, required=FRAMES_COLUMNS)
    ok = manifest[manifest["status"] == "ok"]
    if ok.empty:
        raise InputError(f"{frames_tsv}: no rendered repetition")
    shape = common.load_npy(work / str(ok["frames_path"].iloc[0]),
                            advice="re-run 01_render_frames.py").shape
    config = {"features": features, **({"grid": LOWLEVEL_GRID} if features == "lowlevel" else {})}
    return dict(format="none", vqvae_path=None, config=config, n_layers=0, latent_shape=None,
                frame_shape=tuple(shape[1:]), window=2 * 16, frame_step=4)


# --------------------------------------------------------------------------------------------------
# Model: load a checkpoint (ours or the authors'), run the GPT on a batch of windows
# --------------------------------------------------------------------------------------------------
def load_model(path, vqvae_path, work, device, allow_unfinished=False):
    """The GPT prior of a checkpoint with its frozen VQ-VAE attached as `model.vqvae` (the authors'
    layout: its modules can be hooked as vqvae.encoder...), in eval mode on `device`, and a
    description.

    Ours (04_train_gpt.py) names its VQ-VAE checkpoint (--vqvae overrides it; default
    <work>/vqvae/ckpt.pt); the authors' Lightning checkpoint holds its VQ-VAE under `vqvae.`.
    common.py infers both architectures from the stored configuration and tensor shapes and loads
    the weights strictly. A GPT or VQ-VAE whose training was interrupted is refused unless
    allow_unfinished."""
    config, state, extra = common.load_gpt_checkpoint(path)
    common.require_complete(extra, path, "04_train_gpt.py", "--allow-unfinished", allow_unfinished)
    gpt = common.build_gpt(config, state, path)
    if extra.get("vqvae_state"):                             # the authors' Lightning checkpoint
        checkpoint_format = "lightning"
        vqvae_path = Path(vqvae_path or path)
        vqvae = common.load_vqvae(vqvae_path, allow_unfinished=allow_unfinished)
    else:                                                             # ours
        checkpoint_format = "ours"
        # 04 stores the --vqvae path as given (relative to where it ran): also try it under <work>
        named = (extra.get("args") or {}).get("vqvae")
        candidates = ([Path(vqvae_path)] if vqvae_path
                      else [Path(named), work / named] if named else [])
        candidates.append(work / "vqvae" / "ckpt.pt")
        vqvae_path = next((c for c in candidates if c.is_file()), candidates[0])
        if not vqvae_path.is_file():
            raise InputError(f"{path}: its VQ-VAE {vqvae_path} does not exist (pass --vqvae PATH)")
        if (extra.get("vqvae_sha256")
                and extra["vqvae_sha256"] != common.fingerprint(vqvae_path)["sha256"]):
            raise InputError(f"{vqvae_path}: not the VQ-VAE {path} was trained with "
                             f"(sha256 differs; pass --vqvae PATH to the right one)")
        vqvae = common.load_vqvae(vqvae_path, allow_unfinished=allow_unfinished)
    latent, width = tuple(vqvae.latent_shape), vqvae.embedding_dim
    if latent != tuple(config["latent_shape"]) or width != config["embedding_dim"]:
        raise InputError(f"{path}: the GPT reads {tuple(config['latent_shape'])} tokens of width "
                         f"{config['embedding_dim']}, its VQ-VAE gives {latent} of width {width}")
    gpt.vqvae = vqvae   # a submodule: hookable, moved and switched to eval with the rest
    gpt.to(device).eval()
    args = extra.get("args") or {}
    resolution = vqvae.config["resolution"]
    info = dict(format=checkpoint_format, vqvae_path=vqvae_path,
                config={"gpt": config, "vqvae": vqvae.config}, n_layers=config["layers"],
                latent_shape=latent, frame_shape=(resolution, resolution, 3),
                window=2 * vqvae.config["sequence_length"], frame_step=args.get("frame_step"))
    return gpt, info


def run_model(model, clips, device, precision):
    """read_windows under no_grad, with the GPT under the autocast of `precision` (fp32: none) on
    the model's device."""
    with torch.no_grad(), common.autocast(device, precision):
        read_windows(model, clips.to(device, non_blocking=True))


def layer_rows(model, clips, recorder, pool, latent_shape, device, precision):
    """{layer: (B, D) float32 tensor on the device, and the per-sample activation shape} for clips
    uint8 (B, window, H, W, 3): one forward pass, every hooked layer at once."""
    recorder.clear()
    run_model(model, clips, device, precision)
    rows = {}
    for layer, calls in recorder.outputs.items():
        activation = per_sample_activation(layer, calls, len(clips)).float()   # (B, ...)
        rows[layer] = (pool_activation(activation, pool, latent_shape, layer),
                       tuple(activation.shape[1:]))
    return rows


# --------------------------------------------------------------------------------------------------
# Hooks: record what any named module outputs during a forward pass
# --------------------------------------------------------------------------------------------------
def per_sample_activation(name, calls, batch_size):
    """The recorded calls of one module as one tensor (B, ...); several calls are stacked on
    axis 1."""
    if not calls:
        raise InputError(f"--layer {name}: this module does not run when the model reads a clip")
    if not all(torch.is_tensor(c) for c in calls):
        raise InputError(f"--layer {name}: returns {type(calls[0]).__name__}, not a tensor; "
                         "hook one of its submodules")
    if any(c.shape[0] != batch_size for c in calls):
        raise InputError(f"--layer {name}: output of shape {tuple(calls[0].shape)} does not have "
                         f"one row per sample (batch {batch_size}); "
                         f"hook the module that contains it")
    return calls[0] if len(calls) == 1 else torch.stack(calls, dim=1)


def pool_activation(activation, pool, latent_shape, name):
    """(B, ...) -> (B, D). 'space'/'time' average the latent axes (H', W') or T', found as the
    right-most run of axes equal to latent_shape = (T', H', W') (channels-last or
    channels-first)."""
    if pool != "none":
        shape = tuple(activation.shape)
        starts = [a for a in range(1, len(shape) - 2) if shape[a:a + 3] == tuple(latent_shape)]
        if not starts:
            raise InputError(f"--pool {pool}: the output of {name} has shape {shape[1:]} per "
                             f"sample, without the latent (T', H', W') = {tuple(latent_shape)} "
                             f"axes to pool over")
        a = starts[-1]
        activation = activation.mean(dim=(a + 1, a + 2) if pool == "space" else (a,))
    return activation.reshape(activation.shape[0], -1)                            # (B, D)


def resolve_layers(model, names, n_layers):
    """Check every --layer against the model's modules; 'last' becomes the last block's output."""
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters()) | dict(model.named_buffers())
    resolved = []
    for name in names:
        if name == "last":
            name = f"attn_stack.attn_nets.{n_layers - 1}.{BLOCK_OUTPUT}"
        if name in modules and name:
            resolved.append(name)
            continue
        if name in parameters:
            owner = name.rsplit(".", 1)[0]
            raise InputError(f"--layer {name}: a parameter or buffer, not a module "
                             f"(its module is {owner})")
        close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
        hint = f"closest: {', '.join(close)}" if close else "see --list-layers"
        raise InputError(f"--layer {name}: no such module in the checkpoint's model ({hint})")
    return list(dict.fromkeys(resolved))


# --------------------------------------------------------------------------------------------------
# Which runs, which repetitions: bold/manifest.tsv (02) x frames/manifest.tsv (01)
# --------------------------------------------------------------------------------------------------
def plan_runs(work, subjects, frame_shape, window, frame_step, allow_missing, buttons=False):
    """One dict per fMRI run: labels, n_volumes, tr_s, the repetitions placed on its timeline (with
    buttons: each rendered one also with its recorded inputs, `buttons_path` and `buttons`).

    Raises InputError for a repetition listed as rendered whose frames (or inputs) are missing or of
    the wrong size or length, a failed one (unless allow_missing), one without onset (01 --bk2), or
    a run under one window."""
    frames_tsv, bold_tsv = work / "frames" / "manifest.tsv", work / "bold" / "manifest.tsv"
    frames = read_tsv(frames_tsv, required=FRAMES_COLUMNS)
    frame_runs = frames.apply(common.run_key, axis=1)
    bold = read_tsv(bold_tsv, required=BOLD_COLUMNS)
    if subjects:
        bold = bold[bold["sub"].isin(subjects)]
        if bold.empty:
            raise InputError(f"{bold_tsv}: no run of subject(s) {', '.join(subjects)}")
    window_s = window * frame_step / GAMEPLAY_HZ  # 32 frames at 15 Hz: 2.13 s
    runs = []
    for _, row in bold.iterrows():
        labels = dict(sub=row["sub"], ses=row["ses"], task=row["task"], run=row["run"])
        stem = run_stem(**labels)
        n_volumes, tr_s = int(row["n_volumes"]), float(row["tr_s"])
        if n_volumes * tr_s < window_s:
            raise InputError(f"{bold_tsv}: {stem} lasts {n_volumes} volume(s) x {tr_s:g} s = "
                             f"{n_volumes * tr_s:.2f} s, shorter than one {window}-frame window "
                             f"({window_s:.2f} s)")
        rows = frames[frame_runs == common.run_key(labels)]   # no session: '' in both
        if rows.empty:
            raise InputError(f"{frames_tsv}: no repetition of {stem}, which {bold_tsv} lists")
        reps = [place_repetition(rep, stem, work, frame_shape, allow_missing, buttons)
                for _, rep in rows.sort_values("onset_s", kind="stable").iterrows()]
        runs.append(dict(labels, stem=stem, n_volumes=n_volumes, tr_s=tr_s, repetitions=reps,
                         windows=window_frame_indices(n_volumes, tr_s, window, frame_step)))
    return runs


def place_repetition(rep, stem, work, frame_shape, allow_missing, buttons):
    """A row of the frames manifest as plan_runs places it on run `stem`'s timeline: rep, status,
    onset_s, start, n_frames and frames_path (0 and None: black), with buttons also buttons_path and
    buttons; InputError as plan_runs says."""
    frames_tsv = work / "frames" / "manifest.tsv"
    where = f"{frames_tsv}: {stem} rep {rep['rep']}"
    if not np.isfinite(float(rep["onset_s"])):
        raise InputError(f"{where} has no onset_s (rendered from bare .bk2 files, 01 --bk2, "
                         f"without events.tsv): 05 cannot place it on the run's timeline; render "
                         f"the BIDS dataset instead (01 --bids)")
    placed = {"rep": rep["rep"], "status": rep["status"], "onset_s": float(rep["onset_s"]),
              "start": repetition_start(float(rep["onset_s"])), "n_frames": 0, "frames_path": None}
    if rep["status"] == "failed" and not allow_missing:
        raise InputError(f"{where} failed to render ({rep.get('error', '')}); fix it and re-run "
                         f"01_render_frames.py, or pass --allow-missing to show black frames "
                         f"instead")
    if rep["status"] != "ok":
        return placed
    path = work / str(rep["frames_path"])
    if pd.isna(rep["frames_path"]) or not path.is_file():
        raise InputError(f"{where} is listed as rendered but its frames {path} do not exist "
                         f"(re-run 01_render_frames.py)")
    shape = common.load_npy(path, advice="re-render it with 01_render_frames.py --overwrite").shape
    if shape[1:] != frame_shape:
        raise InputError(f"{path}: frames of shape {shape[1:]}, the checkpoint's VQ-VAE reads "
                         f"{frame_shape} (render with 01_render_frames.py --resolution "
                         f"{frame_shape[0]})")
    if shape[0] != int(rep["n_frames"]):
        raise InputError(f"{path}: {shape[0]} frames, {frames_tsv} says {int(rep['n_frames'])} "
                         f"(re-render with 01_render_frames.py --overwrite)")
    placed.update(n_frames=shape[0], frames_path=str(path))
    if buttons:
        placed.update(recorded_buttons(frames_tsv, rep, where, shape[0], work))
    return placed


class TRWindows(torch.utils.data.Dataset):
    """Item k = the k-th (run, TR) of `runs`, as its window of frames, uint8 (window, H, W, 3)."""

    def __init__(self, runs, frame_shape):
        self.runs, self.frame_shape = runs, frame_shape
        self.items = [(r, t) for r, run in enumerate(runs) for t in range(run["n_volumes"])]
        self._open = {}  # memory-mapped frame files, opened lazily in each loader process

    def open_frames(self, path):
        if path not in self._open:
            self._open[path] = common.load_npy(path)
        return self._open[path]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        r, t = self.items[k]
        run = self.runs[r]
        clip = gather_frames(run["windows"][t], run["repetitions"], self.frame_shape,
                             self.open_frames)
        return torch.from_numpy(clip), r, t                           # (window, H, W, 3) uint8


# --------------------------------------------------------------------------------------------------
# Outputs: one .npy (T, D) and its record (.json) per run and layer, written atomically
# --------------------------------------------------------------------------------------------------
def output_path(work, name, layer, run):
    return (work / "features" / name / layer / common.run_folder(run["sub"], run["ses"])
            / f"{run['stem']}.npy")


def window_alignment(window, frame_step):
    """The record's `alignment` of the features read from frames (a model's, lowlevel)."""
    return (f"row t: {window} frames, every {frame_step}th 60 Hz frame, ending with frame "
            f"ceil((t+1) x TR x 60) - 1 of the run's timeline (the last frame shown before the end "
            f"of volume t); first {window // 2} condition, last {window // 2} are the target clip; "
            f"repetition frame i at round(onset_s x 60) + i, black elsewhere")


def run_details(run, ckpt, info, features, alignment):
    """The details of a run's record that are there for the reader (never compared)."""
    return {"checkpoint": str(ckpt), "checkpoint_format": info["format"], "model": info["config"],
            "features": features, "run": run["stem"], "n_volumes": run["n_volumes"],
            "tr_s": run["tr_s"], "alignment": alignment, "fps": GAMEPLAY_HZ,
            "window_frames": info["window"],
            "repetitions": [{k: rep[k] for k in ("rep", "status", "onset_s", "start", "n_frames")}
                            for rep in run["repetitions"]]}


def write_rows(run, paths, rows, activation_shape, dtype, records):
    """Write every row of a run's only layer at once: rows (n_volumes, D) float32; records as in
    RunWriter.close."""
    (layer,) = paths
    writer = RunWriter(run, paths, dtype)
    try:
        writer.write(layer, np.arange(run["n_volumes"]), rows.astype(dtype), activation_shape)
        writer.close(records)
    finally:
        writer.discard()


class RunWriter:
    """Collects the rows of one run for every layer in memory-mapped temp files; `close()` renames
    them to their final names and writes their records once every row is in; `discard()` removes
    leftovers."""

    def __init__(self, run, paths, dtype):
        self.run, self.paths, self.dtype = run, paths, dtype
        self.tmp = {layer: common.temporary_path(p) for layer, p in paths.items()}
        self.arrays, self.shapes = {}, {}

    def write(self, layer, t, rows, activation_shape):
        """rows (len(t), D) go to rows t of the layer's (n_volumes, D) array."""
        if layer not in self.arrays:
            self.tmp[layer].parent.mkdir(parents=True, exist_ok=True)
            shape = (self.run["n_volumes"], rows.shape[1])
            self.arrays[layer] = common.open_npy_for_writing(self.tmp[layer], self.dtype, shape,
                                                             self.paths[layer])
            self.shapes[layer] = [int(n) for n in activation_shape]
        self.arrays[layer][t] = rows

    def close(self, records):
        """records: {layer: (settings, inputs, details)} of each output."""
        for layer, path in self.paths.items():
            array = self.arrays.pop(layer)
            n_features = array.shape[1]
            array.flush()
            del array
            os.replace(self.tmp[layer], path)
            settings, inputs, details = records[layer]
            record = common.new_record(STAGE, settings, inputs, path, **details, layer=layer,
                                       activation_shape=self.shapes[layer], n_features=n_features)
            common.write_record(path, record)

    def discard(self):
        self.arrays.clear()
        for tmp in self.tmp.values():
            tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    run_main(main)
