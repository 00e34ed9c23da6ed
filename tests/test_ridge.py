"""Stage 06: ridge with exact leave-one-out against scikit-learn and brute force, delays, scores, the CLI."""
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import pearsonr
from sklearn.linear_model import Ridge, RidgeCV

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common
from paper.gpt import PAPER_LAYER
import ridge_fast
import ground_truth
import significance
from common import bids_entities, run_stem  # noqa: E402
from conftest import load_stage, needs_namespaces, run_confined  # noqa: E402
from paper import encoding

ridge = load_stage("06_ridge.py")
ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def regression_data(n, p, n_targets, seed=0, n_test=15):
    """X (n, p) correlated features, Y (n, P) whose signal-to-noise ratio falls across targets."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(p, p)) / np.sqrt(p) + np.eye(p)
    X = rng.normal(size=(n + n_test, p)) @ mixing + 3.0  # non-zero means: the intercept matters
    weights = rng.normal(size=(p, n_targets)) / np.sqrt(p)
    noise = rng.normal(size=(n + n_test, n_targets)) * np.logspace(-1, 1.5, n_targets)
    Y = X @ weights + noise + rng.normal(size=n_targets)
    return X[:n], Y[:n], X[n:]


# --------------------------------------------------------------------------------------------------
# The closed form against independent references
# --------------------------------------------------------------------------------------------------
SOLVERS = [(40, 120, "cholesky"), (40, 120, "eigh"), (80, 12, "svd")]  # n, p, solver
SOLVER_IDS = ["wide-dual-cholesky", "wide-dual-eigh", "tall-primal"]


@pytest.mark.parametrize("n, p, solver", SOLVERS, ids=SOLVER_IDS)
def test_matches_sklearn_ridgecv(n, p, solver):
    X, Y, X_test = regression_data(n, p, n_targets=12)
    # blocks of features, Gram rows and targets that divide nothing evenly
    fit = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, feature_chunk=7, row_block=9, parcel_batch=5,
                              solver="auto" if solver == "svd" else solver)
    assert fit["mode"] == ("dual" if p > n else "primal") and fit["solver"] == solver
    assert set(fit["seconds"]) == {"products", "selection", "prediction"}
    reference = RidgeCV(alphas=ALPHAS, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    assert len(np.unique(reference.alpha_)) >= 3, "data should make targets choose different alphas"
    np.testing.assert_array_equal(fit["alpha"], reference.alpha_)
    # both are ~1e-12 from the exact errors (mpmath) here; 1e-10 catches a lost intercept cancellation, which
    # costs digits where 1 - H_ii is small (the smallest alpha)
    np.testing.assert_allclose(fit["cv_error"], reference.cv_results_.mean(axis=0).T, rtol=1e-10)
    np.testing.assert_allclose(fit["test_prediction"], reference.predict(X_test), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit["train_fit"], reference.predict(X), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n, p", [(40, 120), (80, 12)], ids=["wide", "tall"])
def test_the_papers_solver_matches_sklearn_and_the_fast_one(n, p):
    """paper/encoding.py's ridge (one eigendecomposition in torch, the clearest form) chooses scikit-learn's
    alphas with its leave-one-out errors, and equals ridge_fast's solvers leaving runs out too."""
    X, Y, X_test = regression_data(n, p, n_targets=12)
    as_tensors = [torch.as_tensor(a) for a in (X, Y, X_test)]
    fit = {k: v.numpy() for k, v in encoding.ridge_loo(*as_tensors, ALPHAS).items()}
    reference = RidgeCV(alphas=ALPHAS, alpha_per_target=True, store_cv_results=True).fit(X, Y)
    np.testing.assert_array_equal(fit["alpha"], reference.alpha_)
    np.testing.assert_allclose(fit["cv_error"], reference.cv_results_.mean(axis=0).T, rtol=1e-9)
    np.testing.assert_allclose(fit["test_prediction"], reference.predict(X_test), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(fit["train_fit"], reference.predict(X), rtol=1e-6, atol=1e-9)
    runs = np.repeat([0, 1, 2, -1], [10, 12, n - 30, 8])          # the last 8 rows never left out
    by_run = {k: v.numpy() for k, v in encoding.ridge_loo(*as_tensors, ALPHAS, runs, relative=True).items()}
    fast = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, groups=runs, relative=True)
    np.testing.assert_allclose(by_run["alpha_grid"], fast["alpha_grid"], rtol=1e-10)
    np.testing.assert_allclose(by_run["cv_error"], fast["cv_error"], rtol=1e-8)
    np.testing.assert_allclose(by_run["test_prediction"], fast["test_prediction"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("n, p, solver", [(18, 30, "cholesky"), (18, 30, "eigh"), (25, 6, "svd")], ids=SOLVER_IDS)
def test_leave_one_out_and_leave_one_run_out_match_refitting(n, p, solver):
    X, Y, X_test = regression_data(n, p, n_targets=3, seed=1)
    runs = np.repeat([0, 1, 2], [6, 7, n - 13])
    choice = "auto" if solver == "svd" else solver
    loo = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, solver=choice)
    by_run = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, groups=runs, solver=choice)
    assert loo["solver"] == by_run["solver"] == solver
    for a, alpha in enumerate(ALPHAS):
        held_one = np.empty_like(Y)
        held_run = np.empty_like(Y)
        for i in range(n):  # refit n times without sample i
            keep = np.arange(n) != i
            held_one[i] = Ridge(alpha=alpha).fit(X[keep], Y[keep]).predict(X[i:i + 1])[0]
        for g in np.unique(runs):  # refit once per run without that run
            out = runs == g
            held_run[out] = Ridge(alpha=alpha).fit(X[~out], Y[~out]).predict(X[out])
        np.testing.assert_allclose(loo["cv_error"][a], ((Y - held_one) ** 2).mean(axis=0), rtol=1e-7)
        np.testing.assert_allclose(by_run["cv_error"][a], ((Y - held_run) ** 2).mean(axis=0), rtol=1e-7)


@pytest.mark.parametrize("n, p", [(40, 120), (80, 12)], ids=["dual", "primal"])
def test_a_relative_grid_multiplies_the_mean_nonzero_eigenvalue(n, p):
    """--alphas wide: penalties relative to the features' scale, the mean of the non-zero eigenvalues of
    Xc Xc' (computed here by numpy's eigvalsh), give the same fit as those absolute penalties."""
    X, Y, X_test = regression_data(n, p, n_targets=4)
    Xc = X - X.mean(axis=0)
    eigenvalues = np.linalg.eigvalsh(Xc @ Xc.T)
    scale = eigenvalues[eigenvalues > 1e-8 * eigenvalues.max()].mean()
    relative = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, relative=True)
    absolute = ridge_fast.fit_ridge_loo(X, Y, X_test, [a * scale for a in ALPHAS])
    np.testing.assert_allclose(relative["alpha_grid"], np.array(ALPHAS) * scale, rtol=1e-10)
    np.testing.assert_allclose(relative["alpha"], absolute["alpha"], rtol=1e-10)
    np.testing.assert_allclose(relative["test_prediction"], absolute["test_prediction"], rtol=1e-8)


