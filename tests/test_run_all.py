"""run_all.sh end to end on a reduced demo, then a tiny demo sweep (07_sweep.py) on its outputs.

The reduced demo keeps what makes the planted signal measurable (5 sessions x 2 runs x 3 repetitions of
20 s, 52 volumes per run) but has one subject, 32-pixel frames and smaller, shorter-trained models, so
that the whole pipeline runs in about two minutes on 2 cores.
"""
import json
import os
import subprocess

import numpy as np
import pytest

from conftest import REPO

REDUCED = {
    "DEMO_ARGS": "--subjects 1",
    "RESOLUTION": "32",
    # 32-pixel frames: halve the spatial downsampling to keep the paper's 4 x 8 x 8 latent grid.
    "VQVAE_ARGS": "--downsample 4 4 4 --n-hiddens 16 --max-steps 300",
    "GPT_ARGS": "--hidden-dim 24 --cond-dim 24 --max-steps 100",
    "RIDGE_ARGS": "--n-permutations 100",
}


def run_all(work, **env):
    return subprocess.run(["bash", "run_all.sh"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, WORK=str(work), OMP_NUM_THREADS="2", **REDUCED, **env))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    work = tmp_path_factory.mktemp("run_all")
    result = run_all(work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, result


def test_run_all_recovers_the_planted_parcels(pipeline):
    work, result = pipeline
    truth = json.loads((work / "demo" / "ground_truth.json").read_text())
    summary = json.loads((work / "results" / "demo" / "sub-01" / "summary.json").read_text())
    r = np.load(work / "results" / "demo" / "sub-01" / "r.npy")
    planted = np.array(sorted(int(label) for label in truth["planted"])) - 1   # labels 1..P are columns 0..P-1
    noise = np.setdiff1d(np.arange(len(r)), planted)
    # Independent of 06's own bookkeeping: the planted parcels score clearly above the noise parcels.
    assert np.median(r[planted]) > np.median(r[noise]) + 0.15, (r[planted], r[noise])
    pairs_won = (r[planted][:, None] > r[noise][None, :]).mean()
    assert pairs_won >= 0.8, pairs_won
    recovery = summary["ground_truth"]
    assert recovery["planted_columns"] == planted.tolist()
    assert recovery["planted_beats_noise"] == pytest.approx(pairs_won)
    assert recovery["recovered"] is True
    assert np.isfinite(summary["r_max"]) and summary["n_parcels"] == len(r)
    # The one-screen summary names the subject and the recovery.
    tail = result.stdout[result.stdout.index("run_all.sh: done"):]
    assert "sub-01" in result.stdout and "planted" in result.stdout and str(work / "results" / "demo") in tail
    for path in ("vqvae/ckpt.pt", "vqvae/recon.png", "gpt/demo/ckpt.pt", "gpt/demo/loss.png",
                 "results/demo/sub-01/r_map.nii.gz", "results/demo/sub-01/r_map.png", "results/demo/r_by_subject.png"):
        assert (work / path).is_file(), path


def test_run_all_again_skips_every_stage(pipeline):
    work, _ = pipeline
    def outputs():  # every stage's outputs
        return {p: p.stat().st_mtime_ns for folder in ("frames", "bold", "vqvae", "gpt", "features", "results/demo")
                for p in (work / folder).rglob("*") if p.is_file()}

    before = outputs()
    again = run_all(work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert outputs() == before
    assert "is complete" in again.stdout    # 03 and 04 report their finished runs


def test_run_all_stops_at_the_first_failing_stage(tmp_path):
    result = run_all(tmp_path, DATA=str(tmp_path / "no_such_dataset"), ATLAS=str(tmp_path / "atlas.nii.gz"))
    assert result.returncode == 1
    assert "stage 01_render_frames failed" in result.stderr
    assert "=== 02_prep_fmri" not in result.stdout


def test_demo_sweep_draws_every_figure_and_the_report(pipeline):
    work, _ = pipeline
    result = subprocess.run(
        ["python", "07_sweep.py", "--work", str(work), "--demo", "--experiments", "hidden", "precision",
         "--train-args", "--max-steps 10", "--ridge-args", "--n-permutations 0", "--n-boot", "20"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = work / "figures"
    for name in ("hidden_loss.png", "hidden_scores.png", "hidden_maps.png", "precision_loss.png",
                 "precision_scores.png", "precision_maps.png", "precision.md", "scaling.png", "scaling.json",
                 "report.md"):
        assert (figures / name).is_file() and (figures / name).stat().st_size > 0, name
    report = (figures / "report.md").read_text()
    assert "Scaling up the hidden dimension improves brain encoding" in report and "![](scaling.png)" in report
    fits = json.loads((figures / "scaling.json").read_text())
    assert len(fits["compute"]["runs"]) == 4          # h6, h12, h24 (fp32) and h24 bf16
    assert np.all(np.diff(fits["params"]["x"]) > 0)   # parameters grow with the hidden width
    assert (figures / "precision.md").read_text().count("\n") == 4   # header, rule, fp32, bf16
