"""06 --with: banded ridge against plain ridge and a brute-force scikit-learn grid, and the variance
partition on synthetic targets whose parts are known (unique to A, unique to B, shared, none)."""
import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge, RidgeCV

import partition
import ridge_fast
from conftest import load_stage
from paper import encoding

ridge = load_stage("06_ridge.py")
ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
GRID = (-1.0, 0.0, 1.0)


def grams(sets_train, sets_test):
    """The centered Gram matrices of each set, stacked: (S, n, n), (S, m, n)."""
    pairs = [ridge_fast.centered_gram(X, X_test, "cpu", torch.float64, 4096, 1024) for X, X_test in
             zip(sets_train, sets_test)]
    return torch.stack([K for K, _ in pairs]), torch.stack([K_test for _, K_test in pairs])


def test_band_candidates_cover_every_subset_and_ratio():
    candidates = partition.band_candidates(2, GRID)
    # A alone, B alone, and B at 10^u times A for u in the grid
    expected = {(1.0, 0.0), (0.0, 1.0), (1 / 1.1, 0.1 / 1.1), (0.5, 0.5), (1 / 11, 10 / 11)}
    assert {tuple(np.round(c, 9)) for c in candidates} == {tuple(np.round(e, 9)) for e in expected}
    assert np.allclose(candidates.sum(axis=1), 1)
    assert len(partition.band_candidates(3, GRID)) == 3 + 3 * 3 + 9   # subsets of 1, 2 and 3 sets on