def test_the_default_grid_is_wide_and_the_papers_is_one_flag_away():
    """At the paper's scale (standardized features, p >> n) its grid {0.1, 1, 100} is almost no penalty:
    every parcel with signal sits on its top edge and predicts worse than with the default grid, whose
    choices lie inside it."""
    assert ridge.parse_args(["--name", "x"]).alphas == ["wide"]
    assert ridge_fast.penalty_grid(ridge.parse_args(["--name", "x", "--alphas", "paper"]).alphas) == (
        (0.1, 1.0, 100.0), False)
    rng = np.random.default_rng(4)
    n, m, p = 200, 200, 3000
    latent = rng.normal(size=(n + m, 5))
    X = latent @ rng.normal(size=(5, p)) + 3 * rng.normal(size=(n + m, p))
    X = (X - X[:n].mean(axis=0)) / X[:n].std(axis=0)
    Y = latent @ rng.normal(size=(5, 6)) + 3 * rng.normal(size=(n + m, 6))
    wide = ridge_fast.fit_ridge_loo(X[:n], Y[:n], X[n:], *ridge_fast.penalty_grid(["wide"])[:1], relative=True)
    paper = ridge_fast.fit_ridge_loo(X[:n], Y[:n], X[n:], encoding.PAPER_ALPHAS)
    r_wide, r_paper = encoding.pearson_r(Y[n:], wide["test_prediction"]), encoding.pearson_r(Y[n:], paper["test_prediction"])
    assert (paper["alpha_index"] == 2).all()                                     # the paper's top edge
    assert ((wide["alpha_index"] > 0) & (wide["alpha_index"] < len(ridge_fast.WIDE_GRID) - 1)).all()
    assert (r_wide > r_paper).all() and (r_wide - r_paper).mean() > 0.02, (r_wide, r_paper)


def test_leave_one_run_out_estimates_the_error_that_leave_one_out_underestimates():
    """Noise autocorrelated over TRs (AR 0.9 within runs): exact leave-one-out sees each TR's neighbours,
    underestimates the held-out error several fold and picks a smaller penalty; leave-one-run-out (the
    default, --cv runs) estimates the error on new runs within 25%."""
    assert ridge.parse_args(["--name", "x"]).cv == "runs"
    rng = np.random.default_rng(5)
    runs, length, p = 12, 60, 400

    def autocorrelated(width):
        x = np.empty((runs * length, width))
        for start in range(0, runs * length, length):
            x[start] = rng.normal(size=width)
            for t in range(start + 1, start + length):
                x[t] = 0.9 * x[t - 1] + np.sqrt(1 - 0.81) * rng.normal(size=width)
        return x

    X = autocorrelated(p)
    Y = X[:, :3] @ rng.normal(size=(3, 8)) * 0.3 + autocorrelated(8)
    train = np.arange(runs * length) < 8 * length
    group = np.repeat(np.arange(runs), length)[train]
    loo = ridge_fast.fit_ridge_loo(X[train], Y[train], X[~train], ridge_fast.WIDE_GRID, relative=True)
    by_run = ridge_fast.fit_ridge_loo(X[train], Y[train], X[~train], ridge_fast.WIDE_GRID, groups=group, relative=True)
    for fit, name in ((loo, "loo"), (by_run, "runs")):
        true_error = ((Y[~train] - fit["test_prediction"]) ** 2).mean(axis=0)
        estimate = fit["cv_error"][fit["alpha_index"], np.arange(8)]
        ratio = np.median(estimate / true_error)
        if name == "loo":
            assert ratio < 0.5, ratio
        else:
            assert 0.75 < ratio < 1.25, ratio
    assert np.median(np.log10(by_run["alpha"] / loo["alpha"])) >= 1


def test_dual_solver_choice_and_cholesky_fallback(monkeypatch):
    assert ridge_fast._dual_solver(4000, 1095, 3) == "cholesky"  # the paper's grid: 3 factorizations
    assert ridge_fast._dual_solver(4000, 1095, 40) == "eigh"  # one decomposition serves a long grid
    X, Y, X_test = regression_data(40, 120, n_targets=12)
    eigh = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, solver="eigh")

    def not_positive_definite(K, alpha, shift):  # as when an alpha is below the rounding errors of K
        raise np.linalg.LinAlgError("not positive definite")
    monkeypatch.setattr(ridge_fast, "_inverse_cholesky_factor", not_positive_definite)
    fallback = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, solver="cholesky")
    assert fallback["solver"] == "eigh"
    np.testing.assert_array_equal(fallback["alpha"], eigh["alpha"])
    np.testing.assert_array_equal(fallback["test_prediction"], eigh["test_prediction"])


def test_float32_products_choose_the_same_alphas():
    """The CUDA path (float32 products, float64 decomposition), run here on the CPU."""
    X, Y, X_test = regression_data(40, 120, n_targets=12)
    exact = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS)
    single = ridge_fast.fit_ridge_loo(X.astype(np.float32), Y, X_test.astype(np.float32), ALPHAS, dtype=torch.float32,
                                 feature_chunk=50)
    np.testing.assert_array_equal(single["alpha"], exact["alpha"])
    np.testing.assert_allclose(single["test_prediction"], exact["test_prediction"], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the solver's CUDA branches")
@pytest.mark.parametrize("n, p, solver", SOLVERS, ids=SOLVER_IDS)
def test_cuda_matches_the_cpu(n, p, solver):
    """On a GPU: float64 products equal the CPU's closely, float32 products choose the same alphas."""
    X, Y, X_test = regression_data(n, p, n_targets=12)
    cpu = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, solver=solver)
    double = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS, device="cuda", solver=solver)
    single = ridge_fast.fit_ridge_loo(X.astype(np.float32), Y, X_test.astype(np.float32), ALPHAS, device="cuda",
                                 dtype=torch.float32, solver=solver)
    assert double["solver"] == single["solver"] == cpu["solver"] == solver
    np.testing.assert_array_equal(double["alpha"], cpu["alpha"])
    np.testing.assert_allclose(double["test_prediction"], cpu["test_prediction"], rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(single["alpha"], cpu["alpha"])
    np.testing.assert_allclose(single["test_prediction"], cpu["test_prediction"], rtol=1e-3, atol=1e-3)


def test_constant_target_gives_nan_r_not_a_crash():
    X, Y, X_test = regression_data(30, 50, n_targets=3)
    Y[:, 1] = 2.5
    fit = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS)
    np.testing.assert_allclose(fit["test_prediction"][:, 1], 2.5)
    r = encoding.pearson_r(np.random.default_rng(0).normal(size=(15, 3)), fit["test_prediction"])
    assert np.isnan(r[1]) and np.isfinite(r[[0, 2]]).all()


