"""06 — Ridge encoding: predict each parcel's BOLD from delayed features, score it, test it, map it.

Paper sections 2.3.2-2.3.3 and 3. For each subject: features of TR t-3 (05) predict the parcel BOLD
at TR t (02) by ridge regression; the penalty is chosen per parcel by exact leave-one-out on the
training set (the paper, from {0.1, 1, 100}); the score is Pearson's r between predicted and measured
BOLD on the test set. Two defaults differ from the paper, both unsound for fMRI at its scale (its
choices are one flag away): the penalty grid is wide and scaled to the features (--alphas paper:
the paper's), and the penalty is chosen by leave-one-run-out (--cv loo: the paper's leave-one-out,
which autocorrelated TRs make choose penalties far too small).

    python 06_ridge.py --work work --name demo             # every subject in bold/manifest.tsv
    python 06_ridge.py --work work --name demo --alphas paper --cv loo   # the paper's ridge
    python 06_ridge.py --work work --name demo --subjects 01 --delays 1 2 3 4 --cv validation
    python 06_ridge.py --work work --name demo --split random --test-size 0.1 \
        --n-permutations 0                                 # the paper's split
    python 06_ridge.py --work work --name demo --device cuda --n-permutations 1000
    sbatch --gpus-per-node 1 slurm/gpu_stage.sbatch \
        06_ridge.py --work work --name NAME --device cuda

Inputs (docs/CONTRACT.md):
  <work>/bold/manifest.tsv       sub ses task run n_volumes tr_s split bold_path ...;
                                 bold_path -> float32 (T, P), rows of non-steady-state volumes
                                 may be NaN (dropped here); empty_parcels: 0.0 columns, not scored
  <work>/bold/splits.tsv         sub ses task run split (train, validation or test), the split
                                 that 03 and 04 followed too (an older 02's: the manifest's)
  <work>/bold/labels.tsv         column label name: BOLD column -> atlas label value
  <work>/bold/atlas.nii.gz       the labels image on the BOLD grid
  <work>/features/<name>/<layer>/sub-XX/ses-YYY/<run stem>.npy   float16/32 (T, D), row t = TR t
Outputs, per subject, in <work>/results/<name>/sub-XX/ (summary.json is written last and marks
it done):
  r.npy (P,) test Pearson r, alphas.npy (P,) chosen penalty, p_values.npy (P,) permutation p-values,
  significant.npy (P,) bool (FDR q < --fdr), r_map.nii.gz, r_map.png, summary.json;
  and <work>/results/<name>/r_by_subject.png (the subjects made with this run's flags from the
  current inputs; a printed line names those left out).

Conventions: features are standardized with training-set means and standard deviations (the paper
does not say; --no-standardize fits them as they are); an intercept is fitted (X and Y centered with
training means), as scikit-learn's RidgeCV does, so both choose the same alphas. Split `session`
(default) trains on runs whose split is `train` and tests on `test`; `validation` runs are left out
unless --train-on-validation; a subject without both is skipped, and a model that trained on one of
its test runs refused. Split `random` pools every run of the subject and draws
--test-size of the samples at random (paper section 2.3.3; neighbouring TRs are correlated, so its
scores are optimistic, and it gets no p-values: a test TR's neighbours were trained on, and no
circular-shift null accounts for that).
"""
import argparse
import functools
import itertools
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas, lapack

import common
from common import (DEFAULT_WORK, InputError, atomic_path, load_npy, read_tsv, run_main, run_stem,
                    save_npy)

STAGE = "06_ridge"
PAPER_ALPHAS = (0.1, 1.0, 100.0)  # paper section 2.3.3
# The default grid (--alphas wide), relative to the scale of the features: alpha = 10^u times the
# mean non-zero eigenvalue of Xc Xc' (p for z-scored features when p < n, n when n < p), u from -3
# to 5 in half decades. The paper's grid is almost no penalty at its own scale (alpha / n = 0.7% at
# n = 15,000 TRs; the mean eigenvalue is p = 147,456): on the demo every parcel chose its top, 100,
# and in a synthetic width sweep it made a trough at p = n that a wide grid does not have.
WIDE_GRID = tuple(10.0 ** np.arange(-3.0, 5.01, 0.5))
BAND_GRID = (-2.0, -1.0, 0.0, 1.0, 2.0)   # --with: log10 ratios of the sets' weights (banded ridge)
# what a subject's folder holds besides summary.json, which lists them with their fingerprints; with
# several feature sets (--with), the variance partition too
OUTPUT_FILES = ("r.npy", "alphas.npy", "p_values.npy", "significant.npy", "r_map.nii.gz",
                "r_map.png", "test_bold.npy", "test_prediction.npy", "test_run.npy")
PARTITION_FILES = ("band_weights.npy", "r2_alone.npy", "r2_all.npy", "unique.npy", "shared.npy",
                   "unique_p.npy", "unique_significant.npy", "unique_map.nii.gz", "unique_map.png")


def parse_args(argv=None):
    """The flags of the stage, checked: a value out of range is a usage error (exit status 2), a
    combination that cannot give valid results an InputError."""
    p = argument_parser()
    args = p.parse_args(argv)
    if min(args.delays) < 0:
        p.error("--delays must be >= 0")
    words = [a for a in args.alphas if isinstance(a, str)]
    if words and len(args.alphas) > 1:
        p.error(f"--alphas {words[0]}: a grid's name stands alone (or give values)")
    if not words and min(args.alphas) <= 0:
        p.error("--alphas must be > 0")
    if not 0 < args.test_size < 1:
        p.error("--test-size must be between 0 and 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch")
    if args.with_sets and args.pca:
        raise InputError("--pca with --with: project each feature set yourself (05 --pool), "
                         "or fit one set")
    if args.cv == "validation" and args.train_on_validation:
        p.error("--cv validation already fits the final model on the validation runs: "
                "leave out --train-on-validation")
    if args.cv == "validation" and args.split == "random":
        p.error("--cv validation needs the validation runs of --split session")
    if args.split == "random" and args.n_permutations > 0:
        # On pure noise with autocorrelated features, the random split gives a median r near 0.8 and
        # a circular-shift null calls every parcel significant: the null cannot model the leak.
        raise InputError("--split random: no valid permutation p-values (its test TRs lie between "
                         "training TRs, whose fit leaks into their r): pass --n-permutations 0, "
                         "or use --split session")
    return args


