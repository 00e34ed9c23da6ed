"""The figures of 07_sweep.py: per experiment the loss curves, the scores and the brain maps (the
paper's Figures 2-6, panels a-c), the controls' partition, the scaling laws and where scaling pays.
"""
import numpy as np

import common
from common import read_tsv
from paper.experiments import SCALE_KNOBS
from scaling_laws import saturating_power
from significance import mean_interval, score_interval


def save_figure(fig, path, dpi):
    """Write a figure atomically, as every stage writes its outputs (a half-written PNG never
    replaces a good one), and close it."""
    import matplotlib.pyplot as plt
    with common.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


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


def value_label(value):
    """A configuration's value as the figures and the report write it: --train-frames 0 is 'all'."""
    return "all" if value == 0 else value


def knob_value(value, run):
    """The numeric x of a configuration: its knob's value (--train-frames 0, "all", is its frame
    count)."""
    return run["frames"] if value in (0, "all") else value


def set_names(run):
    """The feature sets of a partition, the GPT's (--name, first) called GPT."""
    return ["GPT", *run["sets"][1:]]