def test_pearson_r_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    b[:, 0] += 2 * a[:, 0]
    expected = [pearsonr(a[:, j], b[:, j])[0] for j in range(4)]
    np.testing.assert_allclose(encoding.pearson_r(a, b), expected, rtol=1e-12)


def test_circular_shift_null_is_the_shifted_prediction():
    rng = np.random.default_rng(4)
    prediction, y_test = rng.normal(size=(12, 3)), rng.normal(size=(12, 3))   # one test run of 12 samples
    run = np.full(12, 7)
    exact = significance.circular_shift_null(y_test, prediction, run, 100, rng)
    expected = [encoding.pearson_r(y_test, np.roll(prediction, -k, axis=0)) for k in range(1, 12)]
    np.testing.assert_allclose(exact, expected)  # 11 shifts besides 0 <= 100 permutations: all of them, once
    sampled = significance.circular_shift_null(y_test, prediction, run, 5, rng)
    assert sampled.shape == (5, 3)
    assert all(np.isclose(row, [encoding.pearson_r(y_test, prediction)] + expected).all(axis=1).any()
               for row in sampled)
    with pytest.raises(ValueError, match="contiguous"):    # samples of a run must not be interleaved
        significance.circular_shift_null(y_test, prediction, np.tile([0, 1], 6), 100, rng)


def test_enumerated_null_is_the_whole_group_of_shifts_of_two_runs():
    """Two test runs of 3 and 4 samples: the null is every pair of shifts but (0, 0), so a p-value is the
    share of the 12 elements of the group (the observed one included) whose r reaches the observed r."""
    rng = np.random.default_rng(5)
    run = np.repeat([0, 1], [3, 4])
    prediction, y = rng.normal(size=(7, 6)), rng.normal(size=(7, 6))
    null = significance.circular_shift_null(y, prediction, run, 1000, rng)
    group = [encoding.pearson_r(y, np.r_[np.roll(prediction[:3], -a, axis=0), np.roll(prediction[3:], -b, axis=0)])
             for a in range(3) for b in range(4)]                     # brute force; (0, 0) first
    np.testing.assert_allclose(null, group[1:])
    r = encoding.pearson_r(y, prediction)
    p, _, _ = significance.permutation_p_values(r, null, 0.05)
    np.testing.assert_allclose(p, (np.array(group) >= r - 1e-12).mean(axis=0))


def test_circular_shift_p_values_are_calibrated_without_signal():
    """No signal: BOLD independent of predictions that are as autocorrelated as HRF-smoothed features
    (AR(1), 0.9), 2 test runs of 77 TRs. A valid test puts 5% of the parcels below p = 0.05. Leaving the
    small shifts out of the null (a 'minimum shift' of 10 TRs) would put 7.9% there."""
    rng = np.random.default_rng(0)
    n_trs, n_parcels = 77, 3000
    innovations = rng.normal(size=(2, n_trs, n_parcels))
    prediction = np.zeros_like(innovations)                            # (runs, TRs, parcels)
    for t in range(n_trs):
        prediction[:, t] = 0.9 * prediction[:, t - 1] + innovations[:, t] if t else innovations[:, t]
    prediction = prediction.reshape(-1, n_parcels)
    y = rng.normal(size=prediction.shape)
    null = significance.circular_shift_null(y, prediction, np.repeat([0, 1], n_trs), 200, np.random.default_rng(1))
    p, _, _ = significance.permutation_p_values(encoding.pearson_r(y, prediction), null, 0.05)
    assert 0.035 < (p < 0.05).mean() < 0.065 and (p < 0.01).mean() < 0.02


def test_principal_components_are_those_of_the_centred_training_features():
    """--pca, also with --no-standardize (features far from zero mean): the projections span what
    scikit-learn's PCA finds on the training rows, and the test rows use the same axes."""
    from sklearn.decomposition import PCA
    rng = np.random.default_rng(6)
    loadings = rng.normal(size=(3, 40)) * np.array([[6.0], [4.0], [3.0]])      # 3 strong axes
    X = (rng.normal(size=(200, 3)) @ loadings + rng.normal(size=(200, 40)) + 5.0).astype(np.float32)
    train, test = ridge.principal_components(X[:150].copy(), X[150:].copy(), 3, "cpu", seed=0)
    reference = PCA(3).fit(X[:150])
    for ours, theirs in ((train, reference.transform(X[:150])), (test, reference.transform(X[150:]))):
        # the same projections up to sign and a constant offset (the intercept's)
        cosines = np.abs(encoding.pearson_r(ours, theirs))
        np.testing.assert_allclose(cosines, 1.0, atol=1e-3)


def test_permutation_p_values_and_fdr():
    r = np.array([0.9, 0.0, np.nan])
    null = np.random.default_rng(0).normal(0, 0.1, size=(199, 3))
    p, q, significant = significance.permutation_p_values(r, null, 0.05)
    assert p[0] == 1 / 200 and 0.2 < p[1] < 0.8 and np.isnan(p[2])
    assert significant.tolist() == [True, False, False]


@pytest.mark.parametrize("n_permutations, run_lengths, warned", [
    (100, (50, 50), "--n-permutations 799"),             # 40 parcels / q 0.05 = 800 p-values' room
    (1000, (50, 50), None),                              # 1 / 1001 <= 0.05 / 40: a lone parcel can pass
    (1000, (30,), "longer or more test runs (these allow 29 circular shifts)")])
def test_a_warning_when_too_few_shifts_let_no_parcel_pass_fdr(capsys, n_permutations, run_lengths,
                                                             warned):
    from types import SimpleNamespace
    args = SimpleNamespace(n_permutations=n_permutations, fdr=0.05)
    test_run = np.repeat(np.arange(len(run_lengths)), run_lengths)
    n_null = len(significance.shift_sources(test_run, n_permutations, np.random.default_rng(0)))
    ridge.warn_if_too_few_shifts(args, "01", n_null, "parcel's r", np.zeros(40, bool))
    message = capsys.readouterr().err
    assert (warned in message) if warned else message == ""
    if warned:
        group = int(message.split(" or more at a time")[0].split()[-1])
        # The group size the warning names, against scipy's Benjamini-Hochberg: `group`
        # parcels at the smallest p-value all pass, one fewer none.
        for k, passes in ((group, True), (group - 1, False)):
            p = np.ones(40)
            p[:k] = 1 / (n_null + 1)
            null = np.zeros((n_null, 40))
            r = np.where(np.arange(40) < k, 1.0, -1.0)    # beats every null r, or none
            np.testing.assert_allclose(significance.permutation_p_values(r, null, 0.05)[0], p)
            assert significance.permutation_p_values(r, null, 0.05)[2][:max(k, 1)].all() == passes
    ridge.warn_if_too_few_shifts(args, "01", n_null, "parcel's r", np.eye(40, dtype=bool)[0])
    assert capsys.readouterr().err == ""                 # a parcel passed: nothing to say

