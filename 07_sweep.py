"""07 — The paper's scaling experiments in one command, their figures, and fitted scaling laws.

    python 07_sweep.py --work work --dry-run                        # list the jobs of every experiment
    python 07_sweep.py --work work --experiments data hidden        # run them (04 -> 05 -> 06 per config)
    python 07_sweep.py --work work --demo                           # tiny configurations, CPU, minutes
    python 07_sweep.py --work work --figures-only                   # figures + report from finished runs
    bash slurm/submit_sweep.sh                                      # one SLURM job chain per configuration

Experiments (paper section 2.4; each varies one knob of the paper configuration, Table 2(b)):
    data       --train-frames 10k, 100k, 1M, 6M 60 Hz frames          (Figure 2)
    hidden     --hidden-dim 6, 15, 30, 63, 126, 255, 576, 1023          (Figure 3; the paper's 1024)
    layers     --layers 1, 2, 4, 8, 16; features of the last block     (Figure 4, Table 3)
    heads      --heads 1, 2, 4, 8                                       (Figure 5)
    precision  --precision fp32, fp16: training time and brain score    (Figure 6)
A configuration shared by several experiments (the paper model appears in all five) trains once. Its
name spells it out, e.g. h576-l8-a4-f6M-fp32, and names its folders: gpt/<name>/, features/<name>/,
results/<name>/. Each stage of a configuration skips what its records vouch for (see the README). The
frozen VQ-VAE (<work>/vqvae/ckpt.pt) and the parcel time series (<work>/bold/) must exist: run stages
01-03 first.

Figures (<work>/figures/): <experiment>_loss.png (GPT train/validation loss, Fig. 2a-6a),
<experiment>_scores.png (per-subject max and median r, Fig. 2b-6b), <experiment>_maps.png (r maps,
Fig. 2c-6c), precision.md (time, speedup, r difference), scaling.png + scaling.json (beyond the paper:
brain score against training compute, data and parameters, with r = a + b log10 x and r = r_inf - c x^-alpha
fitted and 95% bootstrap intervals over parcels), report.md tying each figure to the claim it tests.
"""
import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import common
from common import DEFAULT_WORK, PAPER_LAYER, InputError, read_tsv, run_main

