"""Several feature sets at once (beyond the paper): banded ridge, a penalty per set, and variance
partitioning of the test R^2 into each set's unique part and the part the sets share, with a test of
each unique part that holds where one set re-encodes another (06_ridge.py --with).
"""
import argparse
import itertools

import numpy as np
import torch

from brain_maps import write_parcel_maps
from common import save_npy
from ridge_fast import (centered_gram, eigh, feature_scale, held_out_members, penalty_grid,
                        products_dtype, select_spectral)
from significance import BLOCK_TRS, fdr_mask


BAND_GRID = (-2.0, -1.0, 0.0, 1.0, 2.0)   # --with: log10 ratios of the sets' weights (banded ridge)


PARTITION_FILES = ("band_weights.npy", "r2_alone.npy", "r2_all.npy", "unique.npy", "shared.npy",
                   "unique_p.npy", "unique_significant.npy", "unique_map.nii.gz", "unique_map.png")


# With feature sets X_1 ... X_S (the GPT's, low-level vision, the button presses), banded ridge
# gives each set its own penalty: b minimizes
# ||y - b0 - sum_s X_s b_s||^2 + sum_s lambda_s ||b_s||^2. Writing lambda_s = alpha / w_s, it is
# the ridge of penalty alpha on the kernel K_w = sum_s w_s K_s (K_s = X_s X_s', centered), so one
# eigendecomposition of K_w gives the leave-one-out error of every alpha at once (solve_eigh's
# algebra). The weights w are searched on a grid: every subset of the sets switched on (w_s = 0
# drops set s), the others at 10^u times the first one, u in --band-grid; each parcel keeps the
# (w, alpha) of smallest held-out error, as himalaya's MultipleKernelRidgeCV does with a list of
# candidate weights. Variance partitioning fits every non-empty subset of the sets this way and
# compares test R^2: the unique part of A is R^2(all) - R^2(all but A), the shared part what
# R^2(all) has beyond the unique parts, and a set alone its own R^2.
MAX_BAND_RATIO = 15   # float64 resolves a sum of two weights 10^15 apart, no more