# --------------------------------------------------------------------------------------------------
# A work directory in the stage contract's layout, with a planted signal
# --------------------------------------------------------------------------------------------------
N_FEATURES, N_PARCELS, PLANTED, EMPTY = 8, 12, (0, 3, 7), 10  # BOLD columns; EMPTY is constant (0.0)
LABELS = [2 * c + 3 for c in range(N_PARCELS)]  # atlas label values differ from the column numbers


def make_work(root, subjects=("01",), volumes=60, delay=3, seed=0):
    """Write bold/ (manifest, labels, atlas, runs) and features/demo/<layer>/ for a planted-signal dataset.

    Sessions 001-003 train, 004 validation, 005 test, two runs each. Planted columns follow a fixed linear
    read-out of the features `delay` TRs earlier plus noise; EMPTY is 0.0 (a parcel without voxels, as 02
    writes it); the other columns are noise. Volume 0 is NaN.
    """
    rng = np.random.default_rng(seed)
    work = Path(root)
    readout = rng.normal(size=(N_FEATURES, len(PLANTED)))
    rows = []
    for sub in subjects:
        for ses, split in zip(("001", "002", "003", "004", "005"),
                              ("train", "train", "train", "validation", "test")):
            for run in ("01", "02"):
                stem = run_stem(sub, ses, "airstriker", run)
                features = rng.normal(size=(volumes, N_FEATURES))
                bold = rng.normal(size=(volumes, N_PARCELS))
                bold[delay:, PLANTED] += 1.5 * features[:-delay] @ readout
                bold[:, EMPTY] = 0.0
                bold[0] = np.nan  # a non-steady-state volume
                bold_path = Path("bold") / f"sub-{sub}" / f"ses-{ses}" / f"{stem}.npy"
                feature_path = work / "features/demo/layer_a" / f"sub-{sub}" / f"ses-{ses}" / f"{stem}.npy"
                for path, array in ((work / bold_path, bold.astype(np.float32)),
                                    (feature_path, features.astype(np.float16))):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    np.save(path, array)
                rows.append(dict(sub=sub, ses=ses, task="airstriker", run=run, n_volumes=volumes, tr_s=1.49,
                                 split=split, bold_path=str(bold_path), kept_volumes=volumes - 1))
    pd.DataFrame(rows).to_csv(work / "bold/manifest.tsv", sep="\t", index=False)
    pd.DataFrame(dict(column=range(N_PARCELS), label=LABELS, name=[f"p{v}" for v in LABELS])).to_csv(
        work / "bold/labels.tsv", sep="\t", index=False)
    atlas = np.zeros((8, 9, 8), np.int16)
    atlas[1:7, 1:8, 1:7] = np.resize(LABELS, (6, 7, 6))  # every label owns several voxels
    affine = np.diag([12.0, 12.0, 12.0, 1.0])
    affine[:3, 3] = (-48, -66, -42)
    nib.save(nib.Nifti1Image(atlas, affine), work / "bold/atlas.nii.gz")
    return work


def run_ridge(work, *flags):
    return subprocess.run([sys.executable, "06_ridge.py", "--work", str(work), "--name", "demo", *map(str, flags)],
                          cwd=REPO, capture_output=True, text=True)


def test_delays_never_cross_run_boundaries(tmp_path):
    work = make_work(tmp_path, volumes=12)
    manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
    runs = ridge.load_runs(ridge.run_files(work, manifest.iloc[:2], [work / "features/demo/layer_a"]),
                           delays=[1, 3])
    for run in runs:
        assert run["rows"].tolist() == list(range(3, 12))  # t >= max delay, and volume 0 (NaN) is gone
    ids = [(g, k) for g in range(2) for k in range(9)]
    X = encoding.delayed_design(runs, ids, [1, 3])  # (18, 2 * D)
    for i, (g, k) in enumerate(ids):
        t = runs[g]["rows"][k]
        np.testing.assert_array_equal(X[i, :N_FEATURES], runs[g]["features"][0][t - 1])
        np.testing.assert_array_equal(X[i, N_FEATURES:], runs[g]["features"][0][t - 3])
    # row 0 of run 2 uses run 2's TR 0, not the end of run 1
    np.testing.assert_array_equal(X[9, N_FEATURES:], runs[1]["features"][0][0])


