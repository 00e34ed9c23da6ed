"""The encoding model (paper sections 2.3.2-2.3.3): delayed features, the session split,
standardisation, ridge regression with its penalty chosen by exact leave-one-out, Pearson r.

Reading order: DELAY_TRS and delayed_design (which features predict which volume), split_samples,
standardize, ridge_loo (the derivation is above it), pearson_r. 06_ridge.py runs them per subject;
on the CPU it uses ridge_fast.py, the same ridge with BLAS/LAPACK shortcuts (checked equal).
"""
import numpy as np
import torch

DELAY_TRS = 3                       # paper 2.3.2: features of TR t - 3 (4.5 s) predict volume t
PAPER_ALPHAS = (0.1, 1.0, 100.0)    # paper 2.3.3: the penalty grid


# --------------------------------------------------------------------------------------------------
# The design: which features predict which volume, and which volumes are trained on
# --------------------------------------------------------------------------------------------------
def delayed_design(runs, sample_ids, delays, feature_set=0):
    """The delayed feature rows of the chosen samples, float32 (len(sample_ids), D * len(delays)),
    of one feature set. sample_ids: list of (run index, row index within the run's valid
    samples)."""
    n_features = runs[0]["features"][feature_set].shape[1]
    X = np.empty((len(sample_ids), n_features * len(delays)), np.float32)
    ids = np.array(sample_ids).reshape(-1, 2)  # (N, 2): run index, sample index
    for g in np.unique(ids[:, 0]):
        out_rows = np.flatnonzero(ids[:, 0] == g)
        t = runs[g]["rows"][ids[out_rows, 1]]  # TR of each sample
        features = runs[g]["features"][feature_set]   # (T, D)
        for j, d in enumerate(delays):
            X[out_rows, j * n_features:(j + 1) * n_features] = features[t - d]
    return X


def split_samples(runs, split, test_size, train_splits, rng):
    """Assign each sample to train or test: two lists of (run index, sample index).

    runs: per run a dict with "split" (train, validation or test) and "rows" (its samples).
    split "session" (paper 2.1.4): the runs whose split is in `train_splits` train, those of split
    test are tested. split "random" (paper 2.3.3): `test_size` of every run's samples at random
    (rng), the rest trains."""
    samples = [(g, k) for g, run in enumerate(runs) for k in range(len(run["rows"]))]
    if split == "random":
        test = np.zeros(len(samples), bool)
        test[rng.choice(len(samples), max(1, round(test_size * len(samples))), replace=False)] = True
        return ([s for s, t in zip(samples, test) if not t],
                [s for s, t in zip(samples, test) if t])
    return ([s for s in samples if runs[s[0]]["split"] in train_splits],
            [s for s in samples if runs[s[0]]["split"] == "test"])


def standardize(X_train, X_test, scale=True, chunk=4096):
    """Scale both to zero mean, unit variance with training statistics, in place (scale False: leave
    them as they are); returns the number of columns that are constant over the training samples."""
    n_constant = 0
    for start in range(0, X_train.shape[1], chunk):   # a block of columns at a time: no float64 copy
        c = slice(start, start + chunk)
        std = X_train[:, c].std(axis=0, dtype=np.float64)
        n_constant += int((std == 0).sum())
        if scale:
            mean = X_train[:, c].mean(axis=0, dtype=np.float64)
            std[std == 0] = 1.0  # a constant feature carries nothing: it becomes 0
            X_train[:, c] = (X_train[:, c] - mean) / std
            X_test[:, c] = (X_test[:, c] - mean) / std
    return n_constant


