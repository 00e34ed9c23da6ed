"""07_sweep.py and slurm/: the job plan, the scaling-law fits, the SLURM templates."""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import common
from paper.vqvae import VQVAE, video_from_uint8
import controls as beyond_paper
import scaling_laws
import significance
import sweep_report
from conftest import REPO, load_stage, run_script
from paper import experiments as paper_experiments

sweep = load_stage("07_sweep.py")


def test_log_linear_fit_recovers_known_parameters():
    x = np.array([1e4, 1e5, 1e6, 6e6])
    np.testing.assert_allclose(scaling_laws.fit_log_linear(x, 0.1 + 0.05 * np.log10(x)), [0.1, 0.05], atol=1e-12)


def test_saturating_power_fit_recovers_known_parameters():
    x = np.geomspace(1e15, 1e19, 8)
    truth = (0.6, 2e3, 0.25)  # r_inf, c, alpha: r goes from ~0.24 to ~0.56 over these 4 decades
    r = scaling_laws.saturating_power(x, *truth)
    np.testing.assert_allclose(scaling_laws.fit_saturating_power(x, r), truth, rtol=1e-4)


def test_saturating_fit_reports_parameters_stuck_on_a_bound():
    x = np.geomspace(1e15, 1e19, 8)
    assert scaling_laws.saturating_bounds_hit(x, scaling_laws.fit_saturating_power(x, scaling_laws.saturating_power(x, 0.6, 2e3, 0.25))) == []
    straight = 0.1 + 0.05 * np.log10(x / x[0])            # no curvature: r_inf runs off to its upper bound
    params = scaling_laws.fit_saturating_power(x, straight)
    assert "r_inf" in scaling_laws.saturating_bounds_hit(x, params) and params[0] == pytest.approx(2.0)
    fits = scaling_laws.bootstrap_fits(x[:4], straight[:4], np.repeat(straight[:4, None], 5, axis=1))
    assert "r_inf" in fits["saturating_power_at_bound"]


def test_runs_of_the_same_x_pin_one_point_of_a_law():
    """Four data sizes trained with the same compute are one point on the compute axis: no law is fitted."""
    fit = {"saturating_power": {"r_inf": [0.6, 0.5, 0.7]}, "saturating_power_at_bound": []}
    assert set(scaling_laws.omitted_fits(np.full(4, 7.4e11), fit)) == {"log_linear", "saturating_power"}
    assert set(scaling_laws.omitted_fits(np.array([1.0, 1.0, 10.0, 100.0, 100.0]), fit)) == {"saturating_power"}
    assert scaling_laws.omitted_fits(np.geomspace(1, 1e3, 4), fit) == {}


def test_slope_permutation_p_values_count_each_ordering_once():
    """Exact when K! orderings fit the budget: p = the share of orderings whose slope reaches the observed
    one (the observed ordering among them), so a parcel that rises with x gets 1 / K!, not 2 / (K! + 1)."""
    from itertools import permutations
    rng = np.random.default_rng(2)
    x = np.array([1e3, 1e4, 1e5, 1e6])
    r = np.c_[[0.1, 0.2, 0.3, 0.4], rng.normal(size=(4, 5))]              # (K, P): parcel 0 rises with x
    slopes, p = scaling_laws.slope_permutation_test(x, r)
    lx = np.log10(x)
    for j in range(r.shape[1]):
        brute = [np.polyfit(lx[list(order)], r[:, j], 1)[0] for order in permutations(range(4))]
        assert slopes[j] == pytest.approx(np.polyfit(lx, r[:, j], 1)[0])
        assert p[j] == pytest.approx(np.mean(np.array(brute) >= slopes[j] - 1e-12))
    assert p[0] == pytest.approx(1 / 24)
    _, sampled = scaling_laws.slope_permutation_test(x, r, n_permutations=10)     # 10 < 4!: random orderings
    assert np.all(sampled >= 1 / 11) and np.all(sampled <= 1)


def correlated_time_courses(rho, rng, runs=2, length=150, phi=0.6, prediction=None):
    """Test BOLD y and a prediction (runs * length, P) whose population correlation per parcel is rho
    (P,), both autocorrelated (AR(1) phi) as HRF-smoothed signals are; `prediction` may be given."""
    def ar(shape):
        x = rng.normal(size=shape)
        for t in range(1, shape[0]):
            x[t] = phi * x[t - 1] + np.sqrt(1 - phi**2) * x[t]
        return x
    z = ar((runs * length, len(rho))) if prediction is None else prediction
    return rho * z + np.sqrt(1 - rho**2) * ar(z.shape), z


def test_block_bootstrap_intervals_cover_the_true_max_and_median_r():
    """One parcel clearly best (rho 0.6), 29 others between 0 and 0.3; 2 test runs of 150 autocorrelated
    TRs. Over 120 datasets the 95% intervals of the max and median r over parcels hold the population
    values at about their nominal rate, and hold their own estimate (a parcel bootstrap's interval of a
    maximum lies below it by construction)."""
    rng = np.random.default_rng(0)
    rho = np.r_[0.6, np.linspace(0, 0.3, 29)]
    run = np.repeat([0, 1], 150)
    covered = {"max": 0, "median": 0}
    holds_estimate = {"max": 0, "median": 0}
    for _ in range(120):
        y, z = correlated_time_courses(rho, rng)
        boot = significance.bootstrap_scores([{"bold": y, "prediction": z, "run": run}], n_boot=300,
                                      seed=int(rng.integers(1 << 30)))
        r = np.array([np.corrcoef(y[:, j], z[:, j])[0, 1] for j in range(len(rho))])
        for kind, truth, estimate in (("max", rho.max(), r.max()), ("median", np.median(rho), np.median(r))):
            lo, hi = np.percentile(boot[kind][0], [2.5, 97.5])
            covered[kind] += lo <= truth <= hi
            holds_estimate[kind] += lo <= estimate <= hi
    for kind in covered:
        assert 0.88 <= covered[kind] / 120 <= 0.99, (kind, covered[kind] / 120)
        assert holds_estimate[kind] / 120 >= 0.95, (kind, holds_estimate[kind] / 120)


