"""What two or more stages share: plumbing only. The paper's method (its networks, the encoding
model, the alignment, the experiments) is in paper/; what goes beyond it, in modules named after
what each does.

| section | what | used by |
| --- | --- | --- |
| Loading checkpoints | ours, VideoGPT's and the authors' PyTorch Lightning ones | 04, 05 |
| Errors and exit statuses | `InputError`, `Interrupted`, `run_main` | every stage |
| Atomic writes | `atomic_path`, `save_npy`, `write_json`, `write_tsv` | every stage |
| A folder in use | `hold_folder`: one run at a time writes a training run's folder | 03, 04 |
| Readers | `read_tsv`, `load_npy`, `load_nifti`: a damaged file is named | every stage |
| BIDS names, the split, the frames manifest | `run_stem`, `read_splits`, `training_repetitions` | 01-06 |
| Provenance | records, fingerprints, `is_up_to_date`, `stale_input` | every stage |
| CPU threads | `available_cpus`, `limit_threads`: the job's CPUs, one thread pool per process | 01-05 |
| Training plumbing | DDP, preemption, run flags, checkpoints, schedule, precision | 03, 04 |

"""
import contextlib
import csv
import fcntl
import gc
import hashlib
import io
import json
import math
import os
import pickle
import random
import re
import resource
import shutil
import signal
import socket
import sys
import types
from argparse import BooleanOptionalAction, Namespace
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn

from paper.gpt import GPTPrior
from paper.vqvae import VQVAE

DEFAULT_WORK = "work"


def load_stage(filename):
    """Import a stage script of this repository as a module (tests and benchmarks call its
    functions): its name starts with a digit, so `import` cannot name it."""
    import importlib.util
    path = Path(__file__).resolve().parent / filename
    spec = importlib.util.spec_from_file_location("stage_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# --- Loading checkpoints: ours, VideoGPT's and the authors' PyTorch Lightning ones ---
# Ours hold `model` + `model_config`; a Lightning checkpoint holds `state_dict` +
# `hyper_parameters`, from which the architecture is read (sizes from the tensors' shapes). Every
# load is strict: a key that is missing or left over is a one-line error naming the file.
# --------------------------------------------------------------------------------------------------
class _StubObject(dict):
    """Stands in for a class that cannot be imported while unpickling (e.g. pytorch_lightning's
    callbacks inside an authors' checkpoint): we only need the tensors and hyperparameters. It is a
    dict so that dict subclasses (Lightning's AttributeDict of hyper_parameters) keep their
    items."""

    def __init__(self, *args, **kwargs):
        if args and isinstance(args[0], dict):
            super().__init__(args[0])

    def __setstate__(self, state):
        pass


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_StubObject,), {"__module__": module})


_tolerant_pickle = types.ModuleType("tolerant_pickle")
_tolerant_pickle.Unpickler = _TolerantUnpickler
_tolerant_pickle.load = lambda file, **kwargs: _TolerantUnpickler(file, **kwargs).load()
_tolerant_pickle.loads = lambda data, **kwargs: _TolerantUnpickler(io.BytesIO(data),
                                                                   **kwargs).load()


def load_checkpoint(path, map_location="cpu"):
    """torch.load a checkpoint we wrote or a PyTorch Lightning one (its pytorch_lightning objects
    are replaced by stubs when pytorch_lightning is not installed). Fails with one line on a bad
    file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except (ModuleNotFoundError, AttributeError):
            return torch.load(path, map_location=map_location, weights_only=False,
                              pickle_module=_tolerant_pickle)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: not a readable torch checkpoint ({first})") from None


def load_weights(model, state, path, what):
    """model.load_state_dict(state) with strict key matching;
    a mismatch is an InputError naming `path`."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise InputError(f"{path}: weights do not fit {what} ({detail})") from None
    return model


def _vqvae_config_from_lightning(state, hparams, path, gpt_state=None):
    """The VQVAE keywords of an authors' Lightning checkpoint: sizes from the weights' shapes, the
    rest from its hyper_parameters (resolution, sequence_length, and downsample for a VQ-VAE; for a
    GPT, downsample = clip shape / latent shape, read from the GPT's position embeddings
    `gpt_state`)."""
    args = hparams.get("args", hparams) if isinstance(hparams, dict) else hparams
    args = vars(args) if isinstance(args, Namespace) else dict(args or {})
    try:
        n_codes, embedding_dim = state["codebook.embeddings"].shape
        n_hiddens = state["encoder.conv_last.conv.weight"].shape[0]
    except KeyError as err:
        raise InputError(f"{path}: no VQ-VAE weights (missing {err.args[0]})") from None
    n_res_layers = len({k.split(".")[2] for k in state if k.startswith("encoder.res_stack.")
                        and ".block." in k})
    config = dict(n_hiddens=n_hiddens, n_res_layers=n_res_layers, embedding_dim=embedding_dim,
                  n_codes=n_codes, resolution=args.get("resolution", 128),
                  sequence_length=args.get("sequence_length", 16))
    if "downsample" in args and "n_codes" in args:                        # a VQ-VAE's own args
        config["downsample"] = tuple(args["downsample"])
    elif gpt_state is not None and "attn_stack.pos_embd.emb.d_0" in gpt_state:
        latent = [gpt_state[f"attn_stack.pos_embd.emb.d_{i}"].shape[0]
                  for i in range(3)]                                      # (t, h, w)
        size = (config["sequence_length"], config["resolution"], config["resolution"])
        config["downsample"] = tuple(s // t for s, t in zip(size, latent))
    else:
        raise InputError(f"{path}: cannot tell the VQ-VAE's downsample factors from the checkpoint")
    return config


def load_vqvae(path, map_location="cpu", allow_unfinished=False):
    """A VQVAE in eval mode from (a) a stage-03 checkpoint (`model` + `model_config`), (b) a
    VideoGPT / authors' Lightning VQ-VAE checkpoint (`state_dict` + `hyper_parameters`), or (c) an
    authors' Lightning GPT checkpoint, which holds its VQ-VAE under the prefix `vqvae.`. Keys match
    strictly. A stage-03 run that was interrupted is refused unless allow_unfinished
    (flag --allow-unfinished)."""
    ckpt = load_checkpoint(path, map_location)
    if not isinstance(ckpt, dict):
        raise InputError(f"{path}: not a VQ-VAE checkpoint (a {type(ckpt).__name__}, not a dict)")
    require_complete(ckpt, path, "03_train_vqvae.py", "--allow-unfinished", allow_unfinished)
    if "model" in ckpt and "model_config" in ckpt:
        config, state = ckpt["model_config"], ckpt["model"]
    elif "state_dict" in ckpt:
        state = ckpt["state_dict"]
        gpt_state = None
        if any(k.startswith("vqvae.") for k in state):
            gpt_state = state
            state = {k[len("vqvae."):]: v for k, v in state.items() if k.startswith("vqvae.")}
        config = _vqvae_config_from_lightning(state, ckpt.get("hyper_parameters") or {}, path,
                                              gpt_state)
    else:
        raise InputError(f"{path}: not a VQ-VAE checkpoint "
                         "(neither model + model_config nor state_dict)")
    return load_weights(VQVAE(**config), state, path, f"a VQ-VAE with {config}").eval()


def gpt_config_from_state(state, heads, dropout=0.2, attn_dropout=0.3):
    """GPTPrior(**config) arguments for a GPT state dict: widths, depth and latent shape are read
    from the weights; the number of heads and the dropouts are not in the weights,
    so they are given."""
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("attn_stack.attn_nets."))
    n_axes = sum(k.startswith("attn_stack.pos_embd.emb.") for k in state)
    latent_shape = tuple(state[f"attn_stack.pos_embd.emb.d_{i}"].shape[0] for i in range(n_axes))
    hidden_dim, embedding_dim = state["fc_in.weight"].shape
    return dict(latent_shape=latent_shape, embedding_dim=embedding_dim,
                n_codes=state["fc_out.weight"].shape[0], hidden_dim=hidden_dim, heads=heads,
                layers=layers, dropout=dropout, attn_dropout=attn_dropout,
                cond_dim=state["resnet.conv1.weight"].shape[0])


