"""How sure a score is (beyond the paper, which reports point estimates): intervals that resample
the test time course (a block bootstrap: blocks of BLOCK_TRS consecutive test TRs within each test
run, r recomputed per parcel), paired differences between configurations, and the words a report
uses for an interval.
"""
import warnings

import numpy as np


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
