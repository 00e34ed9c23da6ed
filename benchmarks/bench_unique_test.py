"""06 --with: calibration and power of the unique-part test, over many synthetic datasets.

    python benchmarks/bench_unique_test.py                      # 40 null datasets, 10 per strength
    python benchmarks/bench_unique_test.py --null 100 --power 20 --strengths 0.05 0.1 0.2

The design (tests/test_partition.py, reencoded_design) is the hardest null a user meets: set A holds
60 features of a 10-d autocorrelated latent; the BOLD of 60 parcels is A's signal (R^2 ~0.3) plus
AR(0.5) noise; set B = A M + AR(0.8) noise, 300 features, re-encodes A and carries nothing beyond it
(the null) or, in the power rows, also 5 series of its own that add R^2 `strength` to every parcel.
8 training runs of 80 TRs (penalties chosen run by run, 06's default), 2 test runs of 200 TRs.
Per row: the share of parcels with p < 0.05, and at FDR q = 0.05 the datasets with any discovery and
the mean number of parcels discovered. Three tests are compared on the same fits: 06's (test-TR
blocks plus a delete-a-run jackknife of the fits), the test-TR blocks alone, and the circular-shift
null 06 used before (predictions shifted in time).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
import partition  # noqa: E402
import significance  # noqa: E402
import test_partition as design_of  # noqa: E402  (the datasets the suite tests, one definition)




def circular_shift_p(y, full, reduced, test_run, rng, n_permutations=1000):
    """The former test: R^2(all) - R^2(all but B) against both predictions shifted in time."""
    sources = significance.shift_sources(test_run, n_permutations, rng)
    observed = partition.r2_score(y, full) - partition.r2_score(y, reduced)
    null = np.stack([partition.r2_score(y, full[s]) - partition.r2_score(y, reduced[s]) for s in sources])
    return (1 + (null >= observed).sum(axis=0)) / (1 + len(null))


def p_values_of(seed, strength, rng):
    """{test: p-values (P,) of B's unique part} on one dataset."""
    design = design_of.reencoded_design(seed, strength)
    args = design_of.WideArgs
    fit, parts = partition.partition_variance(design, args)
    test_run = np.array([g for g, _ in design.test_ids])
    deleted = parts["deleted_run_errors"]
    blocks_only = np.zeros_like(deleted)                   # no variance over training samples
    reduced = parts["reduced_prediction"]
    return {"06 (blocks + jackknife)": partition.unique_p_values(design.Y_test, fit["test_prediction"],
                                                             reduced, test_run, deleted)[1],
            "test-TR blocks alone": partition.unique_p_values(design.Y_test, fit["test_prediction"],
                                                          reduced, test_run, blocks_only)[1],
            "circular shifts (former)": circular_shift_p(design.Y_test, fit["test_prediction"],
                                                         reduced[1], test_run, rng)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--null", type=int, default=40, help="datasets without a unique part")
    p.add_argument("--power", type=int, default=10, help="datasets per strength")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.05, 0.1])
    args = p.parse_args()
    start = time.time()
    rows = [(0.0, range(1000, 1000 + args.null))]
    rows += [(s, range(2000 + 100 * k, 2000 + 100 * k + args.power))
             for k, s in enumerate(args.strengths)]
    print(f"{'unique R^2 added':>17} {'test':<26} {'p < 0.05':>9} {'datasets w/ FDR':>16} "
          f"{'parcels FDR (mean)':>19}")
    for strength, seeds in rows:
        results = {}
        for seed in seeds:
            for test, p_values in p_values_of(seed, strength, np.random.default_rng(seed)).items():
                results.setdefault(test, []).append(p_values)
        for test, p_values in results.items():
            found = [significance.fdr_mask(p, 0.05).sum() for p in p_values]
            print(f"{strength:>17g} {test:<26} {np.mean(np.concatenate(p_values) < 0.05):>9.3f} "
                  f"{sum(f > 0 for f in found):>9d} of {len(found):<4d} {np.mean(found):>19.2f}")
    print(f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
