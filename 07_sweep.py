"""07 — The paper's scaling experiments in one command, their figures, and fitted scaling laws.

    python 07_sweep.py --work work --dry-run                  # list the jobs of every experiment
    python 07_sweep.py --work work --experiments data hidden  # run them (04 -> 05 -> 06 per config)
    python 07_sweep.py --work work --demo                     # tiny configurations, CPU, minutes
    python 07_sweep.py --work work --demo --experiments hidden --values 6 12   # other knob values
    python 07_sweep.py --work work --figures-only             # figures + report from finished runs
    python 07_sweep.py --work work --demo --experiments controls appendix   # beyond the paper
    bash slurm/submit_sweep.sh                                # SLURM: a job chain per configuration

Experiments (paper section 2.4; each varies one knob of the paper configuration, Table 2(b)):
    data       --train-frames 10k, 100k, 1M and all training frames (Figure 2; the paper's 6M is
               more than remain once the test session and the validation repetitions are held
               out), each for --data-epochs 100 epochs as the authors' script (--data-epochs 0:
               the steps of the other experiments), in --subset-order (the authors' puts sub-01's
               gameplay alone in the 10k to 1M subsets; balanced shares every size out evenly)
    hidden     --hidden-dim 6, 15, 30, 63, 126, 255, 576, 1023       (Figure 3; the paper's 1024)
    layers     --layers 1, 2, 4, 8, 16; features of the last block  (Figure 4, Table 3)
    heads      --heads 1, 2, 4, 8                                    (Figure 5)
    precision  --precision fp32, fp16: training time and brain score (Figure 6)
and beyond the paper:
    controls   the paper model untrained (04 --max-steps 0), its VQ-VAE alone, low-level vision (no
               model); on a synthetic dataset (--ground-truth) also compared on its planted parcels
    appendix   every module of block 4 and every block's output (Figure 7, appendix A)
--values replaces the list of one of the five (or the demo's list) with values of its knob (checked
against 04's rules before anything runs).
--seeds K trains every configuration of the five and the controls' models K times (04 --seed 0 ...
K - 1): the report gives the spread over seeds beside each interval, which resamples the test time
course only and so leaves out training's own variance.
A configuration shared by several experiments (the paper model appears in all five) trains once.
Its name spells it out, e.g. h576-l8-a4-fall-fp32, and names its folders: gpt/<name>/,
features/<name>/, results/<name>/. Each stage of a configuration skips what its records vouch for
(see the README). The frozen VQ-VAE (<work>/vqvae/ckpt.pt) and the parcel time series (<work>/bold/)
must exist: run stages 01-03 first. The figures take a configuration only when its records chain up
to the current files (its results from the features, these from the checkpoint, and so on);
--figures-only refuses one whose model, say, was trained again since (04 ran, 05 and 06 did not),
or whose results were made with other flags of 06 than --ridge-args (and --demo) ask for. A
configuration without results (its job failed or has not run) is left out of every figure and named
at the top of report.md and on stderr, and the exit status is then 1.

Figures (<work>/figures/), per experiment:
    <experiment>_loss.png    train (solid) and validation (dashed) cross-entropy against steps
                             (Fig. 2a-6a)
    <experiment>_scores.png  per-subject max and median r with 95% bootstrap intervals over parcels
                             and the permutation null's 95% level; lines over the scale, bars for
                             precision (Fig. 2b-6b)
    <experiment>_maps.png    glass brains, one row per configuration, one column per subject, one
                             shared colour scale; parcels that are not significant (FDR) are faded
                             (Fig. 2c-6c)
and precision.md (time, speedup, r difference); scaling.png + scaling.json (beyond the paper: the
score against training compute, data and parameters, r = a + b log10 x and r = r_inf - c x^-alpha
with 95% bands, each law drawn only where the data determine it); report.md: per experiment the
paper's claim, a verdict computed from the numbers and their intervals, the figures and a table.

Verdicts are on the median r over parcels (stable; the max r, the paper's figure, beside it). A claim
of an effect (more data, width improve) is supported when its 95% interval lies above 0; a claim of
no effect (depth, heads, precision) only when the interval lies within --margin (10% of the
reference's score, per tenfold for a slope) of 0: an interval that merely holds 0 is
"inconclusive", never support.
"""
import argparse
import functools
import importlib.util
import json
import math
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import common
from common import DEFAULT_WORK, PAPER_LAYER, InputError, read_tsv, run_main

REPO = Path(__file__).resolve().parent
# The reference trains on every training frame (--train-frames 0, "all"): the paper's 6M are more
# than remain once the test session (473,949 of 6,476,018 frames) and the validation repetitions are
# held out; the report gives the count.
PAPER_CONFIG = {"hidden_dim": 576, "layers": 8, "heads": 4, "train_frames": 0, "precision": "fp32"}
EXPERIMENTS = {  # experiment -> (knob, values, the paper's figure)
    "data": ("train_frames", [10_000, 100_000, 1_000_000, 0], "Figure 2"),
    # The paper lists 1024 but also requires a multiple of 3 (VideoGPT's position tables split the
    # width over t, h, w), which 1024 is not: 1023 is the nearest width that builds.
    "hidden": ("hidden_dim", [6, 15, 30, 63, 126, 255, 576, 1023], "Figure 3"),
    "layers": ("layers", [1, 2, 4, 8, 16], "Figure 4"),
    "heads": ("heads", [1, 2, 4, 8], "Figure 5"),
    "precision": ("precision", ["fp32", "fp16"], "Figure 6"),
}
# The demo: the same five experiments with models small enough to train in a minute on a laptop CPU.
DEMO_CONFIG = {"hidden_dim": 24, "layers": 2, "heads": 2, "train_frames": 0, "precision": "fp32"}
DEMO_EXPERIMENTS = {
    "data": ("train_frames", [2_000, 8_000, 0], "Figure 2"),
    "hidden": ("hidden_dim", [6, 12, 24], "Figure 3"),
    "layers": ("layers", [1, 2], "Figure 4"),
    "heads": ("heads", [1, 2], "Figure 5"),
    "precision": ("precision", ["fp32", "bf16"], "Figure 6"),
}
# 3e-3, not the paper's 3e-4: at 3e-4 no tiny model moves in 80 steps (validation loss ~3.95 for all
# widths, chance ln 64 = 4.16) and every sweep would compare untrained models; at 3e-3, 6 / 12 / 24
# wide reach 3.55 / 3.17 / 2.51.
DEMO_TRAIN_ARGS = ("--device cpu --cond-dim 24 --batch-size 16 --lr 3e-3 "
                   "--log-every 10 --val-every 40 --val-samples 32 --ckpt-every 80")
DEMO_MAX_STEPS = 80          # the demo's budget, but for the data experiment's epochs
DATA_EPOCHS = 100            # the authors' budget of every data size (their script's max_epochs)
DEMO_DATA_EPOCHS = 10        # the demo's: its 2k-frame size then trains 20 steps, all frames ~300
DEMO_EXTRACT_ARGS = "--device cpu"
# 1,000 circular shifts, enough for FDR to pass a lone parcel of 40 (run_all.sh); 06's default grid
DEMO_RIDGE_ARGS = "--n-permutations 1000"
# The controls' variance partition: the GPT's features fitted with these (06 --with), in jobs of
# their own
PARTITION_WITH = ("lowlevel", "buttons")
# Beyond the paper's sweeps: controls for what the GPT learned, appendix A's comparison of layers.
EXTRA_EXPERIMENTS = {"controls": ("control", None, "beyond the paper"),
                     "appendix": ("module", None, "Figure 7, appendix A")}
CLAIMS = {
    "data": "Scaling up the training data of VideoGPT improves brain encoding (section 3.1).",
    "hidden": "Scaling up the hidden dimension improves brain encoding (section 3.2).",
    "layers": "More layers do not reliably improve brain encoding (section 3.3).",
    "heads": "The number of attention heads has a modest effect on brain encoding (section 3.4).",
    "precision": "fp16 mixed precision trains faster without hurting brain encoding (section 3.5).",
    "controls": ("(not the paper's: the paper reports trained models only) The score comes from "
                 "what the GPT learned: the trained model beats its untrained copy, its VQ-VAE "
                 "alone and low-level vision."),
    "appendix": ("Among the modules of block 4, post_fc_dp encodes best (appendix A, Figure 7, "
                 "Table 4); the paper reads block 4 of 8 as mid-level features."),
}
# What kind of claim each of the paper's is: an effect (supported when the interval lies above 0), or
# no effect beyond a margin (supported only when the interval lies inside it: equivalence)
CLAIM_KIND = {"data": "increase", "hidden": "increase", "layers": "no increase", "heads": "none",
              "precision": "not worse"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS),
                   choices=[*EXPERIMENTS, *EXTRA_EXPERIMENTS],
                   help="the paper's five (default) and, beyond it, controls and appendix (the "
                        "layers of block 4)")
    p.add_argument("--values", nargs="+", metavar="V",
                   help="with one of the paper's five experiments: these values of its knob "
                        "instead of the paper's (or the demo's), e.g. --experiments hidden "
                        "--values 6 12")
    p.add_argument("--demo", action="store_true", help="tiny configurations for the demo (CPU)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the jobs (each distinct command once, in submission order) and exit")
    p.add_argument("--jobs-tsv", action="store_true",
                   help="with --dry-run: print name, 04, 05, 06 commands as TSV, one line per job")
    p.add_argument("--figures-only", action="store_true",
                   help="skip training; draw figures from finished runs")
    p.add_argument("--train-args", default="",
                   help="extra flags for 04_train_gpt.py, e.g. '--max-steps 200000'")
    p.add_argument("--extract-args", default="", help="extra flags for 05_extract.py")
    p.add_argument("--ridge-args", default="", help="extra flags for 06_ridge.py")
    p.add_argument("--score", choices=("max", "median"), default="max",
                   help="brain score for the scaling laws: max r over parcels (as the paper) or "
                        "median r (the verdicts use the median r, the max beside it)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="what counts as no effect in a verdict: a change smaller than this "
                        "fraction of the reference's median r (per tenfold for a trend)")
    p.add_argument("--data-epochs", type=float, default=None,
                   help="the data experiment's budget, epochs of each data size (default: the "
                        f"authors' {DATA_EPOCHS:g}; --demo {DEMO_DATA_EPOCHS:g}; 0: the steps of "
                        "the other experiments)")
    p.add_argument("--subset-order", choices=("authors", "balanced"), default="authors",
                   help="the data experiment's subsets (04 --subset-order): the authors' (the "
                        "small ones hold sub-01's gameplay only) or balanced over subjects")
    p.add_argument("--seeds", type=int, default=1,
                   help="train each model of the five experiments and the controls with seeds "
                        "0 ... K - 1 (04 --seed); the report gives their spread")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of parcels")
    p.add_argument("--ground-truth", metavar="JSON", default=None,
                   help="a synthetic dataset's ground_truth.json: the controls are also compared "
                        "on its planted parcels (default with --demo: "
                        "<work>/demo/ground_truth.json)")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.margin < 0 or (args.data_epochs or 0) < 0:
        p.error("--seeds must be >= 1, --margin and --data-epochs >= 0")
    if args.n_boot < 1:
        p.error(f"--n-boot {args.n_boot}: must be at least 1 (the intervals' resamples)")
    if args.values is not None:
        args.values = knob_values(args.experiments, args.values,
                                  DEMO_CONFIG if args.demo else PAPER_CONFIG)
    demo_truth = Path(args.work) / "demo" / "ground_truth.json"
    if args.ground_truth is None and args.demo and demo_truth.is_file():
        args.ground_truth = str(demo_truth)
    return args