def test_end_to_end_planted_signal(tmp_path):
    work = make_work(tmp_path, subjects=("01", "02"))
    result = run_ridge(work, "--n-permutations", 200)
    assert result.returncode == 0, result.stderr
    for sub in ("01", "02"):
        out = work / "results/demo" / f"sub-{sub}"
        r = np.load(out / "r.npy")
        significant = np.load(out / "significant.npy")
        noise = np.setdiff1d(np.arange(N_PARCELS), PLANTED + (EMPTY,))
        assert r.shape == (N_PARCELS,) and np.load(out / "alphas.npy").shape == (N_PARCELS,)
        assert r[list(PLANTED)].min() > 0.6 and np.abs(r[noise]).max() < 0.35
        assert significant[list(PLANTED)].all() and not significant[noise].any()
        assert np.isnan(r[EMPTY]) and np.isnan(np.load(out / "p_values.npy")[EMPTY]) and not significant[EMPTY]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["r_max"] == pytest.approx(float(np.nanmax(r)), abs=1e-6)
        assert summary["n_significant"] == len(PLANTED) and summary["n_parcels"] == N_PARCELS
        assert summary["n_parcels_nan_r"] == 1 and summary["r_median"] == pytest.approx(float(np.nanmedian(r)))
        assert summary["n_train_samples"] == 6 * 57 and summary["n_test_samples"] == 2 * 57  # TR 3.., no ses-004
        assert summary["layer"] == "layer_a" and "training-set" in summary["standardization"]
        # the console line gives r as a person reads it, not 0.9791832447052002
        assert f"r max {summary['r_max']:.3f}, median {summary['r_median']:.3f}, " in result.stdout
        r_map = nib.load(out / "r_map.nii.gz").get_fdata()
        atlas = nib.load(work / "bold/atlas.nii.gz").get_fdata()
        for column, label in enumerate(LABELS):
            np.testing.assert_allclose(r_map[atlas == label], np.nan_to_num(r[column]), rtol=1e-6)  # NaN -> 0
        assert (out / "r_map.png").stat().st_size > 0
    assert (work / "results/demo/r_by_subject.png").stat().st_size > 0
    # idempotent: a second call skips finished subjects and leaves their files alone
    flags = ["--n-permutations", 200]
    before = (work / "results/demo/sub-01/r.npy").stat().st_mtime_ns
    again = run_ridge(work, *flags, "--subjects", "01")
    assert again.returncode == 0 and "done already" in again.stdout
    assert (work / "results/demo/sub-01/r.npy").stat().st_mtime_ns == before
    summary = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    assert summary["stage"] == "06_ridge" and summary["settings"]["--alphas"] == ["wide"]
    assert summary["settings"]["--cv"] == "runs" and "leave-one-run-out" in summary["penalty_selection"]
    assert summary["inputs"]["features/demo/layer_a/sub-01/ses-005/sub-01_ses-005_task-airstriker_run-02.npy"][
        "sha256"] == common.file_sha256(work / "features/demo/layer_a/sub-01/ses-005/sub-01_ses-005_task-airstriker_run-02.npy")
    # other flags for the same results: refused, naming the flag, nothing touched
    other = run_ridge(work, "--n-permutations", 200, "--alphas", 1, 10)
    assert other.returncode == 2 and other.stderr.strip() == (
        f"error: {work / 'results/demo/sub-01/summary.json'}: made with --alphas wide, not 1.0 10.0: pass "
        "the same flags, or --overwrite to redo it")
    assert (work / "results/demo/sub-01/r.npy").stat().st_mtime_ns == before
    # new features of one run of sub-01 (05 recomputed them), a lost output of sub-02: both made again
    path = feature_file(work, "sub-01_ses-005_task-airstriker_run-02")
    np.save(path, np.load(path)[:, ::-1])
    (work / "results/demo/sub-02/r_map.png").unlink()
    redo = run_ridge(work, *flags)
    assert redo.returncode == 0, redo.stderr
    assert "features/demo/layer_a/sub-01/ses-005/sub-01_ses-005_task-airstriker_run-02.npy changed since" in redo.stdout
    assert "r_map.png is missing" in redo.stdout and "done already" not in redo.stdout
    assert (work / "results/demo/sub-01/r.npy").stat().st_mtime_ns != before
    assert (work / "results/demo/sub-02/r_map.png").is_file()


def subjects_drawn(results_dir):
    """How many subjects r_by_subject.png shows: its width is 1.5 + 1.2 x that number inches at 100 dpi."""
    import matplotlib.pyplot as plt
    return round((plt.imread(results_dir / "r_by_subject.png").shape[1] / 100 - 1.5) / 1.2)


def test_r_by_subject_shows_only_subjects_made_with_these_flags_and_inputs(tmp_path):
    """sub-01 made with --alphas 1 10, sub-02 later with the default grid: the second run's figure shows
    sub-02 alone, and one line says which subject it left out and why; the same for a subject whose
    features changed since it was made (05 ran again for it)."""
    work = make_work(tmp_path, subjects=("01", "02"), volumes=30)
    results = work / "results/demo"
    png = results / "r_by_subject.png"
    first = run_ridge(work, "--n-permutations", 0, "--subjects", "01", "--alphas", 1, 10)
    assert first.returncode == 0, first.stderr
    assert subjects_drawn(results) == 1 and "leaves out" not in first.stdout
    second = run_ridge(work, "--n-permutations", 0, "--subjects", "02")
    assert second.returncode == 0, second.stderr
    assert subjects_drawn(results) == 1
    assert f"06_ridge: {png} leaves out sub-01 (made with other --alphas)" in second.stdout.splitlines()
    # sub-01 again, with its own flags: nothing to fit, but the figure drawn for sub-02 is drawn again
    stamp = png.stat().st_mtime_ns
    again = run_ridge(work, "--n-permutations", 0, "--subjects", "01", "--alphas", 1, 10)
    assert again.returncode == 0 and "done already" in again.stdout and png.stat().st_mtime_ns != stamp
    assert f"06_ridge: {png} leaves out sub-02 (made with other --alphas)" in again.stdout.splitlines()
    assert json.loads((results / "sub-02/summary.json").read_text())["settings"]["--alphas"] == ["wide"]
    # new features for a run of sub-02: left out until 06 makes it again
    path = work / "features/demo/layer_a/sub-02/ses-001/sub-02_ses-001_task-airstriker_run-01.npy"
    np.save(path, np.load(path)[:, ::-1])
    overwrite = run_ridge(work, "--n-permutations", 0, "--subjects", "01", "--overwrite")
    assert overwrite.returncode == 0, overwrite.stderr
    assert (f"06_ridge: {png} leaves out sub-02 (features/demo/layer_a/sub-02/ses-001/"
            "sub-02_ses-001_task-airstriker_run-01.npy changed since)") in overwrite.stdout.splitlines()
    assert subjects_drawn(results) == 1


def write_splits(work, split_of=lambda row: row["split"]):
    """bold/splits.tsv as 02 writes it, from make_work's manifest, with each run's split given by split_of."""
    manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
    manifest["split"] = [split_of(row) for _, row in manifest.iterrows()]
    common.write_tsv(work / "bold/splits.tsv", manifest[["sub", "ses", "task", "run", "split"]])


def test_the_split_is_bold_splits_tsv_and_a_subject_without_a_test_run_is_skipped(tmp_path):
    """bold/splits.tsv is the one split: there sub-02's ses-005 runs are train (whatever the manifest's column
    says), so sub-02 has no test run: it is skipped with one line, and sub-01 is fitted. With no subject left:
    one error line."""
    work = make_work(tmp_path, subjects=("01", "02"), volumes=30)
    write_splits(work, lambda row: "train" if row["sub"] == "02" and row["split"] == "test" else row["split"])
    result = run_ridge(work, "--n-permutations", 0)
    assert result.returncode == 0, result.stderr
    why = "no test run in the split (its runs: 8 train, 2 validation)"
    assert f"06_ridge: sub-02: skipped: {why}" in result.stderr.splitlines()
    assert f"sub-02   skipped: {why}" in result.stdout.splitlines()
    assert (work / "results/demo/sub-01/summary.json").is_file() and not (work / "results/demo/sub-02").exists()
    write_splits(work, lambda row: "train")
    failed = run_ridge(work, "--n-permutations", 0)
    assert failed.returncode == 2 and failed.stderr.strip().splitlines()[-1] == (
        f"error: {work / 'bold/splits.tsv'}: no subject can be fitted as asked (sub-01: no test run in the split "
        "(its runs: 10 train)): choose the split with 02's --test-sessions, --test-runs or --splits, or another --cv")
    # --cv runs needs two training runs to leave one out: a subject with one is skipped the same way
    write_splits(work, lambda row: row["split"] if row["sub"] == "01" or row["split"] != "train"
                 or (row["ses"], row["run"]) == ("001", "01") else "validation")   # sub-02: one training run
    one_run = run_ridge(work, "--n-permutations", 0, "--overwrite")
    assert one_run.returncode == 0, one_run.stderr
    assert any(line.startswith("06_ridge: sub-02: skipped: one training run: --cv runs leaves one out")
               for line in one_run.stderr.splitlines()), one_run.stderr