def alpha_value(text):
    """One token of --alphas: a grid's name (wide, paper) or a penalty."""
    if text in ("wide", "paper"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: wide, paper or a number") from None


def penalty_grid(alphas):
    """--alphas as (values (A,), relative): relative values multiply the features' scale, the mean
    non-zero eigenvalue of their centered Gram matrix (fit_ridge_loo)."""
    if alphas == ["wide"]:
        return WIDE_GRID, True
    return (PAPER_ALPHAS if alphas == ["paper"] else tuple(alphas)), False


def argument_parser():
    """The stage's command line (parse_args checks the values it parses)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=DEFAULT_WORK, help="working directory (default: work)")
    p.add_argument("--name", required=True, help="feature set: <work>/features/<name>/")
    p.add_argument("--results-name", default=None,
                   help="results folder <work>/results/<results-name>/ (default: --name; one per "
                        "layer when several layers of a feature set are encoded)")
    p.add_argument("--layer", default=None,
                   help="feature layer folder "
                        "(default: the only layer present; needed when there are several)")
    p.add_argument("--with", dest="with_sets", nargs="+", default=[], metavar="NAME[:LAYER]",
                   help="more feature sets, fitted jointly with --name (banded ridge: a penalty "
                        "per set) and compared by variance partitioning, "
                        "e.g. --with lowlevel buttons")
    p.add_argument("--band-grid", type=band_ratio, nargs="+", default=list(BAND_GRID), metavar="U",
                   help="with --with: the weights of the sets tried, log10 of each set's weight "
                        "relative to another's, from -15 to 15 (default -2 -1 0 1 2; a set may "
                        "also be left out)")
    p.add_argument("--subjects", nargs="+", default=None, type=lambda s: s.removeprefix("sub-"),
                   help="subject labels, e.g. 01 02 (default: all)")
    p.add_argument("--delays", type=int, nargs="+", default=[3],
                   help="feature delays in TRs: 3 = features of TR t-3 predict TR t (paper); "
                        "several = FIR")
    p.add_argument("--alphas", type=alpha_value, nargs="+", default=["wide"], metavar="ALPHA",
                   help="ridge penalty grid: wide (default: 10^-3 ... 10^5 times the features' "
                        "mean eigenvalue, half-decade steps), paper (the paper's 0.1 1 100), "
                        "or values")
    p.add_argument("--cv", choices=("runs", "validation", "loo"), default="runs",
                   help="how the penalty is chosen: leave-one-run-out over the training runs "
                        "(default), the error on the validation runs of the model fitted without "
                        "them (the final model then fits both), or exact leave-one-out (the "
                        "paper's; autocorrelated TRs make it choose too small penalties)")
    p.add_argument("--split", choices=("session", "random"), default="session",
                   help="session: manifest split column (paper 2.1.4); "
                        "random: paper 2.3.3's 90/10 split")
    p.add_argument("--test-size", type=float, default=0.1, help="test fraction for --split random")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random split, PCA and null shifts")
    p.add_argument("--train-on-validation", action="store_true",
                   help="with --split session, also train on the runs whose split is `validation`")
    p.add_argument("--allow-trained-on-test", action="store_true",
                   help="score test runs whose stimuli the model trained on (03/04 "
                        "--test-sessions with no value, as the authors did); refused by default")
    p.add_argument("--no-standardize", action="store_true",
                   help="fit the features as they are instead of z-scoring them with training "
                        "statistics (the paper does not say; z-scoring changes what an alpha of "
                        "the grid means)")
    p.add_argument("--pca", type=int, default=None, metavar="K",
                   help="replace the standardized features by their first K principal components")
    p.add_argument("--n-permutations", type=int, default=1000,
                   help="circular time shifts in the null distribution of r (0: no p-values)")
    p.add_argument("--fdr", type=float, default=0.05,
                   help="Benjamini-Hochberg level of the significance mask")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: float64 throughout; cuda: float32 products, float64 decomposition")
    p.add_argument("--parcel-batch", type=int, default=256, help="parcels solved at once")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute subjects whose summary.json exists")
    p.add_argument("--ground-truth", metavar="JSON",
                   help="the demo's ground_truth.json (00_make_demo.py): report whether its "
                        "planted parcels score above its noise parcels")
    return p


# --------------------------------------------------------------------------------------------------
# Ridge with exact leave-one-out for every alpha and every parcel at once (paper 2.3.2-2.3.3)
# --------------------------------------------------------------------------------------------------
# The model of one parcel is y = b0 + X b, b minimizing ||y - b0 - X b||^2 + alpha ||b||^2 (paper
# Eq. 8; the intercept b0 is not penalized). Its fitted values are H y with the hat matrix
#     H = 11'/n + Xc (Xc'Xc + alpha I)^-1 Xc'          (Xc: X centered with its training means)
# and its leave-one-out residual needs no refit: e_i = r_i / (1 - H_ii), r = (I - H) y. Likewise,
# leaving a whole group g of samples (a run) out gives e_g = [(I - H)_gg]^-1 r_g. I - H in closed
# form:
#   dual (p > n), with K = Xc Xc' (n, n) and G = (K + alpha I)^-1: H = 11'/n + K G and
#   I - K G = alpha G, so
#       I - H = alpha G - 11'/n  and  r = alpha G yc  (yc = y - mean(y), so 11'yc = 0); either
#     "cholesky", one factorization per alpha: K + alpha I = L L', G = L^-T L^-1, diag(G) = column
#       sums of squares of L^-1; or
#     "eigh", one decomposition for every alpha: K = Q diag(lam) Q',
#       alpha G = Q diag(alpha / (lam + alpha)) Q'
#   primal (n >= p): Xc = U diag(s) V'      ->  I - H = I - 11'/n - U diag(s^2 / (s^2 + alpha)) U'
# (1 is in K's null space, so G 1 = 1 / alpha: subtracting 11'/n leaves the intercept's direction
# unpenalized, as scikit-learn does by zeroing the weight of K's eigenvector along 1.)
# This is the leave-one-out that scikit-learn's RidgeCV(alphas, alpha_per_target=True, cv=None)
# computes, with the same criterion (mean squared leave-one-out error) and the same tie rule (the
# first alpha).


def fit_ridge_loo(X_train, Y_train, X_test, alphas, groups=None, device="cpu", dtype=torch.float64,
                  feature_chunk=4096, row_block=1024, parcel_batch=256, solver="auto",
                  relative=False):
    """Ridge per target with the penalty chosen by exact leave-one-out (or leave-one-group-out).

    X_train (n, p), Y_train (n, P), X_test (m, p): numpy arrays, any float dtype (read a block of
    columns at a time, so a float32 X of the paper's size never exists in float64). alphas (A,):
    the penalties, or with `relative` their multiples of the features' scale (feature_scale).
    groups (n,) or None: with groups, the penalty minimizes the error of each group g >= 0 left out
    in turn (rows of group -1 are never left out: --cv validation). Products of X
    run in `dtype` on `device`; the decomposition and everything after it in float64. solver, when
    p > n: "cholesky" (one factorization of Xc Xc' + alpha I per alpha), "eigh" (one
    eigendecomposition of Xc Xc' for every alpha) or "auto" (the faster for these sizes: Cholesky
    below ~25 alphas at n = 4000); n >= p uses the SVD of Xc ("svd"). feature_chunk, row_block and
    parcel_batch bound the memory of temporaries: blocks of columns of X, of rows of the Gram matrix
    (device cuda or float32 products), of targets.

    Returns a dict:
      alpha (P,) chosen penalty; alpha_index (P,) its index in the grid; alpha_grid (A,) the
      penalties tried; cv_error (A, P) mean squared held-out error of each alpha;
      test_prediction (m, P); train_fit (n, P) in-sample fitted values; mode "dual" or "primal";
      solver "cholesky", "eigh" or "svd"; seconds {phase: wall time}: "products" (the Gram matrices;
      primal: centered X), "selection" (decompositions, held-out errors of every alpha),
      "prediction".
    """
    clock = Stopwatch(device)
    n, p = X_train.shape
    f64 = dict(device=device, dtype=torch.float64)
    y_mean = torch.as_tensor(Y_train.mean(axis=0, dtype=np.float64), **f64)      # (P,)
    # (n, P) column-major: a batch of targets is one contiguous block, which BLAS reads without a
    # copy
    yc = (torch.as_tensor(Y_train, **f64) - y_mean).T.contiguous().T
    members = held_out_members(groups, device)
    mode = "dual" if p > n else "primal"
    if mode == "dual":    # (n, n) and (m, n) Gram matrices
        products = _centered_gram(X_train, X_test, device, dtype, feature_chunk, row_block)
        solver = _dual_solver(n, Y_train.shape[1], len(alphas)) if solver == "auto" else solver
    else:                 # (n, p) and (m, p) centered features
        products = _centered_features(X_train, X_test, device, dtype, feature_chunk)
        solver = "svd"
    clock.lap("products")
    scale = feature_scale(products[0], mode, p) if relative else 1.0
    alphas = torch.tensor(list(alphas), **f64) * scale                           # (A,)
    try:
        result = SOLVERS[solver](*products, yc, alphas, members, parcel_batch, clock)
    except np.linalg.LinAlgError:   # an alpha below the rounding errors of K: eigh clamps them
        solver = "eigh"
        result = SOLVERS[solver](*products, yc, alphas, members, parcel_batch, clock)
    cv_error, best, fit, prediction = result
    out = dict(alpha=alphas[best].cpu().numpy(), alpha_index=best.cpu().numpy(),
               alpha_grid=alphas.cpu().numpy(), cv_error=cv_error.cpu().numpy(),
               test_prediction=(prediction + y_mean).cpu().numpy(),
               train_fit=(fit + y_mean).cpu().numpy(), mode=mode, solver=solver)
    clock.lap("prediction")
    return dict(out, seconds=clock.seconds)


def held_out_members(groups, device):
    """The sample indices of each group g >= 0 of `groups` (n,) (None: leave-one-out)."""
    if groups is None:
        return None
    groups = np.asarray(groups)
    return [torch.as_tensor(np.flatnonzero(groups == g), device=device)
            for g in np.unique(groups[groups >= 0])]


def feature_scale(product, mode, p):
    """The mean non-zero eigenvalue of Xc Xc' (= of Xc' Xc): its trace over its rank, which centering
    bounds by n - 1. product: K (n, n) in the dual, Xc (n, p) in the primal; p the number of
    features. A relative grid of penalties multiplies it, so a penalty means the same shrinkage
    whatever the number of features and their units."""
    n = product.shape[0]
    trace = product.diagonal().sum() if mode == "dual" else (product ** 2).sum()
    return float(trace) / max(1, min(n - 1, p))


# The solvers. Each takes the centered products (K (n, n) and K_test (m, n) in the dual, Xc (n, p)
# and Xc_test (m, p) in the primal), the centered targets yc (n, P), the alphas (A,), the held-out
# groups (None: leave-one-out; else the sample indices of each group), a batch size over targets and
# the Stopwatch (its "selection" lap ends before the test prediction), and returns (cv_error (A, P),
# best (P,) index of the chosen alpha, the in-sample fit (n, P) and the test prediction (m, P), both
# centered). Ties go to the first alpha, as scikit-learn's argmin.
def solve_cholesky(K, K_test, yc, alphas, members, parcel_batch, clock):
    """Dual, one Cholesky factorization of K + alpha I per alpha (a few alphas, the paper's 3)."""
    # dual = G yc, best alphas
    cv_error, dual = _select_cholesky(K, yc, alphas, members, parcel_batch)
    best = torch.argmin(cv_error, dim=0)
    clock.lap("selection")
    fit = yc - alphas[best] * dual                       # H yc = yc - alpha G yc
    return cv_error, best, fit, K_test @ dual            # primal coefficients Xc' dual never formed


def solve_eigh(K, K_test, yc, alphas, members, parcel_batch, clock):
    """Dual, one eigendecomposition K = Q diag(lam) Q' for every alpha (a long grid)."""
    lam, basis = _eigh(K)                                # (n,), (n, n)
    lam = lam.clamp(min=0)     # K is positive semi-definite; rounding can make 0 slightly negative
    # 1, the intercept's direction, is K's null vector: its eigenvalue is 0, not eigh's rounding
    # error (scikit-learn likewise leaves the eigenvector closest to 1 unpenalized)
    lam[torch.argmax(basis.sum(dim=0).abs())] = 0
    cv_error, QTy, residual = _select_spectral(basis, lambda a: a / (lam + a), 1, yc, alphas,
                                               members, parcel_batch)
    best = torch.argmin(cv_error, dim=0)
    clock.lap("selection")
    # b = Xc' (K + alpha I)^-1 yc, so X_test b = K_test Q diag(1 / (lam + alpha)) Q' yc
    prediction = (K_test @ basis) @ (QTy / (lam[:, None] + alphas[best][None, :]))   # (m, P)
    return cv_error, best, yc - residual, prediction


def solve_svd(Xc, Xc_test, yc, alphas, members, parcel_batch, clock):
    """Primal, the SVD Xc = U diag(s) V' (n >= p)."""
    basis, s, Vh = torch.linalg.svd(Xc, full_matrices=False)   # (n, r), (r,), (r, p)
    s2 = s**2
    cv_error, QTy, residual = _select_spectral(basis, lambda a: s2 / (s2 + a), -1, yc, alphas,
                                               members, parcel_batch)
    best = torch.argmin(cv_error, dim=0)
    clock.lap("selection")
    # b = V diag(s / (s^2 + alpha)) U' yc
    prediction = (Xc_test @ Vh.T) @ (QTy * (s[:, None] / (s2[:, None] + alphas[best][None, :])))
    return cv_error, best, yc - residual, prediction


SOLVERS = {"cholesky": solve_cholesky, "eigh": solve_eigh, "svd": solve_svd}


class Stopwatch:
    """Wall time per phase, once the device has finished its queued work: seconds {phase: s}."""

    def __init__(self, device):
        self.device, self.seconds, self.last = device, {}, time.perf_counter()

    def lap(self, phase):
        if self.device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.seconds[phase], self.last = now - self.last, now


def _select_cholesky(K, yc, alphas, members, parcel_batch):
    """Held-out errors of every alpha from one Cholesky factorization of K + alpha I per alpha
    (dual).

    K (n, n) centered Gram matrix, yc (n, P) centered targets, alphas (A,), members None or the
    sample indices of each group. Returns cv_error (A, P) and dual (n, P) = G yc, each target with
    its best alpha (the first of its smallest errors, as argmin). Raises LinAlgError as
    _inverse_cholesky_factor.

    The factorization is of S = K + s 11' + alpha I instead (s: K's mean eigenvalue / n). As
    K 1 = 0, 1 is an eigenvector of S with eigenvalue n s + alpha, so
    G = S^-1 + (1/alpha - 1/(n s + alpha)) 11'/n, which gives G yc = S^-1 yc and
    I - H = alpha S^-1 - c 11', c = alpha / (n (n s + alpha)). In G itself the intercept's direction
    weighs 1/alpha, and subtracting 11'/n from alpha diag(G) would cancel leading digits where
    1 - H_ii is small (small alpha); in S^-1 it weighs no more than the other directions.
    """
    n, P = yc.shape
    shift = float(K.diagonal().sum()) / n**2
    cv_error = torch.empty(len(alphas), P, dtype=yc.dtype, device=yc.device)
    dual = torch.empty_like(yc)
    for a, alpha in enumerate(alphas.tolist()):
        F = _inverse_cholesky_factor(K, alpha, shift)  # S^-1 = F'F
        c = alpha / (n * (n * shift + alpha))
        if members is None:
            # diag(I - H), without an (n, n) temporary
            held_out = alpha * torch.einsum("ij,ij->j", F, F) - c
        else:
            # (I - H)_gg = alpha F_g'F_g - c 11'; F is lower triangular, so F_g's rows above
            # group g are 0
            held_out = [torch.linalg.inv(alpha * F[int(idx[0]):, idx].T @ F[int(idx[0]):, idx] - c)
                        for idx in members]
        for b in _chunks(P, parcel_batch):
            solved = _times_inverse(F, yc[:, b])  # G yc = S^-1 yc (n, b)
            errors = _held_out_errors(alpha * solved, held_out, members)  # (n, b)
            cv_error[a, b] = torch.einsum("ij,ij->j", errors, errors) / n
            if a == 0:
                dual[:, b] = solved
            else:  # strictly smaller: a tie keeps the earlier alpha
                better = cv_error[a, b] < cv_error[:a, b].amin(dim=0)
                dual[:, b] = torch.where(better, solved, dual[:, b])
    return cv_error, dual


def _select_spectral(basis, shrink, sign, yc, alphas, members, parcel_batch):
    """Held-out errors of every alpha from one decomposition for all of them (dual eigh or primal
    SVD).

    I - H = base I + sign basis diag(shrink(alpha)) basis' - 11'/n with basis (n, r) orthonormal,
    sign +1 (dual, base 0) or -1 (primal, base 1); yc (n, P) centered targets, alphas (A,),
    members as _select_cholesky.
    Returns cv_error (A, P), basis'yc (r, P) and the residuals (n, P) of each target's best alpha.
    """
    n, P = yc.shape
    base = (1 - sign) / 2
    if members is None:
        basis_sq = basis**2  # (n, r)
        held_out = [base + sign * (basis_sq @ shrink(a)) - 1.0 / n for a in alphas]  # A x (n,)
        del basis_sq
    else:   # A x [inverse of (I - H)_gg for each group g]
        held_out = [[torch.linalg.inv(base * torch.eye(len(idx), dtype=yc.dtype, device=yc.device)
                                      + sign * (basis[idx] * shrink(a)) @ basis[idx].T - 1.0 / n)
                     for idx in members] for a in alphas]
    cv_error = torch.empty(len(alphas), P, dtype=yc.dtype, device=yc.device)
    QTy = torch.empty(basis.shape[1], P, dtype=yc.dtype, device=yc.device)
    chosen_residual = torch.empty_like(yc)
    for b in _chunks(P, parcel_batch):
        QTy[:, b] = basis.T @ yc[:, b]
        residuals = torch.stack([base * yc[:, b] + sign * basis @ (shrink(a)[:, None] * QTy[:, b])
                                 for a in alphas])  # (A, n, b)
        cv_error[:, b] = torch.stack([(_held_out_errors(r, h, members)**2).mean(dim=0)
                                      for r, h in zip(residuals, held_out)])
        best = torch.argmin(cv_error[:, b], dim=0)  # (b,) first minimum on ties, as scikit-learn
        chosen_residual[:, b] = residuals.gather(0, best[None, None, :].expand(1, n, -1))[0]
    return cv_error, QTy, chosen_residual


def _held_out_errors(residual, held_out, members):
    """Held-out errors (n, b) from the residuals r = (I - H) y (n, b) of a batch of targets.

    Leave-one-out (members None): r / diag(I - H), held_out = diag(I - H) (n,). Leave-one-group-out:
    [(I - H)_gg]^-1 r_g for each group g, held_out = those inverses, members = the groups' sample
    indices; the rows come out in group order.
    """
    if members is None:
        return residual / held_out[:, None]
    return torch.cat([inv @ residual[idx] for inv, idx in zip(held_out, members)])


def _centered_gram(X_train, X_test, device, dtype, feature_chunk, row_block):
    """K = Xc Xc' (n, n) and K_test = (X_test - x_mean) Xc' (m, n), float64 tensors on `device`.

    X_train (n, p), X_test (m, p): numpy arrays, read feature_chunk columns at a time and centered
    with the training means. Products run in `dtype`; the chunks' products are summed in float64.
    """
    n, p = X_train.shape
    m = X_test.shape[0]
    if device == "cpu" and dtype == torch.float64:   # the same sums with BLAS's syrk (last section)
        K, K_test = _centered_gram_syrk(X_train, X_test, feature_chunk)
    else:
        f64 = dict(device=device, dtype=torch.float64)
        K = torch.zeros(n, n, **f64)  # upper block triangle first
        K_test = torch.zeros(m, n, **f64)
        row_blocks = _chunks(n, row_block)
        for c in _chunks(p, feature_chunk):
            # (n, chunk), (m, chunk)
            A, A_test = _centered_blocks(X_train, X_test, c, device, dtype)
            for rows in row_blocks:  # K is symmetric: the blocks on and above the diagonal suffice
                K[rows, rows.start:] += (A[rows] @ A[rows.start:].T).double()
            K_test += (A_test @ A.T).double()
        K.triu_()  # the diagonal blocks were computed whole
    K += torch.triu(K, diagonal=1).T  # mirror the upper triangle
    # Centering again in float64 makes 1 an exact null vector of K despite rounding; one vector of
    # means for rows and columns keeps K exactly symmetric.
    mean = K.mean(dim=1)  # (n,)
    K -= mean[:, None] + mean[None, :] - mean.mean()
    return K, K_test


def _centered_features(X_train, X_test, device, dtype, feature_chunk):
    """Xc (n, p) and Xc_test (m, p): both minus the training means, float64 tensors on `device`."""
    blocks = [_centered_blocks(X_train, X_test, c, device, dtype)
              for c in _chunks(X_train.shape[1], feature_chunk)]
    return (torch.cat([train for train, _ in blocks], dim=1).double(),
            torch.cat([test for _, test in blocks], dim=1).double())


def _centered_blocks(X_train, X_test, c, device, dtype):
    """Columns c of X_train and X_test minus the training means, as `dtype` tensors on `device`:
    (n, .), (m, .)."""
    block = torch.as_tensor(X_train[:, c], device=device).to(dtype)  # (n, chunk)
    mean = block.mean(dim=0, dtype=torch.float64).to(dtype)  # (chunk,)
    return block - mean, torch.as_tensor(X_test[:, c], device=device).to(dtype) - mean


def _chunks(n, size):
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


# --------------------------------------------------------------------------------------------------
# Scores and their null distribution (paper section 2.3.3: Pearson r on the test set)
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# The stage: one subject after the other (data, fit, scores, null, maps)
# --------------------------------------------------------------------------------------------------
def main():
    args = parse_args()
    work = Path(args.work)
    stage = read_stage_inputs(args, work)
    names = [name for name, _ in stage.feature_sets]
    results_dir = work / "results" / (args.results_name or "+".join(names))
    # What a subject's results are made of: these flags, and the exact bytes of every BOLD and
    # feature file of the runs used (fingerprints from 02's and 05's records), the atlas and its
    # labels. Finished subjects made the same way are skipped; a changed input makes them again.
    settings = common.settings_of(args, {"work", "name", "results_name", "subjects", "device",
                                         "parcel_batch", "overwrite", "ground_truth", "layer",
                                         "with_sets", "allow_trained_on_test"})
    settings["--layer"] = stage.feature_sets[0][1]
    if args.with_sets:
        settings["--with"] = [f"{name}:{layer}" for name, layer in stage.feature_sets[1:]]
    else:   # a single set's record as before: no band grid either
        settings.pop("--band-grid")
    shared = [work / "bold" / "labels.tsv", stage.atlas_path, *filter(None, [args.ground_truth])]
    feature_dirs = [work / "features" / name / layer for name, layer in stage.feature_sets]
    inputs_of = functools.partial(subject_inputs, work, args, stage.manifest, shared, feature_dirs)
    skipped = subjects_without_split(args, stage)
    stage.subjects = [sub for sub in stage.subjects if sub not in skipped]
    fitted = 0
    for sub in stage.subjects:
        out_dir = results_dir / f"sub-{sub}"
        earlier = common.read_record(out_dir / "summary.json")
        files, inputs = inputs_of(sub, earlier)
        refuse_trained_on_test(args, work, sub, stage.manifest, files)
        if subject_is_done(out_dir, earlier, settings, inputs, len(stage.feature_sets),
                           args.overwrite):
            print(f"sub-{sub}: done already with these flags and inputs "
                  f"({out_dir / 'summary.json'}); --overwrite to redo")
            continue
        summary = encode_subject(args, sub, files, stage, out_dir, (settings, inputs))
        fitted += 1
        print(f"sub-{sub}: {summary['n_train_samples']} train / "
              f"{summary['n_test_samples']} test samples, "
              f"{summary['n_features']} features, r max {score_text(summary['r_max'])}, median "
              f"{score_text(summary['r_median'])}, "
              f"significant {significant_text(summary)}, "
              f"penalty on the grid's edges in {summary['parcels_at_smallest_alpha']} (smallest) "
              f"and {summary['parcels_at_largest_alpha']} (largest) parcels, "
              f"{summary['seconds']} s")
    update_subjects_figure(results_dir, stage, settings, inputs_of, redraw=fitted > 0)
    print_summary(results_dir, stage.subjects, skipped)


@dataclass
class StageInputs:
    """What every subject shares: bold/manifest.tsv (a DataFrame), the atlas label of each BOLD
    column, the atlas on the BOLD grid, the demo's planted labels (or None) and those planted on
    something else (its button parcel: not noise), the feature sets [(name, layer)] (--name first,
    then --with), the subjects; the labels without a voxel on the BOLD grid (02's 0.0 columns)."""
    manifest: object
    labels: list
    atlas_path: Path
    planted_labels: set | None
    other_signal: set
    feature_sets: list
    subjects: list
    off_grid: set


def read_stage_inputs(args, work):
    """StageInputs, after checking them before any subject is fitted (a mismatch leaves no
    results)."""
    manifest_path = work / "bold" / "manifest.tsv"
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: file not found (run 02_prep_fmri.py)")
    manifest = read_tsv(manifest_path, required=("sub", "ses", "task", "run", "split", "bold_path"))
    manifest["split"] = split_of_runs(work, manifest)
    labels, atlas_path, off_grid = read_parcels(work)
    planted_labels = common.read_planted_labels(args.ground_truth) if args.ground_truth else None
    other_signal = (common.read_planted_labels(args.ground_truth, "planted_buttons")
                    if args.ground_truth else set())
    named = ([(args.name, args.layer)]
             + [tuple(f"{spec}:".split(":")[:2]) for spec in args.with_sets])
    feature_sets = [(name, find_layer(work / "features" / name, layer or None))
                    for name, layer in named]
    if len(set(feature_sets)) < len(feature_sets):
        raise InputError(f"--with {' '.join(args.with_sets)}: a feature set is given twice")
    subjects = sorted(manifest["sub"].unique())
    if args.subjects:
        absent = [s for s in args.subjects if s not in subjects]
        if absent:
            raise InputError(f"{manifest_path}: no runs of sub-{absent[0]}")
        subjects = args.subjects
    return StageInputs(manifest, labels, atlas_path, planted_labels, other_signal, feature_sets,
                       subjects, off_grid)


def read_parcels(work):
    """(the atlas label of each BOLD column, the atlas on the BOLD grid, the labels 02 found no
    voxel of on that grid: their columns are 0.0 and they are not scored), after checking that
    the atlas holds every other label."""
    table = read_tsv(work / "bold" / "labels.tsv", required=("column", "label")).sort_values("column")
    labels = table["label"].astype(int).tolist()
    # labels.tsv of an older 02 has no n_voxels column: every label then has voxels
    empty = (table["n_voxels"] == 0).to_numpy() if "n_voxels" in table else np.zeros(len(table), bool)
    off_grid = set(table.loc[empty, "label"].astype(int))
    atlas_path = work / "bold" / "atlas.nii.gz"
    if not atlas_path.is_file():
        raise InputError(f"{atlas_path}: file not found (run 02_prep_fmri.py)")
    atlas = common.load_nifti(atlas_path)
    unknown = sorted(set(labels) - off_grid
                     - set(np.unique(common.nifti_data(atlas, atlas_path)).tolist()))
    if unknown:
        raise InputError(f"{atlas_path}: has no parcel with label {unknown[0]:g} "
                         "listed in bold/labels.tsv")
    return labels, atlas_path, off_grid


def split_of_runs(work, manifest):
    """The split of each run of the manifest: bold/splits.tsv's, the one split that 03 and 04
    follow too (the manifest's own column when an older 02 wrote no such file)."""
    path = common.splits_path(work)
    if not path.is_file():
        return manifest["split"]
    table = common.read_splits(path)
    split = manifest.apply(common.run_key, axis=1).map(
        dict(zip(table.apply(common.run_key, axis=1), table["split"])))
    if split.isna().any():
        row = manifest[split.isna()].iloc[0]
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        raise InputError(f"{path}: no row for run {stem}, which bold/manifest.tsv lists "
                         "(re-run 02_prep_fmri.py, or add it)")
    return split


def subjects_without_split(args, stage):
    """{subject: why} of the subjects that --split session cannot split (no training or no test
    run: a single-session subject, say), each said on one line: they are skipped, the others
    fitted. InputError when no subject is left."""
    if args.split == "random":
        return {}
    training = {"train", "validation"} if args.train_on_validation else {"train"}
    why = {}
    for sub in stage.subjects:
        splits = stage.manifest.loc[stage.manifest["sub"] == sub, "split"]
        lacking = [name for name, wanted in (("training", training), ("test", {"test"}))
                   if not splits.isin(wanted).any()]
        runs = ", ".join(f"{n} {split}" for split, n in splits.value_counts().items())
        if lacking:
            why[sub] = f"no {' and no '.join(lacking)} run in the split (its runs: {runs})"
        elif args.cv == "runs" and splits.isin(training).sum() < 2:
            why[sub] = (f"one training run: --cv runs leaves one out to choose the penalty (its "
                        f"runs: {runs}; --cv loo chooses by leave-one-out)")
        elif args.cv == "validation" and not (splits == "validation").any():
            why[sub] = f"no validation run for --cv validation (its runs: {runs})"
        if sub in why:
            print(f"{STAGE}: sub-{sub}: skipped: {why[sub]}", file=sys.stderr)
    if len(why) == len(stage.subjects):
        raise InputError(f"{common.splits_path(args.work)}: no subject can be fitted as asked "
                         f"(sub-{stage.subjects[0]}: {why[stage.subjects[0]]}): choose the split "
                         "with 02's --test-sessions, --test-runs or --splits, or another --cv")
    return why


def refuse_trained_on_test(args, work, sub, manifest, files):
    """InputError when a model whose features predict the BOLD (04's GPT, 03's VQ-VAE, as the
    first run's features record lists them) trained on the stimuli of one of the subject's test
    runs: its r there would measure memory, not encoding. --allow-trained-on-test lets it pass."""
    if args.allow_trained_on_test or args.split == "random":
        return
    runs = manifest[(manifest["sub"] == sub) & (manifest["split"] == "test")]
    test = {common.run_key(row): run_stem(row["sub"], row["ses"], row["task"], row["run"])
            for _, row in runs.iterrows()}
    for path in files[0][3]:
        record = common.read_record(common.record_path(path))
        for key, model_record in common.runs_trained_on(work, record).items():
            if key in test:
                raise InputError(f"{model_record}: trained on the stimuli of test run {test[key]} "
                                 f"of sub-{sub} ({common.splits_path(work)}): train it without "
                                 "them (03 and 04 follow that file), or pass "
                                 "--allow-trained-on-test")


def update_subjects_figure(results_dir, stage, settings, inputs_of, redraw):
    """r_by_subject.png compares subjects, so it shows only those made as this run makes them; the
    folder's other subjects (from a run with other --subjects and flags, or from inputs that changed
    since) are left out, with a line saying why. Refusing would stop this run over results it did
    not make, and that it does not need: a run that reaches them refuses other flags and remakes
    changed inputs. A re-run of finished subjects rewrites nothing, unless the figure may show other
    runs'."""
    made = sorted(path.parent.name.removeprefix("sub-")
                  for path in results_dir.glob("sub-*/summary.json"))
    others = [sub for sub in made if sub not in stage.subjects]   # this run's: checked above
    left_out = subjects_not_current(results_dir, others, stage.manifest, settings, inputs_of)
    if redraw or left_out or not (results_dir / "r_by_subject.png").is_file():
        plot_subjects(results_dir, [sub for sub in made if sub not in left_out])
    if left_out:
        print(f"{STAGE}: {results_dir / 'r_by_subject.png'} leaves out "
              + ", ".join(f"sub-{sub} ({why})" for sub, why in left_out.items()))


def score_text(value):
    """An r for a person to read: 0.524, or nan (every parcel's r NaN)."""
    return "nan" if value is None else f"{value:.3f}"


def subject_is_done(out_dir, record, settings, inputs, n_sets, overwrite):
    """common.is_up_to_date for a subject's summary.json, which must also list every output this
    version writes (results of an older 06 lack the test time course that 07's intervals
    resample)."""
    if not common.is_up_to_date(out_dir / "summary.json", record, STAGE, settings, inputs,
                                overwrite):
        return False
    missing = [name for name in output_files(n_sets) if name not in record.get("outputs", {})]
    if missing:
        print(f"{STAGE}: {out_dir} has no {missing[0]} (an older 06_ridge.py): making it again")
        return False
    if n_sets > 1 and "unique_test" not in record.get("partition", {}):
        print(f"{STAGE}: {out_dir}: its unique parts were tested by circular shifts (an older "
              "06_ridge.py, anti-conservative there): making it again")
        return False
    return True


def subject_inputs(work, args, manifest, shared, feature_dirs, sub, earlier=None):
    """(files, inputs) of one subject: run_files(...) of the runs it uses, and the inputs of its
    record (fingerprints of the `shared` files and of every run's BOLD and features, reusing those
    of the `earlier` record's inputs where they vouch, and each run's split). InputError for a
    missing file."""
    files = run_files(work, runs_used(args, manifest[manifest["sub"] == sub]), feature_dirs)
    for stem, _, bold_path, feature_paths in files:
        if not bold_path.is_file():
            raise InputError(f"{bold_path}: BOLD file of run {stem} not found")
        for path in feature_paths:
            if not path.is_file():
                raise InputError(f"{path}: features missing for run {stem}")
    paths = [*shared, *(p for _, _, bold, features in files for p in (bold, *features))]
    inputs = common.input_fingerprints(work, paths, (earlier or {}).get("inputs"))
    inputs["splits"] = {stem: split for stem, split, _, _ in files}
    return files, inputs


def subjects_not_current(results_dir, subjects, manifest, settings, inputs_of):
    """{subject: why, in a few words} for those of `subjects` (labels, "01") whose results in
    `results_dir` were not made as this run makes them: with `settings`, from the inputs
    `inputs_of(subject, its record)` gives; 06's rule, common.is_up_to_date."""
    why = {}
    for sub in subjects:
        path = results_dir / f"sub-{sub}" / "summary.json"
        record = common.read_record(path)
        if sub not in set(manifest["sub"]):
            why[sub] = "not in bold/manifest.tsv"
            continue
        try:
            inputs = inputs_of(sub, record)[1]
        except InputError:
            why[sub] = "its BOLD or features are missing"
            continue
        try:
            if common.is_up_to_date(path, record, STAGE, settings, inputs, False,
                                    say=lambda line: None):
                continue
        except InputError:   # other flags
            why[sub] = f"made with other {', '.join(common.changed_settings(record, settings))}"
            continue
        changed = common.changed_inputs(record or {}, inputs)
        why[sub] = ("no record of how it was made" if record is None else
                    f"{changed[0]} changed since" if changed else
                    "its files changed since it was made")
    return why


def encode_subject(args, sub, files, stage, out_dir, record):
    """Fit, score, test and map one subject; write its outputs, then summary.json (its record:
    `record` is (settings, inputs) as main computed them). files: run_files(...) of the runs
    used."""
    start = time.time()
    rng = np.random.default_rng(args.seed)
    design = subject_design(args, sub, files, stage.labels, rng)
    partition = None
    if len(design.X_train) == 1:   # the paper's model: one feature set
        alphas, relative = penalty_grid(args.alphas)
        fit = fit_ridge_loo(design.X_train[0], design.Y_train, design.X_test[0], alphas,
                            groups=design.groups, device=args.device, dtype=products_dtype(args),
                            parcel_batch=args.parcel_batch, relative=relative)
    else:                          # --with: banded ridge of all the sets, the variance partition
        fit, partition = partition_variance(design, args)
    r = pearson_r(design.Y_test, fit["test_prediction"])  # (P,)
    if design.all_constant:
        r[:] = np.nan   # a constant prediction has no correlation, whatever rounding leaves in it
    not_scored = parcels_not_scored(stage, sub, files)
    r[np.isin(stage.labels, list(not_scored))] = np.nan   # no data there: NaN, not a score of 0.0s
    p_values, significant, null = significance(args, design, fit["test_prediction"], r, rng)
    if partition is not None:
        partition |= unique_significance(args, design, fit, partition)
    warn_if_alphas_at_grid_edge(args, sub, fit["alpha_index"], significant, design.all_constant)
    names = [name for name, _ in stage.feature_sets]
    if not design.all_constant:                   # (else there is no r to test)
        warn_if_too_few_shifts(args, sub, null["n_permutations"], "parcel's r", significant)

    # --- outputs (summary.json last: it is the subject's record, and marks it as done) ---
    common.remove_stale_temporaries(out_dir)
    # a subject is all or nothing: a failed write (full disk) removes what this attempt wrote
    with common.all_or_nothing([out_dir / name
                                for name in (*output_files(len(names)), "summary.json")]):
        save_npy(out_dir / "r.npy", r.astype(np.float32))
        save_npy(out_dir / "alphas.npy", fit["alpha"])
        save_npy(out_dir / "p_values.npy", p_values)
        save_npy(out_dir / "significant.npy", significant)
        save_test_time_course(out_dir, design, fit["test_prediction"])
        best = score_text(np.nanmax(r) if np.isfinite(r).any() else None)
        write_r_map(r, significant, args.n_permutations > 0, stage.labels, stage.atlas_path,
                    out_dir, f"sub-{sub} {'+'.join(names)}: test r (max {best})")
        if partition is not None:
            write_partition(out_dir, fit, partition, names, stage, sub)
        summary = subject_summary(args, sub, r, significant, null, fit, design, files, record,
                                  start)
        if partition is not None:
            summary["partition"] = partition_summary(partition, names, args)
        summary["parcels_not_scored"] = {str(label): why for label, why in not_scored.items()}
        if stage.planted_labels is not None:
            summary["ground_truth"] = planted_recovery(r, significant, stage.labels,
                                                       stage.planted_labels, stage.other_signal)
        summary["outputs"] = {name: common.hash_file(out_dir / name)
                              for name in output_files(len(names))}
        common.write_json(out_dir / "summary.json", summary)
    return summary


def parcels_not_scored(stage, sub, files):
    """{atlas label: why} of the parcels that have no data in a run the subject uses (02's 0.0
    columns: no voxel on the BOLD grid, or none usable in that run): carried as NaN, listed in the
    summary, never a stop."""
    why = {label: "no voxel on the BOLD grid (outside the field of view, or too small)"
           for label in stage.off_grid}
    used = {stem for stem, *_ in files}
    runs = stage.manifest[stage.manifest["sub"] == sub]
    for row in runs.itertuples():
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        if stem in used and common.has_label(getattr(row, "empty_parcels", None)):
            for label in str(row.empty_parcels).split():
                why.setdefault(int(label), f"no usable voxel in {stem}")
    return why


def products_dtype(args):
    """The dtype of the products of X (fit_ridge_loo): float32 on a GPU, float64 on the CPU."""
    return torch.float32 if args.device == "cuda" else torch.float64


def output_files(n_sets):
    """What a subject's folder holds besides summary.json (which lists them with their
    fingerprints)."""
    return OUTPUT_FILES + (PARTITION_FILES if n_sets > 1 else ())


def save_test_time_course(out_dir, design, prediction):
    """test_bold.npy and test_prediction.npy (m, P) float32 and test_run.npy (m,) int: the test time
    course, for intervals that resample it (07's block bootstrap: blocks of TRs within a run)."""
    save_npy(out_dir / "test_bold.npy", design.Y_test.astype(np.float32))
    save_npy(out_dir / "test_prediction.npy", prediction.astype(np.float32))
    save_npy(out_dir / "test_run.npy", np.array([g for g, _ in design.test_ids], np.int32))


@dataclass
class Design:
    """One subject's regression: X_train [(n, D_s)] and X_test [(m, D_s)] float32, one per feature
    set (delayed, standardized or projected), Y_train (n, P) and Y_test (m, P) float64 BOLD; the
    samples, (run index, index among the run's samples) for each row; the runs (load_runs); groups
    (n,) the training run of each row for --cv runs, else None; n_constant features constant over
    the training samples (all sets)."""
    X_train: list
    X_test: list
    Y_train: np.ndarray
    Y_test: np.ndarray
    train_ids: list
    test_ids: list
    runs: list
    groups: np.ndarray | None
    n_constant: int

    @property
    def train_runs(self):   # (n,) the run of each training row
        return np.array([g for g, _ in self.train_ids])

    @property
    def n_features(self):
        return sum(X.shape[1] for X in self.X_train)

    @property
    def all_constant(self):   # e.g. every window black: nothing to predict the BOLD from
        return self.n_constant == self.n_features


def subject_design(args, sub, files, labels, rng):
    """The subject's Design: runs read, samples split (--split), features delayed (--delays),
    standardized with training statistics (unless --no-standardize), projected (--pca)."""
    runs = load_runs(files, args.delays)
    train_ids, test_ids = split_samples(runs, args, rng)
    if not train_ids or not test_ids:
        raise InputError(f"{Path(args.work) / 'bold' / 'manifest.tsv'}: sub-{sub} has "
                         f"{len(train_ids)} training and {len(test_ids)} test samples "
                         f"with --split {args.split}")
    sets = range(len(runs[0]["features"]))
    X_train = [delayed_design(runs, train_ids, args.delays, s) for s in sets]  # (n, D_s * delays)
    X_test = [delayed_design(runs, test_ids, args.delays, s) for s in sets]    # (m, D_s * delays)
    X_train, X_test = without_constant_features(sub, files, X_train, X_test)
    Y_train = np.stack([runs[g]["bold"][k] for g, k in train_ids]).astype(np.float64)  # (n, P)
    Y_test = np.stack([runs[g]["bold"][k] for g, k in test_ids]).astype(np.float64)    # (m, P)
    if Y_train.shape[1] != len(labels):
        raise InputError(f"{Path(args.work) / 'bold' / 'labels.tsv'}: lists {len(labels)} parcels "
                         f"but the BOLD of sub-{sub} has {Y_train.shape[1]} columns")
    n_constant = sum(standardize(X, X_test_s, scale=not args.no_standardize)
                     for X, X_test_s in zip(X_train, X_test))
    if n_constant == sum(X.shape[1] for X in X_train):
        print(f"{STAGE}: warning: sub-{sub}: all {n_constant} features are constant over the "
              "training samples: no prediction is possible, r is NaN for every parcel",
              file=sys.stderr)
    if args.pca:   # one set (parse_args refuses --pca with --with)
        if args.pca >= min(X_train[0].shape):
            raise InputError(f"--pca {args.pca}: must be below min(samples, features) = "
                             f"{min(X_train[0].shape)}")
        X_train[0], X_test[0] = principal_components(X_train[0], X_test[0], args.pca, args.device,
                                                     args.seed)
    groups = held_out_groups(args, sub, runs, train_ids)
    return Design(X_train, X_test, Y_train, Y_test, train_ids, test_ids, runs, groups, n_constant)


def held_out_groups(args, sub, runs, train_ids):
    """What --cv leaves out to choose the penalty, as fit_ridge_loo's groups (n,): each training
    run in turn (runs), the validation runs (validation; the other rows -1, never left out), or
    None (loo: each sample)."""
    run_of_row = np.array([g for g, _ in train_ids])
    if args.cv == "runs":
        if len(np.unique(run_of_row)) < 2:
            raise InputError(f"--cv runs: sub-{sub} has only one training run (--cv loo chooses "
                             "the penalty by leave-one-out instead)")
        return run_of_row
    if args.cv == "validation":
        is_validation = np.array([runs[g]["split"] == "validation" for g in run_of_row])
        if not is_validation.any() or is_validation.all():
            raise InputError(f"--cv validation: sub-{sub} has {int(is_validation.sum())} samples "
                             f"in validation runs and {int((~is_validation).sum())} in training "
                             "runs: both are needed")
        return np.where(is_validation, 0, -1)
    return None


PENALTY_SELECTION = {
    "runs": "leave-one-run-out over the training runs (mean squared error)",
    "validation": "the error on the validation runs of the model fitted on the training runs; "
                  "the final model then fits both",
    "loo": "exact leave-one-out over the training samples (the paper's)"}


def without_constant_features(sub, files, X_train, X_test):
    """With several feature sets (--with), each set's design without its columns that are constant
    over the training samples, said in a warning. A set constant everywhere is an InputError: the
    banded ridge would give it a unique part all the same (its weight rescales the others' penalty)
    and r NaN where it alone is chosen. One set is left as it is (all constant: r NaN, said)."""
    if len(X_train) < 2:
        return X_train, X_test
    kept_train, kept_test = [], []
    for s, (X, X_test_s) in enumerate(zip(X_train, X_test)):
        folder = files[0][3][s].parents[2]                       # features/<name>/<layer>
        varies = X.max(axis=0) > X.min(axis=0)                    # (D_s * delays,)
        if not varies.any():
            raise InputError(f"{folder}: every feature is constant over the training samples of "
                             f"sub-{sub}: nothing to fit (leave the set out of --name and --with)")
        if not varies.all():
            print(f"{STAGE}: warning: sub-{sub}: {folder}: {int((~varies).sum())} of {len(varies)} "
                  "features constant over the training samples, left out", file=sys.stderr)
            X, X_test_s = X[:, varies], X_test_s[:, varies]
        kept_train.append(X)
        kept_test.append(X_test_s)
    return kept_train, kept_test


def significance(args, design, prediction, r, rng):
    """p-values (P,), the FDR mask (P,) and the null's summary (its size and the 95th percentile of
    the max and median null r over parcels: the chance level of the scores; None without a null)."""
    if args.n_permutations == 0:
        return (np.full(len(r), np.nan), np.zeros(len(r), bool),
                {"n_permutations": 0, "levels": None})
    # whole runs, in time order (split_samples)
    test_run = np.array([g for g, _ in design.test_ids])
    null = circular_shift_null(design.Y_test, prediction, test_run, args.n_permutations, rng)
    p_values, _, significant = permutation_p_values(r, null, args.fdr)
    levels = None
    if np.isfinite(null).any(axis=1).all():
        levels = {"max_r_95": float(np.quantile(np.nanmax(null, axis=1), 0.95)),
                  "median_r_95": float(np.quantile(np.nanmedian(null, axis=1), 0.95)),
                  "n_permutations": len(null)}
    return p_values, significant, {"n_permutations": len(null), "levels": levels}


def warn_if_alphas_at_grid_edge(args, sub, alpha_index, significant, all_constant):
    """Parcels without signal rightly take the largest penalty, whatever the grid. When every parcel
    sits on an edge of the grid, or a parcel with signal (significant) does, its best penalty
    probably lies outside the grid: say which --alphas to add. alpha_index (P,): each parcel's
    penalty, as its index in the grid."""
    n_alphas = len(penalty_grid(args.alphas)[0])
    if n_alphas < 2 or all_constant:
        return
    for edge, side, direction in ((n_alphas - 1, "largest", "larger"),
                                  (0, "smallest", "smaller")):
        on_edge = alpha_index == edge
        if on_edge.all():
            print(f"{STAGE}: warning: sub-{sub}: every parcel chose the {side} alpha of the "
                  f"grid: add {direction} --alphas", file=sys.stderr)
        elif (on_edge & significant).any():
            print(f"{STAGE}: warning: sub-{sub}: {int((on_edge & significant).sum())} significant "
                  f"parcel(s) chose the {side} alpha of the grid: add {direction} --alphas",
                  file=sys.stderr)


def warn_if_too_few_shifts(args, sub, n_null, what, significant):
    """Benjamini-Hochberg passes the k-th smallest of P p-values only when it is at most k q / P,
    and a permutation p-value is at least 1 / (n_null + 1): with few shifts and many parcels,
    parcels pass only in groups. When none passed (significant (P,) all False), say so, and what a
    single parcel would need; a lone effect (one parcel's unique part) is otherwise never found.
    n_null: the null's size (fewer than --n-permutations when the test runs allow no more)."""
    if n_null == 0 or significant.any():
        return
    n_parcels = significant.size
    smallest_group = int(np.ceil(n_parcels / (args.fdr * (n_null + 1))))
    if smallest_group <= 1:
        return
    needed = int(np.ceil(n_parcels / args.fdr)) - 1    # 1 / (n_null + 1) <= q / P
    hint = (f"--n-permutations {needed}" if n_null == args.n_permutations
            else f"longer or more test runs (these allow {n_null} circular shifts)")
    print(f"{STAGE}: warning: sub-{sub}: no {what} is significant, but with {n_null} circular "
          f"shifts the smallest p-value is {1 / (n_null + 1):.2g}, and FDR q < {args.fdr:g} over "
          f"{n_parcels} parcels passes parcels only {smallest_group} or more at a time; for a single "
          f"one: {hint}", file=sys.stderr)


def subject_summary(args, sub, r, significant, null, fit, design, files, record, start):
    """summary.json without its outputs' fingerprints: scores, significance, method, data,
    record."""
    finite = np.isfinite(r).any()
    values, counts = np.unique(fit["alpha"], return_counts=True)
    n_alphas = len(penalty_grid(args.alphas)[0])
    settings, inputs = record
    return {
        "stage": STAGE, "subject": f"sub-{sub}",
        "r_max": float(np.nanmax(r)) if finite else None,
        "r_median": float(np.nanmedian(r)) if finite else None,
        "r_mean": float(np.nanmean(r)) if finite else None,
        "n_parcels": int(len(r)), "n_parcels_nan_r": int(np.isnan(r).sum()),
        "n_significant": int(significant.sum()),
        "significance": (f"one-sided permutation p-value against {null['n_permutations']} "
                         f"circular shifts of the features within each run, "
                         f"Benjamini-Hochberg q < {args.fdr}"
                         if args.n_permutations else "not computed (--n-permutations 0)"),
        "null": null["levels"],
        "alphas_chosen": {f"{v:.3g}": int(c) for v, c in zip(values, counts)},
        "alpha_grid": grid_text(args, fit),
        "penalty_selection": PENALTY_SELECTION[args.cv],
        **{f"parcels_at_{side}_alpha": int((fit["alpha_index"] == edge).sum())
           for edge, side in ((n_alphas - 1, "largest"), (0, "smallest"))},
        "parcels_significant_at_an_edge": int((significant & np.isin(fit["alpha_index"],
                                                                   [0, n_alphas - 1])).sum()),
        "standardization": standardization_text(args, design.n_constant),
        "n_train_samples": len(design.train_ids), "n_test_samples": len(design.test_ids),
        "n_features": int(design.n_features),
        "solver": SOLVER_TEXT[fit["solver"]],
        "train_runs": sorted({design.runs[g]["stem"] for g, _ in design.train_ids}),
        "test_runs": sorted({design.runs[g]["stem"] for g, _ in design.test_ids}),
        "layer": files[0][3][0].parents[2].name,
        "seconds": round(time.time() - start, 1),
        "settings": settings, "inputs": inputs,
    }


def grid_text(args, fit):
    """The penalty grid in words (summary.json): its values, and what they are relative to."""
    values, relative = penalty_grid(args.alphas)
    text = ", ".join(f"{v:.3g}" for v in values)
    if not relative:
        return text
    if "alpha_grid" in fit:   # one feature set: one scale
        scale = float(fit["alpha_grid"][0] / values[0])
        return f"{text} times the features' mean eigenvalue {scale:.4g}"
    return f"{text} times the mean eigenvalue of each weighting of the sets' kernels"


SOLVER_TEXT = {"cholesky": "dual (a Cholesky factorization of X X^T + alpha I for each alpha)",
               "eigh": "dual (eigendecomposition of X X^T)", "svd": "primal (SVD of X)",
               "banded": "banded ridge, dual "
                         "(an eigendecomposition of sum_s w_s X_s X_s^T per weighting w)"}


def standardization_text(args, n_constant):
    """How the features entered the ridge, in words (summary.json)."""
    text = (f"features z-scored with training-set means and standard deviations "
            f"({n_constant} constant features set to 0)" if not args.no_standardize
            else "features as 05 wrote them (--no-standardize)")
    text += "; intercept fitted (X and BOLD centered with training means)"
    if args.pca:
        text += f"; then the first {args.pca} principal components of the training features"
    return text


def runs_used(args, runs_table):
    """The manifest rows of one subject that --split uses (session: train and test runs, plus
    validation runs with --train-on-validation or --cv validation; random: every run)."""
    if args.split == "session":
        used = {"train", "test"} | ({"validation"} if fits_validation(args) else set())
        runs_table = runs_table[runs_table["split"].isin(used)]
    return runs_table


def fits_validation(args):
    """Whether the final model is fitted on the validation runs too (--split session)."""
    return args.train_on_validation or args.cv == "validation"


# --------------------------------------------------------------------------------------------------
# Several feature sets at once: banded ridge and variance partitioning (beyond the paper)
# --------------------------------------------------------------------------------------------------
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
        lam, basis = _eigh(K)
        lam = lam.clamp(min=0)
        lam[torch.argmax(basis.sum(dim=0).abs())] = 0    # the intercept's direction, as solve_eigh
        cv_error, QTy, residual = _select_spectral(basis, lambda a: a / (lam + a), 1, yc, alphas,
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
    grams, grams_test = zip(*(_centered_gram(X, X_test, args.device, products_dtype(args), 4096,
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


# Is a unique part real? Its estimate is a mean over the test TRs: R^2(all) - R^2(all but s) =
# sum_t d_t / SS with d_t = (y_t - reduced_t)^2 - (y_t - full_t)^2, SS the test sum of squares of y.
# Two things make it vary. (1) The test TRs: they are autocorrelated, so the mean's variance comes
# from the means of d over blocks of ~BLOCK_TRS consecutive TRs of a test run, nearly independent
# (batch means). (2) The training runs: with another training sample, the fitted models differ, and
# a set that carries nothing beyond the others often predicts a little better by luck (its penalty
# and weight chosen on noise): in a design where set B re-encodes set A through more features, the
# fitted joint model beat A alone on fresh data in 26% of the parcels, and a test of (1) alone
# found B "unique" in a third of the datasets. Its variance comes from a delete-a-run jackknife:
# the models refitted without each training run in turn (deleted_run_errors, weights and penalties
# kept). The p-value is one-sided, from Student's t with the Welch-Satterthwaite degrees of freedom
# of the two variances. (A null made by shifting the predictions in time, as for r, is wrong here:
# misaligned, each R^2 is about -Var(prediction) / Var(y), so that null centres below 0 whenever the
# joint model predicts with more variance, and flagged 13-23 of 100 such parcels.)
BLOCK_TRS = 20   # ~30 s at the CNeuroMod TR of 1.49 s; 07's block bootstrap uses the same blocks
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
        lam, basis = _eigh(torch.einsum("s,sij->ij", w, grams))
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


# --------------------------------------------------------------------------------------------------
# Inputs: BOLD runs (02) and feature runs (05), matched run by run through the manifest
# --------------------------------------------------------------------------------------------------
def find_layer(features_root, layer):
    """The layer folder: --layer if given, else the only layer present. With several, --layer is
    needed, even when the paper's layer is among them: another layer extracted later (run_all.sh's
    EXTRACT_ARGS) would otherwise be passed over silently for the paper's."""
    if not features_root.is_dir():
        raise InputError(f"{features_root}: feature folder not found (run 05_extract.py)")
    if layer is not None:
        if not (features_root / layer).is_dir():
            raise InputError(f"{features_root / layer}: layer folder not found")
        return layer
    present = sorted(d.name for d in features_root.iterdir() if d.is_dir())
    if len(present) == 1:
        return present[0]
    raise InputError(f"{features_root}: holds layers {present or 'none'}; choose one with --layer")


def run_files(work, runs, feature_dirs):
    """[(stem, split, BOLD path, [feature path of each set])] of the manifest rows `runs`, in
    manifest order; feature_dirs: the folder of each feature set, <work>/features/<name>/<layer>."""
    files = []
    for row in runs.itertuples():
        stem = run_stem(row.sub, row.ses, row.task, row.run)
        features = [folder / common.run_folder(row.sub, row.ses) / f"{stem}.npy"
                    for folder in feature_dirs]
        files.append((stem, row.split, work / row.bold_path, features))
    return files


def load_runs(files, delays):
    """Read each run's BOLD and features; return the samples each run gives to the delayed design.

    files: run_files(...), whose files subject_inputs found. A sample is a TR t with finite BOLD
    and t >= max(delays): its design row is the concatenation of the features of TRs t - d for d in
    delays, all from the same run (shifts never cross run boundaries). Returns a list of dicts:
    stem, split, bold (T_valid, P) float32, features [one (T, D_s) memory-mapped array per feature
    set], rows (T_valid,).
    """
    loaded = []
    for stem, split, bold_path, feature_paths in files:
        bold = np.array(load_npy(bold_path, advice="re-run 02_prep_fmri.py --overwrite"))
        if bold.ndim != 2:
            raise InputError(f"{bold_path}: expected a 2-D (T, P) array")
        require_numbers(bold, bold_path, "re-run 02_prep_fmri.py --overwrite")
        features = [run_features(path, stem, bold_path, len(bold)) for path in feature_paths]
        if np.isinf(bold).any():
            raise InputError(f"{bold_path}: BOLD contains inf")
        nan_rows = np.isnan(bold).all(axis=1)  # non-steady-state volumes, left out by stage 02
        if np.isnan(bold[~nan_rows]).any():
            raise InputError(f"{bold_path}: BOLD has NaN in some parcels of a volume "
                             "(only whole NaN rows, for non-steady-state volumes, are allowed)")
        if len(bold) <= max(delays):
            raise InputError(f"run {stem}: {len(bold)} volumes, not more than the largest delay "
                             f"{max(delays)}: no sample left")
        rows = np.flatnonzero(~nan_rows & (np.arange(len(bold)) >= max(delays)))  # (T_valid,)
        loaded.append(dict(stem=stem, split=split, bold=bold[rows], features=features, rows=rows))
    for s, path in enumerate(files[0][3]):
        widths = {run["features"][s].shape[1] for run in loaded}
        if len(widths) > 1:
            raise InputError(f"{path.parents[2]}: runs have different feature sizes "
                             f"{sorted(widths)}")
    return loaded


def run_features(path, stem, bold_path, n_volumes):
    """One run's features of one set, (T, D) memory-mapped, after checking them against its BOLD
    (subject_inputs found the file)."""
    features = load_npy(path, advice="re-run 05_extract.py --overwrite")
    if features.ndim != 2:
        raise InputError(f"{path}: expected a 2-D (T, D) array")
    require_numbers(features, path, "re-run 05_extract.py --overwrite")
    if len(features) != n_volumes:
        raise InputError(f"run {stem}: features have {len(features)} rows ({path}) but BOLD has "
                         f"{n_volumes} volumes ({bold_path})")
    if not np.isfinite(features).all():
        raise InputError(f"{path}: features contain NaN or inf")
    return features


def require_numbers(array, path, advice):
    """Refuse an array of anything but integers or floats (strings, booleans), which the checks of
    finite values could not even read."""
    if array.dtype.kind not in "iuf":
        raise InputError(f"{path}: an array of {array.dtype}, not numbers; {advice}")


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


def split_samples(runs, args, rng):
    """Assign each sample to train or test; returns two lists of (run index, sample index)."""
    samples = [(g, k) for g, run in enumerate(runs) for k in range(len(run["rows"]))]
    if args.split == "random":  # paper 2.3.3: 90% of the samples at random for training
        test = np.zeros(len(samples), bool)
        n_test = max(1, round(args.test_size * len(samples)))
        test[rng.choice(len(samples), n_test, replace=False)] = True
        return ([s for s, t in zip(samples, test) if not t],
                [s for s, t in zip(samples, test) if t])
    train_splits = {"train", "validation"} if fits_validation(args) else {"train"}
    return ([s for s in samples if runs[s[0]]["split"] in train_splits],
            [s for s in samples if runs[s[0]]["split"] == "test"])


def principal_components(X_train, X_test, k, device, seed):
    """Both projected on the first k principal axes of the training features: (n, k), (m, k)
    float32.

    The axes are those of the centred training features (z-scoring centred them, --no-standardize
    did not; center=True subtracts the means inside the products, without a centred copy of the
    (n, p) matrix). The projections keep a constant offset, which the ridge's intercept absorbs."""
    torch.manual_seed(seed)
    # (n, p), float32: not copied on CPU
    train_t = torch.as_tensor(X_train, device=device)
    _, _, components = torch.pca_lowrank(train_t, q=k, center=True)         # (p, k)
    return ((train_t @ components).cpu().numpy(),
            (torch.as_tensor(X_test, device=device) @ components).cpu().numpy())


def standardize(X_train, X_test, scale=True, chunk=4096):
    """Scale both to zero mean, unit variance with training statistics, in place (scale False: leave
    them as they are); returns the number of columns that are constant over the training samples."""
    n_constant = 0
    for c in _chunks(X_train.shape[1], chunk):
        std = X_train[:, c].std(axis=0, dtype=np.float64)
        n_constant += int((std == 0).sum())
        if scale:
            mean = X_train[:, c].mean(axis=0, dtype=np.float64)
            std[std == 0] = 1.0  # a constant feature carries nothing: it becomes 0
            X_train[:, c] = (X_train[:, c] - mean) / std
            X_test[:, c] = (X_test[:, c] - mean) / std
    return n_constant


# --------------------------------------------------------------------------------------------------
# Outputs: brain map, figures, the demo's ground truth, the summary
# --------------------------------------------------------------------------------------------------
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


def planted_recovery(r, significant, labels, planted_labels, other_signal=frozenset()):
    """How the planted parcels of a synthetic dataset score against its noise parcels.

    r (P,) test r, significant (P,) bool, labels: the atlas label of each of the P columns;
    other_signal: labels planted on something else (the demo's button parcel), neither planted here
    nor noise, and so are the parcels without an r (no data: not scored). The planted parcels are
    recovered when a planted parcel beats a noise parcel in at least 80% of the (planted, noise)
    pairs, i.e. the area under the ROC curve of r as a detector of planted parcels is >= 0.8.
    """
    is_planted = np.array([label in planted_labels for label in labels])
    is_noise = (~is_planted & np.array([label not in other_signal for label in labels])
                & ~np.isnan(r))
    r_planted, r_noise = r[is_planted], r[is_noise]
    beats = (float(np.mean(r_planted[:, None] > r_noise[None, :]))
             if len(r_planted) and len(r_noise) else float("nan"))
    return {"planted_columns": np.flatnonzero(is_planted).tolist(),
            "planted_r_median": float(np.nanmedian(r_planted)),
            "noise_r_median": float(np.nanmedian(r_noise)),
            "noise_r_max": float(np.nanmax(r_noise)),
            "planted_significant": int(significant[is_planted].sum()),
            "n_planted": int(is_planted.sum()),
            "noise_significant": int(significant[is_noise].sum()),
            "n_noise": int(is_noise.sum()),
            "planted_beats_noise": beats, "recovered": bool(beats >= 0.8)}


def print_summary(results_dir, subjects, skipped):
    """One screen: per subject, max and median r, significant parcels, and the planted parcels if
    known; the subjects `skipped` ({subject: why}) last."""
    print(f"\n06_ridge: test Pearson r per parcel in {results_dir}")
    print(f"{'subject':<9}{'r max':>7}{'r median':>10}{'significant':>13}   planted parcels (demo)")
    for sub in subjects:
        path = results_dir / f"sub-{sub}" / "summary.json"
        if not path.is_file():
            continue
        s = json.loads(path.read_text())
        r_max, r_median = score_text(s["r_max"]), score_text(s["r_median"])
        line = f"{s['subject']:<9}{r_max:>7}{r_median:>10}{significant_text(s):>13}   "
        truth = s.get("ground_truth")
        if truth:
            line += (f"{'recovered' if truth['recovered'] else 'NOT recovered'}: "
                     f"median r {truth['planted_r_median']:.2f} "
                     f"vs {truth['noise_r_median']:.2f} (noise), "
                     f"beats noise in {truth['planted_beats_noise']:.0%} of pairs")
            if tested(s):
                line += (f", {truth['planted_significant']}/{truth['n_planted']} significant "
                         f"({truth['noise_significant']}/{truth['n_noise']} noise)")
        print(line)
        reasons = {}
        for label, why in s.get("parcels_not_scored", {}).items():
            reasons.setdefault(why, []).append(label)
        for why, labels in reasons.items():
            print(f"{'':<9}not scored: parcel(s) {' '.join(labels)}: {why}")
    for sub, why in skipped.items():
        print(f"{'sub-' + sub:<9}skipped: {why}")


def tested(summary):
    """Whether a subject's parcels were tested for significance (--n-permutations above 0)."""
    return summary["settings"].get("--n-permutations", 0) > 0


def significant_text(summary):
    """"k/P" of the P parcels scored, k significant; or "not tested" (--n-permutations 0)."""
    scored = summary["n_parcels"] - len(summary.get("parcels_not_scored", {}))
    return f"{summary['n_significant']}/{scored}" if tested(summary) else "not tested"


# --------------------------------------------------------------------------------------------------
# Fast linear algebra. The same results as the torch forms above, with BLAS and LAPACK routines
# that torch does not expose (syrk, potrf, trtri, trmm: half the multiply-adds of general products)
# and a rule that picks the faster dual solver for the problem's size. Nothing here changes what
# is computed, only how fast: tests/test_ridge.py checks both against scikit-learn.
# --------------------------------------------------------------------------------------------------
def _centered_gram_syrk(X_train, X_test, feature_chunk):
    """_centered_gram on the CPU in float64: K (n, n) with its upper triangle filled (the caller
    mirrors it) and K_test (m, n)."""
    n, p = X_train.shape
    m = X_test.shape[0]
    # BLAS syrk computes one triangle of B B' (half the multiply-adds of torch's general products)
    # and adds it in place; with the test rows stacked under the training rows, the same call gives
    # K_test for m^2 extra multiply-adds per feature.
    gram = np.zeros((n + m, n + m), order="F")  # lower triangle filled: [[K, 0], [K_test, .]]
    # reused: each fresh block would be page-faulted in
    buffer = np.empty((n + m) * min(feature_chunk, p))
    for c in _chunks(p, feature_chunk):
        mean = X_train[:, c].mean(axis=0, dtype=np.float64)  # (chunk,)
        # (n + m, chunk): centered training, then test rows
        block = buffer[:(n + m) * (c.stop - c.start)].reshape(n + m, -1)
        np.subtract(X_train[:, c], mean, out=block[:n])
        np.subtract(X_test[:, c], mean, out=block[n:])
        # block.T is block's memory in Fortran order, (chunk, n + m): trans=1 gives block block',
        # no copy
        gram = blas.dsyrk(1.0, block.T, beta=1.0, c=gram, trans=1, lower=1, overwrite_c=1)
    # K is symmetric: its lower triangle in column-major order is the upper triangle of a
    # row-major K
    K = torch.from_numpy(gram[:n, :n].T)
    K_test = torch.from_numpy(gram[n:, :n])
    return K, K_test


def _dual_solver(n, n_targets, n_alphas):
    """"cholesky" or "eigh": the dual solver that takes less time for these sizes.

    Times in multiply-adds at the rate of BLAS's general product, fitted to timings with n = 4000
    and 1095 targets on the project's 2-core CPU (the two break even at ~25 alphas): an
    eigendecomposition ~6.5 n^3 (half of its tridiagonal reduction is memory-bound), a Cholesky
    factorization and triangular inverse ~0.4 n^3 per alpha; each target then ~1.8 n^2 per alpha
    with Cholesky (two triangular products, held-out errors) and ~2.3 n^2 per alpha and once more
    (Q'y) with eigh (torch's products, held-out errors of every alpha).
    """
    cholesky = n_alphas * (0.4 * n**3 + 1.8 * n**2 * n_targets)
    eigh = 6.5 * n**3 + 2.3 * (n_alphas + 1) * n**2 * n_targets
    return "cholesky" if cholesky <= eigh else "eigh"


def _fortran_copy(K):
    """K (n, n) symmetric, on the CPU, as a new column-major numpy array, copied without transposing
    memory."""
    k = K.numpy()
    # a row-major K' is K, column-major
    return np.array(k.T if k.strides[1] == k.itemsize else k, order="F")


def _inverse_cholesky_factor(K, alpha, shift):
    """F = L^-1 (n, n), lower triangular, where K + shift 11' + alpha I = L L' for K (n, n)
    symmetric float64.

    Raises numpy's LinAlgError when that matrix is not positive definite in floating point (alpha
    below the rounding errors of K).
    """
    n = K.shape[0]
    if K.is_cuda:
        eye = torch.eye(n, dtype=K.dtype, device=K.device)
        L, info = torch.linalg.cholesky_ex(K + shift + alpha * eye)
        if info.item():
            raise np.linalg.LinAlgError(f"K + {alpha:g} I is not positive definite")
        return torch.linalg.solve_triangular(L, eye, upper=False)
    # LAPACK's triangular inverse (trtri, n^3/6 multiply-adds; torch has none) costs a third of
    # solving L F = I
    shifted = _fortran_copy(K)  # potrf and trtri overwrite it
    shifted += shift
    shifted[np.diag_indices(n)] += alpha
    # clean: zero upper triangle, kept in F
    L, info = lapack.dpotrf(shifted, lower=1, clean=1, overwrite_a=1)
    if info == 0:
        F, info = lapack.dtrtri(L, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"K + {alpha:g} I is not positive definite")
    return torch.from_numpy(F)


def _times_inverse(F, B):
    """G B = F'(F B) (n, b) for G = F'F, F (n, n) lower triangular, B (n, b), float64."""
    if F.is_cuda:
        return F.T @ (F @ B)
    # BLAS triangular products (trmm): half the multiply-adds of torch's general products
    FB = blas.dtrmm(1.0, F.numpy(), np.array(B.numpy(), order="F"), lower=1, overwrite_b=1)
    return torch.from_numpy(blas.dtrmm(1.0, F.numpy(), FB, lower=1, trans_a=1, overwrite_b=1))


def _eigh(K):
    """Eigenvalues (n,), ascending, and eigenvectors (n, n) of K (n, n) symmetric float64, on K's
    device."""
    if K.is_cuda:
        return torch.linalg.eigh(K)
    # LAPACK's divide and conquer (syevd) in scipy's OpenBLAS takes ~2/3 of the time of torch's
    # (MKL) on our CPUs
    lam, Q = scipy.linalg.eigh(_fortran_copy(K), driver="evd", overwrite_a=True, check_finite=False)
    return torch.from_numpy(lam), torch.from_numpy(Q)


if __name__ == "__main__":
    run_main(main)