def test_block_counts_rebuild_each_run_from_blocks_of_its_own_trs():
    rng = np.random.default_rng(1)
    run = np.repeat([3, 5], [45, 30])
    counts = significance.block_counts(run, 50, rng, block=20)
    assert counts.shape == (50, 75) and (counts[:, :45].sum(1) == 45).all() and (counts[:, 45:].sum(1) == 30).all()
    y, p = rng.normal(size=(75, 4)), rng.normal(size=(75, 4))
    index = np.repeat(np.arange(75), counts[0].astype(int))                   # the first resample, built
    expected = [np.corrcoef(y[index, j], p[index, j])[0, 1] for j in range(4)]
    np.testing.assert_allclose(significance.resampled_r(y, p, counts[:1])[0], expected, rtol=1e-10)


def test_a_law_fitted_to_block_bootstrap_scores_covers_the_true_slope():
    """Five configurations whose predictions of one subject's BOLD improve with log10 x: the interval of
    the log-linear slope of the median r holds the true one, and narrows with more parcels."""
    rng = np.random.default_rng(3)
    x = np.geomspace(1e4, 1e7, 5)

    def slope_interval(n_parcels):
        signal = rng.normal(size=(300, n_parcels))
        runs = []
        for k, rho in enumerate(0.05 + 0.05 * np.log10(x / x[0])):
            # the same BOLD for every configuration: y = signal + noise; each prediction tracks signal
            prediction, _ = correlated_time_courses(np.full(n_parcels, rho), rng, prediction=signal)
            runs.append({"bold": signal, "prediction": prediction, "run": np.repeat([0, 1], 150)})
        samples = np.stack([significance.bootstrap_scores([run], 200)["median"][0] for run in runs])   # (K, B)
        score = np.array([np.median([np.corrcoef(run["bold"][:, j], run["prediction"][:, j])[0, 1]
                                     for j in range(n_parcels)]) for run in runs])
        est, lo, hi = scaling_laws.bootstrap_fits(x, score, samples)["log_linear"]["b"]
        assert lo <= 0.05 <= hi and lo <= est <= hi, (lo, est, hi)
        return hi - lo

    assert slope_interval(200) < slope_interval(10)


def test_dry_run_lists_each_configuration_once():
    result = run_script("07_sweep.py", "--work", "w", "--dry-run")
    names = [line[2:] for line in result.stdout.splitlines() if line.startswith("# ")]
    assert len(names) == len(set(names))
    # 4 data (100 epochs each, the authors' budget: models of their own) + 8 hidden + 5 layers + 4 heads
    # + 2 precision, the paper model (block-4 features, every training frame) counted once; the depth
    # sweep's 8-layer run reads the last block, a feature set of its own ("-last").
    assert len(names) == 4 + 8 + 5 + (4 - 1) + (2 - 1)
    assert "h576-l8-a4-fall-fp32" in names and "h576-l8-a4-fall-fp32-last" in names
    assert [n for n in names if "-e100" in n] == [f"h576-l8-a4-f{size}-fp32-e100" for size in ("10k", "100k", "1M", "all")]
    lines = result.stdout.splitlines()
    block = lines[lines.index("# h576-l1-a4-fall-fp32") + 1: lines.index("# h576-l1-a4-fall-fp32") + 4]
    assert block[0].startswith("python 04_train_gpt.py --work w --name h576-l1-a4-fall-fp32 --hidden-dim 576 --layers 1")
    assert block[1].endswith("--layer attn_stack.attn_nets.0.post_fc_dp")   # Table 3: last block
    paper = lines[lines.index("# h576-l8-a4-fall-fp32") + 2]
    assert paper.endswith("--layer attn_stack.attn_nets.4.post_fc_dp")      # section 2.3: block 4 of 8
    data = lines[lines.index("# h576-l8-a4-f10k-fp32-e100") + 1]
    assert data.endswith("--resume --train-frames 10000 --epochs 100")