def load_gpt_checkpoint(path, map_location="cpu"):
    """Read a GPT checkpoint, ours (04_train_gpt.py) or the authors' PyTorch Lightning one.

    Returns (config, gpt_state, extra): GPTPrior(**config) rebuilds the model and `gpt_state` loads
    into it strictly. `extra` is the rest of the file: ours holds optimizer, scaler, step, rng,
    args, vqvae_sha256; the authors' gives {"vqvae_state": the frozen VQ-VAE stored beside the GPT
    (prefix `vqvae.` removed), "hyper_parameters": ...}. The causal-mask buffers of the authors'
    attention are dropped: they are derived, and fused attention does not need them.
    """
    ckpt = load_checkpoint(path, map_location)
    if isinstance(ckpt, dict) and "hidden_dim" in (ckpt.get("model_config") or {}):   # ours
        extra = {k: v for k, v in ckpt.items() if k not in ("model_config", "model")}
        return dict(ckpt["model_config"]), ckpt["model"], extra
    if isinstance(ckpt, dict) and "state_dict" in ckpt:                              # the authors'
        state = ckpt["state_dict"]
        hparams = ckpt.get("hyper_parameters") or {}
        args = hparams.get("args", hparams) if isinstance(hparams, dict) else hparams
        args = args if isinstance(args, dict) else vars(args)
        # the weights that gpt_config_from_state reads the model's sizes from
        needed = ["resnet.conv1.weight", "fc_in.weight", "fc_out.weight",
                  "attn_stack.pos_embd.emb.d_0"]
        missing = [k for k in needed if k not in state]
        if not any(k.startswith("attn_stack.attn_nets.") for k in state):
            missing.append("attn_stack.attn_nets.*")
        if missing:
            raise InputError(f"{path}: not a VideoGPT prior with embedding conditioning "
                             f"(emb_cond): no {', '.join(missing)} in its state_dict")
        gpt_state = {k: v for k, v in state.items()
                     if not k.startswith("vqvae.") and not k.endswith(".attn.attn.mask")}
        config = gpt_config_from_state(gpt_state, heads=args.get("heads", 4),
                                       dropout=args.get("dropout", 0.2),
                                       attn_dropout=args.get("attn_dropout", 0.3))
        extra = {"vqvae_state": {k[len("vqvae."):]: v for k, v in state.items()
                                 if k.startswith("vqvae.")},
                 "hyper_parameters": hparams}
        return config, gpt_state, extra
    raise InputError(f"{path}: not a GPT checkpoint "
                     "(neither 04_train_gpt.py's model + model_config nor a Lightning state_dict)")


def build_gpt(config, state=None, path="checkpoint", checkpoint_activations=False):
    """GPTPrior(**config), with `state` loaded strictly when given (a clear error names `path`)."""
    model = GPTPrior(**config, checkpoint_activations=checkpoint_activations)
    return model if state is None else load_weights(model, state, path, f"a VideoGPT with {config}")


# --------------------------------------------------------------------------------------------------
# Errors and exit statuses. Every stage ends with one of these (README, "Re-runs, provenance and
# preemption"); a wrong result must never end with 0.
# --------------------------------------------------------------------------------------------------
EXIT_OK = 0            # done, or nothing left to do
EXIT_SOME_FAILED = 1   # finished, but some items failed (01: replays that could not be rendered)
EXIT_BAD_INPUT = 2     # one line `error: <file>: <what is wrong>`; nothing was written
EXIT_INTERRUPTED = 75  # a signal stopped training before --max-steps: checkpoint saved,
                       # re-run resumes (75 is EX_TEMPFAIL of sysexits.h: "try again later")
EXIT_SIGINT = 130      # Ctrl-C in a stage with nothing to checkpoint (128 + SIGINT, as shells say)


class InputError(Exception):
    """Bad input. The message names the file (or flag) and what is wrong, on one line."""


class Interrupted(Exception):
    """A signal (SLURM's preemption or time limit) stopped training early, its checkpoint saved. The
    message says where and how to continue; the status 75 makes `run_all.sh` stop and
    slurm/gpu_stage.sbatch requeue the job (srun returns the ranks' highest status)."""


def run_main(main):
    """Call `main()`. Bad input, and a file that cannot be read or written
    (read-only folder, full disk), become one line `error: <file>: <what is wrong>` on stderr and
    exit status 2; an interrupted training run, one line (from rank 0) and exit status 75; Ctrl-C
    elsewhere, one line and 130 (atomic writes leave nothing half-written)."""
    # A script that starts a stage in the background (run_all.sh, to pass its signals on) leaves
    # SIGINT ignored in it, and Python keeps it so: a Ctrl-C passed on must still stop the stage.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        main()
    except Interrupted as stop:
        if int(os.environ.get("RANK", "0")) == 0:
            print(stop, file=sys.stderr, flush=True)
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)   # a second Ctrl-C must not cut this line
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{Path(sys.argv[0]).stem}: interrupted by SIGINT; what it finished is kept, "
                  "nothing is half-written: re-run to go on", file=sys.stderr, flush=True)
        sys.exit(EXIT_SIGINT)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except OSError as err:
        where = err.filename if err.filename is not None else "a file"
        print(f"error: {where}: {err.strerror or err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


# --------------------------------------------------------------------------------------------------
# Atomic writes: an output exists under its final name only once it is complete, so an interrupted
# stage never leaves a half-written file that a re-run would mistake for a finished one.
# --------------------------------------------------------------------------------------------------
HOST = socket.gethostname().split(".")[0]
_TEMPORARY = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9_-]+?)-(?P<pid>\d+)(\.|$)")