def knob_values(experiments, values, base):
    """--values as values of the knob of the one paper experiment they are for: integers (frames,
    width, layers, heads) that 04 accepts for the `base` configuration, or precisions."""
    if len(experiments) != 1 or experiments[0] not in EXPERIMENTS:
        raise InputError(f"--values: for one of the experiments {', '.join(EXPERIMENTS)} alone, "
                         f"not --experiments {' '.join(experiments)}")
    knob = EXPERIMENTS[experiments[0]][0]
    if len(set(values)) < len(values):
        raise InputError(f"--values {' '.join(values)}: a value given twice")
    if knob == "precision":
        unknown = [v for v in values if v not in common.PRECISIONS]
        if unknown:
            raise InputError(f"--values {' '.join(unknown)}: not a precision of 04 "
                             f"({', '.join(common.PRECISIONS)})")
        return values
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise InputError(f"--values {' '.join(values)}: {knob} takes integers") from None
    for value in numbers:   # refused now, not by 04 after the configurations before it trained
        rule = knob_rule_broken(knob, value, base)
        if rule:
            raise InputError(f"--values {value}: {knob} {rule}")
    return numbers


def knob_rule_broken(knob, value, base):
    """What 04 would refuse in `value` of `knob` for the `base` configuration, or None."""
    if knob == "train_frames" and value < 0:
        return "must not be negative (0: every training frame)"
    if knob == "hidden_dim" and (value < 3 or value % 3):
        return "must be a positive multiple of 3 (one position table per latent axis t, h, w)"
    if knob == "layers" and value < 1:
        return "must be at least 1"
    if knob == "heads" and not 1 <= value <= base["hidden_dim"]:
        return f"must be between 1 and the hidden size {base['hidden_dim']} (a channel per head)"
    return None


# --------------------------------------------------------------------------------------------------
# The jobs: one configuration = train (04) -> extract (05) -> encode (06)
# --------------------------------------------------------------------------------------------------
def short_count(n):
    """6000000 -> '6M', 10000 -> '10k', 0 -> 'all'."""
    if n == 0:
        return "all"
    for div, unit in ((1_000_000, "M"), (1_000, "k")):
        if n % div == 0:
            return f"{n // div}{unit}"
    return str(n)


def config_name(c):
    """h576-l8-a4-fall-fp32, then what sets a configuration apart from the other experiments' when
    it does: -e100 (trained for epochs), -balanced (subset order), -s1 (the seed)."""
    name = (f"h{c['hidden_dim']}-l{c['layers']}-a{c['heads']}-f{short_count(c['train_frames'])}-"
            f"{c['precision']}")
    if c.get("epochs"):
        name += f"-e{c['epochs']:g}"
    if c.get("subset_order", "authors") != "authors":
        name += f"-{c['subset_order']}"
    return name + (f"-s{c['seed']}" if c.get("seed") else "")


def data_epochs(args):
    """The data experiment's budget in epochs (0: the steps of the other experiments)."""
    if args.data_epochs is not None:
        return args.data_epochs
    return DEMO_DATA_EPOCHS if args.demo else DATA_EPOCHS


def with_seeds(name, seeds):
    """The names of a configuration's runs over --seeds: name, name-s1, ... (seed 0 keeps the
    name)."""
    return [name] + [f"{name}-s{k}" for k in range(1, seeds)]


def feature_layer(config, experiment):
    """The paper's layer (block 4 of 8); the last block in the depth sweep (Table 3) or when there
    is no block 4."""
    if experiment == "layers" or config["layers"] <= 4:
        return f"attn_stack.attn_nets.{config['layers'] - 1}.post_fc_dp"
    return PAPER_LAYER


def appendix_layers(config):
    """Appendix A: every module of the block the paper reads (block 4 of 8; the last block of a
    shallower model), as 05 --list-layers names them, then the output of every block (the depth
    profile)."""
    block = int(feature_layer(config, "data").split(".")[2])
    with torch.device("meta"):   # the module names depend on the depth only
        model = common.GPTPrior(latent_shape=(4, 8, 8), embedding_dim=6, n_codes=8, hidden_dim=12,
                                heads=2, layers=config["layers"], cond_dim=12)
    prefix = f"attn_stack.attn_nets.{block}."
    modules = [name for name, _ in model.named_modules() if name.startswith(prefix)]
    return modules + [f"attn_stack.attn_nets.{i}" for i in range(config["layers"])]


def job(config, layer, kind="model", features=None, extract_layers=None, needs=()):
    """One configuration's jobs: `kind` says which model its features come from (model: the trained
    GPT; untrained: the same GPT with its initial weights; vqvae: the trained GPT's VQ-VAE alone;
    lowlevel, buttons: no model; partition: no features of its own, 06 --with fits together those of
    the jobs `needs` names), `features` names its feature set, `extract_layers` what 05 extracts
    (several for appendix A)."""
    model = None
    if kind in ("model", "untrained", "vqvae"):
        model = config_name(config) + ("-untrained" if kind == "untrained" else "")
    return dict(config=config, layer=layer, kind=kind, model=model, features=features,
                extract_layers=extract_layers or [layer], needs=list(needs))


def plan(args):
    """{experiment: [(value, config, name, layer)]} and the ordered unique jobs {name: job(...)}; a
    job's name is its results folder, results/<name>/. args.values, when given, replace the values
    of the (one) experiment's knob."""
    base, experiments = ((DEMO_CONFIG, DEMO_EXPERIMENTS) if args.demo
                         else (PAPER_CONFIG, EXPERIMENTS))
    per_experiment, jobs = {}, {}

    def add(rows, value, name, spec):
        rows.append((value, spec["config"], name, spec["layer"]))
        jobs.setdefault(name, dict(spec, features=spec["features"] or name))

    for experiment in args.experiments:
        rows = []
        if experiment == "controls":
            layer, name = feature_layer(base, "data"), config_name(base)
            add(rows, "trained", name, job(base, layer))
            add(rows, "untrained", name + "-untrained", job(base, layer, "untrained"))
            add(rows, "VQ-VAE alone", name + "-vqvae", job(base, "vqvae.codebook", "vqvae"))
            add(rows, "low-level", "lowlevel", job(base, "lowlevel", "lowlevel"))
            add(rows, "button presses", "buttons", job(base, "buttons", "buttons"))
            for model in (name, name + "-untrained"):   # beyond low-level vision and the buttons
                jobs[f"{model}+{'+'.join(PARTITION_WITH)}"] = job(
                    base, layer, "partition", model, needs=(model, *PARTITION_WITH))
        elif experiment == "appendix":
            layers, features = appendix_layers(base), config_name(base) + "-appendix"
            for layer in layers:
                add(rows, layer.removeprefix("attn_stack.attn_nets."), f"{features}/{layer}",
                    job(base, layer, "model", features, layers))
        else:
            knob, values, _ = experiments[experiment]
            for value in values if args.values is None else args.values:
                config = dict(base, **{knob: value}, **data_budget(args, experiment))
                layer = feature_layer(config, experiment)
                name = config_name(config)
                if layer != feature_layer(config, "data"):
                    name += "-last"  # same model, other layer: a feature set of its own
                add(rows, value, name, job(config, layer))
        per_experiment[experiment] = rows
    add_seeds(args, per_experiment, jobs)
    return per_experiment, jobs


def data_budget(args, experiment):
    """What the data experiment's configurations add to the paper's: their budget in epochs and
    their subset order (none for the other experiments)."""
    if experiment != "data":
        return {}
    return {"epochs": data_epochs(args) or None, "subset_order": args.subset_order}


def add_seeds(args, per_experiment, jobs):
    """--seeds K: a job for each other seed of every model of the five experiments and of the
    controls' trained and untrained GPT, its features and results (name-s1, ...), after the jobs of
    seed 0."""
    seeded = {name for experiment, rows in per_experiment.items() if experiment != "appendix"
              for _, _, name, _ in rows if jobs[name]["kind"] in ("model", "untrained")}
    for name in [n for n in jobs if n in seeded]:
        spec = jobs[name]
        for k, seed_name in enumerate(with_seeds(name, args.seeds)[1:], 1):
            config = dict(spec["config"], seed=k)
            jobs[seed_name] = job(config, spec["layer"], spec["kind"], seed_name,
                                  spec["extract_layers"])
            jobs[seed_name]["model"] = spec["model"] + f"-s{k}"


def commands(args, name, spec):
    """The stage commands of one job, as argument lists: train (04; none without a model), extract
    (05; none for a partition, which reads other jobs' features), encode (06)."""
    work, config = args.work, spec["config"]
    demo = lambda flags: shlex.split((flags + " " if args.demo else ""))  # noqa: E731
    cmds = []
    if spec["model"] is not None:
        train = ["04_train_gpt.py", "--work", work, "--name", spec["model"],
                 "--hidden-dim", config["hidden_dim"], "--layers", config["layers"],
                 "--heads", config["heads"], "--precision", config["precision"], "--resume"]
        train += model_flags(config, args.demo)
        train += demo(DEMO_TRAIN_ARGS) + shlex.split(args.train_args)
        if spec["kind"] == "untrained":
            train += ["--max-steps", "0"]
        cmds.append(train)
        extract = ["05_extract.py", "--work", work, "--ckpt", f"{work}/gpt/{spec['model']}/ckpt.pt",
                   "--name", spec["features"], "--layer", *spec["extract_layers"]]
    else:   # a feature set without a model (lowlevel, buttons)
        extract = ["05_extract.py", "--work", work, "--features", spec["kind"],
                   "--name", spec["features"]]
    if spec["kind"] != "partition":
        cmds.append(extract + demo(DEMO_EXTRACT_ARGS) + shlex.split(args.extract_args))
    ridge = ["06_ridge.py", "--work", work, "--name", spec["features"], "--layer", spec["layer"]]
    if spec["kind"] == "partition":
        ridge += ["--with", *PARTITION_WITH]
    elif name != spec["features"]:
        ridge += ["--results-name", name]
    cmds.append(ridge + demo(DEMO_RIDGE_ARGS) + shlex.split(args.ridge_args))
    return [[str(a) for a in cmd] for cmd in cmds]


def model_flags(config, demo):
    """04's flags for what a configuration sets beyond the architecture: its data size, subset
    order and budget, its seed."""
    flags = ["--train-frames", config["train_frames"]] if config["train_frames"] else []
    if config.get("subset_order", "authors") != "authors":
        flags += ["--subset-order", config["subset_order"]]
    if config.get("epochs"):
        flags += ["--epochs", f"{config['epochs']:g}"]
    elif demo:
        flags += ["--max-steps", DEMO_MAX_STEPS]
    return flags + (["--seed", config["seed"]] if config.get("seed") else [])