def test_dry_run_prints_each_distinct_command_once_in_submission_order(capsys):
    """The controls and the appendix read one model, and the appendix's modules one feature set: each
    04 and 05 command is printed once, where slurm/submit_sweep.sh submits it (one job per distinct
    command), under the first configuration that needs it."""
    sweep.main(["--work", "w", "--demo", "--experiments", "controls", "appendix", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    cmds = [line for line in lines if line.startswith("python ")]
    assert len(cmds) == len(set(cmds))
    n_modules = len(beyond_paper.appendix_layers(sweep.DEMO_CONFIG))
    # trained, untrained (04 05 06 each), VQ-VAE alone, low-level, buttons (05 06), the two partitions
    # (06 of features already extracted), the appendix's 05, its 06s
    expected = "04 05 06 " * 2 + "05 06 " * 3 + "06 " * 2 + "05 06 " + "06 " * (n_modules - 1)
    assert [cmd.split()[1][:2] for cmd in cmds] == expected.split()
    assert len([line for line in lines if line.startswith("# ")]) == 7 + n_modules


def test_values_replace_the_list_of_one_paper_experiment(capsys):
    """--values: exactly those configurations, converted for the experiment's knob; with any other
    choice of experiments, or a value the knob cannot take, one line of error."""
    sweep.main(["--work", "w", "--demo", "--experiments", "hidden", "--values", "6", "12", "--dry-run"])
    out = capsys.readouterr().out
    assert [line[2:] for line in out.splitlines() if line.startswith("# ")] == ["h6-l2-a2-fall-fp32",
                                                                                 "h12-l2-a2-fall-fp32"]
    per_experiment, jobs = sweep.plan(sweep.parse_args(["--experiments", "data", "--values", "0", "20000"]))
    assert [(value, name) for value, _, name, _ in per_experiment["data"]] == [
        (0, "h576-l8-a4-fall-fp32-e100"), (20000, "h576-l8-a4-f20k-fp32-e100")]
    assert list(jobs) == ["h576-l8-a4-fall-fp32-e100", "h576-l8-a4-f20k-fp32-e100"]
    # the other budget and order, and seeds: names that say so
    _, jobs = sweep.plan(sweep.parse_args(["--experiments", "data", "--values", "20000", "--data-epochs", "0",
                                           "--subset-order", "balanced", "--seeds", "2"]))
    assert list(jobs) == ["h576-l8-a4-f20k-fp32-balanced", "h576-l8-a4-f20k-fp32-balanced-s1"]
    assert sweep.commands(sweep.parse_args(["--work", "w"]), "x", jobs["h576-l8-a4-f20k-fp32-balanced-s1"])[0][-6:] == [
        "--resume", "--train-frames", "20000", "--subset-order", "balanced", "--seed", "1"][-6:]
    per_experiment, _ = sweep.plan(sweep.parse_args(["--experiments", "precision", "--values", "bf16"]))
    assert [value for value, *_ in per_experiment["precision"]] == ["bf16"]
    five = "data, hidden, layers, heads, precision"
    for experiments, values, error in [
            (["hidden", "heads"], ["6"], f"--values: for one of the experiments {five} alone, not --experiments "
                                         "hidden heads"),
            ([], ["6"], f"--values: for one of the experiments {five} alone, not --experiments data hidden "
                        "layers heads precision"),
            (["controls"], ["1"], f"--values: for one of the experiments {five} alone, not --experiments "
                                  "controls"),
            (["hidden"], ["6", "wide"], "--values 6 wide: hidden_dim takes integers"),
            (["hidden"], ["6", "6"], "--values 6 6: a value given twice"),
            (["precision"], ["fp8"], "--values fp8: not a precision of 04 (fp32, fp16, bf16)")]:
        flags = (["--experiments", *experiments] if experiments else []) + ["--values", *values]
        with pytest.raises(common.InputError) as refused:
            sweep.parse_args(flags)
        assert str(refused.value) == error
    result = run_script("07_sweep.py", "--experiments", "controls", "--values", "1", "--dry-run", check=False)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: --values: for one of the experiments {five} alone, not --experiments controls\n"


def test_values_04_would_refuse_and_no_resamples_are_usage_errors():
    """A width that is not a multiple of 3 failed late, in 04, after the configurations before it had trained;
    --n-boot 0 or below had no meaning (and was not refused)."""
    for experiment, value, rule in [
            ("hidden", "10", "hidden_dim must be a positive multiple of 3 (one position table per latent axis "
                             "t, h, w)"),
            ("layers", "0", "layers must be at least 1"),
            ("heads", "0", "heads must be between 1 and the hidden size 576 (a channel per head)"),
            ("heads", "577", "heads must be between 1 and the hidden size 576 (a channel per head)"),
            ("data", "-5", "train_frames must not be negative (0: every training frame)")]:
        with pytest.raises(common.InputError) as refused:
            sweep.parse_args(["--experiments", experiment, "--values", "6", value])
        assert str(refused.value) == f"--values {value}: {rule}"
    with pytest.raises(common.InputError, match=r"^--values 30: heads must be between 1 and the hidden size 24 "):
        sweep.parse_args(["--demo", "--experiments", "heads", "--values", "30"])
    for n_boot in ("0", "-3"):
        result = run_script("07_sweep.py", "--n-boot", n_boot, "--dry-run", check=False)
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.splitlines()[-1] == (f"07_sweep.py: error: --n-boot {n_boot}: must be at least 1 "
                                                  "(the intervals' resamples)")


@pytest.mark.parametrize("demo", [False, True])
def test_every_sweep_configuration_is_a_model_04_accepts(demo):
    """A dry run checks no settings: each planned training command must pass 04's model checks."""
    train_gpt = load_stage("04_train_gpt.py")
    vqvae = type("VQVAE", (), dict(latent_shape=(4, 8, 8), embedding_dim=128, n_codes=1024))()
    args = type("Args", (), dict(experiments=[*paper_experiments.EXPERIMENTS, *beyond_paper.EXTRA_EXPERIMENTS], demo=demo, work="w",
                                 values=None, train_args="", extract_args="", ridge_args="", seeds=2,
                                 data_epochs=None, subset_order="balanced"))()
    _, jobs = sweep.plan(args)
    for name, spec in jobs.items():
        cmds = sweep.commands(args, name, spec)
        if spec["kind"] in ("lowlevel", "buttons"):   # no model: 05 and 06 only
            assert [c[0] for c in cmds] == ["05_extract.py", "06_ridge.py"] and "--ckpt" not in cmds[0]
            continue
        if spec["kind"] == "partition":   # 06 alone, reading the features of the jobs it needs
            assert [c[0] for c in cmds] == ["06_ridge.py"] and "--with" in cmds[0]
            assert all(need in jobs for need in spec["needs"])
            continue
        config = train_gpt.model_config(train_gpt.parse_args(cmds[0][1:]), vqvae)
        layer = spec["layer"]
        if layer.startswith("attn_stack.attn_nets."):
            assert int(layer.split(".")[2]) < config["layers"], name
        assert layer in cmds[1][cmds[1].index("--layer") + 1:], name     # 05 extracts what 06 reads


def test_slurm_templates_parse_and_submit_chain_dry_run():
    for script in sorted((REPO / "slurm").iterdir()):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script
    result = subprocess.run(["bash", "slurm/submit_sweep.sh", "--work", "w", "--experiments", "heads"],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    chains = [line for line in result.stdout.splitlines() if "-> extract" in line]
    assert chains == [f"h576-l8-a{h}-fall-fp32: train {1001 + 3 * i} -> extract {1002 + 3 * i} -> ridge {1003 + 3 * i}"
                      for i, h in enumerate((1, 2, 4, 8))]
    sbatch = [line for line in result.stdout.splitlines() if line.startswith("sbatch")]
    assert "--dependency afterok:1001 --kill-on-invalid-dep=yes " in sbatch[1]
    assert "--dependency afterok:1002 --kill-on-invalid-dep=yes " in sbatch[2]
    assert "06_ridge.py --work w" in sbatch[2] and "--device" not in sbatch[2]   # the node's: gpu_stage.sbatch
    # afterany: the figures job runs even when a chain failed, and names what is missing
    assert sbatch[-1].startswith("sbatch --parsable --job-name sweep-figures --dependency afterany:1003:1006:1009:1012")
    assert "04_train_gpt.py" in sbatch[0] and "--resume" in sbatch[0]


def test_submit_sweep_trains_each_model_once_and_stops_when_sbatch_fails(tmp_path):
    """Chains that read one model (the controls, every appendix module) share one training job and, for
    one feature set, one extraction; the low-level control trains nothing. A refused sbatch stops the
    script, instead of chaining later jobs on an empty dependency."""
    result = subprocess.run(["bash", "slurm/submit_sweep.sh", "--work", "w", "--demo", "--experiments", "controls",
                             "appendix"], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, DRY_RUN="1"))
    assert result.returncode == 0, result.stderr
    sbatch = [line for line in result.stdout.splitlines() if line.startswith("sbatch")]
    trains = [line for line in sbatch if "04_train_gpt.py" in line]
    assert len(trains) == 2                                       # the trained model and its untrained copy
    # trained, untrained, VQ-VAE, low-level, buttons, and one for the 24 appendix modules
    extracts = [line for line in sbatch if "05_extract.py" in line]
    assert len(extracts) == 6
    assert "lowlevel: train none -> extract" in result.stdout and " - " not in " ".join(sbatch)
    # the partition's 06 waits for the three extractions it reads: the GPT's, low-level vision's, buttons'
    ids = {name: extract for name, extract in re.findall(r"^(\S+): train \S+ -> extract (\d+)", result.stdout, re.M)}
    partition = next(line for line in sbatch if "--job-name ridge-h24-l2-a2-fall-fp32+lowlevel+buttons" in line)
    needs = (ids["h24-l2-a2-fall-fp32"], ids["lowlevel"], ids["buttons"])
    assert f"--dependency afterok:{':'.join(needs)} " in partition and "--with lowlevel buttons" in partition
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/usr/bin/env bash\ncase "$*" in *train-*) echo "rejected" >&2; exit 1;; esac\n'
                                 'echo 42\n')
    (fake / "sbatch").chmod(0o755)
    failed = subprocess.run(["bash", "slurm/submit_sweep.sh", "--work", "w", "--experiments", "heads"], cwd=REPO,
                            capture_output=True, text=True, env=dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}"))
    assert failed.returncode == 1 and "submit_sweep.sh: sbatch failed" in failed.stderr
    assert "-> extract" not in failed.stdout


