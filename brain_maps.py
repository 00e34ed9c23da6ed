"""Brain maps of per-parcel values (beyond the paper's figures): NIfTI images through the atlas, stat
maps with the non-significant parcels faded, and the per-subject bar chart of 06.
"""
import json
import warnings

import numpy as np

from common import atomic_path


def write_r_map(r, significant, tested, labels, atlas_path, out_dir, title):
    """r per BOLD column -> r_map.nii.gz through the atlas labels, and r_map.png of it on one
    symmetric colour scale, the parcels that are not significant (FDR) faded when a null was
    `tested`."""
    write_parcel_maps(r[None], significant[None], tested, labels, atlas_path, out_dir / "r_map",
                      [title], "test r")


def write_parcel_maps(values, significant, tested, labels, atlas_path, stem, titles, unit):
    """Maps of per-parcel values (K, P) (one per row; NaN drawn as 0): <stem>.nii.gz (3D for K = 1,
    else 4D) and <stem>.png, one stat map per row on one symmetric colour scale, the parcels that
    are not `significant` (K, P) faded when a null was `tested`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from nilearn import image, plotting
    from nilearn.maskers import NiftiLabelsMasker

    masker = NiftiLabelsMasker(labels_img=str(atlas_path)).fit()
    # the sorted label values
    atlas_labels = [v for k, v in masker.region_ids_.items() if k != "background"]
    values = np.nan_to_num(values, nan=0.0)

    def parcel_image(row):            # per-column values (P,) -> a NIfTI image on the atlas grid
        value_of = dict(zip(labels, row))
        return masker.inverse_transform(np.array([value_of.get(v, 0.0) for v in atlas_labels]))

    maps = [parcel_image(row) for row in values]
    with atomic_path(stem.with_name(stem.name + ".nii.gz")) as tmp:
        (maps[0] if len(maps) == 1 else image.concat_imgs(maps)).to_filename(tmp)
    vmax = max(float(np.abs(values).max()), 1e-3)
    # the same in every row
    cuts = plotting.find_xyz_cut_coords(parcel_image(np.abs(values).max(axis=0)))
    fig, axes = plt.subplots(len(values), 1, figsize=(10, 3.5 * len(values)), squeeze=False)
    for row, shown_if_tested, title, ax in zip(values, significant, titles, axes[:, 0]):
        shown = shown_if_tested if tested else np.ones(len(row), bool)
        title += "; faded: not significant (FDR)" if tested else "; no significance tested"
        with warnings.catch_warnings():  # nothing significant: the faded overlay shows the values
            warnings.filterwarnings("ignore", "empty mask")
            display = plotting.plot_stat_map(parcel_image(np.where(shown, row, 0)), axes=ax,
                                             cut_coords=cuts, vmax=vmax, cmap="cold_hot",
                                             colorbar=True, symmetric_cbar=True)
        ax.set_title(title, fontsize=11)  # above the brain: nilearn's own title hides the L / R
        if (row[~shown] != 0).any():  # nilearn warns of an empty overlay
            display.add_overlay(parcel_image(np.where(shown, 0, row)), cmap="cold_hot", vmin=-vmax,
                                vmax=vmax, threshold=1e-6, transparency=0.3)
    fig.text(0.99, 0.01, unit, ha="right", fontsize=8)
    with atomic_path(stem.with_name(stem.name + ".png")) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def plot_subjects(results_dir, subjects):
    """Bar chart of max and median test r of `subjects` (labels, "01"), from their summary.json,
    with the permutation null's 95% level of each (dotted) when it was computed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [json.loads((results_dir / f"sub-{sub}" / "summary.json").read_text())
                 for sub in subjects]
    if not summaries:
        return
    x = np.arange(len(summaries))
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(summaries), 3.5))
    for offset, kind, label in ((-0.2, "max", "max r (paper)"), (0.2, "median", "median r")):
        ax.bar(x + offset, [np.nan if s[f"r_{kind}"] is None else s[f"r_{kind}"]
                            for s in summaries], 0.4, label=label)
        for xi, s in zip(x, summaries):
            level = (s.get("null") or {}).get(f"{kind}_r_95")
            if level is not None:
                ax.hlines(level, xi + offset - 0.2, xi + offset + 0.2, colors="k", linestyles=":")
    ax.set_xticks(x, [s["subject"] for s in summaries])
    ax.set_ylabel("test Pearson r")
    ax.axhline(0, color="0.7", linewidth=0.8)
    ax.set_title(f"{results_dir.name}: encoding per subject\n(dotted: the null's 95% level)",
                 fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(results_dir / "r_by_subject.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