def test_a_model_trained_on_a_test_run_is_refused(tmp_path):
    """06 finds the models behind the features in their records (05's lists the GPT and the VQ-VAE, whose
    records list the repetitions they trained on): one that trained on a test run's stimuli is refused in one
    line, done results or not, unless --allow-trained-on-test; a training run is fine."""
    work = make_work(tmp_path, volumes=30)
    write_splits(work)
    ckpt = work / "gpt/m/ckpt.pt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"weights")
    for path in (work / "features/demo/layer_a").rglob("*.npy"):
        common.write_record(path, {"stage": "05_extract", "settings": {},
                                   "inputs": {"gpt/m/ckpt.pt": common.hash_file(ckpt), "timeline": {}}})

    def trained_on(rep):
        common.write_record(ckpt, {"stage": "04_train_gpt", "settings": {}, "inputs": {},
                                   "training_repetitions": [rep]})
    trained_on(dict(frames_path="frames/a.npy", sub="01", ses="003", task="airstriker", run="02"))
    assert run_ridge(work, "--n-permutations", 0).returncode == 0
    refusal = (f"error: {work / 'gpt/m/ckpt.json'}: trained on the stimuli of test run "
               f"sub-01_ses-005_task-airstriker_run-02 of sub-01 ({work / 'bold/splits.tsv'}): train it without "
               "them (03 and 04 follow that file), or pass --allow-trained-on-test")
    for rep in (dict(frames_path="frames/a.npy", sub="01", ses="005", task="airstriker", run="02"),
                # an older 04's record: the run is read from the name of the frames file
                dict(frames_path="frames/sub-01/ses-005/sub-01_ses-005_task-airstriker_run-02_rep-01.npy")):
        trained_on(rep)
        refused = run_ridge(work, "--n-permutations", 0)
        assert refused.returncode == 2 and refused.stderr.strip() == refusal
    allowed = run_ridge(work, "--n-permutations", 0, "--allow-trained-on-test")
    assert allowed.returncode == 0 and "done already" in allowed.stdout


def test_random_split_fir_pca_and_run_cv(tmp_path):
    work = make_work(tmp_path)
    result = run_ridge(work, "--split", "random", "--test-size", "0.2", "--delays", 2, 3, 4, "--pca", 20,
                       "--cv", "runs", "--n-permutations", 0)
    assert result.returncode == 0, result.stderr
    # nothing was tested: the table does not say "0/12 significant"
    assert re.search(r"^sub-01 .* not tested   $", result.stdout, re.M) and "/12" not in result.stdout
    summary = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    n_samples = 10 * (60 - 4)  # every run, samples from TR 4 (largest delay) on
    assert summary["n_test_samples"] == round(0.2 * n_samples)
    assert summary["n_train_samples"] + summary["n_test_samples"] == n_samples
    assert summary["n_features"] == 20 and summary["solver"].startswith("primal")
    r = np.load(work / "results/demo/sub-01/r.npy")
    assert r[list(PLANTED)].min() > 0.5


# --------------------------------------------------------------------------------------------------
# Bad input: one line naming the file or run and what is wrong, exit status 2, no results written
# --------------------------------------------------------------------------------------------------
STEM = "sub-01_ses-002_task-airstriker_run-01"


def feature_file(work, stem=STEM):
    ses = stem.split("_")[1]
    return work / "features/demo/layer_a/sub-01" / ses / f"{stem}.npy"


def corrupt_lengths(work):
    np.save(feature_file(work), np.zeros((50, N_FEATURES), np.float16))


def corrupt_nan(work):
    features = np.load(feature_file(work))
    features[7, 2] = np.nan
    np.save(feature_file(work), features)


def corrupt_bold_inf(work):
    path = work / "bold/sub-01/ses-002" / f"{STEM}.npy"
    bold = np.load(path)
    bold[5, 2] = np.inf
    np.save(path, bold)


def corrupt_bold_partial_nan(work):
    path = work / "bold/sub-01/ses-002" / f"{STEM}.npy"
    bold = np.load(path)
    bold[5, 2] = np.nan  # whole NaN volumes are dropped; a NaN parcel inside a kept volume is an error
    np.save(path, bold)


def corrupt_atlas_labels(work):
    labels = pd.read_csv(work / "bold/labels.tsv", sep="\t")
    labels.loc[3, "label"] = 999
    labels.to_csv(work / "bold/labels.tsv", sep="\t", index=False)


def corrupt_missing(work):
    feature_file(work).unlink()


def corrupt_bold_garbage(work):
    (work / "bold/sub-01/ses-002" / f"{STEM}.npy").write_bytes(np.random.default_rng(0).bytes(3000))