# --------------------------------------------------------------------------------------------------
# Figures and report from a synthetic results tree with a clear trend
# --------------------------------------------------------------------------------------------------
def synthetic_sweep(work, slope=0.08, seed=0):
    """The files 02, 04 and 06 leave behind, for every configuration of the demo sweep: 2 subjects, 12
    parcels of which 4 carry signal; their r grows by `slope` per tenfold hidden size and data."""
    import nibabel as nib
    import pandas as pd
    import common

    rng = np.random.default_rng(seed)
    subs, n_parcels = ("01", "02"), 12
    (work / "bold").mkdir(parents=True)
    pd.DataFrame({"sub": subs}).to_csv(work / "bold/manifest.tsv", sep="\t", index=False)
    atlas = np.zeros((8, 9, 8), np.int16)
    atlas[1:7, 1:8, 1:7] = np.resize(np.arange(1, n_parcels + 1), (6, 7, 6))
    nib.save(nib.Nifti1Image(atlas, np.diag([12.0, 12.0, 12.0, 1.0])), work / "bold/atlas.nii.gz")
    pd.DataFrame({"column": range(n_parcels), "label": range(1, n_parcels + 1)})[::-1].to_csv(
        work / "bold/labels.tsv", sep="\t", index=False)                 # rows in any order: "column" says which
    (work / "demo").mkdir()   # as 00_make_demo.py writes it: the parcels with signal are labels 1-4
    common.write_json(work / "demo/ground_truth.json", {"planted": {str(label): "x" for label in range(1, 5)}})
    args = type("Args", (), dict(demo=True, experiments=[*sweep.DEMO_EXPERIMENTS, *beyond_paper.EXTRA_EXPERIMENTS],
                                 values=None, seeds=1, data_epochs=None, subset_order="authors", work=str(work)))()
    _, jobs = sweep.plan(args)
    # the controls fall short of the trained model; in block 1 (the demo's last), post_fc_dp encodes best
    gains = {"untrained": 0.3, "vqvae": 0.5, "lowlevel": 0.8, "buttons": 0.2}
    bold = {sub: rng.normal(size=(120, n_parcels)) for sub in subs}    # each subject's test BOLD
    for name, spec in jobs.items():
        config = spec["config"]
        frames = config["train_frames"] or 30000
        gain = gains.get(spec["kind"], 1.0) * (1.0 if "appendix" not in name or name.endswith("post_fc_dp") else 0.7)
        level = gain * slope * (np.log10(config["hidden_dim"]) + np.log10(frames))
        for j, sub in enumerate(subs):
            out = work / "results" / name / f"sub-{sub}"
            out.mkdir(parents=True)
            target = np.clip(rng.normal(0, 0.05, n_parcels), -0.5, 0.5)
            target += 0.5 * level                                        # every parcel a little (median r)
            target[:4] += level + 0.05 * j                               # the parcels with signal
            # 06's test time course: a prediction of the subject's BOLD with about that correlation
            prediction = target * bold[sub] + np.sqrt(1 - target**2) * rng.normal(size=bold[sub].shape)
            r = np.array([np.corrcoef(bold[sub][:, k], prediction[:, k])[0, 1] for k in range(n_parcels)])
            significant = r > 0.15
            np.save(out / "r.npy", r.astype(np.float32))
            np.save(out / "significant.npy", significant)
            np.save(out / "test_bold.npy", bold[sub].astype(np.float32))
            np.save(out / "test_prediction.npy", prediction.astype(np.float32))
            np.save(out / "test_run.npy", np.repeat([0, 1], 60))
            summary = {"r_max": float(r.max()), "r_median": float(np.median(r)),
                       "null": {"max_r_95": 0.12, "median_r_95": 0.02}}
            if spec["kind"] == "partition":   # 06 --with: the GPT's part is unique in parcels 0-1
                sets = [spec["features"], "lowlevel", "buttons"]
                unique = rng.normal(0, 0.005, (3, n_parcels))
                unique[0, :2] += 0.08 if "untrained" not in name else 0.02
                unique[1, 2:4] += 0.1                                   # low-level vision's own parcels
                np.save(out / "unique.npy", unique)
                np.save(out / "unique_significant.npy", unique > 0.04)
                np.save(out / "unique_p.npy", np.where(unique > 0.04, 0.001, 0.5))
                np.save(out / "r2_alone.npy", unique + 0.01)
                np.save(out / "shared.npy", np.full(n_parcels, 0.01))
                np.save(out / "r2_all.npy", unique.sum(0) + 0.01)
                summary["partition"] = {"sets": sets}
            common.write_json(out / "summary.json", summary)
        if spec["model"] is None or (work / "gpt" / spec["model"]).exists():
            continue
        gpt = work / "gpt" / spec["model"]
        gpt.mkdir(parents=True)
        steps = np.arange(10, 90, 10)
        pd.DataFrame({"step": steps, "epoch": steps * 16 / (frames / 64),
                      "train_loss": 4 - np.log10(config["hidden_dim"]) * steps / 100,
                      "val_loss": np.where(steps % 40 == 0, 4.2 - np.log10(config["hidden_dim"]) * steps / 120, np.nan),
                      "wall_s": steps * (0.5 if config["precision"] == "bf16" else 1.0)}).to_csv(gpt / "log.csv", index=False)
        common.write_json(gpt / "ckpt.json", {
            "stage": "04_train_gpt", "settings": {"--batch-size": 16}, "inputs": {}, "step": 80, "complete": True,
            "n_parameters": 1000 * config["hidden_dim"] ** 2, "train_flops_per_sample": 1e6 * config["hidden_dim"] ** 2,
            "training_repetitions": [{"sub": "01", "frames_used": frames}], "n_train_samples": frames // 64})
    return work


def test_every_figure_and_a_verdict_from_a_synthetic_sweep(tmp_path):
    work = synthetic_sweep(tmp_path)
    result = run_script("07_sweep.py", "--work", work, "--demo", "--figures-only", "--n-boot", "50", "--experiments",
                        *sweep.DEMO_EXPERIMENTS, *beyond_paper.EXTRA_EXPERIMENTS)
    figures = work / "figures"
    for experiment in sweep.DEMO_EXPERIMENTS:
        for kind in ("loss", "scores", "maps"):
            assert (figures / f"{experiment}_{kind}.png").stat().st_size > 10_000, (experiment, kind)
    report = (figures / "report.md").read_text()
    sections = report.split("\n## ")
    hidden = next(s for s in sections if s.startswith("hidden"))
    data = next(s for s in sections if s.startswith("data"))
    assert "**Verdict**: supported on this data: the median r changes by +" in data
    assert "; the max r (the paper's score) by +" in hidden
    precision = next(s for s in sections if s.startswith("precision"))
    assert "bf16 trained 2.00x as fast as fp32" in precision
    fits = json.loads((figures / "scaling.json").read_text())
    assert fits["params"]["omitted"] == {"saturating_power": "3 distinct x values for 3 parameters"}
    assert "saturating_power" not in fits["params"]                # no estimate kept for an undetermined law
    assert fits["params"]["log_linear"]["b"][1] > 0           # r grows with the model: the interval excludes 0
    assert "not drawn" in report and result.returncode == 0
    controls = next(s for s in sections if s.startswith("controls"))
    assert re.search(r"against the untrained control, median r \+\S+ \(95% CI \[\S+, \S+\]: higher\), max r \+",
                     controls)
    # <work>/demo/ground_truth.json, read by default with --demo: the planted parcels alone
    planted = re.search(r"On the 4 planted parcels of ground_truth.json, mean r: trained (\S+), untrained (\S+),", controls)
    trained_r, untrained_r = (np.mean([np.load(work / "results" / name / f"sub-{s}/r.npy")[:4] for s in ("01", "02")])
                              for name in ("h24-l2-a2-fall-fp32", "h24-l2-a2-fall-fp32-untrained"))
    assert [float(v) for v in planted.groups()] == pytest.approx([trained_r, untrained_r], abs=6e-4)
    assert "There, the trained model minus its untrained copy: +" in controls and ": higher)." in controls
    assert (figures / "controls_scores.png").is_file() and (figures / "appendix_scores.png").is_file()
    # beyond low-level vision and buttons: the GPT's unique part, where it lies, what training changes
    assert "against the button presses control, median r" in controls
    partition = controls[controls.index("### What the GPT explains beyond"):]
    assert (figures / "controls_partition.png").stat().st_size > 10_000
    unique = {name: np.stack([np.load(work / "results" / name / f"sub-{s}/unique.npy")[0] for s in ("01", "02")])
              for name in ("h24-l2-a2-fall-fp32+lowlevel+buttons", "h24-l2-a2-fall-fp32-untrained+lowlevel+buttons")}
    for j, sub in enumerate(("01", "02")):
        row = re.search(rf"\| sub-{sub} \| \S+ \| (\S+), (\S+), (\d+)/12 \|", partition)
        trained = unique["h24-l2-a2-fall-fp32+lowlevel+buttons"][j]
        assert float(row[1]) == pytest.approx(trained.mean(), abs=6e-5) and int(row[3]) == (trained > 0.04).sum()
    top = re.findall(r"^\| (\d+) \| .* \| [+-]\S+ \| \d of 2 subjects \|$", partition, re.M)
    assert len(top) == 10 and set(top[:2]) == {"1", "2"}               # labels 1-2 = columns 0-1, planted there
    difference = np.mean(unique["h24-l2-a2-fall-fp32+lowlevel+buttons"]) - np.mean(
        unique["h24-l2-a2-fall-fp32-untrained+lowlevel+buttons"])
    reported = re.search(r"its untrained copy's, mean over parcels and subjects: (\S+) \(95% CI \[(\S+), (\S+)\]: "
                         r"(higher|lower|inconclusive)\)", partition)
    lo, hi = float(reported[2]), float(reported[3])
    assert float(reported[1]) == pytest.approx(difference, abs=6e-5) and lo < difference < hi
    assert reported[4] == ("higher" if lo > 0 else "lower" if hi < 0 else "inconclusive")
    assert "On the 4 planted visual parcels, mean R^2 of each set alone: GPT +" in partition
    appendix = next(s for s in sections if s.startswith("appendix"))
    assert "**Verdict**: supported on this data: post_fc_dp ranks 1 of" in appendix
    for experiment in ("data", "hidden"):      # where scaling pays: a map, a glass brain, the top 10 parcels
        assert (figures / f"{experiment}_slope.nii.gz").is_file() and (figures / f"{experiment}_slope.png").is_file()
    pays = report[report.index("## Where scaling pays"):]
    assert "the smallest p-value possible is 0.167" in pays and pays.count("\n| ") >= 2 * 11


def test_figures_leave_out_an_unfinished_configuration_name_it_and_fail(tmp_path):
    """A configuration without results (its SLURM chain failed): --figures-only draws the others, names
    it at the top of report.md and on stderr, and exits 1, so that submit_sweep.sh's figures job fails
    instead of pretending every configuration ran."""
    work = synthetic_sweep(tmp_path)
    shutil.rmtree(work / "results" / "h24-l2-a1-fall-fp32")
    result = run_script("07_sweep.py", "--work", work, "--demo", "--figures-only", "--n-boot", "20",
                        "--experiments", "heads", check=False)
    assert result.returncode == common.EXIT_SOME_FAILED, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "07_sweep: 1 configuration(s) not finished, left out of every figure: h24-l2-a1-fall-fp32")
    figures = work / "figures"
    report = (figures / "report.md").read_text().splitlines()
    assert report[2] == "**Not finished** (left out of every figure): h24-l2-a1-fall-fp32."
    assert "| 2 | " in "\n".join(report) and "| 1 | " not in "\n".join(report)   # heads 2 only
    for kind in ("loss", "scores", "maps"):
        assert (figures / f"heads_{kind}.png").stat().st_size > 10_000, kind
    assert sorted(p.name for p in figures.iterdir()) == ["heads_loss.png", "heads_maps.png", "heads_scores.png",
                                                         "report.md"]   # and no temporary file left


def test_a_configuration_without_any_r_is_drawn_and_its_scores_are_n_a(tmp_path):
    """06 writes r_max and r_median None when every parcel's r is undefined (all NaN): the figures are
    drawn, the tables say n/a, and the verdict says why there is none."""
    work = synthetic_sweep(tmp_path)
    for sub in ("01", "02"):
        out = work / "results" / "h24-l2-a2-fall-fp32" / f"sub-{sub}"   # fp32: the first, the reference
        np.save(out / "r.npy", np.full(12, np.nan, np.float32))
        np.save(out / "significant.npy", np.zeros(12, bool))
        summary = json.loads((out / "summary.json").read_text())
        common.write_json(out / "summary.json", dict(summary, r_max=None, r_median=None))
    result = run_script("07_sweep.py", "--work", work, "--demo", "--figures-only", "--n-boot", "20",
                        "--experiments", "precision", check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    figures = work / "figures"
    report = (figures / "report.md").read_text()
    assert "| fp32 | n/a | n/a | n/a |" in report and "| bf16 | 0." in report
    assert "**Verdict**: none: precision = fp32 has no r for a subject" in report
    assert (figures / "precision.md").read_text().splitlines()[-1].endswith(" | n/a |")
    for kind in ("loss", "scores", "maps"):
        assert (figures / f"precision_{kind}.png").stat().st_size > 10_000, kind


def test_a_damaged_result_is_named_in_one_line(tmp_path):
    """A truncated test_bold.npy, unique.npy or summary.json was a traceback of numpy or json."""
    work = synthetic_sweep(tmp_path)
    folder = work / "results" / "h24-l2-a2-fall-fp32+lowlevel+buttons" / "sub-02"   # a partition: unique.npy
    redo = "re-run 07_sweep.py without --figures-only (06 then redoes it)"
    for name, what in (("test_bold.npy", "truncated ("), ("unique.npy", "truncated ("),
                       ("summary.json", "not a readable summary (truncated or damaged): ")):
        path = folder / name
        content = path.read_bytes()
        path.write_bytes(content[:len(content) // 2])
        result = run_script("07_sweep.py", "--work", work, "--demo", "--figures-only", "--n-boot", "20",
                            "--experiments", "controls", check=False)
        path.write_bytes(content)
        assert result.returncode == 2, result.stderr[-2000:]
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"error: {path}: {what}") and line.endswith(redo), line
    assert not (work / "figures" / "report.md").exists()


# --------------------------------------------------------------------------------------------------
# Figures from a real record chain: frames (01), BOLD (02), a VQ-VAE (03), one configuration through
# 07's own jobs (04 -> 05 -> 06)
# --------------------------------------------------------------------------------------------------
CONFIG = "h24-l2-a2-fall-fp32"   # the demo's paper-like configuration, one of the heads experiment's two
TINY_JOBS = sweep.parse_args([   # 07's demo flags, with 2 training steps and no permutations
    "--demo", "--experiments", "heads", "--ridge-args=--n-permutations 0",
    "--train-args=--max-steps 2 --batch-size 4 --val-every 2 --ckpt-every 2 --log-every 1 --val-samples 4"])


@pytest.fixture(scope="module")
def swept(rendered_work, tmp_path_factory):
    """A work dir with the tiny demo's frames (01) and BOLD (02), a VQ-VAE (save_vqvae), and CONFIG
    finished by 07's own jobs (04 -> 05 -> 06, as a run without --figures-only makes them)."""
    work = tmp_path_factory.mktemp("swept")
    (work / "demo").symlink_to(rendered_work / "demo")
    shutil.copytree(rendered_work / "frames", work / "frames")   # copy2 keeps mtimes: 01's records vouch
    run_script("02_prep_fmri.py", "--work", work, "--fmriprep", work / "demo/derivatives/fmriprep", "--atlas",
               work / "demo/atlas/tpl-MNI152NLin2009cAsym_res-06_atlas-demo_dseg.nii.gz", "--workers", "2")
    save_vqvae(work)
    sweep.run_jobs(tiny_args(work), tiny_jobs(work))
    return work


def save_vqvae(work):
    """A VQ-VAE for 32 px frames (4 x 8 x 8 codes per clip) saved as 03 saves it, with its record (the
    frames it read). Untrained, but its codes differ between clips: its codebook is drawn from the
    encoder's outputs on clips of the demo. (A 03 run of a few steps may collapse onto position on the
    demo's dark frames: every TR would get the same features, and r would be undefined.)"""
    import torch
    manifest = common.read_tsv(work / "frames" / "manifest.tsv")
    frames = [work / path for path in manifest.loc[manifest["status"] == "ok", "frames_path"]]
    torch.manual_seed(0)
    vqvae = VQVAE(resolution=32, sequence_length=16, n_hiddens=16, n_res_layers=1, downsample=(4, 4, 4),
                         embedding_dim=16, n_codes=64).eval()
    clips = np.stack([rep[start:start + 64:4] for rep in map(np.load, frames)           # (B, 16, 32, 32, 3)
                      for start in range(0, len(rep) - 64, 300)])
    with torch.no_grad():
        z = vqvae.pre_vq_conv(vqvae.encoder(video_from_uint8(torch.from_numpy(clips))))
        z = z.movedim(1, -1).reshape(-1, 16)                                   # (B x 4 x 8 x 8, 16)
        chosen = z[torch.randperm(len(z))[:64]]
        vqvae.codebook.embeddings.copy_(chosen + 0.01 * torch.randn_like(chosen))
    record = dict(stage="03_train_vqvae", settings={}, inputs=common.input_fingerprints(work, frames))
    common.save_checkpoint(work / "vqvae" / "ckpt.pt", dict(
        model=vqvae.state_dict(), model_config=vqvae.config, kind="03_train_vqvae", step=0, max_steps=0,
        complete=True, provenance=record))


def tiny_args(work):
    """07's arguments (TINY_JOBS) on `work`."""
    return argparse.Namespace(**dict(vars(TINY_JOBS), work=str(work)))


def tiny_jobs(work):
    """{CONFIG: its job}, as 07 plans it."""
    return {CONFIG: sweep.plan(tiny_args(work))[1][CONFIG]}


def test_figures_refuse_results_of_a_replaced_checkpoint_until_the_sweep_redoes_them(swept, tmp_path, capfd):
    """04 ran again for a configuration (here: the same flags, other numbers, as on a GPU), 05 and 06 not:
    its results come from the old model, its training log and compute from the new one. --figures-only
    refuses it in one line; the stages of a run without --figures-only redo 05 and 06, and the figures
    take the new results."""
    work = tmp_path / "work"
    shutil.copytree(swept, work, symlinks=True)
    ckpt = work / "gpt" / CONFIG / "ckpt.pt"
    checkpoint = common.load_checkpoint(ckpt)
    checkpoint["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    common.save_checkpoint(ckpt, checkpoint)   # as 04 writes it: ckpt.pt, then ckpt.json with its sha256
    refused = run_script("07_sweep.py", "--work", work, "--demo", "--experiments", "heads", "--figures-only",
                         check=False)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert refused.stderr.strip() == (
        f"error: {work / 'results' / CONFIG}: made from another {ckpt} than the current one (04_train_gpt ran "
        "again since): re-run 07_sweep.py without --figures-only (05 and 06 then redo it)")
    assert not (work / "figures" / "report.md").exists()
    before = json.loads((work / "results" / CONFIG / "sub-01" / "summary.json").read_text())

    capfd.readouterr()
    sweep.run_jobs(tiny_args(work), tiny_jobs(work))   # what 07 runs before its figures
    out = capfd.readouterr().out
    assert "is complete" in out                                           # 04: kept
    assert "5 of 5 run(s) to do" in out and "done already" not in out     # 05 and 06: made again
    after = json.loads((work / "results" / CONFIG / "sub-01" / "summary.json").read_text())
    assert after["inputs"] != before["inputs"]
    # what the figures read (drawing them takes 15 s: other tests do)
    run = sweep.load_run(work, CONFIG, tiny_jobs(work)[CONFIG], ["01"])
    np.testing.assert_array_equal(run["r"][0], np.load(work / "results" / CONFIG / "sub-01" / "r.npy"))
    assert run["params"] == common.read_record(ckpt.with_suffix(".json"))["n_parameters"]


def test_figures_refuse_results_made_with_other_ridge_args(swept):
    """--figures-only with other --ridge-args than the results were made with drew the old results as if
    made with these; the record's flags (summary.json's settings) must be the ones asked for."""
    refused = run_script("07_sweep.py", "--work", swept, "--demo", "--experiments", "heads", "--figures-only",
                         "--ridge-args", "--n-permutations 0 --alphas 1 10", check=False)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert refused.stderr.strip() == (
        f"error: {swept / 'results' / CONFIG}: made with --alphas wide, not 1.0 10.0 (06's flags): pass the --ridge-args it was made with, or redo it "
        "without --figures-only and with --overwrite among the --ridge-args")
    assert not (swept / "figures").exists()
    spec = tiny_jobs(swept)[CONFIG]      # the flags it was made with: taken
    run = sweep.load_run(swept, CONFIG, spec, ["01"], asked=sweep.ridge_settings(tiny_args(swept), CONFIG, spec))
    assert run["summaries"]["01"]["settings"]["--n-permutations"] == 0


def test_a_sweep_refuses_a_vqvae_older_than_its_frames_before_training(swept, tmp_path):
    """07 runs 04 -> 05 -> 06, not 03: frames rendered again after the VQ-VAE was trained would make every
    new model from a VQ-VAE of the old frames, and its figures refuse that. A run refuses it first."""
    work = tmp_path / "work"
    shutil.copytree(swept, work, symlinks=True)
    frames = work / next(iter(common.read_record(work / "vqvae" / "ckpt.json")["inputs"]))
    np.save(frames, np.load(frames)[:, ::-1])   # 01 again, with its record, as it writes them
    record = common.read_record(common.record_path(frames))
    common.write_record(frames, dict(record, output=common.hash_file(frames)))
    result = run_script("07_sweep.py", "--work", work, "--demo", "--experiments", "heads", "--train-args",
                        TINY_JOBS.train_args, "--ridge-args", TINY_JOBS.ridge_args, check=False)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip() == (
        f"error: {work / 'vqvae/ckpt.pt'}: made from another {frames} than the current one (01_render_frames "
        "ran again since): re-run 03_train_vqvae.py first")
    assert "04_train_gpt.py" not in result.stdout   # nothing trained


def test_a_claim_of_no_effect_needs_an_interval_inside_the_margin():
    """Equivalence, not absence of evidence: a claim of no effect is supported only when its interval lies
    within the margin; an interval that merely holds 0 is inconclusive; a claim of an effect needs an
    interval above 0."""
    cases = [("increase", 0.01, 0.05, "supported"), ("increase", -0.01, 0.05, "inconclusive"),
             ("increase", -0.05, 0.005, "not supported"), ("no increase", -0.02, 0.009, "supported"),
             ("no increase", -0.02, 0.05, "inconclusive"), ("no increase", 0.02, 0.05, "not supported"),
             ("none", -0.009, 0.009, "supported"), ("none", -0.05, 0.05, "inconclusive"),
             ("none", -0.05, -0.02, "not supported"), ("not worse", -0.009, 0.05, "supported"),
             ("not worse", -0.05, 0.01, "inconclusive"), ("not worse", -0.05, -0.02, "not supported")]
    for kind, lo, hi, word in cases:
        assert sweep_report.claim_word(kind, lo, hi, margin=0.01) == word, (kind, lo, hi)


def test_a_worse_fp16_model_is_not_reported_as_not_hurting():
    """A model made worse on purpose (its predictions diluted with noise: median r about 16% lower) trained
    faster: the old verdict called the precision claim supported because the interval of the difference
    held 0; now it is not supported, or inconclusive, never supported."""
    rng = np.random.default_rng(0)
    m, n_parcels = 400, 60
    bold = rng.normal(size=(m, n_parcels))
    signal = bold + rng.normal(size=(m, n_parcels)) * 4                      # r ~0.24 with the BOLD
    worse = signal + rng.normal(size=(m, n_parcels)) * 2.2                    # r ~0.2

    def run(prediction, wall_s):
        test = {"bold": bold, "prediction": prediction, "run": np.repeat([0, 1], m // 2)}
        r = ridge_r(bold, prediction)[None]                                  # (1 subject, P)
        finished = {"r": r, "boot": significance.bootstrap_scores([test], 500), "wall_s": wall_s}
        return finished | {"seed_runs": [finished]}

    reference, fp16 = run(signal, 100.0), run(worse, 80.0)
    drop = 1 - np.median(fp16["r"]) / np.median(reference["r"])
    assert 0.1 < drop < 0.25, drop
    args = sweep.parse_args(["--work", "w"])
    text = sweep_report.precision_verdict([("fp32", "a", reference), ("fp16", "b", fp16)], args)
    assert not text.startswith("supported"), text
    assert text.startswith(("not supported", "inconclusive")) and "trained 1.25x as fast" in text


def ridge_r(y, prediction):
    """Pearson r of each column (P,)."""
    y, prediction = y - y.mean(axis=0), prediction - prediction.mean(axis=0)
    return (y * prediction).sum(axis=0) / np.sqrt((y ** 2).sum(axis=0) * (prediction ** 2).sum(axis=0))


FAKE_STAGE = """import os, signal, sys, time
def stop(signum, frame):
    time.sleep(1.0)                                        # a checkpoint being written
    with open(sys.argv[1] + "/stopped", "a") as f:
        f.write(signal.Signals(signum).name + "\\n")
    sys.exit(75)
signal.signal(signal.SIGINT, stop)
open(sys.argv[1] + "/pid", "w").write(str(os.getpid()))
while True:
    time.sleep(0.05)
"""
SWEEP_RUNNING_A_STAGE = """import sys
sys.path.insert(0, {repo!r})
from common import load_stage
print(*load_stage("07_sweep.py").run_stage([sys.executable, {fake!r}, {folder!r}]))
"""


def test_ctrl_c_during_a_sweep_reaches_its_stage_once_and_waits_for_the_checkpoint(tmp_path):
    """Ctrl-C signals the terminal's foreground process group, 07's. 07 ran each stage with
    subprocess.run, which killed it a quarter of a second later, before 04 had saved its checkpoint
    (its last steps lost). Now the stage runs in a group of its own, 07 passes the signal on and waits;
    a stand-in stage takes a second to stop."""
    fake = tmp_path / "fake_stage.py"
    fake.write_text(FAKE_STAGE)
    sweep_process = subprocess.Popen(
        [sys.executable, "-c", SWEEP_RUNNING_A_STAGE.format(repo=str(REPO), fake=str(fake), folder=str(tmp_path))],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
        assert time.time() < deadline and sweep_process.poll() is None, sweep_process.stderr.read()
        time.sleep(0.02)
    stage_pid = int((tmp_path / "pid").read_text())
    os.killpg(sweep_process.pid, signal.SIGINT)                  # what the terminal does on Ctrl-C
    out, err = sweep_process.communicate(timeout=60)
    assert out.split() == ["75", "SIGINT"]                     # the stage's status, and the signal
    assert (tmp_path / "stopped").read_text() == "SIGINT\n"     # once, and it finished stopping
    assert err.splitlines() == [f"07_sweep: SIGINT: passed to fake_stage.py (pid {stage_pid}); waiting for it to stop"]