REPO = Path(__file__).resolve().parent
PAPER_CONFIG = {"hidden_dim": 576, "layers": 8, "heads": 4, "train_frames": 6_000_000, "precision": "fp32"}
EXPERIMENTS = {  # experiment -> (knob, values, the paper's figure)
    "data": ("train_frames", [10_000, 100_000, 1_000_000, 6_000_000], "Figure 2"),
    # The paper lists 1024 but also requires a multiple of 3 (VideoGPT's position tables split the width over
    # t, h, w), which 1024 is not: 1023 is the nearest width that builds.
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
DEMO_TRAIN_ARGS = ("--device cpu --cond-dim 24 --max-steps 80 --batch-size 16 --log-every 10 --val-every 40 "
                   "--val-samples 32 --ckpt-every 80")
DEMO_EXTRACT_ARGS = "--device cpu"
# ~300 training TRs x a few thousand standardized features need stronger penalties than the paper's grid.
DEMO_RIDGE_ARGS = "--alphas 1e2 1e3 1e4 1e5 1e6 1e7 1e8 --n-permutations 100"
CLAIMS = {
    "data": "Scaling up the training data of VideoGPT improves brain encoding (section 3.1).",
    "hidden": "Scaling up the hidden dimension improves brain encoding (section 3.2).",
    "layers": "More layers do not reliably improve brain encoding (section 3.3).",
    "heads": "The number of attention heads has a modest effect on brain encoding (section 3.4).",
    "precision": "fp16 mixed precision trains faster without hurting brain encoding (section 3.5).",
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--experiments", nargs="+", default=list(EXPERIMENTS), choices=list(EXPERIMENTS))
    p.add_argument("--demo", action="store_true", help="tiny configurations for the demo (CPU)")
    p.add_argument("--dry-run", action="store_true", help="print the jobs (one line per stage) and exit")
    p.add_argument("--jobs-tsv", action="store_true", help="with --dry-run: print name, 04, 05, 06 commands as TSV")
    p.add_argument("--figures-only", action="store_true", help="skip training; draw figures from finished runs")
    p.add_argument("--train-args", default="", help="extra flags for 04_train_gpt.py, e.g. '--max-steps 200000'")
    p.add_argument("--extract-args", default="", help="extra flags for 05_extract.py")
    p.add_argument("--ridge-args", default="", help="extra flags for 06_ridge.py")
    p.add_argument("--score", choices=("max", "median"), default="max",
                   help="brain score for the scaling laws: max r over parcels (as the paper) or median r")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of parcels")
    return p.parse_args()


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
    return f"h{c['hidden_dim']}-l{c['layers']}-a{c['heads']}-f{short_count(c['train_frames'])}-{c['precision']}"


def feature_layer(config, experiment):
    """The paper's layer (block 4 of 8); the last block in the depth sweep (Table 3) or when there is no
    block 4."""
    if experiment == "layers" or config["layers"] <= 4:
        return f"attn_stack.attn_nets.{config['layers'] - 1}.post_fc_dp"
    return PAPER_LAYER


def plan(args):
    """{experiment: [(value, config, name, layer)]} and the ordered unique jobs {name: (config, layer)}."""
    base, experiments = (DEMO_CONFIG, DEMO_EXPERIMENTS) if args.demo else (PAPER_CONFIG, EXPERIMENTS)
    per_experiment, jobs = {}, {}
    for experiment in args.experiments:
        knob, values, _ = experiments[experiment]
        rows = []
        for value in values:
            config = dict(base, **{knob: value})
            layer = feature_layer(config, experiment)
            name = config_name(config)
            if layer != feature_layer(config, "data"):
                name += "-last"  # same model, other layer: a feature set of its own
            rows.append((value, config, name, layer))
            jobs.setdefault(name, (config, layer))
        per_experiment[experiment] = rows
    return per_experiment, jobs


def commands(args, name, config, layer):
    """The three stage commands of one configuration, as argument lists."""
    work = args.work
    model_name = config_name(config)  # the "-last" feature set reuses the trained model
    train = ["04_train_gpt.py", "--work", work, "--name", model_name, "--hidden-dim", config["hidden_dim"],
             "--layers", config["layers"], "--heads", config["heads"], "--precision", config["precision"],
             "--resume"]
    if config["train_frames"]:
        train += ["--train-frames", config["train_frames"]]
    train += shlex.split((DEMO_TRAIN_ARGS + " " if args.demo else "") + args.train_args)
    extract = ["05_extract.py", "--work", work, "--ckpt", f"{work}/gpt/{model_name}/ckpt.pt", "--name", name,
               "--layer", layer] + shlex.split((DEMO_EXTRACT_ARGS + " " if args.demo else "") + args.extract_args)
    ridge = ["06_ridge.py", "--work", work, "--name", name, "--layer", layer] + shlex.split(
        (DEMO_RIDGE_ARGS + " " if args.demo else "") + args.ridge_args)
    return [[str(a) for a in cmd] for cmd in (train, extract, ridge)]


def subjects(work):
    manifest = read_tsv(Path(work) / "bold" / "manifest.tsv", required=("sub",))
    return sorted(manifest["sub"].unique())


def finished(work, name, subs):
    return all((Path(work) / "results" / name / f"sub-{s}" / "summary.json").is_file() for s in subs)


def run_jobs(args, jobs):
    subjects(args.work)   # bold/manifest.tsv must exist: stage 02 has run
    if not (Path(args.work) / "vqvae" / "ckpt.pt").is_file():
        raise InputError(f"{Path(args.work) / 'vqvae' / 'ckpt.pt'}: no VQ-VAE checkpoint (run 03_train_vqvae.py first)")
    # Every stage runs: each one skips what its records say is up to date, so a configuration whose VQ-VAE,
    # frames or flags changed is made again instead of being kept because its results exist.
    for i, (name, (config, layer)) in enumerate(jobs.items(), 1):
        for cmd in commands(args, name, config, layer):
            print(f"[{i}/{len(jobs)}] {name}: python {shlex.join(cmd)}", flush=True)
            status = subprocess.run([sys.executable, *cmd], cwd=REPO).returncode
            if status == common.EXIT_INTERRUPTED:
                print(f"07_sweep: {cmd[0]} of configuration {name} was interrupted: re-run to resume", file=sys.stderr)
                sys.exit(status)
            if status != 0:
                raise InputError(f"{cmd[0]} failed for configuration {name} (exit {status}; its message is above)")


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


SATURATING_BOUNDS = ([-1.0, 0.0, 1e-3], [2.0, 10.0, 5.0])  # r_inf, c (for x over its geometric mean), alpha


def geometric_mean(x):
    """The saturating law is fitted to x / geometric_mean(x), for conditioning (x spans many decades)."""
    return np.exp(np.log(np.asarray(x, float)).mean())


def fit_saturating_power(x, r):
    """Least-squares (r_inf, c, alpha) of r = r_inf - c x^(-alpha); NaNs when it does not converge (K >= 3).

    x is rescaled by its geometric mean for conditioning; c is reported for the original x.
    """
    from scipy.optimize import curve_fit

    x, r = np.asarray(x, float), np.asarray(r, float)
    if len(x) < 3:
        return np.full(3, np.nan)
    scale = geometric_mean(x)
    start = (r.max() + 0.05, max(r.max() - r.min(), 1e-3), 0.5)
    try:
        (r_inf, c, alpha), _ = curve_fit(saturating_power, x / scale, r, p0=start,
                                         bounds=SATURATING_BOUNDS, maxfev=20000)
    except (RuntimeError, ValueError):
        return np.full(3, np.nan)
    return np.array([r_inf, c * scale ** alpha, alpha])


def saturating_bounds_hit(x, params):
    """The names of the parameters of a fit_saturating_power result that sit on a bound of its search: the
    data did not pin them down (too few points, or no curvature), so their values mean little."""
    r_inf, c, alpha = params
    scale = geometric_mean(x)
    searched = (r_inf, c / scale ** alpha, alpha)  # c as the search saw it
    # within 0.1% of the search's width: the optimizer stops near a bound, not on it
    return [name for name, value, low, high in zip(("r_inf", "c", "alpha"), searched, *SATURATING_BOUNDS)
            if min(value - low, high - value) <= 1e-3 * (high - low)]


def brain_score(r, kind):
    """(..., S, P) test r of P parcels for S subjects -> (...,): max (or median) over parcels, mean over subjects."""
    reduce = np.nanmax if kind == "max" else np.nanmedian
    return reduce(r, axis=-1).mean(-1)


def bootstrap_fits(x, r, kind="max", n_boot=1000, seed=0):
    """Both laws fitted to the brain score of K configurations, with 95% intervals from resampling parcels.

    x: (K,) compute, data or parameters; r: (K, S, P) test r per configuration, subject and parcel (one
    resample of parcels applies to every configuration, keeping them paired).
    Returns {"log_linear": {"a": [est, lo, hi], "b": ...}, "saturating_power": {"r_inf": ..., "c": ..., "alpha": ...}}
    and "saturating_power_at_bound": the names of the point estimate's parameters stuck on a search bound.
    """
    rng = np.random.default_rng(seed)
    n_parcels = r.shape[-1]
    laws = {"log_linear": (fit_log_linear, ("a", "b")),
            "saturating_power": (fit_saturating_power, ("r_inf", "c", "alpha"))}
    resamples = [r[..., rng.integers(0, n_parcels, n_parcels)] for _ in range(n_boot)]
    out = {}
    for law, (fit, names) in laws.items():
        estimate = fit(x, brain_score(r, kind))
        samples = np.array([fit(x, brain_score(sample, kind)) for sample in resamples])  # (n_boot, n_params)
        ok = np.isfinite(samples).all(1)
        lo, hi = (np.percentile(samples[ok], [2.5, 97.5], axis=0) if ok.any()
                  else (np.full(len(names), np.nan),) * 2)
        out[law] = {n: [float(e), float(a), float(b)] for n, e, a, b in zip(names, estimate, lo, hi)}
        if law == "saturating_power":
            out["saturating_power_at_bound"] = saturating_bounds_hit(x, estimate) if np.isfinite(estimate).all() else []
    return out


# --------------------------------------------------------------------------------------------------
# Reading finished runs
# --------------------------------------------------------------------------------------------------
def load_run(work, name, config, subs):
    """What the figures need from one configuration, or None when it has not finished."""
    import torch

    work = Path(work)
    if not finished(work, name, subs):
        return None
    model_name = config_name(config)
    log = pd.read_csv(work / "gpt" / model_name / "log.csv")
    summaries = {s: json.loads((work / "results" / name / f"sub-{s}" / "summary.json").read_text()) for s in subs}
    r = np.stack([np.load(work / "results" / name / f"sub-{s}" / "r.npy") for s in subs])   # (S, P)
    ckpt = torch.load(work / "gpt" / model_name / "ckpt.pt", map_location="cpu", weights_only=False)
    n_params = sum(v.numel() for k, v in ckpt["model"].items() if not k.startswith("vqvae."))
    train = _stage("04_train_gpt.py")
    batch = ckpt["args"]["batch_size"]  # samples per optimizer step, over all processes
    compute = float(train.train_flops_per_sample(ckpt["model_config"])) * batch * ckpt["step"]
    frames = config["train_frames"] or ckpt.get("train_frames") or np.nan
    return {"log": log, "summaries": summaries, "r": r, "params": n_params, "compute": compute,
            "frames": frames, "wall_s": float(log["wall_s"].dropna().iloc[-1]) if len(log) else np.nan}


def _stage(filename):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"stage_{filename[:2]}", REPO / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------------------
# Figures and report
# --------------------------------------------------------------------------------------------------
def draw_figures(args, per_experiment, jobs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import plotting

    work = Path(args.work)
    figures = work / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    subs = subjects(work)
    runs = {name: load_run(work, name, config, subs) for name, (config, _) in jobs.items()}
    report = ["# Scaling experiments", "",
              f"Brain score: test Pearson r per parcel (06_ridge.py); subjects {', '.join(subs)}.", ""]
    experiments = DEMO_EXPERIMENTS if args.demo else EXPERIMENTS
    for experiment, rows in per_experiment.items():
        # --train-frames 0 means every training frame
        done = [(value if value != 0 else "all", name, runs[name]) for value, _, name, _ in rows
                if runs[name] is not None]
        knob, _, figure = experiments[experiment]
        report += [f"## {experiment}: {knob} ({figure})", "", f"Claim tested: {CLAIMS[experiment]}", ""]
        if not done:
            report += ["No finished configuration yet.", ""]
            continue
        # (a) loss curves
        fig, ax = plt.subplots(figsize=(6, 4))
        for value, name, run in done:
            line, = ax.plot(run["log"]["step"], run["log"]["train_loss"], label=f"{knob}={value} train")
            val = run["log"].dropna(subset=["val_loss"])
            ax.plot(val["step"], val["val_loss"], "--", color=line.get_color(), label=f"{knob}={value} val")
        ax.set(xlabel="step", ylabel="cross-entropy", title=f"GPT loss, {experiment} ({figure}a)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figures / f"{experiment}_loss.png", dpi=120)
        plt.close(fig)
        # (b) per-subject bars of max and median r
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        width = 0.8 / len(done)
        for k, (value, name, run) in enumerate(done):
            x = np.arange(len(subs)) + k * width
            axes[0].bar(x, [run["summaries"][s]["r_max"] for s in subs], width, label=f"{knob}={value}")
            axes[1].bar(x, [run["summaries"][s]["r_median"] for s in subs], width, label=f"{knob}={value}")
        for ax, title in zip(axes, ("max r over parcels", "median r over parcels")):
            ax.set_xticks(np.arange(len(subs)) + 0.4 - width / 2, [f"sub-{s}" for s in subs])
            ax.set(title=f"{title} ({figure}b)", ylabel="Pearson r")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(figures / f"{experiment}_scores.png", dpi=120)
        plt.close(fig)
        # (c) brain maps: one row per configuration, one column per subject
        fig, axes = plt.subplots(len(done), len(subs), figsize=(4 * len(subs), 1.8 * len(done)), squeeze=False)
        vmax = max(np.nanmax(run["r"]) for _, _, run in done)
        for k, (value, name, run) in enumerate(done):
            for j, s in enumerate(subs):
                plotting.plot_glass_brain(str(work / "results" / name / f"sub-{s}" / "r_map.nii.gz"),
                                          axes=axes[k, j], display_mode="z", colorbar=False, vmax=vmax,
                                          plot_abs=False, cmap="cold_hot", title=f"sub-{s} {knob}={value}")
        fig.savefig(figures / f"{experiment}_maps.png", dpi=100)
        plt.close(fig)
        table = ["| " + knob + " | " + " | ".join(f"sub-{s} max r" for s in subs) + " | median r (mean) |",
                 "|" + " --- |" * (len(subs) + 2)]
        for value, name, run in done:
            table.append(f"| {value} | " + " | ".join(f"{run['summaries'][s]['r_max']:.3f}" for s in subs)
                         + f" | {np.mean([run['summaries'][s]['r_median'] for s in subs]):.3f} |")
        report += [f"![]({experiment}_loss.png) ![]({experiment}_scores.png)", "", *table, "",
                   f"![]({experiment}_maps.png)", ""]
        if experiment == "precision" and len(done) >= 2:
            report += precision_table(done, subs, figures)

    finished_runs = {name: run for name, run in runs.items() if run is not None}
    if len(finished_runs) >= 2:
        report += scaling_section(args, per_experiment, finished_runs, figures)
    (figures / "report.md").write_text("\n".join(report) + "\n")
    print(f"07_sweep: figures and report in {figures}")


def precision_table(done, subs, figures):
    (ref_value, _, ref), others = done[0], done[1:]
    lines = ["| precision | training time (s) | speedup | max r difference (mean over subjects) |",
             "| --- | --- | --- | --- |", f"| {ref_value} | {ref['wall_s']:.0f} | 1.00 | 0 |"]
    for value, _, run in others:
        diff = np.mean([run["summaries"][s]["r_max"] - ref["summaries"][s]["r_max"] for s in subs])
        lines.append(f"| {value} | {run['wall_s']:.0f} | {ref['wall_s'] / run['wall_s']:.2f} | {diff:+.3f} |")
    (figures / "precision.md").write_text("\n".join(lines) + "\n")
    return ["Precision (paper Figure 6):", "", *lines, ""]


def scaling_section(args, per_experiment, runs, figures):
    """Brain score against compute (every run), data (data experiment) and parameters (hidden experiment)."""
    import matplotlib.pyplot as plt

    axes_spec = [("compute", "training compute (FLOPs)", list(runs))]
    for experiment, key, label in (("data", "frames", "training frames (60 Hz)"),
                                   ("hidden", "params", "GPT parameters")):
        names = [name for _, _, name, _ in per_experiment.get(experiment, []) if name in runs]
        axes_spec.append((key, label, names))
    fits = {}
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label, names) in zip(axes, axes_spec):
        names = [n for n in names if np.isfinite(runs[n][key]) and runs[n][key] > 0]
        if len(names) < 2:
            ax.set_title(f"{label}: fewer than 2 finished runs")
            continue
        x = np.array([runs[n][key] for n in names], float)
        r = np.stack([runs[n]["r"] for n in names])                                    # (K, S, P)
        fit = bootstrap_fits(x, r, args.score, args.n_boot)
        fits[key] = {"runs": names, "x": x.tolist(), "score": brain_score(r, args.score).tolist(), **fit}
        grid = np.geomspace(x.min(), x.max(), 100)
        ax.scatter(x, brain_score(r, args.score), color="k", zorder=3)
        a, b = fit["log_linear"]["a"][0], fit["log_linear"]["b"][0]
        ax.plot(grid, a + b * np.log10(grid), label=f"r = {a:.3f} + {b:.3f} log10 x")
        r_inf, c, alpha = (fit["saturating_power"][k][0] for k in ("r_inf", "c", "alpha"))
        if np.isfinite(r_inf):
            ax.plot(grid, saturating_power(grid, r_inf, c, alpha), "--", label=f"r_inf = {r_inf:.3f}, alpha = {alpha:.2f}")
        ax.set(xscale="log", xlabel=label, ylabel=f"{args.score} r (mean over subjects)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figures / "scaling.png", dpi=120)
    plt.close(fig)
    (figures / "scaling.json").write_text(json.dumps(fits, indent=1))
    lines = ["## Scaling laws (beyond the paper)", "", "![](scaling.png)", "",
             f"Brain score = {args.score} r over parcels, mean over subjects; 95% intervals from "
             f"{args.n_boot} bootstrap resamples of parcels. Compute = FLOPs of one training sample "
             "(forward + backward, counted by torch) x samples seen.", "",
             "| x | law | parameter | estimate | 95% interval |", "| --- | --- | --- | --- | --- |"]
    for key, fit in fits.items():
        for law in ("log_linear", "saturating_power"):
            for param, (est, lo, hi) in fit[law].items():
                stuck = " (on a search bound)" if law == "saturating_power" and param in fit["saturating_power_at_bound"] else ""
                lines.append(f"| {key} | {law} | {param} | {est:.4g}{stuck} | [{lo:.4g}, {hi:.4g}] |")
    if any(fit["saturating_power_at_bound"] for fit in fits.values()):
        lines += ["", "A saturating-law parameter on a bound of its search was not determined by the data "
                      "(too few configurations, or no curvature): read the log-linear law instead."]
    return lines + [""]


def main():
    args = parse_args()
    per_experiment, jobs = plan(args)
    if args.dry_run:
        for name, (config, layer) in jobs.items():
            cmds = commands(args, name, config, layer)
            if args.jobs_tsv:
                print("\t".join([name] + [shlex.join(c) for c in cmds]))
            else:
                print(f"# {name}")
                for cmd in cmds:
                    print(f"python {shlex.join(cmd)}")
        return
    if not args.figures_only:
        run_jobs(args, jobs)
    draw_figures(args, per_experiment, jobs)


if __name__ == "__main__":
    run_main(main)