def band_ratio(text):
    """One value of --band-grid (argparse type): a log10 ratio of two sets' weights, within
    MAX_BAND_RATIO: beyond, the lighter set vanishes in the sum (and 10^400 overflows)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a number") from None
    if not -MAX_BAND_RATIO <= value <= MAX_BAND_RATIO:
        raise argparse.ArgumentTypeError(f"{text}: a log10 ratio of weights, between "
                                         f"-{MAX_BAND_RATIO} and {MAX_BAND_RATIO}")
    return value


def band_candidates(n_sets, log_ratios):
    """The kernel weights w (C, n_sets) to try, each summing to 1 (alpha sets the overall scale):
    every non-empty subset of the sets on, its first set at weight 1 and the others at 10^u, u in
    log_ratios."""
    candidates = set()
    for on in itertools.chain.from_iterable(itertools.combinations(range(n_sets), k)
                                            for k in range(1, n_sets + 1)):
        for exponents in itertools.product(log_ratios, repeat=len(on) - 1):
            w = np.zeros(n_sets)
            w[list(on)] = [1.0, *(10.0 ** u for u in exponents)]
            candidates.add(tuple(np.round(w / w.sum(), 12)))
    return np.array(sorted(candidates))


def fit_banded_ridge(grams, grams_test, Y_train, alphas, candidates, groups=None, parcel_batch=256,
                     n_features=None):
    """Banded ridge, the weights of the sets and the penalty chosen per target by exact
    leave-one-out (or leave-one-group-out) among `candidates` x `alphas`.

    grams (S, n, n) and grams_test (S, m, n): the centered Gram matrices K_s = Xc_s Xc_s' and
    K_test,s = (X_test,s - mean) Xc_s' of each set (float64 tensors, _centered_gram);
    Y_train (n, P); alphas (A,); candidates (C, S) from band_candidates; groups as fit_ridge_loo.
    n_features (S,) or None: the sets' numbers of features; given, the alphas are relative, each
    a multiple of the scale of the weighted kernel (feature_scale).

    Returns a dict: alpha (P,); alpha_index (P,) its index in the grid; weights (P, S); cv_error
    (P,) of the chosen pair; test_prediction (m, P); train_fit (n, P); solver "banded".
    """
    device = grams.device
    f64 = dict(device=device, dtype=torch.float64)
    relative = torch.tensor(list(alphas), **f64)                                 # (A,)
    y_mean = torch.as_tensor(Y_train.mean(axis=0, dtype=np.float64), **f64)      # (P,)
    yc = torch.as_tensor(Y_train, **f64) - y_mean                                # (n, P)
    members = held_out_members(groups, device)
    n, P = yc.shape
    best_error = torch.full((P,), torch.inf, **f64)
    alpha = torch.zeros(P, **f64)
    alpha_index = torch.zeros(P, dtype=torch.long, device=device)
    weights = torch.zeros(P, len(grams), **f64)
    fit = torch.zeros_like(yc)
    prediction = torch.zeros(grams_test.shape[1], P, **f64)
    for w in torch.as_tensor(candidates, **f64):
        K = torch.einsum("s,sij->ij", w, grams)                              # (n, n)
        alphas = relative
        if n_features is not None:   # the sets switched on make the kernel's rank
            rank = sum(p for on, p in zip((w > 0).tolist(), n_features) if on)
            alphas = relative * feature_scale(K, "dual", rank)
        lam, basis = eigh(K)
        lam = lam.clamp(min=0)
        lam[torch.argmax(basis.sum(dim=0).abs())] = 0    # the intercept's direction, as solve_eigh
        cv_error, QTy, residual = select_spectral(basis, lambda a: a / (lam + a), 1, yc, alphas,
                                                   members, parcel_batch)
        error, index = cv_error.min(dim=0)                                   # (P,) first minimum
        better = error < best_error                                          # ties keep the earlier
        if not better.any():
            continue
        chosen = alphas[index[better]]                                       # (b,)
        # c = (K_w + alpha I)^-1 yc
        dual = basis @ (QTy[:, better] / (lam[:, None] + chosen[None, :]))
        best_error[better], alpha[better], weights[better] = error[better], chosen, w
        alpha_index[better] = index[better]
        fit[:, better] = yc[:, better] - residual[:, better]
        # K_test,w c: (m, b)
        prediction[:, better] = torch.einsum("s,smn->mn", w, grams_test) @ dual
    return dict(alpha=alpha.cpu().numpy(), alpha_index=alpha_index.cpu().numpy(),
                weights=weights.cpu().numpy(),
                cv_error=best_error.cpu().numpy(),
                test_prediction=(prediction + y_mean).cpu().numpy(),
                train_fit=(fit + y_mean).cpu().numpy(), solver="banded")


def r2_score(y, prediction):
    """Test R^2 of each column, 1 - SSE / SS around the test mean: y, prediction (m, P) -> (P,); NaN
    for a constant column of y. Negative when the prediction is worse than the test mean."""
    ss = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = 1 - ((y - prediction) ** 2).sum(axis=0) / ss
    r2[ss == 0] = np.nan
    return r2


def partition_variance(design, args):
    """Every non-empty subset of the S >= 2 feature sets fitted by banded ridge, and the variance
    partition of the test BOLD. Returns (the fit of all the sets (fit_banded_ridge), a dict of
    arrays: r2_alone (S, P), r2_all (P,), unique (S, P), shared (P,), and for the test of the
    unique parts the models without set s, reduced_prediction (S, m, P), and deleted_run_errors
    (1 + S, R, P) of the model of all the sets and of each without a set."""
    grams, grams_test = zip(*(centered_gram(X, X_test, args.device, products_dtype(args.device), 4096,
                                             1024)
                              for X, X_test in zip(design.X_train, design.X_test)))
    grams, grams_test = torch.stack(grams), torch.stack(grams_test)      # (S, n, n), (S, m, n)
    n_sets = len(grams)
    alphas, relative = penalty_grid(args.alphas)
    n_features = [X.shape[1] for X in design.X_train]
    fits = {}
    for size in range(1, n_sets + 1):
        for subset in itertools.combinations(range(n_sets), size):
            fits[subset] = fit_banded_ridge(grams[list(subset)], grams_test[list(subset)],
                                            design.Y_train, alphas,
                                            band_candidates(size, args.band_grid), design.groups,
                                            args.parcel_batch,
                                            [n_features[s] for s in subset] if relative else None)
    r2 = {subset: r2_score(design.Y_test, fit["test_prediction"]) for subset, fit in fits.items()}
    everything = tuple(range(n_sets))
    without = [tuple(s for s in everything if s != t) for t in everything]
    unique = np.stack([r2[everything] - r2[rest] for rest in without])          # (S, P)
    deleted = [deleted_run_errors(grams[list(subset)], grams_test[list(subset)], design.Y_train,
                                  design.Y_test, fits[subset], design.train_runs)
               for subset in (everything, *without)]
    return fits[everything], dict(
        r2_alone=np.stack([r2[(s,)] for s in everything]), r2_all=r2[everything], unique=unique,
        shared=r2[everything] - unique.sum(axis=0),
        reduced_prediction=np.stack([fits[rest]["test_prediction"] for rest in without]),
        deleted_run_errors=np.stack(deleted))


UNIQUE_TEST = ("one-sided t-test of R^2(all) - R^2(all but the set): its variance over the test "
               "TRs from means over blocks of ~{block} consecutive TRs, plus its variance over "
               "training samples from a delete-a-run jackknife of the fitted models; "
               "Benjamini-Hochberg q < {fdr} over parcels, per set")


def deleted_run_errors(grams, grams_test, Y_train, Y_test, fit, train_runs):
    """The test errors of a banded ridge `fit` refitted without each training run in turn, each
    parcel's weights and penalty kept: (R, P) sums of squared test errors.

    No refit is needed. With the training fit's hat matrix H (its test rows H_test = 11'/n +
    K_test,w G, G = (K_w + alpha I)^-1) and the run's held-out residuals e_g = [(I - H)_gg]^-1 r_g
    (the leave-one-run-out algebra above), the prediction without run g is
    prediction - H_test,g e_g. grams (S, n, n), grams_test (S, m, n) as fit_banded_ridge; Y_train
    (n, P), Y_test (m, P); fit: fit_banded_ridge's result; train_runs (n,): each row's run."""
    f64 = dict(device=grams.device, dtype=torch.float64)
    yc = torch.as_tensor(Y_train - Y_train.mean(axis=0), **f64)                     # (n, P)
    test_error = torch.as_tensor(Y_test - fit["test_prediction"], **f64)             # (m, P)
    members = held_out_members(train_runs, grams.device)
    n = len(yc)
    errors = torch.zeros(len(members), yc.shape[1], **f64)
    weightings, weighting_of = np.unique(fit["weights"], axis=0, return_inverse=True)
    for k, w in enumerate(torch.as_tensor(weightings, **f64)):
        lam, basis = eigh(torch.einsum("s,sij->ij", w, grams))
        lam = lam.clamp(min=0)
        lam[torch.argmax(basis.sum(dim=0).abs())] = 0    # the intercept's direction, as solve_eigh
        test_basis = torch.einsum("s,smn->mn", w, grams_test) @ basis             # (m, n)
        for alpha in np.unique(fit["alpha"][weighting_of.ravel() == k]):
            cols = np.flatnonzero((weighting_of.ravel() == k) & (fit["alpha"] == alpha))
            scale = 1 / (lam + alpha)                                             # G's spectrum
            residual = alpha * basis @ (scale[:, None] * (basis.T @ yc[:, cols]))  # alpha G yc
            for g, idx in enumerate(members):
                block = alpha * (basis[idx] * scale) @ basis[idx].T - 1.0 / n     # (I - H)_gg
                held_out = torch.linalg.solve(block, residual[idx])               # e_g (n_g, b)
                change = (held_out.sum(dim=0) / n
                          + test_basis @ (scale[:, None] * (basis[idx].T @ held_out)))  # (m, b)
                errors[g, cols] = ((test_error[:, cols] + change) ** 2).sum(dim=0)
    return errors.cpu().numpy()


def test_blocks(test_run, block=BLOCK_TRS):
    """The blocks of the test time course: each test run's TRs (contiguous, in time order) cut into
    max(1, L // block) blocks of consecutive TRs as equal as can be. test_run (m,): the run of each
    test TR. Returns a list of index arrays."""
    blocks = []
    for run in np.unique(test_run):
        rows = np.flatnonzero(test_run == run)
        blocks += np.array_split(rows, max(1, len(rows) // block))
    return blocks


def unique_p_values(y_test, prediction, reduced_prediction, test_run, deleted, block=BLOCK_TRS):
    """One-sided p-values (S, P) that set s improves the prediction, R^2(all) > R^2(all but s) (see
    above). y_test, prediction (m, P); reduced_prediction (S, m, P) the models without each set;
    test_run (m,); deleted: deleted_run_errors (R, P) of the model of all the sets, then of each
    reduced one, stacked (1 + S, R, P). NaN where there are fewer than 2 blocks or training runs; 1
    where the models with and without the set predict the same (it was switched off)."""
    from scipy.stats import t as student
    blocks = test_blocks(test_run, block)
    n_runs = deleted.shape[1]
    if len(blocks) < 2 or n_runs < 2:
        return np.full((len(reduced_prediction), y_test.shape[1]), np.nan)
    ss = ((y_test - y_test.mean(axis=0)) ** 2).sum(axis=0)                        # (P,)
    full_error = (y_test - prediction) ** 2                                       # (m, P)
    p_values = []
    for reduced, reduced_deleted in zip(reduced_prediction, deleted[1:]):
        d = (y_test - reduced) ** 2 - full_error                                 # (m, P)
        means = np.stack([d[rows].mean(axis=0) for rows in blocks])               # (k, P)
        test_var = (means.var(axis=0, ddof=1) / len(blocks)) * (len(d) / ss) ** 2
        gains = (reduced_deleted - deleted[0]) / ss                               # (R, P)
        train_var = (n_runs - 1) / n_runs * ((gains - gains.mean(axis=0)) ** 2).sum(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            df = (test_var + train_var) ** 2 / (test_var ** 2 / (len(blocks) - 1)
                                                + train_var ** 2 / (n_runs - 1))
            p = student.sf(d.sum(axis=0) / ss / np.sqrt(test_var + train_var), df)
        p_values.append(np.where(test_var + train_var > 0, p, 1.0))
    return np.stack(p_values)


def unique_significance(args, design, fit, partition):
    """unique_p (S, P) the one-sided p-values of the unique parts (unique_p_values) and
    unique_significant (S, P) their Benjamini-Hochberg mask per set; NaN and False where the split
    gives no test time course to test on (--split random) and for a parcel without an R^2."""
    unique = partition["unique"]
    if args.split == "random":   # test TRs interleaved with training TRs: no independent blocks
        return dict(unique_p=np.full(unique.shape, np.nan),
                    unique_significant=np.zeros(unique.shape, bool))
    test_run = np.array([g for g, _ in design.test_ids])
    p_values = unique_p_values(design.Y_test, fit["test_prediction"],
                               partition["reduced_prediction"], test_run,
                               partition["deleted_run_errors"])
    p_values[np.isnan(unique)] = np.nan
    return dict(unique_p=p_values,
                unique_significant=np.stack([fdr_mask(p, args.fdr) for p in p_values]))


def partition_summary(partition, names, args):
    """The variance partition in summary.json: per set its R^2 alone and its unique part (median and
    max over parcels, significant parcels), and the R^2 of all the sets and their shared part."""
    def median(x):
        return float(np.nanmedian(x)) if np.isfinite(x).any() else None
    per_set = {name: {"r2_alone_median": median(partition["r2_alone"][s]),
                      "unique_median": median(partition["unique"][s]),
                      "unique_max": float(np.nanmax(partition["unique"][s]))
                      if np.isfinite(partition["unique"][s]).any() else None,
                      "unique_n_significant": int(partition["unique_significant"][s].sum())}
               for s, name in enumerate(names)}
    return {"sets": names, "band_grid": list(args.band_grid),
            "r2_all_median": median(partition["r2_all"]),
            "shared_median": median(partition["shared"]), "per_set": per_set,
            "definition": "test R^2; unique part of a set = R^2(all sets) - R^2(all sets but it); "
                          "shared = R^2(all sets) - the sum of the unique parts; "
                          "each model a banded ridge",
            "unique_test": UNIQUE_TEST.format(block=BLOCK_TRS, fdr=args.fdr)}


def write_partition(out_dir, fit, partition, names, stage, sub):
    """The arrays of the variance partition, and unique_map.nii.gz (one volume per set) with
    unique_map.png (one row per set; parcels whose unique part is not significant faded)."""
    save_npy(out_dir / "band_weights.npy", fit["weights"])                     # (P, S)
    for key in ("r2_alone", "r2_all", "unique", "shared", "unique_p", "unique_significant"):
        save_npy(out_dir / f"{key}.npy", partition[key])
    tested = np.isfinite(partition["unique_p"]).any()
    titles = [f"sub-{sub}: R^2 of {name} beyond " + " + ".join(n for n in names if n != name)
              for name in names]
    write_parcel_maps(partition["unique"], partition["unique_significant"], tested, stage.labels,
                      stage.atlas_path, out_dir / "unique_map", titles, "test R^2")