# --------------------------------------------------------------------------------------------------
# Ridge with exact leave-one-out for every alpha and every parcel at once (paper 2.3.3)
# --------------------------------------------------------------------------------------------------
# The model of one parcel is y = b0 + X b, b minimizing ||y - b0 - X b||^2 + alpha ||b||^2 (paper
# eq. 8; the intercept b0 is not penalized). With Xc = X minus its training means and yc = y minus
# its mean, the fit is b = Xc' (Xc Xc' + alpha I)^-1 yc, and the fitted values are H y with the hat
# matrix
#     H = 11'/n + K G,   K = Xc Xc' (n, n),   G = (K + alpha I)^-1.
# A left-out sample needs no refit: its leave-one-out residual is e_i = r_i / (1 - H_ii), with
# r = (I - H) y the in-sample residuals (the Sherman-Morrison formula); leaving a group g of samples
# out (a run) gives e_g = [(I - H)_gg]^-1 r_g. Since K G = I - alpha G and K 1 = 0,
#     I - H = alpha G - 11'/n   and   r = alpha G yc.
# One eigendecomposition K = Q diag(lam) Q' gives G for every alpha: alpha G = Q diag(alpha / (lam +
# alpha)) Q'. The penalty of each parcel is the alpha of smallest mean squared held-out error (the
# first on ties): the choice of scikit-learn's RidgeCV(alphas, alpha_per_target=True).
def ridge_loo(X_train, Y_train, X_test, alphas, groups=None, relative=False):
    """Ridge per target, its penalty chosen by exact leave-one-out (or leave-one-group-out).

    X_train (n, p), Y_train (n, P), X_test (m, p): float tensors on one device (computed in
    float64). alphas (A,): the penalties tried, or with `relative` their multiples of the mean
    non-zero eigenvalue of K (the features' scale). groups (n,) or None: the group of each sample,
    left out together; -1 marks samples never left out. Returns a dict: alpha (P,) the chosen
    penalty, alpha_index (P,), alpha_grid (A,), cv_error (A, P) mean squared held-out error of
    each alpha, test_prediction (m, P) and train_fit (n, P)."""
    X_train, Y_train, X_test = (t.double() for t in (X_train, Y_train, X_test))
    x_mean, y_mean = X_train.mean(dim=0), Y_train.mean(dim=0)
    Xc, yc = X_train - x_mean, Y_train - y_mean                                # (n, p), (n, P)
    K, K_test = Xc @ Xc.T, (X_test - x_mean) @ Xc.T                             # (n, n), (m, n)
    lam, Q = torch.linalg.eigh(K)                                               # (n,), (n, n)
    lam = lam.clamp(min=0)                           # rounding can make K's zeros slightly negative
    lam[torch.argmax(Q.sum(dim=0).abs())] = 0        # 1, the intercept's direction, is K's null vector
    n, p = Xc.shape
    alphas = torch.tensor(alphas, dtype=torch.float64, device=K.device)
    if relative:
        alphas = alphas * lam.sum() / max(1, min(n - 1, p))
    Qty = Q.T @ yc                                                              # (n, P)
    groups = None if groups is None else torch.as_tensor(groups, device=K.device)
    cv_error = torch.stack([held_out_error(Q, lam, alpha, Qty, groups) for alpha in alphas])
    best = torch.argmin(cv_error, dim=0)                                        # (P,)
    dual = Q @ (Qty / (lam[:, None] + alphas[best][None, :]))                   # G yc, (n, P)
    return dict(alpha=alphas[best], alpha_index=best, alpha_grid=alphas, cv_error=cv_error,
                test_prediction=K_test @ dual + y_mean,
                train_fit=Y_train - alphas[best] * dual)                        # y - alpha G yc


def held_out_error(Q, lam, alpha, Qty, groups):
    """Mean squared held-out error (P,) of one alpha: residuals r = alpha G yc, then r_i / (1 - H_ii)
    for each sample (groups None) or [(I - H)_gg]^-1 r_g for each group g >= 0."""
    n = len(Q)
    shrink = alpha / (lam + alpha)                                               # alpha G's spectrum
    residual = Q @ (shrink[:, None] * Qty)                                       # (n, P)
    if groups is None:
        one_minus_h = (Q ** 2) @ shrink - 1.0 / n                                # diag(I - H), (n,)
        return ((residual / one_minus_h[:, None]) ** 2).mean(dim=0)
    errors = []
    for g in torch.unique(groups[groups >= 0]):
        rows = torch.nonzero(groups == g).flatten()
        block = (Q[rows] * shrink) @ Q[rows].T - 1.0 / n                         # (I - H)_gg
        errors.append(torch.linalg.solve(block, residual[rows]))                 # e_g
    return (torch.cat(errors) ** 2).mean(dim=0)


def pearson_r(a, b):
    """Pearson r of each column of a (n, P) with the same column of b (n, P): (P,). NaN for a
    constant column."""
    # centering could leave rounding noise
    constant = (np.ptp(a, axis=0) == 0) | (np.ptp(b, axis=0) == 0)
    a = a - a.mean(axis=0)
    b = b - b.mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(axis=0) / np.sqrt((a**2).sum(axis=0) * (b**2).sum(axis=0))
    r[~np.isfinite(r) | constant] = np.nan
    return r
