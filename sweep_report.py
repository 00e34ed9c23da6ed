"""07_sweep.py's report: per experiment the paper's claim, a verdict computed from the scores and
their intervals, the figures and a table; the controls' partition; the scaling laws.

Verdicts are on the median r over parcels (stable; the max r, the paper's figure, beside it). A claim
of an effect (more data, width improve) is supported when its 95% interval lies above 0; a claim of
no effect (depth, heads, precision) only when the interval lies within --margin (10% of the
reference's score, per tenfold for a slope) of 0: an interval that merely holds 0 is
"inconclusive", never support.
"""
import math
from pathlib import Path

import numpy as np

import common
from common import InputError, read_tsv
from controls import CONTROLS_CLAIM, EXTRA_EXPERIMENTS
from ground_truth import read_planted_labels
from paper.experiments import CLAIM_KIND, CLAIMS, EXPERIMENTS, SCALE_KNOBS
from scaling_laws import (bootstrap_fits, fit_log_linear, omitted_fits, slope_permutation_test)
from significance import (BLOCK_TRS, brain_score, interval_word, mean_interval,
                          paired_difference, parcel_paired_difference, score_samples)
from sweep_figures import (draw_laws, knob_value, loss_figure, maps_figure, parcel_atlas,
                           partition_figure, save_figure, save_slope_map, scores_figure, set_names,
                           value_label)


def experiment_section(args, base, experiment, done, subs, figures):
    """One experiment's figures and its section of the report (markdown lines): the claim, a
    verdict, the figures and a table. done: (value, name, run) of its finished configurations;
    base: the configuration the experiment varies."""
    knob, _, figure = {**EXPERIMENTS, **EXTRA_EXPERIMENTS}[experiment]   # the demo's are the same
    source = "tested here" if experiment in EXTRA_EXPERIMENTS else "the paper"
    lines = [f"## {experiment}: {knob} ({figure})", "",
             f"**Claim** ({source}): {({**CLAIMS, 'controls': CONTROLS_CLAIM})[experiment]}", ""]
    if not done:
        return lines + ["No finished configuration yet.", ""]
    lines += [f"**Verdict**: {verdict(experiment, knob, done, args, base)}", ""]
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


def write_lines(path, lines):
    """Write markdown lines to `path` atomically."""
    with common.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")


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


def partition_section(args, partitions, subs, figures):
    """The report's lines on the variance partition of the trained GPT's features with low-level
    vision and the button presses (06 --with, jobs "<model>+lowlevel+buttons"; low-level vision
    alone for movies, "<model>+lowlevel"): per subject the
    parts, where the GPT's unique part lies, and whether training changes it. partitions: the runs
    of the trained and the untrained model's partitions (None: not finished)."""
    trained, untrained = partitions
    sets = jobs_sets(partitions)
    others = " and ".join(SET_WORDS.get(name, name) for name in sets)
    lines = [f"### What the GPT explains beyond {others}", "",
             f"Banded ridge of the GPT's features with {others} (06 --with {' '.join(sets)}; a "
             "penalty per feature set), test R^2 per parcel; the unique "
             "part of a set is R^2(all sets) - R^2(all but it), tested per parcel by 06 (a t-test "
             "whose variance adds the test TRs' and the training runs', FDR q < 0.05). A mean over "
             "parcels is given with the parcels where its part is significant, not with an "
             "interval from resampling parcels: that would leave out both variances, and call "
             "unique what a set gains by luck where it re-encodes another.", ""]
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


SET_WORDS = {"lowlevel": "low-level vision", "buttons": "button presses"}


def jobs_sets(partitions):
    """The feature sets fitted with the GPT's in the controls' partitions (buttons only for game
    replays): those of the first finished one, else the defaults'."""
    finished = [run for run in partitions if run is not None]
    return finished[0]["sets"][1:] if finished else ["lowlevel", "buttons"]


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
    """On a synthetic dataset: each set's mean R^2 alone over the planted visual parcels, with its
    interval (resampling them), and its mean unique R^2 there with the parcels and subjects where 06
    found it significant; each set's R^2 alone on the parcels planted on button presses."""
    labels = read_tsv(Path(args.work) / "bold" / "labels.tsv", required=("column", "label"))
    labels = labels.sort_values("column")["label"].astype(int)
    part, names, lines = run["partition"], set_names(run), []

    def alone(columns):   # "GPT +0.1336 (95% CI [+0.1002, +0.1701]), lowlevel ..."
        texts = []
        for k, name in enumerate(names):
            estimate, lo, hi = mean_interval(part["r2_alone"][:, k, columns], args.n_boot)
            texts.append(f"{name} {estimate:+.4f} (95% CI [{lo:+.4f}, {hi:+.4f}])")
        return ", ".join(texts)

    def unique(columns):   # "GPT +0.0063 (significant in 0 of 10 parcels x subjects), ..."
        significant = part["unique_significant"][:, :, columns]                  # (S, sets, P)
        return ", ".join(f"{name} {np.nanmean(part['unique'][:, k, columns]):+.4f} (significant "
                         f"in {int(significant[:, k].sum())} of {significant[:, k].size})"
                         for k, name in enumerate(names))

    visual = np.flatnonzero(labels.isin(read_planted_labels(args.ground_truth)).to_numpy())
    if len(visual):
        lines += [f"On the {len(visual)} planted visual parcels, mean R^2 of each set alone: "
                  f"{alone(visual)}; mean unique R^2 (parcels x subjects where 06 finds it): "
                  f"{unique(visual)}.", ""]
    planted_buttons = read_planted_labels(args.ground_truth, "planted_buttons")
    buttons = np.flatnonzero(labels.isin(planted_buttons).to_numpy())
    if len(buttons):
        alone = ", ".join(f"{name} {np.nanmean(part['r2_alone'][:, k, buttons]):+.3f}"
                          for k, name in enumerate(names))
        lines += [f"On the {len(buttons)} parcel(s) planted on button presses, R^2 of each set "
                  f"alone (mean over subjects): {alone}.", ""]
    return lines


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


def verdict(experiment, knob, done, args, base):
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
    ref = reference_score(base, knob, done)
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


def reference_score(base, knob, done):
    """The median r (mean over subjects) of the experiment's reference, the `base` configuration
    (the paper's, or the demo's); of the mean over configurations when --values left it out."""
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
    planted = read_planted_labels(args.ground_truth)
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




def write_report(args, base, per_experiment, jobs, runs, subs, missing):
    """figures/report.md and every figure: per experiment its section (the paper's Figures 2-6),
    the controls' partition, then the scaling laws over the paper's configurations. runs: {job name:
    load_run's, with its seeds' runs and bootstrap resamples, or None}; base: the configuration the
    experiments vary (the paper's, or the demo's); missing: the jobs not finished."""
    import matplotlib
    matplotlib.use("Agg")
    figures = Path(args.work) / "figures"
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
        report += experiment_section(args, base, experiment, done, subs, figures)
        if experiment == "controls":   # and beyond them: the variance partition
            partitions = [runs[name] for name, spec in jobs.items() if spec["kind"] == "partition"]
            report += partition_section(args, partitions, subs, figures)
    # the scaling laws over the paper's configurations (controls, modules: not points of a law)
    paper_runs = {name: runs[name] for experiment, rows in per_experiment.items()
                  if experiment in EXPERIMENTS for _, _, name, _ in rows if runs[name] is not None}
    if len(paper_runs) >= 2:
        report += scaling_section(args, per_experiment, paper_runs, figures)
        report += scaling_maps(per_experiment, paper_runs, Path(args.work), figures)
    write_lines(figures / "report.md", report)