def corrupt_truncated_features(work):
    data = feature_file(work).read_bytes()
    feature_file(work).write_bytes(data[:len(data) // 2])


def corrupt_atlas_garbage(work):
    (work / "bold/atlas.nii.gz").write_bytes(np.random.default_rng(0).bytes(3000))


@pytest.mark.parametrize("corrupt, flags, expected", [
    (corrupt_lengths, [], [STEM, "50 rows", "60 volumes"]),
    (corrupt_nan, [], [f"{STEM}.npy", "NaN or inf"]),
    (corrupt_bold_inf, [], [f"bold/sub-01/ses-002/{STEM}.npy", "BOLD contains inf"]),
    (corrupt_bold_partial_nan, [], [f"bold/sub-01/ses-002/{STEM}.npy", "NaN in some parcels"]),
    (corrupt_atlas_labels, [], ["bold/atlas.nii.gz", "no parcel with label 999"]),
    (corrupt_missing, [], [f"{STEM}.npy", f"features missing for run {STEM}"]),
    (corrupt_bold_garbage, [], [f"bold/sub-01/ses-002/{STEM}.npy: not a .npy array", "02_prep_fmri.py"]),
    (corrupt_truncated_features, [], [f"{STEM}.npy: truncated", "re-run 05_extract.py"]),
    (corrupt_atlas_garbage, [], ["bold/atlas.nii.gz: not a readable NIfTI image"]),
    (None, ["--delays", 60], ["run sub-01_ses-001", "60 volumes", "largest delay 60"]),
    (None, ["--split", "random"], ["--split random: no valid permutation p-values", "--n-permutations 0"]),
], ids=["length-mismatch", "nan-features", "inf-bold", "partial-nan-bold", "label-not-in-atlas", "missing-features",
        "garbage-bold", "truncated-features", "garbage-atlas", "fewer-samples-than-delays", "random-split-p-values"])
def test_bad_input_clear_error(tmp_path, corrupt, flags, expected):
    work = make_work(tmp_path)
    if corrupt:
        corrupt(work)
    result = run_ridge(work, *flags)
    assert result.returncode == 2
    message = result.stderr.strip()
    assert message.startswith("error: ") and "\n" not in message
    for text in expected:
        assert text in message
    assert not (work / "results/demo/sub-01").exists()


def chosen_by_refitting(X, Y, alphas, held_out):
    """Brute force of a penalty selection: per target, the alpha whose scikit-learn Ridge refitted
    without each held-out group of rows predicts it best (mean squared error over the held-out rows).
    held_out: a list of boolean row masks."""
    from sklearn.linear_model import Ridge
    errors = np.zeros((len(alphas), Y.shape[1]))
    for a, alpha in enumerate(alphas):
        for rows in held_out:
            model = Ridge(alpha=alpha).fit(X[~rows], Y[~rows])
            errors[a] += ((model.predict(X[rows]) - Y[rows]) ** 2).sum(axis=0)
    return np.asarray(alphas)[np.argmin(errors, axis=0)]


@pytest.mark.parametrize("standardize, cv", [(True, "loo"), (False, "loo"), (True, "runs"),
                                             (True, "validation")])
def test_script_equals_scikit_learn_on_the_delayed_features(tmp_path, standardize, cv):
    """The whole stage against an independent pipeline: the delayed design written out here, z-scored
    (or not: --no-standardize) with scikit-learn, a penalty per parcel chosen by RidgeCV's leave-one-out
    (--cv loo), by refitting without each training run (--cv runs) or on the validation run (--cv
    validation, then refitted on training and validation runs), Pearson r by scipy."""
    from sklearn.preprocessing import StandardScaler
    work = make_work(tmp_path, volumes=40)
    scales = np.logspace(-1, 1, N_FEATURES)   # features of unequal scales: z-scoring them changes the fit
    for path in (work / "features/demo/layer_a").rglob("*.npy"):
        np.save(path, (np.load(path) * scales).astype(np.float16))
    grid = [0.1, 10, 1000]
    flags = ["--n-permutations", 0, "--alphas", *grid, "--cv", cv] + ([] if standardize else ["--no-standardize"])
    result = run_ridge(work, *flags)
    assert result.returncode == 0, result.stderr
    manifest = pd.read_csv(work / "bold/manifest.tsv", sep="\t", dtype=str)
    fitted = {"train", "validation"} if cv == "validation" else {"train"}
    X, Y, run = {"fit": [], "test": []}, {"fit": [], "test": []}, {"fit": [], "test": []}
    for row in manifest.itertuples():
        part = "test" if row.split == "test" else "fit" if row.split in fitted else None
        if part is None:   # validation runs are left out
            continue
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        features = np.load(work / "features/demo/layer_a" / f"sub-{row.sub}" / f"ses-{row.ses}" / f"{stem}.npy")
        bold = np.load(work / row.bold_path)
        X[part].append(features[:-3].astype(np.float64))   # samples: volumes t = 3 ... 39, features of t - 3
        Y[part].append(bold[3:].astype(np.float64))
        run[part] += [(row.split, stem)] * 37
    X = {k: np.concatenate(v) for k, v in X.items()}
    Y = {k: np.concatenate(v) for k, v in Y.items()}
    if standardize:
        scaler = StandardScaler().fit(X["fit"])
        X = {k: scaler.transform(v) for k, v in X.items()}
    if cv == "loo":
        reference_alphas = RidgeCV(alphas=grid, alpha_per_target=True).fit(X["fit"], Y["fit"]).alpha_
    else:
        runs = np.array([stem if cv == "runs" else split for split, stem in run["fit"]])
        held_out = ([runs == stem for stem in np.unique(runs)] if cv == "runs" else [runs == "validation"])
        reference_alphas = chosen_by_refitting(X["fit"], Y["fit"], grid, held_out)
    r = np.load(work / "results/demo/sub-01/r.npy")
    alphas = np.load(work / "results/demo/sub-01/alphas.npy")
    for j in range(N_PARCELS):
        if j == EMPTY:
            assert np.isnan(r[j])
            continue
        assert alphas[j] == reference_alphas[j]
        prediction = Ridge(alpha=reference_alphas[j]).fit(X["fit"], Y["fit"][:, j]).predict(X["test"])
        assert r[j] == pytest.approx(pearsonr(Y["test"][:, j], prediction)[0], abs=1e-5)
    summary = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    assert summary["standardization"].startswith("features z-scored" if standardize else "features as 05 wrote them")
    assert summary["penalty_selection"] == ridge_fast.PENALTY_SELECTION[cv]


def test_significant_parcels_on_the_edge_of_the_grid_are_reported(tmp_path):
    work = make_work(tmp_path)
    result = run_ridge(work, "--alphas", "1e-3", "1e-2", "--n-permutations", 200)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "06_ridge: warning: sub-01: 3 significant parcel(s) chose the largest alpha of the grid: add larger --alphas")
    summary = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    assert summary["parcels_at_largest_alpha"] == 11 and summary["parcels_at_smallest_alpha"] == 1


def test_constant_features_give_nan_r_and_say_so(tmp_path):
    work = make_work(tmp_path)
    for path in (work / "features/demo/layer_a").rglob("*.npy"):
        np.save(path, np.full((60, N_FEATURES), 0.5, np.float16))   # e.g. every window black
    result = run_ridge(work, "--n-permutations", 20)
    assert result.returncode == 0, result.stderr
    assert "all 8 features are constant over the training samples: no prediction is possible, r is NaN" in result.stderr
    assert "edge of the grid" not in result.stderr   # no advice about alphas: they are not the problem
    assert "circular shifts" not in result.stderr    # nor about the null: there is no r to test
    assert np.isnan(np.load(work / "results/demo/sub-01/r.npy")).all()
    summary = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    assert summary["r_max"] is None and summary["n_parcels_nan_r"] == N_PARCELS and summary["n_significant"] == 0


# --------------------------------------------------------------------------------------------------
# The demo (00) through stage 02, with the demo's true visual properties as features
# --------------------------------------------------------------------------------------------------
def test_planted_recovery_against_hand_counts():
    r = np.array([0.5, 0.1, 0.3, -0.2, 0.4, 0.35])
    significant = np.array([True, False, False, False, True, False])
    labels = [1, 2, 3, 4, 5, 6]
    truth = ground_truth.planted_recovery(r, significant, labels, planted_labels={1, 5, 6})
    # planted r 0.5, 0.4, 0.35 against noise 0.1, 0.3, -0.2: all 9 pairs won
    assert truth["planted_columns"] == [0, 4, 5] and truth["planted_beats_noise"] == 1.0 and truth["recovered"]
    assert truth["planted_r_median"] == pytest.approx(0.4) and truth["noise_r_max"] == pytest.approx(0.3)
    assert (truth["planted_significant"], truth["noise_significant"]) == (2, 0)
    swapped = ground_truth.planted_recovery(r, significant, labels, planted_labels={2, 3, 4})
    assert swapped["planted_beats_noise"] == 0.0 and not swapped["recovered"]
    mixed = ground_truth.planted_recovery(r, significant, labels, planted_labels={1, 2})   # 0.5 wins 4, 0.1 wins 1
    assert mixed["planted_beats_noise"] == pytest.approx(5 / 8) and not mixed["recovered"]
    # a parcel planted on something else (the demo's button presses) is not noise either
    other = ground_truth.planted_recovery(r, significant, labels, planted_labels={1, 5}, other_signal={6})
    assert other["n_noise"] == 3 and other["noise_r_max"] == pytest.approx(0.3)
    assert (other["noise_significant"], other["planted_beats_noise"]) == (0, 1.0)


def test_ground_truth_file_errors(tmp_path):
    work = make_work(tmp_path)
    missing = run_ridge(work, "--ground-truth", tmp_path / "none.json")
    assert missing.returncode == 2 and missing.stderr.strip() == f"error: {tmp_path / 'none.json'}: file not found"
    (tmp_path / "bad.json").write_text('{"subjects": ["01"]}')
    bad = run_ridge(work, "--ground-truth", tmp_path / "bad.json")
    assert bad.returncode == 2 and "not a ground truth file" in bad.stderr


def test_demo_planted_parcels_beat_noise_parcels(demo_work, tmp_path):
    """Features = ground_truth/<run>_signals.tsv (already HRF-convolved, so --delays 0): stages 02 and 06
    checked without any model (tests/test_run_all.py does it with the GPT's features).

    The tiny demo has 30-volume runs: 02 runs with 6 motion regressors and no smoothing here, since the
    paper's 24 regressors would leave ~3 degrees of freedom per run.
    """
    truth = json.loads((demo_work / "demo/ground_truth.json").read_text())
    (tmp_path / "demo").symlink_to(demo_work / "demo")
    prep = subprocess.run([sys.executable, "02_prep_fmri.py", "--work", str(tmp_path), "--motion", "basic",
                           "--fwhm", "0", "--workers", "1"], cwd=REPO, capture_output=True, text=True)
    assert prep.returncode == 0, prep.stderr
    for signals in sorted((demo_work / "demo/ground_truth").glob("*_signals.tsv")):
        stem = signals.name.removesuffix("_signals.tsv")
        entities = bids_entities(stem)
        out = tmp_path / "features/truth/signals" / f"sub-{entities['sub']}" / f"ses-{entities['ses']}"
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"{stem}.npy", pd.read_csv(signals, sep="\t").to_numpy(np.float32))
    result = subprocess.run([sys.executable, "06_ridge.py", "--work", str(tmp_path), "--name", "truth",
                             "--delays", "0", "--ground-truth", str(demo_work / "demo/ground_truth.json")],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    labels = pd.read_csv(tmp_path / "bold/labels.tsv", sep="\t")["label"].to_numpy()
    planted = np.isin(labels, [int(label) for label in truth["planted"]])
    out = tmp_path / "results/truth/sub-01"
    r, p_values = np.load(out / "r.npy"), np.load(out / "p_values.npy")
    assert np.median(r[planted]) > np.quantile(r[~planted], 0.9) + 0.1
    assert r[planted].mean() - r[~planted].mean() > 0.25
    assert np.median(p_values[planted]) < np.median(p_values[~planted])
    assert not np.load(out / "significant.npy")[~planted].any()
    recovery = json.loads((out / "summary.json").read_text())["ground_truth"]
    assert recovery["planted_columns"] == np.flatnonzero(planted).tolist() and recovery["recovered"]
    assert "sub-01" in result.stdout and "recovered: median r" in result.stdout


@needs_namespaces
def test_read_only_work_and_full_disk(tmp_path):
    work = make_work(tmp_path)
    flags = ["--work", work, "--name", "demo", "--n-permutations", 0]
    result, _ = run_confined("06_ridge.py", *flags, read_only=work)
    assert result.returncode == 2 and result.stderr.strip() == f"error: {work / 'results'}: Read-only file system"
    # room for the small arrays, not for the brain map: the subject is all or nothing
    result, left = run_confined("06_ridge.py", *flags, full=work / "results", full_bytes=12 * 1024)
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {work / 'results/demo/sub-01'}/") and line.endswith(
        ": cannot write it (No space left on device)")
    assert left == []


