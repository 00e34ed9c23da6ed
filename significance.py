"""How sure a score is (beyond the paper, which reports point estimates): the null of a parcel's test
r (the fitted model against circularly time-shifted features) with permutation p-values and FDR;
intervals that resample the test time course (a block bootstrap: blocks of BLOCK_TRS consecutive test TRs within each test
run, r recomputed per parcel), paired differences between configurations, and the words a report
uses for an interval.
"""
import warnings

import numpy as np

from common import InputError
from paper.encoding import pearson_r


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


def brain_score(r, kind):
    """(..., S, P) test r of P parcels for S subjects -> (...,): max (median, mean) over parcels,
    mean over subjects."""
    reduce = {"max": np.nanmax, "median": np.nanmedian, "mean": np.nanmean}[kind]
    return reduce(r, axis=-1).mean(-1)


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


def mean_interval(values, n_boot, seed=0):
    """The mean of values (S, P) over parcels and subjects, and its 95% interval from resampling
    parcels: (est, lo, hi)."""
    return parcel_paired_difference(values, np.zeros_like(values), n_boot, seed)


def interval_word(lo, hi, margin=None):
    """What a difference's 95% interval says: higher, lower, no difference beyond the margin (it
    lies inside +-margin), or inconclusive (it holds 0 but not only small differences)."""
    if lo > 0 or hi < 0:
        return "higher" if lo > 0 else "lower"
    if margin is not None and -margin < lo and hi < margin:
        return f"no difference beyond +-{margin:.3f}"
    return "inconclusive"


def circular_shift_null(y_test, prediction, test_run, n_permutations, rng):
    """Null distribution of the test r: the fitted model applied to circularly time-shifted
    features.

    Shifting the features of a run by k TRs shifts the model's predictions by k TRs, so the null r
    of a permutation correlates the test BOLD at TR t with the prediction at TR t + k (modulo the
    run length, one k per run), which keeps the autocorrelation of both series but breaks their
    alignment. y_test, prediction (m, P); test_run (m,) as shift_sources. Returns (n_null, P).
    """
    return np.stack([pearson_r(y_test, prediction[source])
                     for source in shift_sources(test_run, n_permutations, rng)])


def shift_sources(test_run, n_permutations, rng):
    """The circular shifts of the null, as row indices (n_null, m): row i of a shifted prediction is
    row sources[k, i] of the prediction. test_run (m,): the run of each test sample, the samples of
    a run contiguous and in time order (whole test runs: --split session).

    The shifts are the whole group of circular shifts, k = 0 ... L - 1 in each run independently
    (all runs at 0 is the observed r): when it has no more than n_permutations other elements, all
    of them are used (an exact test), otherwise n_permutations drawn at random. Small shifts stay in
    on purpose: leaving out |k| < 10, say, compares the observed r only with distant shifts and
    makes the test anti-conservative (2 test runs of 77 TRs, autocorrelated predictions, no signal:
    7.9% of parcels below p = 0.05).
    """
    runs, starts, lengths = np.unique(test_run, return_index=True, return_counts=True)
    if not all((test_run[s:s + n] == g).all() for g, s, n in zip(runs, starts, lengths)):
        raise ValueError("circular shifts: the samples of a test run must be contiguous")
    n_shifts = np.prod(lengths.astype(float)) - 1   # the group's elements besides the identity
    if n_shifts < 1:
        raise InputError("the test runs have one sample each: no circular shift is possible; use "
                         "--n-permutations 0")
    if n_shifts <= n_permutations:
        every = np.stack(np.meshgrid(*[np.arange(n) for n in lengths], indexing="ij"), axis=-1)
        shifts = every.reshape(-1, len(runs))[1:]               # every combination but all zeros
    else:
        shifts = np.stack([rng.integers(0, n, n_permutations) for n in lengths],
                          axis=1)                                              # (n_perm, runs)
    run_index = np.searchsorted(runs, test_run)                     # (m,)
    position = np.arange(len(test_run)) - starts[run_index]         # (m,) index within the run
    start, length = starts[run_index], lengths[run_index]
    return start + (position + shifts[:, run_index]) % length       # (n_null, m)


def permutation_p_values(r, null, level):
    """One-sided permutation p-values (P,), Benjamini-Hochberg q-values and the mask q < level."""
    p_values = (1 + (null >= r[None, :]).sum(axis=0)) / (1 + len(null))
    p_values[np.isnan(r)] = np.nan
    q_values = q_values_of(p_values)
    return p_values, q_values, np.nan_to_num(q_values, nan=1.0) < level


def q_values_of(p_values):
    """Benjamini-Hochberg q-values (P,) of the finite p-values (P,) among them; NaN elsewhere."""
    from scipy.stats import false_discovery_control
    q_values = np.full_like(p_values, np.nan, dtype=float)
    finite = np.isfinite(p_values)
    if finite.any():
        q_values[finite] = false_discovery_control(p_values[finite])
    return q_values


def fdr_mask(p_values, level):
    """The parcels (P,) whose Benjamini-Hochberg q-value is below level."""
    return np.nan_to_num(q_values_of(p_values), nan=1.0) < level