def print_jobs(args, jobs):
    """--dry-run. With --jobs-tsv, one line per job for slurm/submit_sweep.sh: name, the 04, 05 and
    06 commands ("-" for a stage the job does not need), and the jobs whose features its 06 also
    reads (a partition: comma-separated names; else "-"). Otherwise each job's commands under its
    name, each distinct command once, in the order submit_sweep.sh submits them: a model that
    several jobs read trains once, a feature set is extracted once (the appendix's modules share
    both)."""
    printed = set()
    for name, spec in jobs.items():
        cmds = [shlex.join(cmd) for cmd in commands(args, name, spec)]
        if args.jobs_tsv:
            stages = cmds if spec["kind"] != "partition" else ["-", "-", *cmds]
            stages = ["-"] * (3 - len(stages)) + stages
            print("\t".join([name, *stages, ",".join(spec["needs"]) or "-"]))
            continue
        print(f"# {name}")
        for cmd in cmds:
            if cmd not in printed:
                print(f"python {cmd}")
                printed.add(cmd)


def subjects(work):
    manifest = read_tsv(Path(work) / "bold" / "manifest.tsv", required=("sub",))
    return sorted(manifest["sub"].unique())


def finished(work, name, subs):
    folder = Path(work) / "results" / name
    return all((folder / f"sub-{s}" / "summary.json").is_file() for s in subs)


def run_jobs(args, jobs):
    subjects(args.work)   # bold/manifest.tsv must exist: stage 02 has run
    vqvae = Path(args.work) / "vqvae" / "ckpt.pt"
    if not vqvae.is_file():
        raise InputError(f"{vqvae}: no VQ-VAE checkpoint (run 03_train_vqvae.py first)")
    # The figures refuse results whose record chain is not current (load_run). The stages below
    # remake every link of it but one, the VQ-VAE: one older than its frames (01 ran again since 03)
    # would make every model of the sweep, to be refused at the end. Refused now, before training.
    stale = common.stale_input(args.work, common.read_record(common.record_path(vqvae)))
    if stale:
        raise out_of_date(args.work, vqvae, stale)
    # Every stage runs: each one skips what its records say is up to date, so a configuration whose
    # VQ-VAE, frames or flags changed is made again instead of being kept because its results exist.
    for i, (name, spec) in enumerate(jobs.items(), 1):
        for cmd in commands(args, name, spec):
            print(f"[{i}/{len(jobs)}] {name}: python {shlex.join(cmd)}", flush=True)
            # the script from this repository, its paths as given (relative to the current folder)
            status = subprocess.run([sys.executable, str(REPO / cmd[0]), *cmd[1:]]).returncode
            if status == common.EXIT_INTERRUPTED:
                print(f"07_sweep: {cmd[0]} of configuration {name} was interrupted: re-run to "
                      "resume", file=sys.stderr)
                sys.exit(status)
            if status != 0:
                raise InputError(f"{cmd[0]} failed for configuration {name} (exit {status}; its "
                                 "message is above)")


# --------------------------------------------------------------------------------------------------
# Scaling laws (beyond the paper): brain score as a function of compute, data or parameters
# --------------------------------------------------------------------------------------------------
def saturating_power(x, r_inf, c, alpha):
    """r = r_inf - c x^(-alpha): the score approaches r_inf as x grows, with diminishing returns."""
    return r_inf - c * np.power(x, -alpha)


def fit_log_linear(x, r):
    """Least-squares (a, b) of r = a + b log10 x. x, r: (K,), K >= 2."""
    design = np.stack([np.ones(len(x)), np.log10(x)], 1)                    # (K, 2)
    return np.linalg.lstsq(design, r, rcond=None)[0]


SATURATING_BOUNDS = ([-1.0, 0.0, 1e-3], [2.0, 10.0, 5.0])  # r_inf, c (x / geometric mean), alpha


def geometric_mean(x):
    """The saturating law is fitted to x / geometric_mean(x), for conditioning (x spans decades)."""
    return np.exp(np.log(np.asarray(x, float)).mean())


