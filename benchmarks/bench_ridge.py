"""Stage 06 speed: closed-form leave-one-out ridge (ridge_fast.fit_ridge_loo) against scikit-learn's RidgeCV.

    python benchmarks/bench_ridge.py                                  # n=4000, p=20000, 1095 targets (minutes)
    python benchmarks/bench_ridge.py --n 1000 --p 5000                # a quick look
    python benchmarks/bench_ridge.py --threads 1                      # both solvers on one thread
    python benchmarks/bench_ridge.py --device cuda --paper-scale      # n=15313, p=147456: GPU, no scikit-learn

Targets: >= 5x faster than RidgeCV(alphas, alpha_per_target=True) on the project's 2-core CPU
machines, with identical chosen alphas; the paper scale (sub-01: 15,313 training TRs x 147,456 features x
1,095 parcels) under 60 s on one H100, in 24 GB of host memory (the peak memory line). Both solvers see the same data: features mixing latent components of decaying
variance plus noise (so the penalty matters, as with real features) and targets whose signal-to-noise ratio varies
(so parcels choose different alphas). The time of each includes fitting and predicting the test samples; ours
is also split into its phases (Gram matrices, alpha selection, fitted values and test predictions).
Timings need a quiet machine: on an oversubscribed one (load average above the core count), multi-threaded
LAPACK (factorizations, eigendecompositions) slows down many times; the header prints the load and the threads
of torch and of each BLAS library loaded.
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from threadpoolctl import threadpool_info, threadpool_limits

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import common  # noqa: E402
import ridge_fast  # noqa: E402
from paper import encoding  # noqa: E402

PAPER_SCALE = dict(n=15313, p=147456, targets=1095, n_test=1513)  # paper Table 1, sub-01; 576 x 256 features


def make_data(n, p, n_targets, n_test, rank, dtype, seed=0):
    """X (n + n_test, p) = latent components of decaying variance (power law) x random loadings + small noise,
    Y (n + n_test, P) = a random read-out of all components + noise of a size that varies across targets."""
    rng = np.random.default_rng(seed)
    X = np.empty((n + n_test, p), dtype)
    latent = rng.standard_normal((n + n_test, rank)) * np.arange(1, rank + 1) ** -1.0  # (N, k)
    mixing = rng.standard_normal((rank, p), dtype=np.float32)  # (k, p)
    for rows in range(0, n + n_test, 2048):  # blocks keep the float32 temporaries small at the paper scale
        block = slice(rows, rows + 2048)
        X[block] = latent[block].astype(np.float32) @ mixing
        X[block] += 0.01 * rng.standard_normal((len(X[block]), p), dtype=np.float32)
    weights = rng.standard_normal((rank, n_targets))
    noise_level = np.logspace(-2, 0.5, n_targets)
    Y = latent @ weights + noise_level * rng.standard_normal((n + n_test, n_targets))  # (N, P)
    return X[:n], Y[:n], X[n:], Y[n:]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4000, help="training samples")
    parser.add_argument("--p", type=int, default=20000, help="features")
    parser.add_argument("--targets", type=int, default=1095, help="parcels")
    parser.add_argument("--n-test", type=int, default=400, help="test samples")
    parser.add_argument("--rank", type=int, default=1000, help="latent components of the features")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.1, 1.0, 100.0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--paper-scale", action="store_true", help="the paper's sizes; skips scikit-learn")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads of both solvers (torch and numpy's BLAS); default: the libraries' own")
    args = parser.parse_args()
    return argparse.Namespace(**{**vars(args), **PAPER_SCALE, "skip_sklearn": True}) if args.paper_scale else args


def print_header(args):
    # 06_ridge runs its CPU products and factorizations in scipy's OpenBLAS, a few in torch (MKL); scikit-learn
    # runs in numpy's and scipy's OpenBLAS: the header shows each library's thread count
    blas_threads = ", ".join(f"{info['internal_api']} in {Path(info['filepath']).parent.name} {info['num_threads']}"
                             for info in threadpool_info() if info["user_api"] == "blas")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; n={args.n} p={args.p} "
          f"targets={args.targets} test={args.n_test} alphas={args.alphas}; threads: torch {torch.get_num_threads()}, "
          f"{blas_threads}; load average {os.getloadavg()[0]:.1f}", flush=True)


def time_ours(args, X, Y, X_test, dtype, data_gb):
    """(06's fit, its seconds, a line on its peak memory)."""
    rss_before_gb = common.peak_memory_gb(torch.device("cpu"))  # the process's peak RSS so far
    if args.device == "cuda":  # warm up the CUDA context and kernels outside the timing
        ridge_fast.fit_ridge_loo(X[:64, :256], Y[:64, :8], X_test[:8, :256], args.alphas, device="cuda", dtype=dtype)
        torch.cuda.synchronize()
    start = time.perf_counter()
    fit = ridge_fast.fit_ridge_loo(X, Y, X_test, args.alphas, device=args.device, dtype=dtype)
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    # the peak RSS only grows: what the fit added above the data's own peak is its working memory
    rss_after_gb = common.peak_memory_gb(torch.device("cpu"))
    memory = (f"peak memory: process {rss_after_gb:.1f} GB (data {data_gb:.1f} GB; the fit raised the peak by "
              f"{rss_after_gb - rss_before_gb:.1f} GB)")
    if args.device == "cuda":
        memory += f"; CUDA {torch.cuda.max_memory_allocated() / 1e9:.1f} GB allocated at most"
    return fit, seconds, memory


def main():
    args = parse_args()
    if args.threads:  # on a shared machine, multi-threaded LAPACK can be many times slower than one thread
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.device == "cuda" else torch.float64
    # float32 features, as 05 writes them, except when scikit-learn must see the same float64 data (it
    # computes in the dtype of X)
    X, Y, X_test, Y_test = make_data(args.n, args.p, args.targets, args.n_test, args.rank,
                                     np.float32 if args.device == "cuda" or args.skip_sklearn else np.float64)
    data_gb = (X.nbytes + X_test.nbytes + Y.nbytes + Y_test.nbytes) / 1e9
    print_header(args)
    fit, ours, memory = time_ours(args, X, Y, X_test, dtype, data_gb)
    r = encoding.pearson_r(Y_test, fit["test_prediction"])
    rows = [(f"06_ridge {fit['mode']} {fit['solver']} ({args.device}, {str(dtype).split('.')[1]} products)", ours)]
    phases = {"products": "Gram matrices (train, test rows)" if fit["mode"] == "dual" else "centered X",
              "selection": f"alpha selection ({len(args.alphas)} alphas)", "prediction": "fit and test prediction"}
    rows += [(f"  {phases[phase]}", seconds) for phase, seconds in fit["seconds"].items()]

    if not args.skip_sklearn:
        from sklearn.linear_model import RidgeCV
        start = time.perf_counter()
        reference = RidgeCV(alphas=args.alphas, alpha_per_target=True).fit(X, Y)
        reference_prediction = reference.predict(X_test)
        theirs = time.perf_counter() - start
        rows.append(("sklearn RidgeCV(alpha_per_target=True)", theirs))

    print(f"{'solver':<48} {'seconds':>9}")
    for name, seconds in rows:
        print(f"{name:<48} {seconds:>9.2f}")
    print(memory)
    values, counts = np.unique(fit["alpha"], return_counts=True)
    print(f"alphas chosen: {dict(zip(values.tolist(), counts.tolist()))}; test r median {np.nanmedian(r):.3f}")
    if not args.skip_sklearn:
        scale = np.abs(reference_prediction).max(axis=0)
        print(f"speed-up: {theirs / ours:.1f}x (target >= 5x)")
        print(f"identical alphas: {np.array_equal(fit['alpha'], reference.alpha_)} "
              f"({int((fit['alpha'] != reference.alpha_).sum())} of {args.targets} differ)")
        print(f"max |prediction difference| / max |prediction| per target: "
              f"{(np.abs(fit['test_prediction'] - reference_prediction).max(axis=0) / scale).max():.2e}")
    if args.paper_scale:
        print(f"paper scale in {ours:.1f} s (target < 60 s on one H100)")


if __name__ == "__main__":
    main()