def temporary_path(path):
    """Where `path` is written before its rename: `.r_map.nii.gz.tmp-<host>-<pid>.nii.gz` beside it.
    It keeps the final suffix (np.save and nibabel look at it) and says which process on which
    machine owns it, so that a later run can remove it once that process is gone."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}{''.join(path.suffixes)}")


def _process_is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # someone else's process
        return True
    return True


def remove_stale_temporaries(folder):
    """Delete the temporary files that killed runs left under `folder` (recursively): those written
    on this machine by a process that no longer exists. Temporaries of other machines
    (a shared cluster filesystem) are left alone: their process may still be writing.
    Returns the paths removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for path in folder.rglob(".*.tmp-*"):
        match = _TEMPORARY.search(path.name)
        if (match and match["host"] == HOST and not _process_is_alive(int(match["pid"]))
                and path.is_file()):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds. On failure
    the temporary is removed, and a write that fails (full disk, read-only folder) is an InputError
    naming `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise InputError(f"{path}: cannot write it ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)


def save_npy(path, array):
    """np.save to `path` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def open_npy_for_writing(tmp, dtype, shape, final):
    """A writable memory-mapped .npy of `shape` at the temporary path `tmp`,
    its disk space reserved now.

    Without the reservation a memory map is a sparse file, and a full disk shows up only when a page
    is written back: the process dies of SIGBUS, with no message and a large temporary file left
    behind. posix_fallocate makes a full disk an error here, before any work is done: an OSError
    naming `final` (the output the temporary becomes), after the temporary is removed."""
    try:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
        with open(tmp, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise OSError(err.errno, f"cannot write it ({err.strerror or err})", str(final)) from None
    return array


def write_tsv(path, table):
    """Write a DataFrame (or list of dicts) as a tab-separated file, atomically; 'n/a' for missing.
    A file that already holds exactly this text is left alone, so a re-run that changes nothing does
    not touch its manifests (nor wake up tools that watch modification times)."""
    text = pd.DataFrame(table).to_csv(sep="\t", index=False, na_rep="n/a")
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    with atomic_path(path) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def all_or_nothing(paths):
    """Remove the files `paths` when the block fails: a set of outputs that belong together is
    complete or absent, never half there."""
    try:
        yield
    except BaseException:
        for path in paths:
            Path(path).unlink(missing_ok=True)
        raise


def write_json(path, value):
    """json.dump to `path` atomically, indented for a human reader."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(value, indent=1) + "\n")


# --------------------------------------------------------------------------------------------------
# A folder in use: two runs writing one folder (a second `03 --resume` while the first trains, or
# run_all.sh killed and run again while its stage goes on) would each log and checkpoint the same
# steps, and both end with 0.
# --------------------------------------------------------------------------------------------------
LOCK_NAME = ".lock"


@contextlib.contextmanager
def hold_folder(folder):
    """Hold `folder` for the block: an exclusive flock on `<folder>/.lock`, which names this process
    (host and pid) for the run that finds it taken: that run stops with an InputError naming the
    holder. The kernel releases the lock when the process ends, however it ends, so a killed run
    never leaves the folder locked; the file stays (removing it would let two runs lock two files).
    Under DDP rank 0 holds it for every rank of its run. A filesystem without locks (some cluster
    mounts) is said, and the run goes on unguarded."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise InputError(f"{folder}: in use by {holder}, another run of this stage: wait for "
                             "it to end, or stop it, before running it again") from None
        except OSError as err:
            print(f"warning: {folder / LOCK_NAME}: cannot lock it ({err.strerror}): a second run "
                  "on this folder at the same time would not be noticed", file=sys.stderr)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{HOST} pid {os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Readers that turn a damaged or foreign file into one line naming it
# --------------------------------------------------------------------------------------------------
# labels, not numbers: "001" stays "001"
BIDS_LABEL_COLUMNS = ("sub", "ses", "task", "run", "rep", "level")


def read_tsv(path, required=()):
    """Read a BIDS-style TSV ('n/a' is missing), with the BIDS label columns present kept as text.
    Fails clearly when it is absent or lacks columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=True,
                            dtype={column: str for column in BIDS_LABEL_COLUMNS})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable TSV file ({str(err).splitlines()[0]})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


def load_npy(path, mmap=True, advice=""):
    """np.load an array we wrote (memory-mapped by default). A missing, truncated or foreign file is
    an InputError naming it; `advice` (e.g. "re-run 01_render_frames.py") ends the message."""
    path = Path(path)
    advice = f"; {advice}" if advice else ""
    if not path.is_file():
        raise InputError(f"{path}: file not found{advice}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:
        reason = ("truncated" if "mmap length" in str(err) or "Failed to read all data" in str(err)
                  else "empty" if isinstance(err, EOFError) else "not a .npy array")
        first = str(err).split(". ")[0].splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(f"{path}: {reason} ({first}){advice}") from None


def load_nifti(path):
    """nibabel.load a NIfTI image (header only; nibabel reads the voxels on demand); a missing or
    unreadable file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        import nibabel   # imported here: the training stages and the GPU machines do without it
        return nibabel.load(path)
    except Exception as err:   # nibabel raises many types (ImageFileError, OSError, EOFError ...)
        raise InputError(f"{path}: not a readable NIfTI image "
                         f"({str(err).splitlines()[0]})") from None


def nifti_data(image, path, dtype=np.float32):
    """The voxels of a loaded NIfTI image as a `dtype` array;
    a truncated file is an InputError naming it."""
    try:
        return image.get_fdata(dtype=dtype)
    except Exception as err:   # gzip: EOFError, zlib.error, OSError; a short file: ValueError
        raise InputError(f"{path}: cannot read its voxels (truncated or damaged: "
                         f"{str(err).splitlines()[0] or type(err).__name__})") from None


# --------------------------------------------------------------------------------------------------
# BIDS names (sub-01_ses-002_task-shinobi_run-03_level-1_rep-02.bk2 -> {"sub": "01", ...}),
# the split of the fMRI runs (bold/splits.tsv), the frames manifest
# --------------------------------------------------------------------------------------------------
_ENTITY = re.compile(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)")
RUN_ENTITIES = ("sub", "ses", "task", "run")
SPLITS = ("train", "validation", "test")
# 02's split when no flag or file names the test runs: the paper's (section 2.1.4)
DEFAULT_TEST_SESSIONS, DEFAULT_VALIDATION_SESSIONS = ("005",), ("004",)


def bids_entities(path):
    """The key-value entities of a BIDS file name, in order: {'sub': '01', 'ses': '002', ...}."""
    stem = Path(path).name.split(".")[0]
    return dict(_ENTITY.findall(stem))


def has_label(value):
    """Whether a BIDS label is there: a dataset without sessions has none (None, n/a, '')."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) \
        and str(value) != ""


def run_stem(sub, ses, task, run):
    """The BIDS prefix that names one fMRI run: sub-01_ses-002_task-shinobi_run-03; an entity the
    dataset does not have (no session level) is left out, as in its file names."""
    labels = zip(RUN_ENTITIES, (sub, ses, task, run))
    return "_".join(f"{key}-{value}" for key, value in labels if has_label(value))


def run_folder(sub, ses):
    """Where a run's outputs go below a stage's folder: sub-01/ses-002, or sub-01 without
    sessions."""
    return Path(f"sub-{sub}", *([f"ses-{ses}"] if has_label(ses) else []))


def session_flag(text):
    """argparse type of --test-sessions and kin: 'ses-005' and '005' are both given as '005'."""
    return text.removeprefix("ses-")


def run_flag(text):
    """argparse type of --test-runs and kin: 'run-02' and '02' are both given as '02'."""
    return text.removeprefix("run-")


def bids_label(value):
    """A label that compares as a number when it is one: '005' (a manifest), 'ses-005' and '5' (as
    a flag may give it) are all '5'; '' when there is none (a dataset without sessions)."""
    if not has_label(value):
        return ""
    text = re.sub(r"^[a-z]+-", "", str(value))
    return str(int(text)) if text.isdigit() else text


def run_key(row):
    """(sub, ses, task, run) labels of one run (a manifest row or a dict), compared as bids_label
    compares them: how bold/splits.tsv and both manifests name the same run."""
    return tuple(bids_label(row.get(key)) for key in RUN_ENTITIES)


def splits_path(work):
    return Path(work) / "bold" / "splits.tsv"


def read_splits(path):
    """A splits file (02's bold/splits.tsv, or one a user gives 02): a DataFrame with one row per
    run, `sub ses task run split`, after checking the split values and that no run is listed
    twice."""
    table = read_tsv(path, required=(*RUN_ENTITIES, "split"))
    wrong = table[~table["split"].isin(SPLITS)]
    if len(wrong):
        raise InputError(f"{path}: row {wrong.index[0] + 2} has split {wrong['split'].iloc[0]!r}; "
                         f"expected one of {', '.join(SPLITS)}")
    keys = table.apply(run_key, axis=1)
    if keys.duplicated().any():
        row = table[keys.duplicated()].iloc[0]
        stem = run_stem(*(row[k] for k in RUN_ENTITIES))
        raise InputError(f"{path}: run {stem} is listed twice")
    return table


def held_out_runs(work, frames, test_sessions):
    """The run keys of the encoding test runs, which 03 and 04 leave out of training: those of
    bold/splits.tsv when 02 wrote it, else the runs of `frames` (the frames manifest) in
    `test_sessions` (default 005). `test_sessions` given beside the file must name the same runs
    (InputError otherwise); [] names none (train on every run, as the authors did)."""
    path = splits_path(work)
    if test_sessions is not None and not test_sessions:
        return set()
    sessions = {bids_label(s) for s in (test_sessions or DEFAULT_TEST_SESSIONS)}
    if not path.is_file():
        return {run_key(row) for _, row in frames.iterrows() if bids_label(row["ses"]) in sessions}
    splits = read_splits(path)
    in_file = splits["split"] == "test"
    if test_sessions is not None:
        named = splits["ses"].map(bids_label).isin(sessions)
        if (named != in_file).any():
            row = splits[named != in_file].iloc[0]
            raise InputError(f"--test-sessions {' '.join(test_sessions)}: {path} makes run "
                             f"{run_stem(*(row[k] for k in RUN_ENTITIES))} {row['split']}: leave "
                             "the flag out to follow the file, or remake the file with 02's split "
                             "flags")
    return set(splits[in_file].apply(run_key, axis=1))


def training_repetitions(work, test_sessions):
    """The repetitions 03 and 04 train on: rows (dicts) of frames/manifest.tsv with status ok
    outside the encoding test runs (held_out_runs: the models must not see them), in manifest
    order. Frames shown in several runs (a movie every subject watched) are trained on once, and
    not at all when a test run shows them."""
    manifest_path = Path(work) / "frames" / "manifest.tsv"
    manifest = read_tsv(manifest_path, required=(*RUN_ENTITIES, "status", "frames_path",
                                                 "n_frames"))
    held_out = held_out_runs(work, manifest, test_sessions)
    in_test = manifest.apply(run_key, axis=1).isin(held_out)
    test_frames = set(manifest.loc[in_test, "frames_path"].dropna())
    rows = manifest[(manifest["status"] == "ok") & ~in_test
                    & ~manifest["frames_path"].isin(test_frames)]
    rows = rows.drop_duplicates("frames_path")
    if rows.empty:
        raise InputError(f"{manifest_path}: no repetition with status ok outside the "
                         f"{len(held_out)} test run(s)")
    reps = [dict(row) for _, row in rows.iterrows()]
    for rep in reps:
        if not (Path(work) / str(rep["frames_path"])).is_file():
            raise InputError(f"{manifest_path}: frames file {Path(work) / str(rep['frames_path'])} "
                             "is listed as ok but does not exist (re-run 01_render_frames.py)")
    return reps


def repetition_record(rep):
    """What a model's record says of one repetition it trained on (04's, 03's
    `training_repetitions`): its frames and the labels of its run."""
    return {"frames_path": str(rep["frames_path"]),
            **{key: str(rep[key]) if has_label(rep.get(key)) else None for key in RUN_ENTITIES}}


def runs_trained_on(work, record):
    """{run key: the record of the model that trained on it} of the models (04's GPT, 03's
    VQ-VAE) among the inputs of `record` (a features record of 05), from their
    `training_repetitions`; a record of an older 04 names a run by its frames file."""
    trained = {}
    for name in (record or {}).get("inputs", {}):
        model_record = record_path(Path(work) / name)
        for rep in (read_record(model_record) or {}).get("training_repetitions", []):
            labels = {**bids_entities(rep["frames_path"]),
                      **{k: v for k, v in rep.items() if k in RUN_ENTITIES and has_label(v)}}
            trained.setdefault(run_key(labels), model_record)
    return trained


# --------------------------------------------------------------------------------------------------
# Provenance: a stage skips an output only when the output's record says it was made exactly as the
# stage would make it now: the same flags, and the same bytes in every input. Each output that a
# later run may skip has a record beside it, `<output stem>.json`:
#     {"stage": "05_extract", "settings": {"--pool": "none", ...},          the flags that shape it
#      "inputs": {"gpt/demo/ckpt.pt": {"sha256": ..., "size": ..., "mtime_ns": ...}, ...},
#      "output": {"sha256": ..., "size": ..., "mtime_ns": ...}, ...}        the output itself
# An input's sha256 comes from its own record when it has one (its producer hashed it once), so a
# change anywhere upstream changes a fingerprint that every stage downstream compares. Size and
# mtime only let a record vouch for a file without reading it again,
# as git's index does; content decides.
# --------------------------------------------------------------------------------------------------
def file_sha256(path, chunk=1 << 24):
    """Hex sha256 of a file, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def record_path(output):
    """The record of an output: `x.npy` -> `x.json`, `ckpt.pt` -> `ckpt.json`."""
    output = Path(output)
    return output.with_name(output.name.split(".")[0] + ".json")


def read_record(path):
    """The record at `path`, or None when there is none. A file that is not one of our records (a
    BIDS sidecar, or a record cut short by a crash) also gives None: the output is then made
    again."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return (record if isinstance(record, dict) and "stage" in record and "settings" in record
            else None)


def hash_file(path):
    """The fingerprint of a file, computed from its bytes: {"sha256", "size", "mtime_ns"}."""
    stat = Path(path).stat()
    return {"sha256": file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(path, known=None):
    """The fingerprint of a file, without reading it when a record vouches for it: `known` (what an
    earlier record of ours said of this input) or the file's own record (what its producer wrote),
    as long as the file still has the size and modification time that record saw.
    Otherwise it is hashed."""
    path = Path(path)
    stat = path.stat()

    def vouches(candidate):
        return isinstance(candidate, dict) and "sha256" in candidate and \
            (candidate.get("size"), candidate.get("mtime_ns")) == (stat.st_size, stat.st_mtime_ns)

    if vouches(known):   # the caller's record first: the file's own record is read only when needed
        return {k: known[k] for k in ("sha256", "size", "mtime_ns")}
    own = (read_record(record_path(path)) or {}).get("output")
    return {k: own[k] for k in ("sha256", "size", "mtime_ns")} if vouches(own) else hash_file(path)


def input_fingerprints(work, paths, earlier=None):
    """{path relative to work: fingerprint} of input files; `earlier` is an older record's inputs,
    whose fingerprints are reused for files that have not been touched since."""
    earlier = earlier or {}
    fingerprints = {}
    for path in paths:
        name = os.path.relpath(path, work)
        fingerprints[name] = fingerprint(path, earlier.get(name))
    return fingerprints


def vouched_fingerprint(path, advice):
    """The fingerprint of an input, checked against its producer's record (`outputs` lists it by
    name; `output` is the file of the record's own stem): without reading it while it keeps the size
    and modification time the record saw, by its sha256 otherwise. Bytes other than those the record
    lists (another repetition's array copied in its place, a file edited by hand) are an InputError
    naming the file, with `advice`: what is made from it would be wrong, and say it was right. A
    file without a record of ours is only fingerprinted."""
    path = Path(path)
    record = read_record(record_path(path)) or {}
    listed = record.get("outputs", {}).get(path.name)
    if listed is None and path.stem == record_path(path).stem:
        listed = record.get("output")
    found = fingerprint(path, listed)
    if isinstance(listed, dict) and found["sha256"] != listed.get("sha256", found["sha256"]):
        raise InputError(f"{path}: not the file its record {record_path(path)} lists (other bytes: "
                         f"replaced or changed since {record['stage']} wrote it); {advice}")
    return found


def _content(value):
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def changed_settings(record, settings):
    """The flags whose value differs between a record and `settings`, in the order of `settings`."""
    before = record.get("settings", {})
    return [k for k in [*settings, *(k for k in before if k not in settings)]
            if before.get(k) != settings.get(k)]


def changed_inputs(record, inputs):
    """The inputs whose content differs between a record and `inputs`
    (added and removed ones too)."""
    before = record.get("inputs", {})
    return [k for k in [*inputs, *(k for k in before if k not in inputs)]
            if _content(before.get(k)) != _content(inputs.get(k))]


def flags_differ_error(output, record, settings, changed):
    """The InputError for an output made with other flags: names the first differing flag."""
    return InputError(f"{output}: {other_flags_text(record, settings, changed)}: "
                      f"pass the same flags, or --overwrite to redo it")


def other_flags_text(record, settings, changed):
    """'made with --lr 0.0003, not 0.001' for the first flag of `changed` (changed_settings' list),
    and how many others differ."""
    flag = changed[0]
    before, now = record["settings"].get(flag), settings.get(flag)
    others = (f" (and {len(changed) - 1} other flag(s): {', '.join(changed[1:])})"
              if len(changed) > 1 else "")
    return f"made with {flag} {_show(before)}, not {_show(now)}{others}"


def _show(value):
    if value is None:
        return "(unset)"
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def is_up_to_date(output, record, stage, settings, inputs, overwrite, say=print):
    """Whether `output` can be skipped: its record exists, describes the file as it is, and equals
    what `stage` would make now with `settings` from `inputs`.

    The one rule every stage applies: different flags -> InputError naming the flag
    (unless --overwrite); a changed input, a missing or damaged record, or a changed output file ->
    False (made again, and said through `say`); otherwise True. `record` is read_record(...) of the
    output (or the checkpoint's own).
    """
    output = Path(output)
    if overwrite or not output.exists():
        return False
    if record is None or record.get("stage") != stage:
        say(f"{stage}: {output} has no record of how it was made: making it again")
        return False
    flags = changed_settings(record, settings)
    if flags:
        raise flags_differ_error(output, record, settings, flags)
    changed = changed_inputs(record, inputs)
    if changed:
        more = f" and {len(changed) - 1} other input(s)" if len(changed) > 1 else ""
        say(f"{stage}: {changed[0]}{more} changed since {output} was made: making it again")
        return False
    # the output itself (or, for a folder of outputs, each file the record lists)
    # as the record saw it
    made = {output: record.get("output")} if record.get("output") else {}
    made |= {output.parent / name: fp for name, fp in record.get("outputs", {}).items()}
    for path, recorded in made.items():
        if not path.is_file():
            say(f"{stage}: {path} is missing: making {output} again")
            return False
        if fingerprint(path, recorded)["sha256"] != recorded.get("sha256"):
            say(f"{stage}: {path} changed since it was made (damaged?): making {output} again")
            return False
    return True


def stale_input(work, record, checked=None):
    """The first input of `record` (a record, or None) that is no longer what the record saw, as
    (its name, the stage of the record that lists it), or None when the whole chain above is
    current.

    Each input recorded by its path under `work` (as input_fingerprints names it) must still exist
    with the recorded sha256, and so must the inputs of its own record, up the chain (results ->
    features -> GPT -> VQ-VAE, frames, BOLD). Inputs recorded by role (01's "bk2", 02's "bold": raw
    data the record does not locate) and plain values (05's timeline) end the chain. `checked`, a
    set shared by calls, holds the (name, sha256) pairs already found current, so that calls over
    many records read each once.
    """
    checked = set() if checked is None else checked
    for name, recorded in (record or {}).get("inputs", {}).items():
        path = Path(work) / name
        if (not isinstance(recorded, dict) or "sha256" not in recorded
                or (name, recorded["sha256"]) in checked):
            continue   # a plain value, or found current already
        if "/" not in name and not path.is_file():
            continue   # a role, not a path
        if not path.is_file() or fingerprint(path, recorded)["sha256"] != recorded["sha256"]:
            return name, record.get("stage")
        above = stale_input(work, read_record(record_path(path)), checked)
        if above:
            return above
        checked.add((name, recorded["sha256"]))
    return None


def new_record(stage, settings, inputs, output=None, **details):
    """A record (dict) for `output`, fingerprinted from its bytes now that it is written; `details`
    are extra fields for the reader (never compared). Library versions are kept for the reader
    too."""
    record = {"stage": stage, "settings": settings, "inputs": inputs, **details,
              "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                           "torch": torch.__version__}}
    if output is not None:
        record["output"] = hash_file(output)
    return record


def write_record(output, record):
    """Write the record of `output` beside it (after the output itself: a crash in between leaves an
    output without a record, which the next run makes again)."""
    write_json(record_path(output), record)


# --------------------------------------------------------------------------------------------------
# CPU threads: the CPUs a job was given, shared between its processes (one thread pool each).
# Left alone, torch and BLAS start one thread per CPU in every process: N worker processes run N x
# CPUs threads, and under SLURM without CPU binding or in a container with a CPU quota they count
# CPUs the job does not have. OMP_NUM_THREADS, when set, is the user's choice and is obeyed.
# --------------------------------------------------------------------------------------------------
def available_cpus(cpu_max=Path("/sys/fs/cgroup/cpu.max")):
    """The CPUs this job may use: the fewest of the process's CPU affinity (taskset, a cpuset),
    SLURM's --cpus-per-task and the cgroup's CPU quota (`cpu_max`: docker --cpus)."""
    counts = [len(os.sched_getaffinity(0))]
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        counts.append(int(os.environ["SLURM_CPUS_PER_TASK"]))
    try:
        quota, period = Path(cpu_max).read_text().split()[:2]
        if quota != "max":
            counts.append(math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):   # no cgroup v2 CPU controller: no quota to read
        pass
    return max(1, min(counts))


def limit_threads(processes=1):
    """Size the thread pools of this process (torch's, and numpy's and scipy's BLAS) to
    OMP_NUM_THREADS when set, else to its share of available_cpus() among `processes` processes
    of the job. Returns that number of threads."""
    from threadpoolctl import threadpool_limits   # imported here: only the stages that use it

    threads = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(threads) if threads.isdigit() else max(1, available_cpus() // processes)
    torch.set_num_threads(threads)
    threadpool_limits(threads)
    return threads


# --------------------------------------------------------------------------------------------------
# --- Training plumbing (stages 03 and 04) ---
# One code path for CPU, one GPU and DDP (torchrun, or srun under SLURM: one node or many);
# checkpoints that resume exactly; SLURM preemption; the cosine schedule; a CSV log; mixed
# precision. None of this is the paper's algorithm: it only makes long training runs safe and fast.
# --------------------------------------------------------------------------------------------------
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass
class DistContext:
    """Where this process runs: rank `rank` of `world_size` processes, on `device`."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self):
        """Rank 0 alone logs, writes checkpoints and draws figures."""
        return self.rank == 0


def choose_device(flag):
    """--device as a torch.device: auto (a GPU when torch sees one), cpu, cuda or cuda:N. The one
    place every stage decides it; a device torch does not know or see is an InputError."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise InputError(f"--device {flag}: not a torch device (auto, cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {flag}: torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {flag}: expected auto, cpu or cuda")
    return device


def setup_distributed(device="auto"):
    """Join the process group that RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT
    describe (set by `torchrun`, or by slurm/gpu_stage.sbatch for the processes srun starts), if
    any.

    device: 'auto' (CUDA when torch sees it), 'cuda' or 'cpu'. A plain `python script.py` is a world
    of one and starts no process group; several processes use NCCL on GPUs and gloo on CPUs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch_device = choose_device(device)
    if torch_device.type == "cuda":
        torch_device = torch.device("cuda", local_rank)      # one GPU per process on the node
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    return DistContext(rank, local_rank, world_size, torch_device)


def teardown_distributed(wait_for_all=False):
    """Leave the process group (if one was started); after a run that ended well on this process,
    `wait_for_all` first waits until every process has ended its run."""
    if dist.is_initialized():
        if wait_for_all:
            # rank 0 still writing the last checkpoint while another rank closes its connections
            # can abort that rank in gloo's threads
            dist.barrier()
        # Collect first: reference cycles (autograd graphs, DDP's reducer) can keep gloo work
        # objects alive until interpreter exit, where freeing them aborts the process ("terminate
        # called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def split_batch(global_batch, ctx, stage):
    """The per-process share of --batch-size, which counts the samples of one optimizer step over
    all processes: the paper's recipe (64 clips per step for the GPT) is then the same on 1 or 8
    GPUs."""
    if global_batch % ctx.world_size:
        raise InputError(f"--batch-size {global_batch}: does not divide evenly between "
                         f"{ctx.world_size} processes")
    per_rank = global_batch // ctx.world_size
    print0(f"{stage}: batch {global_batch} per optimizer step = "
           f"{ctx.world_size} process(es) x {per_rank}")
    return per_rank


def barrier(ctx):
    """Wait until every process gets here (nothing to wait for in a world of one)."""
    if ctx.world_size > 1:
        dist.barrier()


def print0(*args, **kwargs):
    """print() on rank 0 only, so that N processes do not print N copies."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def seed_everything(seed, rank=0):
    """Seed python, numpy and torch (CPU and CUDA) with `seed + rank`:
    ranks draw different clips."""
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


class PreemptionFlag:
    """Remembers that SIGTERM or SIGUSR1 arrived (SLURM sends one before it kills or requeues a
    job), or SIGINT (Ctrl-C), so that training can save a checkpoint and stop cleanly at the end of
    its step. Made first thing in a training stage's main(): from then on a signal never kills the
    process, whatever it is doing (caching codes, validating, writing a checkpoint, drawing the last
    figure); it is only read where stopping is safe. A signal after the last step is then harmless:
    the run completes and exits 0."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.name = None
        for signum in signals:
            signal.signal(signum, self._handler)

    def _handler(self, signum, frame):
        self.name = self.name or signal.Signals(signum).name

    def agreed(self, ctx):
        """True on every rank as soon as any rank got the signal
        (all ranks must stop at the same step)."""
        if ctx.world_size == 1:
            return self.name is not None
        flag = torch.tensor([float(self.name is not None)], device=ctx.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def interrupted(self, stage, where, kept="checkpoint saved"):
        """The Interrupted exception that ends the run,
        `where` ("at step 7 of 9") and what was `kept`."""
        return Interrupted(f"{stage}: interrupted {where} by {self.name or 'a signal'}; "
                           f"{kept}: re-run to resume")


# Flags that choose the hardware, the speed or the logging of a training run, declared here once for
# 03 and 04: never part of a run's record, so a run may resume on another device, with
# torch.compile, or with other log intervals. A stage adds those it has with add_run_flags;
# settings_of leaves them out.
RUN_FLAGS = {
    "--device": dict(default="auto", choices=("auto", "cuda", "cpu"),
                     help="auto: CUDA when torch sees it"),
    "--workers": dict(type=int, default=4,
                      help="threads that read clips from disk (default %(default)s)"),
    "--tf32": dict(action="store_true",
                   help="TF32 matmuls and convolutions in fp32 (Ampere and later)"),
    "--channels-last": dict(action="store_true", help="channels_last_3d memory format"),
    "--cudnn-benchmark": dict(action="store_true", help="let cuDNN pick the fastest kernels"),
    "--compile": dict(action=BooleanOptionalAction, default=None,
                      help="torch.compile the model (default: on CUDA, off on the CPU, where "
                           "compiling takes longer than a short run saves)"),
    "--log-every": dict(type=int, default=100,
                        help="steps between log.csv rows (default %(default)s)"),
    "--val-every": dict(type=int, default=1000,
                        help="steps between validation passes (default %(default)s)"),
    "--val-clips": dict(type=int, default=32,
                        help="validation clips, drawn once (default %(default)s)"),
    "--val-samples": dict(type=int, default=2048,
                          help="validation samples per pass (0: all; default %(default)s)"),
    "--ckpt-every": dict(type=int, default=1000,
                         help="steps between checkpoints (default %(default)s)"),
    "--resume": dict(action="store_true",
                     help="continue this stage's unfinished run, if there is one"),
    "--overwrite": dict(action="store_true", help="start over even if a checkpoint exists"),
    "--allow-unfinished": dict(action="store_true",
                               help="use an upstream checkpoint whose training was interrupted"),
}
NOT_RECORDED = {"work", "name", *(flag[2:].replace("-", "_") for flag in RUN_FLAGS)}


def add_split_flags(group):
    """Add the flags that choose 03's and 04's training and validation repetitions to an argparse
    `group`, declared once so that both stages hold out the same ones by default: the frozen VQ-VAE
    never sees the GPT's validation clips."""
    group.add_argument("--test-sessions", nargs="*", default=None, type=session_flag,
                       help="sessions left out of training (the encoding test set; default: the "
                            "test runs of bold/splits.tsv, which 02 writes, else 005); with no "
                            "value: train on every run, as the authors did")
    group.add_argument("--val-reps", type=int, default=2,
                       help="the last N training repetitions (manifest order) held out for validation "
                            "(default 2, the same in 03 and 04)")
    group.add_argument("--frame-step", type=int, default=4,
                       help="60 Hz frames per clip frame (4: clips at 15 Hz)")


def add_run_flags(parser, flags, **defaults):
    """Add the RUN_FLAGS named in `flags` to `parser`, in a group of their own; `defaults` overrides
    theirs by destination (log_every=50)."""
    group = parser.add_argument_group("run (hardware, speed and logging: not part of the record)")
    for flag in flags:
        spec = dict(RUN_FLAGS[flag])
        spec["default"] = defaults.get(flag[2:].replace("-", "_"), spec.get("default"))
        group.add_argument(flag, **spec)


def settings_of(args, leave_out=NOT_RECORDED):
    """The flags of an argparse namespace that shape the result, as {"--flag": value},
    JSON-normalised (tuples become lists) so that they compare equal to the same flags read back
    from a record."""
    settings = {f"--{k.replace('_', '-')}": v for k, v in vars(args).items() if k not in leave_out}
    return json.loads(json.dumps(settings))


def checkpoint_to_resume(ckpt_path, stage, settings, inputs, resume, overwrite):
    """What a training stage does with the checkpoint at `ckpt_path`. Returns
    (checkpoint, complete): (None, False) to train from step 0 (no checkpoint, --overwrite, or it
    was trained on other inputs); (checkpoint, True) when that run is complete (the stage skips it);
    (checkpoint, False) to resume it (--resume). Raises InputError when the flags differ, or an
    unfinished run exists without --resume."""
    ckpt_path = Path(ckpt_path)
    if overwrite or not ckpt_path.exists():
        return None, False
    checkpoint = load_checkpoint(ckpt_path)
    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != stage:
        raise InputError(f"{ckpt_path}: not a checkpoint of {stage} (--overwrite replaces it)")
    if "provenance" not in checkpoint:
        raise InputError(f"{ckpt_path}: written by an older version of {stage}, without a record "
                         "of its inputs: --overwrite to train again (or choose another --work)")
    if not is_up_to_date(ckpt_path, checkpoint["provenance"], stage, settings, inputs, False,
                         say=print0):
        print0(f"{stage}: training from step 0")
        return None, False
    if checkpoint["complete"]:
        return checkpoint, True
    if not resume:
        raise InputError(f"{ckpt_path}: an unfinished run "
                         f"({checkpoint['step']} of {checkpoint['max_steps']} steps) exists: "
                         "pass --resume to continue it or --overwrite to start over")
    return checkpoint, False


def start_over(ckpt_path, ctx):
    """Remove the checkpoint of a run that trains from step 0 (other inputs, or --overwrite), once
    every rank has decided: interrupted at once, the new run must not leave the old run's weights
    behind."""
    barrier(ctx)
    if ctx.is_main:
        Path(ckpt_path).unlink(missing_ok=True)
        record_path(ckpt_path).unlink(missing_ok=True)


@dataclass
class TrainingRun:
    """What a training run (03, 04) is made of, decided before it starts: where it writes, the
    unfinished run it resumes (None: from step 0), the model's keywords, its record (provenance) and
    the stage's training data."""
    out_dir: Path
    checkpoint: dict | None
    model_config: dict
    record: dict
    data: object

    @property
    def ckpt_path(self):
        return self.out_dir / "ckpt.pt"


def run_training(train, args, run, preemption):
    """Join the process group of --device, remove the checkpoint of a run that starts over, call
    train(args, run, ctx, preemption), and leave the group however it ends."""
    ctx = setup_distributed(args.device)
    # the processes on this node share its CPUs (torchrun says how many; srun: OMP_NUM_THREADS)
    limit_threads(int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)))
    print0(f"{run.record['stage']}: {torch.get_num_threads()} CPU thread(s) per process "
           "(OMP_NUM_THREADS sets it)")
    try:
        if run.checkpoint is None:
            start_over(run.ckpt_path, ctx)
        train(args, run, ctx, preemption)
    except BaseException:
        teardown_distributed()   # no waiting: the other processes may never get here
        raise
    teardown_distributed(wait_for_all=True)


def wrap_for_training(model, args, ctx, **ddp_options):
    """The model the training loop calls: under DDP with several processes, compiled where
    compiles(--compile). The checkpoints save the model itself, unwrapped."""
    if ctx.world_size > 1:
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_options)
    if compiles(args.compile, ctx.device):
        model = torch.compile(model)
    return model


def compiles(flag, device):
    """Whether --compile (True), --no-compile (False) or neither (None) compiles the model on
    `device`: by default on CUDA, where eager mode launches a kernel per elementwise operation and
    torch.compile fuses them (fewer launches, less memory traffic), and not on the CPU."""
    return device.type == "cuda" if flag is None else flag


def split_validation(reps, val_reps, path):
    """(training, validation) repetitions: the last `val_reps` in manifest order are held out. 03
    and 04 hold out the same ones (same default), so the frozen VQ-VAE never saw the GPT's
    validation clips."""
    if len(reps) <= val_reps:
        raise InputError(f"{path}: {len(reps)} usable repetition(s), not enough to hold out "
                         f"--val-reps {val_reps} and still train")
    return reps[:len(reps) - val_reps], reps[len(reps) - val_reps:]


def require_complete(checkpoint, path, producer, allow_flag, allowed=False):
    """Refuse a checkpoint whose training was interrupted (complete False), unless `allowed` (the
    user passed `allow_flag` on purpose). Checkpoints of other origins (the authors') count as
    complete."""
    if isinstance(checkpoint, dict) and checkpoint.get("complete") is False and not allowed:
        raise InputError(f"{path}: unfinished training (step {checkpoint.get('step')} of "
                         f"{checkpoint.get('max_steps')}): re-run {producer} to finish it, "
                         f"or pass {allow_flag} to use it as it is")


def rng_state():
    """The state of every random generator this process uses (python, numpy, torch CPU and CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_rng_states(ctx):
    """rng_state() of every rank, as a list indexed by rank
    (a checkpoint resumes every rank exactly)."""
    if ctx.world_size == 1:
        return [rng_state()]
    states = [None] * ctx.world_size
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states, ctx):
    """Give each rank the generator state it had when `states` (from gather_rng_states) was saved.
    Returns False (and leaves the generators as seeded) when the number of ranks changed."""
    if len(states) != ctx.world_size:
        return False
    set_rng_state(states[ctx.rank])
    return True


def save_checkpoint(path, checkpoint):
    """torch.save(checkpoint) atomically: a kill during the write leaves the previous file intact.

    The stages save a dict with: model (state dict), optimizer, scaler, step, max_steps, complete,
    rng (list by rank), args (vars of the argparse namespace), model_config (the keyword arguments
    that rebuild the model) and provenance (the record: stage, settings, inputs), which is also
    written beside it as `ckpt.json` with the checkpoint's own fingerprint.
    """
    with atomic_path(path) as tmp:
        try:
            torch.save(checkpoint, tmp)
        except RuntimeError as err:
            # torch's zip writer reports a full disk as a RuntimeError of its own
            reason = ("No space left on device" if shutil.disk_usage(tmp.parent).free < 1 << 20
                      else f"torch: {str(err).splitlines()[0]}")
            raise InputError(f"{path}: cannot write it ({reason})") from None
    # its record beside it: what it was made from, whether it is complete
    if "provenance" in checkpoint:
        write_record(path, dict(checkpoint["provenance"], complete=checkpoint["complete"],
                                step=checkpoint["step"], max_steps=checkpoint["max_steps"],
                                output=hash_file(path)))


def cosine_lr(step, max_steps, base_lr, min_lr=0.0):
    """Learning rate at `step`: paper eq. 2 (torch's CosineAnnealingLR over max_steps), base_lr at
    step 0, min_lr at max_steps."""
    progress = min(1.0, step / max(1, max_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


class CSVLog:
    """A CSV training log, one row per call to log(), flushed at once (a killed run keeps its rows).

    resume_step: when resuming from a checkpoint at that step, rows written after it by the killed
    run are dropped, so the log of a resumed run equals that of an uninterrupted one.
    """

    def __init__(self, path, fields, resume_step=None):
        self.path = Path(path)
        self.fields = list(fields)
        kept = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, self.fields, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)

    def log(self, **row):
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.fields).writerow(row)


def peak_memory_gb(device):
    """Peak memory so far: allocated CUDA memory on a GPU,
    the process's peak RSS on the host (GB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6    # Linux: KiB -> GB


# --precision, the same in 03, 04 and 05. Mixed precision is autocast (torch.amp) around the model;
# the model keeps its own float32 islands whatever it says (the VQ-VAE's encoding, its codebook, the
# GPT's LayerNorm: paper/). auto is GPU_PRECISION on a GPU (bf16: float32's exponent range, so no
# loss scaling; the paper found 16-bit training did not change the brain scores) and fp32 on the CPU.
GPU_PRECISION = "bf16"


def resolved_precision(flag, device):
    """--precision on `device` (a torch.device): fp32, fp16 or bf16, auto made one of them."""
    if flag == "auto":
        return GPU_PRECISION if device.type == "cuda" else "fp32"
    return flag


def autocast(device, precision):
    """The autocast context of --precision on `device`: none for fp32, else torch.amp's."""
    precision = resolved_precision(precision, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device, precision):
    """A GradScaler, active for fp16 only
    (bf16 has fp32's exponent range and needs no loss scaling)."""
    return torch.amp.GradScaler(device.type,
                                enabled=resolved_precision(precision, device) == "fp16")