@pytest.mark.parametrize("p", [60, 12], ids=["wide", "tall"])
def test_banded_ridge_with_one_set_is_the_plain_ridge(p):
    rng = np.random.default_rng(0)
    X, X_test = rng.normal(size=(40, p)) + 2, rng.normal(size=(9, p)) + 2
    Y = X @ rng.normal(size=(p, 7)) / np.sqrt(p) + rng.normal(size=(40, 7)) * np.logspace(-1, 1, 7)
    K, K_test = grams([X], [X_test])
    banded = partition.fit_banded_ridge(K, K_test, Y, ALPHAS, partition.band_candidates(1, GRID))
    plain = ridge_fast.fit_ridge_loo(X, Y, X_test, ALPHAS)
    np.testing.assert_array_equal(banded["alpha"], plain["alpha"])
    np.testing.assert_allclose(banded["test_prediction"], plain["test_prediction"], rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(banded["train_fit"], plain["train_fit"], rtol=1e-7, atol=1e-9)


def test_banded_ridge_equals_a_brute_force_grid_of_scikit_learn():
    """Each candidate weighting w is a plain ridge on the sets' columns scaled by sqrt(w_s): scikit-learn's
    RidgeCV gives its leave-one-out errors; the best (w, alpha) per target and its prediction must match."""
    rng = np.random.default_rng(1)
    n, m = 50, 11
    A, B = rng.normal(size=(n + m, 30)), rng.normal(size=(n + m, 8)) + 1
    Y = (A[:, :3] @ rng.normal(size=(3, 6)) * np.r_[1, 1, 1, 0, 0, 0] + B[:, :2] @ rng.normal(size=(2, 6))
         * np.r_[0, 0, 1, 1, 0, 0] + rng.normal(size=(n + m, 6)))[:n]
    candidates = partition.band_candidates(2, GRID)
    K, K_test = grams([A[:n], B[:n]], [A[n:], B[n:]])
    ours = partition.fit_banded_ridge(K, K_test, Y, ALPHAS, candidates)

    errors, predictions = [], []
    for w in candidates:
        scaled = np.hstack([np.sqrt(w[0]) * A, np.sqrt(w[1]) * B])
        cv = RidgeCV(alphas=ALPHAS, alpha_per_target=True, store_cv_results=True).fit(scaled[:n], Y)
        errors.append(cv.cv_results_.mean(axis=0))                                   # (P, A)
        predictions.append([Ridge(alpha=a).fit(scaled[:n], Y).predict(scaled[n:]) for a in ALPHAS])
    errors = np.stack(errors)                                                        # (C, P, A)
    for target in range(Y.shape[1]):
        c, a = np.unravel_index(np.argmin(errors[:, target, :]), errors.shape[::2])  # first minimum
        assert ours["alpha"][target] == ALPHAS[a] and np.allclose(ours["weights"][target], candidates[c])
        np.testing.assert_allclose(ours["test_prediction"][:, target], predictions[c][a][:, target],
                                   rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(ours["cv_error"][target], errors[c, target, a], rtol=1e-8)


# --------------------------------------------------------------------------------------------------
# Variance partitioning on targets with known parts
# --------------------------------------------------------------------------------------------------
class Args:   # the flags of 06 that partition_variance and unique_significance read
    device, alphas, band_grid, parcel_batch, split, fdr = "cpu", list(ALPHAS), GRID, 256, "session", 0.05


def synthetic_design(seed, n_train=400, run_length=150, per_kind=25):
    """Two feature sets: A = [Z, U_a], B = [Z, U_b] (Z shared, U_a and U_b their own), and parcels driven
    by U_a (kind 'A'), U_b ('B'), Z ('shared') or nothing ('none'), each with a true R^2 of 0.5.
    Returns (Design, kinds (P,))."""
    rng = np.random.default_rng(seed)
    n = n_train + 2 * run_length
    Z, Ua, Ub = (rng.normal(size=(n, 5)) for _ in range(3))
    kinds = np.repeat(["A", "B", "shared", "none"], per_kind)
    source = {"A": Ua, "B": Ub, "shared": Z}
    Y = rng.normal(size=(n, len(kinds)))                                 # noise of variance 1
    for j, kind in enumerate(kinds):
        if kind != "none":
            signal = source[kind] @ rng.normal(size=5)
            Y[:, j] += signal / signal.std()                                  # variance 1: R^2 = 0.5
    X_sets = [np.hstack([Z, Ua]).astype(np.float32), np.hstack([Z, Ub]).astype(np.float32)]
    train_ids = [(i // 100, i % 100) for i in range(n_train)]                 # training runs of 100 TRs
    test_ids = [(10 + t // run_length, t % run_length) for t in range(2 * run_length)]   # two test runs
    design = ridge.Design([X[:n_train] for X in X_sets], [X[n_train:] for X in X_sets], Y[:n_train],
                          Y[n_train:], train_ids, test_ids, runs=[], groups=None, n_constant=0)
    return design, kinds


def test_variance_partition_recovers_known_parts():
    design, kinds = synthetic_design(seed=2)
    fit, parts = partition.partition_variance(design, Args)
    parts |= partition.unique_significance(Args, design, fit, parts)
    truth = {  # (unique A, unique B, shared, A alone, B alone) per kind, true R^2 = 0.5
        "A": (0.5, 0, 0, 0.5, 0), "B": (0, 0.5, 0, 0, 0.5), "shared": (0, 0, 0.5, 0.5, 0.5), "none": (0, 0, 0, 0, 0)}
    for kind, expected in truth.items():
        j = kinds == kind
        estimates = (parts["unique"][0, j], parts["unique"][1, j], parts["shared"][j],
                     parts["r2_alone"][0, j], parts["r2_alone"][1, j])
        for name, estimate, value in zip(("unique A", "unique B", "shared", "A alone", "B alone"), estimates,
                                         expected):
            # mean over 25 parcels of 300 test TRs: standard error ~0.01; finite-sample shrinkage ~0.03
            assert abs(estimate.mean() - value) < 0.06, (kind, name, estimate.mean(), value)
    # the unique part of a set is significant where it carries its own signal, not elsewhere
    assert parts["unique_significant"][0, kinds == "A"].all() and parts["unique_significant"][1, kinds == "B"].all()
    assert not parts["unique_significant"][1, kinds == "A"].any() and not parts["unique_significant"][0, kinds == "B"].any()
    np.testing.assert_allclose(parts["r2_all"], parts["unique"].sum(0) + parts["shared"])


def test_the_unique_part_of_a_set_that_carries_nothing_is_significant_at_most_at_the_nominal_rate():
    """Over several datasets, a set's unique part where it has none (the other set's parcels, the shared
    ones, pure noise) reaches p < 0.05 in about 5% of the parcels or fewer. A null that shifted only the
    set's own part of the prediction fails here: in shared parcels that part carries the shared signal,
    and 72% of them came out significant."""
    nothing_unique = {0: ("B", "shared", "none"), 1: ("A", "shared", "none")}   # set -> parcels
    p_values = {0: [], 1: []}
    for seed in range(4):
        design, kinds = synthetic_design(seed=10 + seed, per_kind=30)
        fit, parts = partition.partition_variance(design, Args)
        unique_p = partition.unique_significance(Args, design, fit, parts)["unique_p"]
        for s, where in nothing_unique.items():
            p_values[s].append(unique_p[s, np.isin(kinds, where)])
    for s in (0, 1):
        p = np.concatenate(p_values[s])                                       # 360 parcels
        assert (p < 0.05).mean() <= 0.075 and (p < 0.2).mean() <= 0.25, (s, (p < 0.05).mean(), (p < 0.2).mean())


def test_06_with_a_second_set_writes_the_partition(tmp_path):
    """06 --with on the planted dataset of test_ridge.py plus a feature set of pure noise: the planted
    parcels' variance is unique to the planted set, the noise set's unique part is nowhere significant,
    and the maps and the record say so."""
    import json
    import subprocess
    import sys

    import nibabel as nib

    from conftest import REPO
    from test_ridge import EMPTY, N_FEATURES, PLANTED, make_work

    work = make_work(tmp_path)
    rng = np.random.default_rng(7)
    for path in (work / "features/demo/layer_a").rglob("*.npy"):
        noise = work / "features/noise/noise" / path.relative_to(work / "features/demo/layer_a")
        noise.parent.mkdir(parents=True, exist_ok=True)
        np.save(noise, rng.normal(size=(len(np.load(path)), N_FEATURES)).astype(np.float16))
    result = subprocess.run([sys.executable, "06_ridge.py", "--work", str(work), "--name", "demo", "--with",
                             "noise", "--n-permutations", "200", "--band-grid", "-1", "0", "1"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = work / "results/demo+noise/sub-01"
    unique, significant = np.load(out / "unique.npy"), np.load(out / "unique_significant.npy")
    assert unique.shape == significant.shape == (2, len(np.load(out / "r.npy")))
    assert significant[0, list(PLANTED)].all() and unique[0, list(PLANTED)].min() > 0.2
    assert not significant[1].any() and np.nanmax(unique[1]) < 0.05
    np.testing.assert_allclose(np.load(out / "r2_all.npy"), unique.sum(0) + np.load(out / "shared.npy"))
    assert np.isnan(unique[:, EMPTY]).all()                                   # a parcel without voxels
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"]["sets"] == ["demo", "noise"]
    assert summary["settings"]["--with"] == ["noise:noise"] and summary["settings"]["--band-grid"] == [-1, 0, 1]
    assert summary["partition"]["per_set"]["demo"]["unique_n_significant"] == len(PLANTED)
    assert nib.load(out / "unique_map.nii.gz").shape[-1] == 2 and (out / "unique_map.png").is_file()
    again = subprocess.run([sys.executable, "06_ridge.py", "--work", str(work), "--name", "demo", "--with",
                            "noise", "--n-permutations", "200", "--band-grid", "-1", "0", "1"],
                           cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "done already" in again.stdout


# --------------------------------------------------------------------------------------------------
# The hardest null: a set that re-encodes another through more features
# --------------------------------------------------------------------------------------------------
def autoregressive(rng, lengths, width, phi):
    """Unit-variance AR(1) series restarted at each run, runs of `lengths` TRs: (sum(lengths), width)."""
    runs = []
    for run_length in lengths:
        x = np.empty((run_length, width))
        x[0] = rng.normal(size=width)
        for t in range(1, run_length):
            x[t] = phi * x[t - 1] + np.sqrt(1 - phi ** 2) * rng.normal(size=width)
        runs.append(x)
    return np.concatenate(runs)


def reencoded_design(seed, own_signal=0.0, train_runs=(80,) * 8, test_runs=(200, 200), n_parcels=60):
    """Set A: 60 features from a 10-d AR(0.9) latent plus noise; the BOLD: A's signal (R^2 ~0.3) plus
    AR(0.5) noise; set B = A M + AR(0.8) noise, 300 features, which re-encodes A and carries nothing
    beyond it, unless own_signal > 0: B then also carries 5 series of its own that add that variance
    to every parcel. Penalties chosen run by run, as 06 does by default. train_runs, test_runs: the
    runs' lengths in TRs. Returns a Design."""
    rng = np.random.default_rng(seed)
    lengths = train_runs + test_runs
    latent = autoregressive(rng, lengths, 10, 0.9)
    A = latent @ rng.normal(size=(10, 60)) / np.sqrt(10) + rng.normal(size=(len(latent), 60))
    B = A @ rng.normal(size=(60, 300)) / np.sqrt(60) + 0.3 * autoregressive(rng, lengths, 300, 0.8)
    signal = A @ rng.normal(size=(60, n_parcels))
    Y = np.sqrt(0.3) * signal / signal.std(axis=0) + np.sqrt(0.7) * autoregressive(rng, lengths, n_parcels, 0.5)
    if own_signal:
        own = autoregressive(rng, lengths, 5, 0.5)
        B[:, :5] += 2 * own
        extra = own @ rng.normal(size=(5, n_parcels))
        Y += np.sqrt(own_signal) * extra / extra.std(axis=0)
    run = np.repeat(np.arange(len(lengths)), lengths)
    train, test = run < len(train_runs), run >= len(train_runs)
    sets = [A.astype(np.float32), B.astype(np.float32)]
    design = ridge.Design([X[train] for X in sets], [X[test] for X in sets], Y[train], Y[test],
                          [(g, 0) for g in run[train]], [(g, 0) for g in run[test]], runs=[], groups=run[train],
                          n_constant=0)
    for X, X_test in zip(design.X_train, design.X_test):
        encoding.standardize(X, X_test)
    return design


class WideArgs(Args):   # 06's defaults: the wide grid relative to the features' scale
    alphas = ["wide"]


def unique_tests_of_b(seeds, own_signal=0.0):
    """Per dataset, the p-values (P,) and the FDR mask (P,) of B's unique part."""
    results = []
    for seed in seeds:
        design = reencoded_design(seed, own_signal)
        fit, parts = partition.partition_variance(design, WideArgs)
        tests = partition.unique_significance(WideArgs, design, fit, parts)
        results.append((tests["unique_p"][1], tests["unique_significant"][1]))
    return results


def test_a_set_that_re_encodes_another_has_no_false_unique_part():
    """B re-encodes A through more features and holds nothing beyond it. The test of its unique part
    (test-TR blocks plus a delete-a-run jackknife of the fits) stays calibrated there: p < 0.05 in at
    most 5% of the parcels, and at FDR q = 0.05 a false discovery in at most 1 of 8 datasets (over 40
    others, benchmarks/bench_unique_test.py: 1.5% and none). Testing the test TRs alone (blocks,
    without the training runs' variance) gave false discoveries in 2 and 13 of two draws of 40
    datasets; the circular-shift null it replaces, in every dataset (8 of these 8)."""
    results = unique_tests_of_b(range(8))
    p = np.concatenate([p for p, _ in results])
    with_discovery = sum(significant.any() for _, significant in results)
    assert (p < 0.05).mean() <= 0.05 and with_discovery <= 1, ((p < 0.05).mean(), with_discovery)


def test_a_true_unique_part_is_found():
    """The same design with 5 series of B's own adding R^2 ~0.09 to every parcel: found in every dataset
    (benchmarks/bench_unique_test.py reports the power over more datasets and strengths)."""
    results = unique_tests_of_b(range(100, 104), own_signal=0.1)
    assert all(significant.any() for _, significant in results)
    assert np.mean([(p < 0.05).mean() for p, _ in results]) > 0.3


def test_deleted_run_errors_equal_refitting_without_each_run():
    """The closed form of the jackknife's refits against scikit-learn: for each parcel, its chosen weights
    and penalty, Ridge refitted on the scaled sets without training run g predicts the test rows; the sum
    of squared test errors must match."""
    rng = np.random.default_rng(3)
    n, m = 60, 17
    runs = np.repeat([0, 1, 2, 3], [15, 20, 10, 15])
    A, B = rng.normal(size=(n + m, 25)) + 1, rng.normal(size=(n + m, 9))
    Y = A[:, :3] @ rng.normal(size=(3, 5)) + B[:, :2] @ rng.normal(size=(2, 5)) + rng.normal(size=(n + m, 5))
    K, K_test = grams([A[:n], B[:n]], [A[n:], B[n:]])
    fit = partition.fit_banded_ridge(K, K_test, Y[:n], ALPHAS, partition.band_candidates(2, GRID), runs)
    errors = partition.deleted_run_errors(K, K_test, Y[:n], Y[n:], fit, runs)
    for j in range(Y.shape[1]):
        w = fit["weights"][j]
        scaled = np.hstack([np.sqrt(w[0]) * A, np.sqrt(w[1]) * B])
        for g in range(4):
            keep = runs != g
            refit = Ridge(alpha=fit["alpha"][j]).fit(scaled[:n][keep], Y[:n][keep, j])
            expected = ((Y[n:, j] - refit.predict(scaled[n:])) ** 2).sum()
            assert errors[g, j] == pytest.approx(expected, rel=1e-7)


def test_06_with_a_constant_set_refuses_it_and_leaves_constant_columns_out(tmp_path):
    """A --with set whose features never change (every window black, say) used to get NaN r in the
    parcels where it alone was chosen and a unique R^2 up to +0.04, without a word: refused in one line.
    Constant columns of a set that varies are left out, and said."""
    import subprocess
    import sys

    from conftest import REPO
    from test_ridge import N_FEATURES, make_work

    work = make_work(tmp_path)
    rng = np.random.default_rng(3)
    for path in (work / "features/demo/layer_a").rglob("*.npy"):
        other = work / "features/other/other" / path.relative_to(work / "features/demo/layer_a")
        other.parent.mkdir(parents=True, exist_ok=True)
        features = rng.normal(size=(len(np.load(path)), N_FEATURES))
        features[:, :3] = 0.5                                                  # 3 constant columns
        np.save(other, features.astype(np.float16))

    def ridge_with(name):
        return subprocess.run([sys.executable, "06_ridge.py", "--work", str(work), "--name", "demo", "--with",
                               name, "--n-permutations", "0", "--band-grid", "0"],
                              cwd=REPO, capture_output=True, text=True)

    partly = ridge_with("other")
    assert partly.returncode == 0, partly.stderr
    assert (f"06_ridge: warning: sub-01: {work / 'features/other/other'}: 3 of {N_FEATURES} features constant "
            "over the training samples, left out") in partly.stderr.splitlines()
    for path in (work / "features/other/other").rglob("*.npy"):
        np.save(path, np.full(np.load(path).shape, 0.5, np.float16))
    constant = ridge_with("other")
    assert constant.returncode == 2
    assert constant.stderr.splitlines() == [
        f"error: {work / 'features/other/other'}: every feature is constant over the training samples of "
        "sub-01: nothing to fit (leave the set out of --name and --with)"]
