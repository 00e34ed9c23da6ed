"""Scaling laws (beyond the paper): the brain score as a function of training compute, data or
parameters, r = a + b log10 x and r = r_inf - c x^-alpha, with intervals from the block bootstrap of
the test time course; and per parcel, whether its r grows with x (a permutation test).
"""
import math
import warnings

import numpy as np


def saturating_power(x, r_inf, c, alpha):
    """r = r_inf - c x^(-alpha): the score approaches r_inf as x grows, with diminishing returns."""
    return r_inf - c * np.power(x, -alpha)


def fit_log_linear(x, r):
    """Least-squares (a, b) of r = a + b log10 x. x, r: (K,), K >= 2."""
    design = np.stack([np.ones(len(x)), np.log10(x)], 1)                    # (K, 2)
    return np.linalg.lstsq(design, r, rcond=None)[0]


SATURATING_BOUNDS = ([-1.0, 0.0, 1e-3], [2.0, 10.0, 5.0])  # r_inf, c (x / geometric mean), alpha


def geometric_mean(x):
    """The saturating law is fitted to x / geometric_mean(x), for conditioning (x spans decades)."""
    return np.exp(np.log(np.asarray(x, float)).mean())


def fit_saturating_power(x, r):
    """Least-squares (r_inf, c, alpha) of r = r_inf - c x^(-alpha); NaNs when it does not converge
    (K >= 3).

    x is rescaled by its geometric mean for conditioning; c is reported for the original x.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    x, r = np.asarray(x, float), np.asarray(r, float)
    if len(x) < 3:
        return np.full(3, np.nan)
    scale = geometric_mean(x)
    start = (r.max() + 0.05, max(r.max() - r.min(), 1e-3), 0.5)
    try:
        with warnings.catch_warnings():   # 3 points, 3 parameters: no covariance, and none needed
            warnings.simplefilter("ignore", OptimizeWarning)
            (r_inf, c, alpha), _ = curve_fit(saturating_power, x / scale, r, p0=start,
                                             bounds=SATURATING_BOUNDS, maxfev=20000)
    except (RuntimeError, ValueError):
        return np.full(3, np.nan)
    return np.array([r_inf, c * scale ** alpha, alpha])


def saturating_bounds_hit(x, params):
    """The names of the parameters of a fit_saturating_power result that sit on a bound of its
    search: the data did not pin them down (too few points, or no curvature), so their values mean
    little."""
    r_inf, c, alpha = params
    scale = geometric_mean(x)
    searched = (r_inf, c / scale ** alpha, alpha)  # c as the search saw it
    # within 0.1% of the search's width: the optimizer stops near a bound, not on it
    return [name for name, value, low, high
            in zip(("r_inf", "c", "alpha"), searched, *SATURATING_BOUNDS)
            if min(value - low, high - value) <= 1e-3 * (high - low)]


def bootstrap_fits(x, score, samples):
    """Both laws fitted to the brain score of K configurations, with 95% intervals from the score's
    bootstrap resamples.

    x: (K,) compute, data or parameters; score: (K,) the brain score of each configuration;
    samples: (K, n_boot) its block-bootstrap resamples (bootstrap_scores; one resample of the test
    time course applies to every configuration, keeping them paired).
    Returns {"log_linear": {"a": [est, lo, hi], "b": ...}, "saturating_power": {"r_inf": ...,
    "c": ..., "alpha": ...}, "saturating_power_at_bound": the names of the point estimate's
    parameters stuck on a search bound, "samples": {law: (n_ok, n_params) parameters of the
    resamples that converged} (for confidence bands)}.
    """
    laws = {"log_linear": (fit_log_linear, ("a", "b")),
            "saturating_power": (fit_saturating_power, ("r_inf", "c", "alpha"))}
    out = {"samples": {}}
    for law, (fit, names) in laws.items():
        estimate = fit(x, score)
        fitted = np.array([fit(x, sample) for sample in samples.T])                  # (boot, n)
        ok = np.isfinite(fitted).all(1)
        lo, hi = (np.percentile(fitted[ok], [2.5, 97.5], axis=0) if ok.any()
                  else (np.full(len(names), np.nan),) * 2)
        out[law] = {n: [float(e), float(a), float(b)]
                    for n, e, a, b in zip(names, estimate, lo, hi)}
        out["samples"][law] = fitted[ok]
        if law == "saturating_power":
            stuck = saturating_bounds_hit(x, estimate) if np.isfinite(estimate).all() else []
            out["saturating_power_at_bound"] = stuck
    return out


def omitted_fits(x, fit):
    """Why a fitted law is not drawn: {law: reason} for the laws the data do not determine.
    Configurations that share an x (runs of the same compute, say) count once: together they pin a
    single point."""
    reasons = {}
    n = len(np.unique(x))
    if n < 3:
        reasons["log_linear"] = f"{n} distinct x values: a line through 2 points tests nothing"
    r_inf = fit["saturating_power"]["r_inf"][0]
    if n < 4:
        reasons["saturating_power"] = f"{n} distinct x values for 3 parameters"
    elif not np.isfinite(r_inf):
        reasons["saturating_power"] = "the fit did not converge"
    elif fit["saturating_power_at_bound"]:
        stuck = ", ".join(fit["saturating_power_at_bound"])
        reasons["saturating_power"] = f"{stuck} on a bound of the search"
    elif r_inf > 1:
        reasons["saturating_power"] = f"r_inf = {r_inf:.2f} > 1 is not a correlation"
    return reasons


def parcel_slopes(x, r):
    """Least-squares slope of r against log10 x for every parcel: x (K,), r (K, P) -> (P,)."""
    lx = np.log10(x) - np.log10(x).mean()                                        # (K,)
    return lx @ (r - r.mean(axis=0)) / (lx @ lx)


def slope_permutation_test(x, r, n_permutations=1000, seed=0):
    """One-sided p-values (P,) that a parcel's r grows with x more than chance: the configurations'
    x are permuted. When K! <= n_permutations every permutation is used, the identity included (an
    exact test: the smallest possible p-value is 1 / K!); otherwise n_permutations random ones, and
    the observed order is added to them (the smallest p-value is then 1 / (n_permutations + 1))."""
    from itertools import permutations
    k = len(x)
    observed = parcel_slopes(x, r)
    if math.factorial(k) <= n_permutations:
        null = np.stack([parcel_slopes(np.asarray(x)[list(order)], r)
                         for order in permutations(range(k))])                   # (K!, P)
        return observed, (null >= observed - 1e-12).mean(axis=0)   # the identity counts itself
    orders = [np.random.default_rng([seed, i]).permutation(k) for i in range(n_permutations)]
    null = np.stack([parcel_slopes(np.asarray(x)[order], r) for order in orders])   # (n, P)
    return observed, (1 + (null >= observed - 1e-12).sum(axis=0)) / (1 + len(null))
