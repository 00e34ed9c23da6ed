"""The ridge of paper/encoding.py made fast, and what 06 adds to it beyond the paper: a penalty grid
scaled to the features, and the penalty chosen by leaving runs out.

fit_ridge_loo computes what paper.encoding.ridge_loo computes (tests/test_ridge.py checks both against
scikit-learn), faster: the Gram matrices a block of features at a time (a float32 X of the paper's
size never exists in float64), BLAS and LAPACK routines that torch does not expose (syrk, potrf,
trtri, trmm: half the multiply-adds of general products), one Cholesky factorization per alpha when
the alphas are few and one eigendecomposition when they are many, the primal SVD when n >= p, and
float32 products on a GPU. The algebra is paper/encoding.py's; the solvers' notes say what differs.
"""
import argparse
import sys
import time

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas, lapack

from common import InputError
from paper.encoding import PAPER_ALPHAS


# The default grid (--alphas wide), relative to the scale of the features: alpha = 10^u times the
# mean non-zero eigenvalue of Xc Xc' (p for z-scored features when p < n, n when n < p), u from -3
# to 5 in half decades. The paper's grid is almost no penalty at its own scale (alpha / n = 0.7% at
# n = 15,000 TRs; the mean eigenvalue is p = 147,456): on the demo every parcel chose its top, 100,
# and in a synthetic width sweep it made a trough at p = n that a wide grid does not have.
WIDE_GRID = tuple(10.0 ** np.arange(-3.0, 5.01, 0.5))


def penalty_grid(alphas):
    """--alphas as (values (A,), relative): relative values multiply the features' scale, the mean
    non-zero eigenvalue of their centered Gram matrix (fit_ridge_loo)."""
    if alphas == ["wide"]:
        return WIDE_GRID, True
    return (PAPER_ALPHAS if alphas == ["paper"] else tuple(alphas)), False


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
        products = centered_gram(X_train, X_test, device, dtype, feature_chunk, row_block)
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
    lam, basis = eigh(K)                                # (n,), (n, n)
    lam = lam.clamp(min=0)     # K is positive semi-definite; rounding can make 0 slightly negative
    # 1, the intercept's direction, is K's null vector: its eigenvalue is 0, not eigh's rounding
    # error (scikit-learn likewise leaves the eigenvector closest to 1 unpenalized)
    lam[torch.argmax(basis.sum(dim=0).abs())] = 0
    cv_error, QTy, residual = select_spectral(basis, lambda a: a / (lam + a), 1, yc, alphas,
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
    cv_error, QTy, residual = select_spectral(basis, lambda a: s2 / (s2 + a), -1, yc, alphas,
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
            cv_error[a, b] = torch.einsum("ij,ij->j", errors, errors) / len(errors)
            if a == 0:
                dual[:, b] = solved
            else:  # strictly smaller: a tie keeps the earlier alpha
                better = cv_error[a, b] < cv_error[:a, b].amin(dim=0)
                dual[:, b] = torch.where(better, solved, dual[:, b])
    return cv_error, dual


def select_spectral(basis, shrink, sign, yc, alphas, members, parcel_batch):
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


def centered_gram(X_train, X_test, device, dtype, feature_chunk, row_block):
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


def eigh(K):
    """Eigenvalues (n,), ascending, and eigenvectors (n, n) of K (n, n) symmetric float64, on K's
    device."""
    if K.is_cuda:
        return torch.linalg.eigh(K)
    # LAPACK's divide and conquer (syevd) in scipy's OpenBLAS takes ~2/3 of the time of torch's
    # (MKL) on our CPUs
    lam, Q = scipy.linalg.eigh(_fortran_copy(K), driver="evd", overwrite_a=True, check_finite=False)
    return torch.from_numpy(lam), torch.from_numpy(Q)


SOLVER_TEXT = {"paper": "dual (paper/encoding.py: one eigendecomposition of X X^T in torch)",
               "cholesky": "dual (a Cholesky factorization of X X^T + alpha I for each alpha)",
               "eigh": "dual (eigendecomposition of X X^T)", "svd": "primal (SVD of X)",
               "banded": "banded ridge, dual "
                         "(an eigendecomposition of sum_s w_s X_s X_s^T per weighting w)"}


def products_dtype(device):
    """The dtype of the products of X (fit_ridge_loo) on `device`: float32 on a GPU, float64 on the
    CPU."""
    return torch.float32 if device == "cuda" else torch.float64


def alpha_value(text):
    """One token of --alphas: a grid's name (wide, paper) or a penalty."""
    if text in ("wide", "paper"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: wide, paper or a number") from None


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
            print(f"06_ridge: warning: sub-{sub}: every parcel chose the {side} alpha of the "
                  f"grid: add {direction} --alphas", file=sys.stderr)
        elif (on_edge & significant).any():
            print(f"06_ridge: warning: sub-{sub}: {int((on_edge & significant).sum())} significant "
                  f"parcel(s) chose the {side} alpha of the grid: add {direction} --alphas",
                  file=sys.stderr)


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