def fit_saturating_power(x, r):
    """Least-squares (r_inf, c, alpha) of r = r_inf - c x^(-alpha); NaNs when it does not converge
    (K >= 3).

    x is rescaled by its geometric mean for conditioning; c is reported for the original x.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    x, r = np.asarray(x, float), np.asarray(r, float)
    if len(x) < 3:
        return np.full(3, np.nan)
    scale = geometric_mean(x)
    start = (r.max() + 0.05, max(r.max() - r.min(), 1e-3), 0.5)
    try:
        with warnings.catch_warnings():   # 3 points, 3 parameters: no covariance, and none needed
            warnings.simplefilter("ignore", OptimizeWarning)
            (r_inf, c, alpha), _ = curve_fit(saturating_power, x / scale, r, p0=start,
                                             bounds=SATURATING_BOUNDS, maxfev=20000)
    except (RuntimeError, ValueError):
        return np.full(3, np.nan)
    return np.array([r_inf, c * scale ** alpha, alpha])


def saturating_bounds_hit(x, params):
    """The names of the parameters of a fit_saturating_power result that sit on a bound of its
    search: the data did not pin them down (too few points, or no curvature), so their values mean
    little."""
    r_inf, c, alpha = params
    scale = geometric_mean(x)
    searched = (r_inf, c / scale ** alpha, alpha)  # c as the search saw it
    # within 0.1% of the search's width: the optimizer stops near a bound, not on it
    return [name for name, value, low, high
            in zip(("r_inf", "c", "alpha"), searched, *SATURATING_BOUNDS)
            if min(value - low, high - value) <= 1e-3 * (high - low)]


def brain_score(r, kind):
    """(..., S, P) test r of P parcels for S subjects -> (...,): max (median, mean) over parcels,
    mean over subjects."""
    reduce = {"max": np.nanmax, "median": np.nanmedian, "mean": np.nanmean}[kind]
    return reduce(r, axis=-1).mean(-1)


def bootstrap_fits(x, score, samples):
    """Both laws fitted to the brain score of K configurations, with 95% intervals from the score's
    bootstrap resamples.

    x: (K,) compute, data or parameters; score: (K,) the brain score of each configuration;
    samples: (K, n_boot) its block-bootstrap resamples (bootstrap_scores; one resample of the test
    time course applies to every configuration, keeping them paired).
    Returns {"log_linear": {"a": [est, lo, hi], "b": ...}, "saturating_power": {"r_inf": ...,
    "c": ..., "alpha": ...}, "saturating_power_at_bound": the names of the point estimate's
    parameters stuck on a search bound, "samples": {law: (n_ok, n_params) parameters of the
    resamples that converged} (for confidence bands)}.
    """
    laws = {"log_linear": (fit_log_linear, ("a", "b")),
            "saturating_power": (fit_saturating_power, ("r_inf", "c", "alpha"))}
    out = {"samples": {}}
    for law, (fit, names) in laws.items():
        estimate = fit(x, score)
        fitted = np.array([fit(x, sample) for sample in samples.T])                  # (boot, n)
        ok = np.isfinite(fitted).all(1)
        lo, hi = (np.percentile(fitted[ok], [2.5, 97.5], axis=0) if ok.any()
                  else (np.full(len(names), np.nan),) * 2)
        out[law] = {n: [float(e), float(a), float(b)]
                    for n, e, a, b in zip(names, estimate, lo, hi)}
        out["samples"][law] = fitted[ok]
        if law == "saturating_power":
            stuck = saturating_bounds_hit(x, estimate) if np.isfinite(estimate).all() else []
            out["saturating_power_at_bound"] = stuck
    return out


# --------------------------------------------------------------------------------------------------
# Intervals: a block bootstrap of the test time course (beyond the paper)
# --------------------------------------------------------------------------------------------------
# What is random in a test r is the test time course: the same model scored on other test TRs would
# give another r. So the intervals of the max and median r resample that: blocks of BLOCK_TRS
# consecutive test TRs, drawn with replacement within each test run (circularly, so that every TR is
# as likely), r recomputed for every parcel, then the max or median over parcels. Resampling parcels
# instead cannot give an interval for a maximum: no resample's maximum exceeds the observed one.
BLOCK_TRS = 20   # ~30 s at the CNeuroMod TR of 1.49 s: longer than the HRF's autocorrelation


def block_counts(test_run, n_boot, rng, block=BLOCK_TRS):
    """How often each test TR enters each resample, (n_boot, m): each test run of length L is
    rebuilt from ceil(L / block) blocks of `block` consecutive TRs (circular within the run), cut
    to L.
    test_run (m,): the run of each test TR, the TRs of a run contiguous (06's test_run.npy)."""
    _, starts, lengths = np.unique(test_run, return_index=True, return_counts=True)
    counts = np.zeros((n_boot, len(test_run)))
    rows = np.arange(n_boot)[:, None]
    for start, length in zip(starts, lengths):
        size = min(block, length)
        first = rng.integers(0, length, size=(n_boot, -(-length // size)))          # (B, blocks)
        index = ((first[:, :, None] + np.arange(size)) % length).reshape(n_boot, -1)[:, :length]
        np.add.at(counts, (rows, start + index), 1)
    return counts


def resampled_r(y, prediction, counts):
    """Pearson r (n_boot, P) of each column of y and prediction (m, P) over resamples that take test
    TR t counts[b, t] times: weighted sums, without building any resample."""
    n = counts.sum(axis=1, keepdims=True)                                           # (B, 1)
    sum_y, sum_p = counts @ y, counts @ prediction                                  # (B, P)
    cov = counts @ (y * prediction) - sum_y * sum_p / n
    var_y = counts @ (y * y) - sum_y ** 2 / n
    var_p = counts @ (prediction * prediction) - sum_p ** 2 / n
    with np.errstate(invalid="ignore", divide="ignore"):
        return cov / np.sqrt(var_y * var_p)


def bootstrap_scores(test, n_boot, seed=0):
    """{"max": (S, n_boot), "median": (S, n_boot)}: the max and median test r over parcels of each
    subject in n_boot block resamples of its test time course. test: per subject (in order) the dict
    of 06's test_bold (m, P), test_prediction (m, P) and test_run (m,). A subject's resamples depend
    only on its test runs and `seed`: every configuration gets the same ones (paired)."""
    scores = {"max": [], "median": []}
    for index, course in enumerate(test):
        counts = block_counts(course["run"], n_boot, np.random.default_rng([seed, index]))
        r = resampled_r(course["bold"].astype(np.float64), course["prediction"].astype(np.float64),
                        counts)                                                      # (B, P)
        with warnings.catch_warnings():   # all-NaN resamples of a constant prediction: NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            scores["max"].append(np.nanmax(r, axis=1))
            scores["median"].append(np.nanmedian(r, axis=1))
    return {kind: np.stack(values) for kind, values in scores.items()}


def score_interval(run, subject_index, kind):
    """One subject's brain score (max or median r over parcels) and its 95% block-bootstrap
    interval: (est, lo, hi); NaNs when no parcel has an r."""
    r, samples = run["r"][subject_index], run["boot"][kind][subject_index]
    if not np.isfinite(r).any() or not np.isfinite(samples).any():
        return (np.nan,) * 3
    estimate = float(np.nanmax(r) if kind == "max" else np.nanmedian(r))
    return estimate, *np.nanpercentile(samples, [2.5, 97.5]).tolist()


def score_samples(runs, kind):
    """(K, n_boot): each run's brain score (kind over parcels, mean over subjects) in every
    resample."""
    return np.stack([run["boot"][kind].mean(axis=0) for run in runs])


def omitted_fits(x, fit):
    """Why a fitted law is not drawn: {law: reason} for the laws the data do not determine.
    Configurations that share an x (runs of the same compute, say) count once: together they pin a
    single point."""
    reasons = {}
    n = len(np.unique(x))
    if n < 3:
        reasons["log_linear"] = f"{n} distinct x values: a line through 2 points tests nothing"
    r_inf = fit["saturating_power"]["r_inf"][0]
    if n < 4:
        reasons["saturating_power"] = f"{n} distinct x values for 3 parameters"
    elif not np.isfinite(r_inf):
        reasons["saturating_power"] = "the fit did not converge"
    elif fit["saturating_power_at_bound"]:
        stuck = ", ".join(fit["saturating_power_at_bound"])
        reasons["saturating_power"] = f"{stuck} on a bound of the search"
    elif r_inf > 1:
        reasons["saturating_power"] = f"r_inf = {r_inf:.2f} > 1 is not a correlation"
    return reasons


# --------------------------------------------------------------------------------------------------
# Reading finished runs
# --------------------------------------------------------------------------------------------------
SWEEP_STAGES = ("04", "05", "06")   # what a run without --figures-only runs for each configuration


def out_of_date(work, output, stale):
    """The InputError that refuses `output`, made from an input that is gone or no longer the same:
    `stale` is common.stale_input's (the input's name under `work`, the stage that read it)."""
    name, reader = stale
    path = Path(work) / name
    if not path.is_file():
        made = f"made from {path}, which no longer exists"
    else:   # its producer wrote it again (its own record vouches for it), or something changed it
        own = common.read_record(common.record_path(path)) or {}
        again = (own.get("output") or {}).get("sha256") == common.fingerprint(path)["sha256"]
        since = f"{own['stage']} ran again since" if again else "it changed since"
        made = f"made from another {path} than the current one ({since})"
    if reader[:2] < SWEEP_STAGES[0]:   # 03: a stage that this script does not run
        return InputError(f"{output}: {made}: re-run {reader}.py first")
    redo = [stage for stage in SWEEP_STAGES if stage >= reader[:2]]   # the reader and those below
    words = redo[0] if len(redo) == 1 else f"{', '.join(redo[:-1])} and {redo[-1]}"
    # (a missing input is made again by its own stage first, which may be any of them)
    then = f" ({words} then redo{'es' if len(redo) == 1 else ''} it)" if path.is_file() else ""
    return InputError(f"{output}: {made}: re-run 07_sweep.py without --figures-only{then}")


REDO_RESULTS = "re-run 07_sweep.py without --figures-only (06 then redoes it)"


def load_run(work, name, spec, subs, checked=None, asked=None):
    """What the figures need from one job, or None when it has not finished: per subject the
    summary, r (P,) and the significance mask (P,); and, for jobs with a trained model, its training
    log, size and compute (from the checkpoint's record, which 04 writes beside it). Refuses
    (InputError) results whose record chain is not current (04 ran again since 05, say), instead of
    pairing them with the log and compute of another model, and results made with other flags of
    06 than `asked` (ridge_settings'); `checked` is common.stale_input's, shared by the jobs. A
    damaged file is named."""
    work = Path(work)
    if not finished(work, name, subs):
        return None
    folders = {s: work / "results" / name / f"sub-{s}" for s in subs}
    summaries = current_summaries(work, name, folders, checked, asked or {})
    for folder in folders.values():
        if not (folder / "test_run.npy").is_file():
            raise InputError(f"{folder}: made by an older 06_ridge.py, without its test time "
                             f"course (test_bold.npy ...) for the intervals: {REDO_RESULTS}")

    def stacked(file):   # (subjects, ...)
        return np.stack([read_result(f / file) for f in folders.values()])

    run = {"summaries": summaries,
           "test": [{key: read_result(f / f"test_{key}.npy")
                     for key in ("bold", "run", "prediction")} for f in folders.values()],
           "r": stacked("r.npy"), "significant": stacked("significant.npy"),           # (S, P)
           "log": pd.DataFrame(), "params": np.nan, "compute": np.nan, "frames": np.nan,
           "wall_s": np.nan, "steps": np.nan, "epochs": np.nan, "frames_by_subject": {}}
    if spec["kind"] == "partition":   # 06 --with: (subjects, sets, P) and (subjects, P) arrays
        keys = ("unique", "unique_p", "unique_significant", "r2_alone", "r2_all", "shared")
        run["partition"] = {key: stacked(f"{key}.npy") for key in keys}
        run["sets"] = run["summaries"][subs[0]]["partition"]["sets"]
    if spec["model"] is None:
        return run
    model_dir = work / "gpt" / spec["model"]
    record = common.read_record(model_dir / "ckpt.json")
    if record is None or "n_parameters" not in record:
        raise InputError(f"{model_dir / 'ckpt.json'}: no record of the model's size (a checkpoint "
                         "of an older 04_train_gpt.py: re-run it with --overwrite)")
    log = pd.read_csv(model_dir / "log.csv")
    samples_seen = record["settings"]["--batch-size"] * record["step"]
    by_subject = {}                   # the frames of each subject's gameplay the model trained on
    for rep in record["training_repetitions"]:
        sub = rep.get("sub", "?")
        by_subject[sub] = by_subject.get(sub, 0) + rep["frames_used"]
    return dict(run, log=log, params=record["n_parameters"],
                compute=float(record["train_flops_per_sample"]) * samples_seen,
                frames=sum(by_subject.values()), frames_by_subject=by_subject, steps=record["step"],
                epochs=samples_seen / record.get("n_train_samples", np.nan),
                wall_s=float(log["wall_s"].dropna().iloc[-1]) if len(log) else np.nan)


def current_summaries(work, name, folders, checked, asked):
    """{subject: its summary.json (06's record)} of the result `folders` {subject: folder} of job
    `name`, once each is found readable, its record chain current (common.stale_input) and its flags
    of 06 those `asked` (the flags its record holds; the layer and the sets are the job's)."""
    summaries = {}
    for sub, folder in folders.items():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (ValueError, OSError):   # a UnicodeDecodeError is a ValueError
            summary = None
        if not isinstance(summary, dict):
            raise InputError(f"{folder / 'summary.json'}: not a readable summary (truncated or "
                             f"damaged): {REDO_RESULTS}")
        stale = common.stale_input(work, summary, checked)
        if stale:
            raise out_of_date(work, work / "results" / name, stale)
        made = {flag: value for flag, value in summary.get("settings", {}).items() if flag in asked}
        changed = common.changed_settings({"settings": made},
                                          {flag: asked[flag] for flag in made})
        if changed:
            raise InputError(f"{work / 'results' / name}: "
                             f"{common.other_flags_text(summary, asked, changed)} (06's flags): "
                             "pass the --ridge-args it was made with, or redo it without "
                             "--figures-only and with --overwrite among the --ridge-args")
        summaries[sub] = summary
    return summaries


def read_result(path):
    """An array of 06's results, read whole; a damaged file is an InputError naming it."""
    return common.load_npy(path, mmap=False, advice=REDO_RESULTS)


def ridge_settings(args, name, spec):
    """The flags of the 06 command this sweep runs for job `name` (its --ridge-args and the demo's
    included) as 06 records them in summary.json's settings."""
    command = commands(args, name, spec)[-1]
    return common.settings_of(ridge_parser().parse_args(command[1:]), {"with_sets"})


@functools.lru_cache(maxsize=1)
def ridge_parser():
    """06_ridge.py's command line parser (the script is loaded as a module: its name starts with
    a digit)."""
    spec = importlib.util.spec_from_file_location("ridge_stage", REPO / "06_ridge.py")
    ridge = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ridge)
    return ridge.argument_parser()


# --------------------------------------------------------------------------------------------------
# Figures and report
# --------------------------------------------------------------------------------------------------
# the experiments whose x axis is a scale: lines, not bars
SCALE_KNOBS = {"train_frames": "training frames (60 Hz)", "hidden_dim": "hidden size",
               "layers": "layers", "heads": "attention heads"}


def draw_figures(args, per_experiment, jobs):
    """Per experiment: loss curves, scores, brain maps (the paper's Figures 2-6) and the report's
    section; then the scaling laws over every finished configuration. Returns the names of the
    configurations that have not finished: they are left out of every figure, and the report names
    them at its top."""
    import matplotlib
    matplotlib.use("Agg")

    work = Path(args.work)
    figures = work / "figures"
    subs = subjects(work)
    checked = set()   # the inputs found current, shared by the jobs (a model's frames checked once)
    runs = {name: load_run(work, name, spec, subs, checked, ridge_settings(args, name, spec))
            for name, spec in jobs.items()}
    missing = [name for name, run in runs.items() if run is None]
    for name, run in runs.items():   # each seed-0 run also holds the runs of its seeds (--seeds)
        if run is not None:
            run["seed_runs"] = [runs[n] for n in with_seeds(name, args.seeds)
                                if runs.get(n) is not None]
    for run in runs.values():   # the intervals' resamples (the same for every configuration)
        if run is not None:
            run["boot"] = bootstrap_scores(run["test"], args.n_boot)
    report = ["# Scaling experiments", ""]
    if missing:
        report += [f"**Not finished** (left out of every figure): {', '.join(missing)}.", ""]
    report += [f"Brain score: test Pearson r per parcel (06_ridge.py), {args.score} over parcels "
               f"unless said; subjects {', '.join(subs)}; 95% intervals of max and median r "
               f"from {args.n_boot} block-bootstrap resamples of the test time course (blocks of "
               f"{BLOCK_TRS} TRs within each test run, r recomputed per parcel); intervals of "
               "means over parcels from resampling parcels.", ""]
    for experiment, rows in per_experiment.items():
        done = [(value, name, runs[name]) for value, _, name, _ in rows if runs[name] is not None]
        report += experiment_section(args, experiment, done, subs, figures)
        if experiment == "controls":   # and beyond them: the variance partition
            partitions = [runs[name] for name, spec in jobs.items() if spec["kind"] == "partition"]
            report += partition_section(args, partitions, subs, figures)
    # the scaling laws over the paper's configurations (controls, modules: not points of a law)
    paper_runs = {name: runs[name] for experiment, rows in per_experiment.items()
                  if experiment in EXPERIMENTS for _, _, name, _ in rows if runs[name] is not None}
    if len(paper_runs) >= 2:
        report += scaling_section(args, per_experiment, paper_runs, figures)
        report += scaling_maps(per_experiment, paper_runs, work, figures)
    write_lines(figures / "report.md", report)
    print(f"07_sweep: figures and report in {figures}")
    return missing


def experiment_section(args, experiment, done, subs, figures):
    """One experiment's figures and its section of the report (markdown lines): the claim, a
    verdict, the figures and a table. done: (value, name, run) of its finished configurations."""
    knob, _, figure = {**EXPERIMENTS, **EXTRA_EXPERIMENTS}[experiment]   # the demo's are the same
    source = "tested here" if experiment in EXTRA_EXPERIMENTS else "the paper"
    lines = [f"## {experiment}: {knob} ({figure})", "",
             f"**Claim** ({source}): {CLAIMS[experiment]}", ""]
    if not done:
        return lines + ["No finished configuration yet.", ""]
    lines += [f"**Verdict**: {verdict(experiment, knob, done, args)}", ""]
    pictures = []
    if experiment not in EXTRA_EXPERIMENTS:   # the controls without a model have no training loss
        loss_figure(experiment, knob, figure, done, figures / f"{experiment}_loss.png")
        pictures.append(f"{experiment}_loss.png")
    scores_figure(experiment, knob, figure, done, subs, args, figures / f"{experiment}_scores.png")
    pictures.append(f"{experiment}_scores.png")
    lines += [" ".join(f"![]({p})" for p in pictures), "", *score_table(knob, done, subs), ""]
    if experiment != "appendix":   # one brain per module would be a wall of glass brains
        maps_figure(experiment, knob, figure, done, subs, Path(args.work),
                    figures / f"{experiment}_maps.png")
        lines += [f"![]({experiment}_maps.png)", ""]
    if experiment == "precision" and len(done) >= 2:
        lines += precision_table(done, subs, figures)
    if experiment == "data":
        lines += subset_lines(args, done)
    return lines


def subset_lines(args, done):
    """The data experiment's subsets: whose gameplay each data size holds (frames per subject, from
    the checkpoints' records) and, in the authors' order, the confound that makes."""
    subjects = sorted({sub for _, _, run in done for sub in run["frames_by_subject"]})
    lines = ["Whose gameplay each data size holds (60 Hz frames per subject):", "",
             "| train frames | " + " | ".join(f"sub-{s}" for s in subjects) + " |",
             "|" + " --- |" * (len(subjects) + 1)]
    for value, _, run in done:
        counts = [str(run["frames_by_subject"].get(sub, 0)) for sub in subjects]
        lines.append(f"| {value_label(value)} ({run['frames']:.0f}) | " + " | ".join(counts) + " |")
    single = [str(value_label(value)) for value, _, run in done
              if len(run["frames_by_subject"]) == 1 and len(subjects) > 1]
    if args.subset_order == "authors" and single:
        lines += ["", f"In the authors' order, the {', '.join(single)} subsets hold one subject's "
                  "gameplay only: a gain with data size is also a gain in whose gameplay the model "
                  "saw, per subject (`--subset-order balanced` shares every size out evenly)."]
    return lines + [""]


def score_table(knob, done, subs):
    """The report's table: per configuration, each subject's max r, the median r (mean over
    subjects; with --seeds, its spread over the seeds), the training budget and compute, and the
    parcels whose penalty sat on an edge of the ridge's grid (the significant ones there)."""
    header = [knob, *(f"sub-{s} max r" for s in subs), "median r (mean)", "steps (epochs)",
              "compute (FLOPs)", "penalty on the grid's low / high edge (significant)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for value, _, run in done:
        summaries = [run["summaries"][s] for s in subs]
        median = format_r(np.mean([r_of(summary, "r_median") for summary in summaries]))
        if len(run["seed_runs"]) > 1:
            median += f" ({seed_spread(run, 'median')})"
        budget = ("n/a" if not np.isfinite(run["steps"]) else f"{run['steps']:.0f}"
                  + (f" ({run['epochs']:.3g})" if np.isfinite(run["epochs"]) else ""))
        compute = f"{run['compute']:.3g}" if np.isfinite(run["compute"]) else "n/a"
        edges = (f"{sum(x.get('parcels_at_smallest_alpha', 0) for x in summaries)} / "
                 f"{sum(x.get('parcels_at_largest_alpha', 0) for x in summaries)} "
                 f"({sum(x.get('parcels_significant_at_an_edge', 0) for x in summaries)})")
        cells = [format_r(r_of(summary, "r_max")) for summary in summaries]
        lines.append(f"| {value_label(value)} | " + " | ".join(
            [*cells, median, budget, compute, edges]) + " |")
    return lines


def seed_spread(run, kind):
    """The spread of a configuration's brain score (kind over parcels, mean over subjects) over its
    training seeds: 'sd 0.004 over 3 seeds'."""
    scores = [brain_score(seed_run["r"], kind) for seed_run in run["seed_runs"]]
    return f"sd {np.std(scores, ddof=1):.3f} over {len(scores)} seeds"


def r_of(summary, key):
    """A score of 06's summary.json (r_max, r_median): NaN where 06 wrote None (every parcel's r
    undefined, a constant prediction or BOLD)."""
    return np.nan if summary[key] is None else summary[key]


def format_r(value, spec=".3f"):
    """An r for the report: 0.524, or n/a for NaN (no r)."""
    return "n/a" if not np.isfinite(value) else format(value, spec)


def value_label(value):
    """A configuration's value as the figures and the report write it: --train-frames 0 is 'all'."""
    return "all" if value == 0 else value


def knob_value(value, run):
    """The numeric x of a configuration: its knob's value (--train-frames 0, "all", is its frame
    count)."""
    return run["frames"] if value in (0, "all") else value


def save_figure(fig, path, dpi):
    """Write a figure atomically, as every stage writes its outputs (a half-written PNG never
    replaces a good one), and close it."""
    import matplotlib.pyplot as plt
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def write_lines(path, lines):
    """Write markdown lines to `path` atomically."""
    with common.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


def short_number(v):
    """A compact tick label: 2000 -> '2k', 1.5e6 -> '1.5M', 4.6e10 -> '4.6e10'."""
    if abs(v) >= 1e9:
        mantissa, exponent = f"{v:.2g}".split("e")
        return f"{mantissa}e{int(exponent)}"
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g}{unit}"
    return f"{v:g}"


def log_axis(ax, values):
    """A readable log x axis: ticks at the values themselves when they span less than two decades
    (the default minor labels would run into each other), else at powers of ten."""
    import matplotlib.ticker as ticker
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    values = np.unique(np.asarray(values, float))
    if values.max() / values.min() < 100:
        ax.xaxis.set_major_locator(ticker.FixedLocator(values))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: short_number(v)))
    else:
        ax.xaxis.set_major_locator(ticker.LogLocator(base=10, numticks=7))


def verdict(experiment, knob, done, args):
    """One sentence: is the paper's claim supported on this data, from the numbers and their
    intervals."""
    if len(done) < 2:
        return "none yet: fewer than 2 finished configurations."
    undefined = [str(value_label(value)) for value, _, run in done
                 if not np.isfinite(run["r"]).any(axis=-1).all()]
    if undefined:
        return (f"none: {knob} = {', '.join(undefined)} has no r for a subject (every parcel's r "
                "undefined).")
    if experiment == "controls":
        return controls_verdict(done, args)
    if experiment == "appendix":
        return appendix_verdict(done, args)
    if experiment == "precision":
        return precision_verdict(done, args)
    ref = reference_score(args, knob, done)
    margin = args.margin * abs(ref)                        # r per tenfold
    est, lo, hi = trend(knob, done, "median")
    max_est, max_lo, max_hi = trend(knob, done, "max")
    return (f"{claim_word(CLAIM_KIND[experiment], lo, hi, margin)} on this data: the median r "
            f"changes by {est:+.4f} per tenfold {SCALE_KNOBS[knob]} (95% CI [{lo:+.4f}, "
            f"{hi:+.4f}], {len(done)} configurations; no effect: within +-{margin:.4f}, "
            f"{args.margin:g} x the reference's {ref:.3f}){seed_trend_text(knob, done)}; the max r "
            f"(the paper's score) by {max_est:+.3f} [{max_lo:+.3f}, {max_hi:+.3f}].")


def trend(knob, done, kind):
    """The slope of the brain score (kind over parcels, mean over subjects) against log10 of the
    knob, and its 95% block-bootstrap interval: (est, lo, hi)."""
    r = np.stack([run["r"] for _, _, run in done])                                       # (K, S, P)
    x = np.array([knob_value(value, run) for value, _, run in done], float)
    samples = score_samples([run for _, _, run in done], kind)
    return bootstrap_fits(x, brain_score(r, kind), samples)["log_linear"]["b"]


def seed_trend_text(knob, done):
    """With --seeds: the slope of the median r fitted to each seed's runs, their mean and spread
    (training's variance, which the test-time-course interval leaves out); else nothing."""
    n_seeds = min(len(run["seed_runs"]) for _, _, run in done)
    if n_seeds < 2:
        return ""
    x = np.array([knob_value(value, run) for value, _, run in done], float)
    slopes = [fit_log_linear(x, np.array([brain_score(run["seed_runs"][k]["r"], "median")
                                          for _, _, run in done]))[1] for k in range(n_seeds)]
    return (f"; over {n_seeds} training seeds the slope is {np.mean(slopes):+.4f} "
            f"(sd {np.std(slopes, ddof=1):.4f})")


def reference_score(args, knob, done):
    """The median r (mean over subjects) of the experiment's reference, the paper's configuration
    (the demo's with --demo); of the mean over configurations when --values left it out."""
    base = DEMO_CONFIG if args.demo else PAPER_CONFIG
    scores = {value: brain_score(run["r"], "median") for value, _, run in done}
    return scores.get(base[knob], float(np.mean(list(scores.values()))))


def claim_word(kind, lo, hi, margin):
    """The verdict on a claim from the 95% interval [lo, hi] of its effect and the margin of no
    effect. "increase": supported when the interval lies above 0. "no increase", "none", "not
    worse": no effect beyond the margin, supported only when the interval lies inside it (an
    interval that merely holds 0 is absence of evidence, not evidence of absence). Each is "not
    supported" when the interval lies wholly on the other side, else "inconclusive"."""
    if kind == "increase":
        supported, refuted = lo > 0, hi < margin
    elif kind == "no increase":
        supported, refuted = hi < margin, lo > margin
    elif kind == "none":
        supported, refuted = -margin < lo and hi < margin, lo > margin or hi < -margin
    else:   # "not worse"
        supported, refuted = lo > -margin, hi < -margin
    return "supported" if supported else "not supported" if refuted else "inconclusive"


def precision_verdict(done, args):
    """Faster, and not worse beyond the margin: the second precision against the first (the
    reference), on the median r, the max r beside it."""
    (ref_value, _, ref), (value, _, other) = done[0], done[1]
    difference, lo, hi = paired_difference(other, ref, "median")
    max_difference, max_lo, max_hi = paired_difference(other, ref, "max")
    margin = args.margin * abs(brain_score(ref["r"], "median"))
    speedup = ref["wall_s"] / other["wall_s"]
    word = "not supported" if speedup <= 1 else claim_word("not worse", lo, hi, margin)
    seeds = ""
    if min(len(ref["seed_runs"]), len(other["seed_runs"])) > 1:
        per_seed = [brain_score(a["r"], "median") - brain_score(b["r"], "median")
                    for a, b in zip(other["seed_runs"], ref["seed_runs"])]
        seeds = (f"; over {len(per_seed)} training seeds the difference is "
                 f"{np.mean(per_seed):+.4f} (sd {np.std(per_seed, ddof=1):.4f})")
    return (f"{word} on this data: {value} trained {speedup:.2f}x as fast as {ref_value}, and "
            f"its median r differs by {difference:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}]; not "
            f"worse: above -{margin:.4f}, {args.margin:g} x {ref_value}'s median r){seeds}; its "
            f"max r (the paper's score) by {max_difference:+.3f} [{max_lo:+.3f}, {max_hi:+.3f}].")


def paired_difference(a, b, kind):
    """The brain score (max or median r over parcels, mean over subjects) of run `a` minus that of
    run `b`, and its 95% interval from the block bootstrap (the same resamples for both: paired)."""
    samples = score_samples([a, b], kind)
    difference = brain_score(a["r"], kind) - brain_score(b["r"], kind)
    return difference, *np.nanpercentile(samples[0] - samples[1], [2.5, 97.5])


def parcel_paired_difference(a, b, n_boot, seed=0):
    """The mean over parcels (and subjects) of a (S, P) minus that of b (S, P), and its 95% interval
    from resampling parcels (the same resample for both: the parcels are paired)."""
    rng = np.random.default_rng(seed)
    samples = [np.nanmean(a[:, idx]) - np.nanmean(b[:, idx])
               for idx in (rng.integers(0, a.shape[-1], a.shape[-1]) for _ in range(n_boot))]
    return np.nanmean(a) - np.nanmean(b), *np.percentile(samples, [2.5, 97.5])


def interval_word(lo, hi, margin=None):
    """What a difference's 95% interval says: higher, lower, no difference beyond the margin (it
    lies inside +-margin), or inconclusive (it holds 0 but not only small differences)."""
    if lo > 0 or hi < 0:
        return "higher" if lo > 0 else "lower"
    if margin is not None and -margin < lo and hi < margin:
        return f"no difference beyond +-{margin:.3f}"
    return "inconclusive"


def controls_verdict(done, args):
    """Which control wins where: the trained model against each control (max and median r, mean over
    subjects, paired bootstrap intervals), and the best of them per subject."""
    runs = {value: run for value, _, run in done}
    if "trained" not in runs:
        return "none yet: the trained model has not finished."
    sentences = []
    for control in (v for v in runs if v != "trained"):
        parts = []
        for kind in ("median", "max"):
            diff, lo, hi = paired_difference(runs["trained"], runs[control], kind)
            margin = args.margin * abs(brain_score(runs["trained"]["r"], kind))
            parts.append(f"{kind} r {diff:+.3f} (95% CI [{lo:+.3f}, {hi:+.3f}]: "
                         f"{interval_word(lo, hi, margin)})")
        sentences.append(f"against the {control} control, {', '.join(parts)}"
                         + seed_difference_text(runs["trained"], runs[control]))
    best = {s: max(runs, key=lambda v: runs[v]["summaries"][s]["r_max"])
            for s in done[0][2]["summaries"]}
    text = ("the trained model, " + "; ".join(sentences) + ". Best max r: "
            + ", ".join(f"sub-{s} {v}" for s, v in best.items()) + ".")
    if args.ground_truth:
        text += " " + planted_comparison(runs, args)
    if args.demo:
        text += (" On the demo, whose planted signals are the luminance and motion of screen "
                 "quadrants, the low-level control is expected to be strong: it measures exactly "
                 "those.")
    return text


def seed_difference_text(a, b):
    """With --seeds (both runs trained over seeds): the median r of run a minus run b for each
    seed, their mean and spread; else nothing."""
    n_seeds = min(len(a["seed_runs"]), len(b["seed_runs"]))
    if n_seeds < 2:
        return ""
    per_seed = [brain_score(x["r"], "median") - brain_score(y["r"], "median")
                for x, y in zip(a["seed_runs"][:n_seeds], b["seed_runs"][:n_seeds])]
    return (f" (median r over {n_seeds} training seeds: {np.mean(per_seed):+.3f}, "
            f"sd {np.std(per_seed, ddof=1):.3f})")


def planted_comparison(runs, args):
    """The controls on a synthetic dataset's planted parcels only: mean r over them and the
    subjects, and the trained model minus its untrained copy there (paired bootstrap over the
    planted parcels)."""
    planted = common.read_planted_labels(args.ground_truth)
    labels_path = Path(args.work) / "bold" / "labels.tsv"
    labels = read_tsv(labels_path, required=("column", "label")).sort_values("column")
    planted_columns = labels["label"].astype(int).isin(planted).to_numpy()
    columns = np.flatnonzero(planted_columns)                               # BOLD columns
    if len(columns) == 0:
        raise InputError(f"{args.ground_truth}: none of its planted labels is a parcel of "
                         f"{labels_path}")
    means = ", ".join(f"{v} {brain_score(run['r'][:, columns], 'mean'):.3f}"
                      for v, run in runs.items())
    text = (f"On the {len(columns)} planted parcels of {Path(args.ground_truth).name}, mean r: "
            f"{means}.")
    if "untrained" in runs:
        diff, lo, hi = parcel_paired_difference(runs["trained"]["r"][:, columns],
                                                runs["untrained"]["r"][:, columns], args.n_boot)
        margin = args.margin * abs(brain_score(runs["trained"]["r"][:, columns], "mean"))
        text += (f" There, the trained model minus its untrained copy: {diff:+.3f} "
                 f"(95% CI [{lo:+.3f}, {hi:+.3f}]: {interval_word(lo, hi, margin)}).")
    return text


# --------------------------------------------------------------------------------------------------
# Controls, beyond: what the GPT explains beyond low-level vision and button presses
# --------------------------------------------------------------------------------------------------
def partition_section(args, partitions, subs, figures):
    """The report's lines on the variance partition of the trained GPT's features with low-level
    vision and the button presses (06 --with, jobs "<model>+lowlevel+buttons"): per subject the
    parts, where the GPT's unique part lies, and whether training changes it. partitions: the runs
    of the trained and the untrained model's partitions (None: not finished)."""
    trained, untrained = partitions
    lines = ["### What the GPT explains beyond low-level vision and button presses", "",
             "Banded ridge of the GPT's features with low-level vision and the button presses (06 "
             "--with lowlevel buttons; a penalty per feature set), test R^2 per parcel; the unique "
             "part of a set is R^2(all sets) - R^2(all but it), significant by circular shifts of "
             "the test predictions (FDR q < 0.05); intervals of means over parcels from resampling "
             "parcels.", ""]
    if trained is None:
        return lines + ["Not finished yet.", ""]
    partition_figure(partitions, subs, args.n_boot, figures / "controls_partition.png")
    lines += ["![](controls_partition.png)", "", *partition_table(trained, subs), ""]
    lines += top_unique_parcels(trained, Path(args.work), subs)
    if untrained is not None:
        diff, lo, hi = parcel_paired_difference(trained["partition"]["unique"][:, 0],
                                                untrained["partition"]["unique"][:, 0], args.n_boot)
        lines += ["Training: the trained GPT's unique R^2 minus its untrained copy's, mean over "
                  f"parcels and subjects: {diff:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}]: "
                  f"{interval_word(lo, hi)}).", ""]
    if args.ground_truth:
        lines += planted_partition(trained, args)
    return lines


def set_names(run):
    """The feature sets of a partition, the GPT's (--name, first) called GPT."""
    return ["GPT", *run["sets"][1:]]


def mean_interval(values, n_boot, seed=0):
    """The mean of values (S, P) over parcels and subjects, and its 95% interval from resampling
    parcels: (est, lo, hi)."""
    return parcel_paired_difference(values, np.zeros_like(values), n_boot, seed)


def partition_table(run, subs):
    """Per subject: R^2 of all the sets, each set's unique part (mean and max over parcels, parcels
    significant) and the shared part (mean), as a markdown table."""
    part = run["partition"]
    header = ["subject", "R^2 all (mean)",
              *(f"unique {name}: mean, max, significant" for name in set_names(run)),
              "shared (mean)"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for j, s in enumerate(subs):
        cells = [f"{np.nanmean(part['r2_all'][j]):.4f}"]
        for k, unique in enumerate(part["unique"][j]):                               # (P,) per set
            tested = np.isfinite(part["unique_p"][j, k]).any()   # 06 --n-permutations 0: no null
            significant = (f"{int(part['unique_significant'][j, k].sum())}/{unique.size}" if tested
                           else "not tested")
            cells.append(f"{np.nanmean(unique):+.4f}, {np.nanmax(unique):+.4f}, {significant}")
        cells.append(f"{np.nanmean(part['shared'][j]):+.4f}")
        lines.append(f"| sub-{s} | " + " | ".join(cells) + " |")
    return lines


def top_unique_parcels(run, work, subs, n=10):
    """Where the GPT's unique part lies: the n parcels of largest unique R^2 (mean over subjects),
    by atlas label and name, with the subjects where it is significant."""
    labels = read_tsv(work / "bold" / "labels.tsv", required=("column", "label"))
    labels = labels.sort_values("column")
    names = labels["name"].fillna("").tolist() if "name" in labels else [""] * len(labels)
    unique = np.nanmean(run["partition"]["unique"][:, 0], axis=0)                      # (P,)
    significant = run["partition"]["unique_significant"][:, 0].sum(axis=0)             # (P,)
    lines = [f"The {n} parcels where the GPT's unique R^2 is largest (mean over subjects):", "",
             "| parcel (atlas label) | name | unique R^2 | significant in |",
             "| --- | --- | --- | --- |"]
    for column in np.argsort(-np.nan_to_num(unique, nan=-np.inf))[:n]:
        lines.append(f"| {labels['label'].iloc[column]} | {names[column]} | "
                     f"{unique[column]:+.4f} | "
                     f"{int(significant[column])} of {len(subs)} subjects |")
    return lines + [""]


def planted_partition(run, args):
    """On a synthetic dataset: each set's mean R^2 alone and unique R^2 over the planted visual
    parcels, with their intervals (resampling them), and each set's R^2 alone on the parcels planted
    on button presses."""
    labels = read_tsv(Path(args.work) / "bold" / "labels.tsv", required=("column", "label"))
    labels = labels.sort_values("column")["label"].astype(int)
    part, names, lines = run["partition"], set_names(run), []

    def per_set(key, columns):   # "GPT +0.0019 (95% CI [-0.0015, +0.0067]), lowlevel ..."
        texts = []
        for k, name in enumerate(names):
            estimate, lo, hi = mean_interval(part[key][:, k, columns], args.n_boot)
            texts.append(f"{name} {estimate:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}])")
        return ", ".join(texts)

    visual = np.flatnonzero(labels.isin(common.read_planted_labels(args.ground_truth)).to_numpy())
    if len(visual):
        lines += [f"On the {len(visual)} planted visual parcels, mean R^2 of each set alone: "
                  f"{per_set('r2_alone', visual)}; mean unique R^2: "
                  f"{per_set('unique', visual)}.", ""]
    planted_buttons = common.read_planted_labels(args.ground_truth, "planted_buttons")
    buttons = np.flatnonzero(labels.isin(planted_buttons).to_numpy())
    if len(buttons):
        alone = ", ".join(f"{name} {np.nanmean(part['r2_alone'][:, k, buttons]):+.3f}"
                          for k, name in enumerate(names))
        lines += [f"On the {len(buttons)} parcel(s) planted on button presses, R^2 of each set "
                  f"alone (mean over subjects): {alone}.", ""]
    return lines


def partition_figure(partitions, subs, n_boot, path):
    """controls_partition.png: per model (trained, untrained) and subject, the mean over parcels of
    R^2 with all the sets, each set's unique part and the shared part, with 95% intervals over
    parcels."""
    import matplotlib.pyplot as plt
    finished = [(label, run) for label, run in zip(("trained GPT", "untrained GPT"), partitions)
                if run is not None]
    fig, axes = plt.subplots(1, len(finished), figsize=(6 * len(finished), 4), squeeze=False,
                             sharey=True)
    for ax, (label, run) in zip(axes[0], finished):
        part = run["partition"]
        unique = [(f"unique {name}", part["unique"][:, k]) for k, name in enumerate(set_names(run))]
        bars = [("all sets", part["r2_all"]), *unique, ("shared", part["shared"])]
        width = 0.8 / len(bars)
        for b, (name, values) in enumerate(bars):                                     # (S, P)
            mean, lo, hi = np.array([mean_interval(values[j:j + 1], n_boot)
                                     for j in range(len(subs))]).T
            ax.bar(np.arange(len(subs)) + b * width, mean, width, label=name,
                   yerr=np.maximum([mean - lo, hi - mean], 0), capsize=2)
        ax.set_xticks(np.arange(len(subs)) + 0.4 - width / 2, [f"sub-{s}" for s in subs])
        ax.axhline(0, color="0.7", linewidth=0.8)
        ax.set(ylabel="test R^2, mean over parcels", title=label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def appendix_verdict(done, args):
    """Appendix A: where the output of the block's MLP branch (post_fc_dp) ranks among its
    modules."""
    scores = {value: brain_score(run["r"], args.score) for value, _, run in done}
    modules = {v: s for v, s in scores.items() if "." in v}   # "4.post_fc_dp"; block outputs: "4"
    if not modules:
        return "none yet: no module of the block has finished."
    ranked = sorted(modules, key=modules.get, reverse=True)
    paper = next((v for v in ranked if v.endswith(".post_fc_dp")), None)
    if paper is None:
        return (f"no verdict: post_fc_dp has not finished; best so far {ranked[0]} "
                f"({modules[ranked[0]]:.3f}).")
    rank = ranked.index(paper) + 1
    depth = sorted((int(v), s) for v, s in scores.items() if "." not in v)   # (block, score)
    profile = (f" Block outputs, first to last: {', '.join(f'{s:.3f}' for _, s in depth)}."
               if depth else "")
    return (f"{'supported' if rank == 1 else 'not supported'} on this data: post_fc_dp ranks "
            f"{rank} of {len(ranked)} modules by {args.score} r ({modules[paper]:.3f}; best "
            f"{ranked[0]}, {modules[ranked[0]]:.3f}).{profile}")


def panel(figure, letter):
    """'Figure 3', 'b' -> 'Figure 3b', the paper's panel; other captions are kept as they are."""
    return f"{figure}{letter}" if figure.startswith("Figure ") and figure[7:].isdigit() else figure


def loss_figure(experiment, knob, figure, done, path):
    """(a) of the paper's figure: training (solid) and validation (dashed) cross-entropy per
    configuration."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for value, name, run in done:   # against epochs, as the paper's panels (a)
        line, = ax.plot(run["log"]["epoch"], run["log"]["train_loss"],
                        label=f"{knob} = {value_label(value)}")
        val = run["log"].dropna(subset=["val_loss"])
        ax.plot(val["epoch"], val["val_loss"], "--o", markersize=3, color=line.get_color())
    ax.set(xlabel="epoch (passes over the training samples)",
           ylabel="cross-entropy (nats per code)",
           title=f"GPT loss, {experiment} ({panel(figure, 'a')}): train solid, validation dashed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def scores_figure(experiment, knob, figure, done, subs, args, path):
    """(b): max and median r per subject with 95% bootstrap intervals over parcels and the
    permutation null's 95% level (dotted); lines over the scale when the knob is one, bars
    otherwise."""
    import matplotlib.pyplot as plt
    many = len(done) > 6   # the modules of appendix A: one panel above the other, labels turned
    size = (max(9, 0.4 * len(done) * len(subs) + 2), 9) if many else (11, 4.6)
    fig, axes = plt.subplots(2 if many else 1, 1 if many else 2, figsize=size)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, kind in zip(axes, ("max", "median")):
        for j, s in enumerate(subs):
            scores = np.array([score_interval(run, j, kind)
                               for _, _, run in done])                                 # (K, 3)
            # (an interval from resamples may leave out its estimate: its bar then stops there)
            errors = np.maximum([scores[:, 0] - scores[:, 1], scores[:, 2] - scores[:, 0]], 0)
            nulls = [(run["summaries"][s].get("null") or {}).get(f"{kind}_r_95")
                     for _, _, run in done]
            style = dict(color=colors[j % len(colors)], capsize=3, label=f"sub-{s}")
            if knob in SCALE_KNOBS:
                x = np.array([knob_value(value, run) for value, _, run in done], float)
                ax.errorbar(x, scores[:, 0], yerr=errors, fmt="-o", **style)
                if all(n is not None for n in nulls):
                    ax.plot(x, nulls, ":", color=style["color"], label=f"sub-{s} null 95%")
            else:
                width = 0.8 / len(subs)
                x = np.arange(len(done)) + j * width
                ax.bar(x, scores[:, 0], width, yerr=errors, **style)
                for xi, n in zip(x, nulls):
                    if n is not None:
                        ax.hlines(n, xi - width / 2, xi + width / 2, colors="k", linestyles=":")
        scores_x_axis(ax, knob, done, subs, many)
        ax.set(ylabel=f"{kind} test r over parcels", title=f"{kind} r ({panel(figure, 'b')})")
        ax.axhline(0, color="0.7", linewidth=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def scores_x_axis(ax, knob, done, subs, many):
    """The x axis of a scores panel: the knob's scale, or one group of bars per configuration (their
    labels turned when there are `many`)."""
    if knob in SCALE_KNOBS:
        values = [knob_value(value, run) for value, _, run in done]
        if knob in ("train_frames", "hidden_dim"):   # scales spanning decades
            log_axis(ax, values)
        else:
            ax.set_xticks(values)
        ax.set_xlabel(SCALE_KNOBS[knob])
    else:
        ax.set_xticks(np.arange(len(done)) + 0.4 - 0.4 / len(subs),
                      [str(value) for value, _, _ in done],
                      rotation=60 if many else 0, ha="right" if many else "center")
        ax.set_xlabel(f"{knob} (dotted: the permutation null's 95% level)")


def parcel_atlas(work):
    """The parcels on the BOLD grid: (labels, paint). labels: bold/labels.tsv in BOLD column order;
    paint(values (P,), one per column) -> a NIfTI image of the atlas holding each parcel's value, 0
    outside the parcels."""
    import nibabel as nib
    atlas = common.load_nifti(work / "bold" / "atlas.nii.gz")
    grid = np.asarray(atlas.dataobj).astype(np.int64)                      # (X, Y, Z) atlas labels
    labels = read_tsv(work / "bold" / "labels.tsv", required=("column", "label"))
    labels = labels.sort_values("column")
    label_of_column = labels["label"].astype(int).to_numpy()              # (P,)

    def paint(values):
        by_label = np.zeros(max(grid.max(), label_of_column.max()) + 1, np.float32)
        by_label[label_of_column] = values
        return nib.Nifti1Image(by_label[grid], atlas.affine)

    return labels, paint


def maps_figure(experiment, knob, figure, done, subs, work, path):
    """(c): glass brains of test r, one row per configuration, one column per subject, one symmetric
    colour scale with its colorbar; parcels not significant (FDR, 06) are faded."""
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from nilearn import plotting

    _, paint = parcel_atlas(work)
    vmax = max(float(np.abs(np.nan_to_num(run["r"])).max()) for _, _, run in done) or 1.0
    width = max(3.4 * len(subs) + 0.8, 6.0)   # room for the title with one subject
    fig, axes = plt.subplots(len(done), len(subs), figsize=(width, 2.9 * len(done) + 0.4),
                             squeeze=False)
    tested = all(run["summaries"][s].get("null") for _, _, run in done for s in subs)
    for k, (value, name, run) in enumerate(done):
        for j, s in enumerate(subs):
            r = np.nan_to_num(run["r"][j])
            shown = run["significant"][j] if tested else np.ones(len(r), bool)
            display = plotting.plot_glass_brain(
                None, axes=axes[k, j], display_mode="z", plot_abs=False,
                title=f"sub-{s}, {knob} = {value_label(value)}")
            faded, bright = np.where(shown, 0, r), np.where(shown, r, 0)
            for values, transparency in ((faded, 0.3), (bright, 1.0)):
                if values.any():   # else nothing to draw (nilearn would warn "empty mask")
                    display.add_overlay(paint(values), cmap="cold_hot", vmin=-vmax, vmax=vmax,
                                        threshold=1e-6, transparency=transparency)
    fig.subplots_adjust(right=1 - 0.8 / fig.get_figwidth())
    bar = fig.add_axes([1 - 0.65 / fig.get_figwidth(), 0.15, 0.15 / fig.get_figwidth(), 0.7])
    fig.colorbar(ScalarMappable(Normalize(-vmax, vmax), "cold_hot"), cax=bar, label="test r")
    tests = ("faded parcels are not significant (FDR q < 0.05)" if tested
             else "no significance tested (06 --n-permutations 0)")
    fig.suptitle(f"{experiment} ({panel(figure, 'c')}): test r; {tests}", fontsize=10)
    save_figure(fig, path, dpi=90)


def precision_table(done, subs, figures):
    """precision.md: per precision its training time, its speedup over the first and its max r minus
    the first's (mean over subjects). Returns the report's lines."""
    (ref_value, _, ref), others = done[0], done[1:]
    lines = ["| precision | training time (s) | speedup | max r difference (mean over subjects) |",
             "| --- | --- | --- | --- |", f"| {ref_value} | {ref['wall_s']:.0f} | 1.00 | 0 |"]
    for value, _, run in others:
        diff = np.mean([r_of(run["summaries"][s], "r_max") - r_of(ref["summaries"][s], "r_max")
                        for s in subs])
        speedup = ref["wall_s"] / run["wall_s"]
        lines.append(f"| {value} | {run['wall_s']:.0f} | {speedup:.2f} | "
                     f"{format_r(diff, '+.3f')} |")
    write_lines(figures / "precision.md", lines)
    return ["Precision (paper Figure 6):", "", *lines, ""]


def scaling_section(args, per_experiment, runs, figures):
    """Brain score against compute (every run), data (data experiment) and parameters (hidden
    experiment), with both laws and their 95% bands where the data determine them (the figure says
    why not, otherwise): scaling.png, scaling.json, and the report's lines."""
    import matplotlib.pyplot as plt

    axes_spec = [("compute", "training compute (FLOPs)", list(runs))]
    for experiment, key, label in (("data", "frames", "training frames (60 Hz)"),
                                   ("hidden", "params", "GPT parameters")):
        axes_spec.append((key, label, [name for _, _, name, _ in per_experiment.get(experiment, [])
                                       if name in runs]))
    fits = {}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, (key, label, names) in zip(axes, axes_spec):
        names = [n for n in names if np.isfinite(runs[n][key]) and runs[n][key] > 0]
        ax.set(xlabel=label, ylabel=f"{args.score} r (mean over subjects)")
        if len({runs[n][key] for n in names}) < 2:   # e.g. every data size with the same compute
            ax.text(0.5, 0.5, f"{label}:\nfewer than 2 finished configurations with distinct "
                    "values", ha="center", va="center", transform=ax.transAxes)
            ax.axis("off")
            continue
        x = np.array([runs[n][key] for n in names], float)                            # (K,)
        fit, samples = fit_laws(x, [runs[n] for n in names], args.score)
        fits[key] = {"runs": names, **fit}
        draw_laws(ax, x, fit, samples)
    fig.tight_layout()
    save_figure(fig, figures / "scaling.png", dpi=120)
    common.write_json(figures / "scaling.json", fits)
    return scaling_report(args, fits)


def fit_laws(x, runs, kind):
    """Both laws on one axis, x (K,) and the K runs: (the fit as scaling.json keeps it, {law:
    (n, n_params) parameters of the bootstrap resamples}). A law the data do not determine keeps no
    estimate worth keeping: only the reason, under "omitted"."""
    score = np.array([brain_score(run["r"], kind) for run in runs])                    # (K,)
    fit = bootstrap_fits(x, score, score_samples(runs, kind))
    samples = fit.pop("samples")
    omitted = omitted_fits(x, fit)
    kept = {law: value for law, value in fit.items() if law not in omitted}
    fit = {"x": x.tolist(), "score": score.tolist(), **kept, "omitted": omitted}
    return fit, samples


def draw_laws(ax, x, fit, samples):
    """One panel of scaling.png: the brain score of each configuration against x (K,), each law that
    was kept with its 95% band, and why the others are not drawn."""
    grid = np.geomspace(x.min(), x.max(), 100)
    curves = {"log_linear": lambda p: p[0] + p[1] * np.log10(grid),
              "saturating_power": lambda p: saturating_power(grid, *p)}
    ax.scatter(x, fit["score"], color="k", zorder=3)
    for law, style in (("log_linear", "-"), ("saturating_power", "--")):
        if law not in fit or not len(samples[law]):
            continue
        estimate = [value[0] for value in fit[law].values()]
        band = np.percentile([curves[law](p) for p in samples[law]], [2.5, 97.5], axis=0)
        label = (f"r = {estimate[0]:.3f} + {estimate[1]:.3f} log10 x" if law == "log_linear"
                 else f"r_inf = {estimate[0]:.3f}, alpha = {estimate[2]:.2f}")
        line, = ax.plot(grid, curves[law](estimate), style, label=label)
        ax.fill_between(grid, *band, color=line.get_color(), alpha=0.2)
    if fit["omitted"]:
        why = "; ".join(f"{law.replace('_', ' ')} ({why})" for law, why in fit["omitted"].items())
        ax.text(0.02, 0.02, "not drawn: " + why, transform=ax.transAxes, fontsize=7, va="bottom",
                wrap=True)
    log_axis(ax, x)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper left")


def scaling_report(args, fits):
    """The report's section on the scaling laws: every estimate with its interval, then the laws not
    drawn and why."""
    lines = ["## Scaling laws (beyond the paper)", "", "![](scaling.png)", "",
             f"Brain score = {args.score} r over parcels, mean over subjects; 95% intervals and "
             f"bands from {args.n_boot} block-bootstrap resamples of the test time course, the "
             "same for every configuration. "
             "Compute = FLOPs of one training sample (forward + backward, counted by torch) x "
             "samples seen.", "",
             "| x | law | parameter | estimate | 95% interval |", "| --- | --- | --- | --- | --- |"]
    for key, fit in fits.items():
        for law in ("log_linear", "saturating_power"):
            for param, (est, lo, hi) in fit.get(law, {}).items():   # an omitted law has no estimate
                stuck = (" (on a search bound)" if law == "saturating_power"
                         and param in fit["saturating_power_at_bound"] else "")
                lines.append(f"| {key} | {law} | {param} | {est:.4g}{stuck} | "
                             f"[{lo:.4g}, {hi:.4g}] |")
    for key, fit in fits.items():
        for law, why in fit["omitted"].items():
            lines.append(f"- {key}: the {law.replace('_', ' ')} law is not drawn: {why}.")
    return lines + [""]


def parcel_slopes(x, r):
    """Least-squares slope of r against log10 x for every parcel: x (K,), r (K, P) -> (P,)."""
    lx = np.log10(x) - np.log10(x).mean()                                        # (K,)
    return lx @ (r - r.mean(axis=0)) / (lx @ lx)


def slope_permutation_test(x, r, n_permutations=1000, seed=0):
    """One-sided p-values (P,) that a parcel's r grows with x more than chance: the configurations'
    x are permuted. When K! <= n_permutations every permutation is used, the identity included (an
    exact test: the smallest possible p-value is 1 / K!); otherwise n_permutations random ones, and
    the observed order is added to them (the smallest p-value is then 1 / (n_permutations + 1))."""
    from itertools import permutations
    k = len(x)
    observed = parcel_slopes(x, r)
    if math.factorial(k) <= n_permutations:
        null = np.stack([parcel_slopes(np.asarray(x)[list(order)], r)
                         for order in permutations(range(k))])                   # (K!, P)
        return observed, (null >= observed - 1e-12).mean(axis=0)   # the identity counts itself
    orders = [np.random.default_rng([seed, i]).permutation(k) for i in range(n_permutations)]
    null = np.stack([parcel_slopes(np.asarray(x)[order], r) for order in orders])   # (n, P)
    return observed, (1 + (null >= observed - 1e-12).sum(axis=0)) / (1 + len(null))


def scaling_maps(per_experiment, runs, work, figures):
    """Where scaling pays (beyond the paper): for the data and hidden experiments, the slope of each
    parcel's r (mean over subjects) against log10 of training compute (or of the knob, when the
    compute does not vary), as a NIfTI map and a glass brain; which slopes are significant
    (permutation of the configurations, Benjamini-Hochberg); and the 10 parcels that gain most, by
    atlas label. Returns the report's lines."""
    labels, paint = parcel_atlas(work)
    lines = ["## Where scaling pays (beyond the paper)", ""]
    for experiment, key in (("data", "frames"), ("hidden", "params")):
        names = [name for _, _, name, _ in per_experiment.get(experiment, []) if name in runs]
        if len(names) < 3:
            continue
        x, what = slope_axis(runs, names, key)
        r = np.stack([np.nan_to_num(runs[n]["r"]).mean(axis=0) for n in names])   # (K, P)
        slopes, p_values = slope_permutation_test(x, r)
        save_slope_map(experiment, what, paint(slopes), slopes, figures)
        lines += slope_report(experiment, what, x, slopes, p_values, labels)
    return lines


def slope_axis(runs, names, key):
    """The x of the slopes, (K,), and its name: the training compute when it differs between every
    configuration, else the knob's `key` (frames or params)."""
    computes = np.array([runs[n]["compute"] for n in names])
    if np.isfinite(computes).all() and len(np.unique(computes)) == len(computes):
        return computes, "training compute"
    x = np.array([runs[n][key] for n in names], float)
    return x, {"frames": "training frames", "params": "parameters"}[key]


def save_slope_map(experiment, what, image, slopes, figures):
    """<experiment>_slope.nii.gz, the parcels' slopes (P,) painted on the atlas (`image`), and its
    glass brain, <experiment>_slope.png."""
    import matplotlib.pyplot as plt
    from nilearn import plotting

    with common.atomic_path(figures / f"{experiment}_slope.nii.gz") as tmp:
        image.to_filename(tmp)
    fig = plt.figure(figsize=(8, 3.2))
    vmax = float(np.abs(slopes).max()) or 1.0
    plotting.plot_glass_brain(image, figure=fig, display_mode="lzr", plot_abs=False, colorbar=True,
                              vmin=-vmax, vmax=vmax, threshold=0, cmap="cold_hot",
                              title=f"{experiment}: change of r per tenfold {what}")
    save_figure(fig, figures / f"{experiment}_slope.png", dpi=100)


def slope_report(experiment, what, x, slopes, p_values, labels):
    """The report's lines on one experiment's slopes: how many parcels' r grows with x above chance,
    and the 10 parcels whose r grows most."""
    from scipy.stats import false_discovery_control

    q_values = false_discovery_control(p_values)
    orders = math.factorial(len(x))
    smallest = 1 / orders if orders <= 1000 else 1 / 1001   # slope_permutation_test's 1000
    names = labels["name"].fillna("").tolist() if "name" in labels else [""] * len(labels)
    lines = [f"### {experiment}: r against log10 {what} ({len(x)} configurations)", "",
             f"![]({experiment}_slope.png) (map: `{experiment}_slope.nii.gz`)", "",
             f"{int((q_values < 0.05).sum())} of {len(slopes)} parcels have a slope above chance "
             "(one-sided permutation of the configurations, Benjamini-Hochberg q < 0.05; with "
             f"{len(x)} configurations the smallest p-value possible is {smallest:.3g}).", "",
             "| parcel (atlas label) | name | slope (r per tenfold) | p | q |",
             "| --- | --- | --- | --- | --- |"]
    for j in np.argsort(-slopes)[:10]:
        lines.append(f"| {labels['label'].iloc[j]} | {names[j]} | {slopes[j]:+.3f} | "
                     f"{p_values[j]:.3g} | {q_values[j]:.3g} |")
    return lines + [""]


def main(argv=None):
    args = parse_args(argv)
    per_experiment, jobs = plan(args)
    if args.dry_run:
        print_jobs(args, jobs)
        return
    if not args.figures_only:
        run_jobs(args, jobs)
    missing = draw_figures(args, per_experiment, jobs)
    if missing:   # e.g. submit_sweep.sh's figures job after a failed chain: it fails too
        print(f"07_sweep: {len(missing)} configuration(s) not finished, left out of every figure: "
              f"{', '.join(missing)}", file=sys.stderr)
        sys.exit(common.EXIT_SOME_FAILED)


if __name__ == "__main__":
    run_main(main)
