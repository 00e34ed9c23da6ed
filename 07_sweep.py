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
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import common
import sweep_report
from common import DEFAULT_WORK, InputError, read_tsv, run_main
from controls import EXTRA_EXPERIMENTS, appendix_layers, partition_with
from paper.experiments import EXPERIMENTS, PAPER_CONFIG, feature_layer
from significance import bootstrap_scores

REPO = Path(__file__).resolve().parent
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
            others = partition_with(args.work)   # no buttons in a movie
            if "buttons" in others:
                add(rows, "button presses", "buttons", job(base, "buttons", "buttons"))
            for model in (name, name + "-untrained"):   # beyond low-level vision and the buttons
                jobs[f"{model}+{'+'.join(others)}"] = job(base, layer, "partition", model,
                                                          needs=(model, *others))
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
        ridge += ["--with", *spec["needs"][1:]]
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


def run_stage(argv):
    """Run one stage in a process group of its own and wait for it; returns (its exit status, the
    name of the first signal 07 got meanwhile, or None). SIGINT and SIGTERM to 07 (Ctrl-C reaches
    07's group only) are passed to the stage, which stops where it is safe (04 saves a checkpoint
    and exits 75), and 07 waits for it, as run_all.sh does: subprocess.run would kill the stage
    a quarter of a second after a Ctrl-C, before its checkpoint."""
    received, stage = [], None

    def pass_on(signum, frame):
        received.append(signal.Signals(signum).name)
        if stage is not None:   # else: passed on as soon as the stage has started
            print(f"07_sweep: {received[-1]}: passed to {Path(argv[1]).name} (pid {stage.pid}); "
                  "waiting for it to stop", file=sys.stderr, flush=True)
            stage.send_signal(signum)

    previous = {signum: signal.signal(signum, pass_on)
                for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        stage = subprocess.Popen(argv, start_new_session=True)
        if received:
            pass_on(signal.Signals[received.pop()], None)
        status = stage.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:   # what the stage left running (a pool's workers) stops with it
        try:
            os.killpg(stage.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return status, (received[0] if received else None)


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
            status, signalled = run_stage([sys.executable, str(REPO / cmd[0]), *cmd[1:]])
            if status == common.EXIT_INTERRUPTED:
                print(f"07_sweep: {cmd[0]} of configuration {name} was interrupted: re-run to "
                      "resume", file=sys.stderr)
                sys.exit(status)
            if signalled:   # it stopped, or it had finished before the signal reached it
                print(f"07_sweep: {signalled}: stopped after {cmd[0]} of configuration {name} "
                      f"(exit {status}): re-run to go on", file=sys.stderr)
                sys.exit(status or 128 + signal.Signals[signalled])
            if status != 0:
                raise InputError(f"{cmd[0]} failed for configuration {name} (exit {status}; its "
                                 "message is above)")


# --------------------------------------------------------------------------------------------------
# Scaling laws (beyond the paper): brain score as a function of compute, data or parameters
# --------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------
# Intervals: a block bootstrap of the test time course (beyond the paper)
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Controls, beyond: what the GPT explains beyond low-level vision and button presses
# --------------------------------------------------------------------------------------------------


def draw_figures(args, per_experiment, jobs):
    """Read every finished configuration (load_run), then draw the figures and write the report
    (sweep_report). Returns the names of the configurations that have not finished: they are left
    out of every figure, and the report names them at its top."""
    work = Path(args.work)
    subs = subjects(work)
    checked = set()   # the inputs found current, shared by the jobs (a model's frames checked once)
    runs = {name: load_run(work, name, spec, subs, checked, ridge_settings(args, name, spec))
            for name, spec in jobs.items()}
    missing = [name for name, run in runs.items() if run is None]
    for name, run in runs.items():   # each seed-0 run also holds the runs of its seeds (--seeds)
        if run is not None:
            run["seed_runs"] = [runs[n] for n in with_seeds(name, args.seeds)
                                if runs.get(n) is not None]
            run["boot"] = bootstrap_scores(run["test"], args.n_boot)   # the same resamples for all
    base = DEMO_CONFIG if args.demo else PAPER_CONFIG
    sweep_report.write_report(args, base, per_experiment, jobs, runs, subs, missing)
    print(f"07_sweep: figures and report in {work / 'figures'}")
    return missing


REDO_RESULTS = "re-run 07_sweep.py without --figures-only (06 then redoes it)"


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