def test_several_layer_folders_need_layer_even_with_the_papers(tmp_path):
    """A layer extracted later beside the paper's (run_all.sh with EXTRACT_ARGS="--layer ...") must not be
    passed over for the paper's without a word: 06 asks which."""
    root = tmp_path / "features" / "demo"
    for layer in (PAPER_LAYER, "attn_stack.attn_nets.7.post_fc_dp"):
        (root / layer).mkdir(parents=True)
    with pytest.raises(common.InputError, match="holds layers .*; choose one with --layer"):
        ridge.find_layer(root, None)
    assert ridge.find_layer(root, "attn_stack.attn_nets.7.post_fc_dp") == "attn_stack.attn_nets.7.post_fc_dp"
    (root / PAPER_LAYER).rmdir()
    assert ridge.find_layer(root, None) == "attn_stack.attn_nets.7.post_fc_dp"   # the only one: no question


def test_bold_of_strings_and_band_grid_out_of_range_are_one_line(tmp_path):
    """A BOLD .npy of strings was a TypeError traceback from np.isinf; --band-grid 400 an OverflowError."""
    work = make_work(tmp_path)
    bold = work / "bold/sub-01/ses-002" / f"{STEM}.npy"
    np.save(bold, np.load(bold).astype(str))
    result = run_ridge(work, "--n-permutations", 0)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {bold}: an array of {np.load(bold).dtype}, not numbers; re-run "
                                          "02_prep_fmri.py --overwrite"]
    result = run_ridge(work, "--with", "demo:layer_a", "--band-grid", "0", "400")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("06_ridge.py: error: argument --band-grid: 400: a log10 ratio of "
                                              "weights, between -15 and 15")
