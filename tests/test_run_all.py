"""run_all.sh end to end on a reduced demo, then a tiny demo sweep (07_sweep.py) on its outputs.

The reduced demo keeps what makes the planted signal measurable (5 sessions x 2 runs x 3 repetitions of
20 s, 52 volumes per run) but has one subject, 32-pixel frames and smaller, shorter-trained models, so
that the whole pipeline runs in about two minutes on 2 cores.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import common
from conftest import REDUCED, REPO, processes_running, run_all

def test_run_all_recovers_the_planted_parcels(pipeline):
    work, result = pipeline
    truth = json.loads((work / "demo" / "ground_truth.json").read_text())
    summary = json.loads((work / "results" / "demo" / "sub-01" / "summary.json").read_text())
    r = np.load(work / "results" / "demo" / "sub-01" / "r.npy")
    planted = np.array(sorted(int(label) for label in truth["planted"])) - 1   # labels 1..P are columns 0..P-1
    # The ground truth's noise parcels: neither planted on vision nor on the button presses.
    noise = np.array(sorted(truth["noise_parcels"])) - 1
    assert len(noise) == len(r) - len(planted) - len(truth["planted_buttons"])
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
    def outputs():  # every stage's outputs (not a training folder's lock: each run that holds it names itself)
        return {p: p.stat().st_mtime_ns for folder in ("frames", "bold", "vqvae", "gpt", "features", "results/demo")
                for p in (work / folder).rglob("*") if p.is_file() and p.name != common.LOCK_NAME}

    before = outputs()
    again = run_all(work)
    assert again.returncode == 0, again.stderr[-2000:]
    assert outputs() == before
    assert "is complete" in again.stdout    # 03 and 04 report their finished runs


def stage_calls(tmp_path, **env):
    """run_all.sh with a stand-in for python that records, for each stage it starts, its command line and
    the thread settings it gets, and runs nothing (`python -c`, run_all.sh's own questions, goes through).
    Returns {script: (arguments, OMP_NUM_THREADS, OMP_WAIT_POLICY)}."""
    log, fake = tmp_path / "calls.tsv", tmp_path / "python"
    tmp_path.mkdir(exist_ok=True)
    fake.write_text(f'#!/usr/bin/env bash\nif [ "$1" = -c ]; then exec "{sys.executable}" "$@"; fi\n'
                    f'printf "%s\\t%s\\t%s\\n" "$*" "${{OMP_NUM_THREADS:-}}" "${{OMP_WAIT_POLICY:-}}" >> "{log}"\n')
    fake.chmod(0o755)
    outside = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "SLURM_"))}
    result = subprocess.run(["bash", "run_all.sh"], cwd=REPO, capture_output=True, text=True,
                            env={**outside, "WORK": str(tmp_path / "work"), "PYTHON": str(fake), **env})
    assert result.returncode == 0, result.stderr
    calls = [line.split("\t") for line in log.read_text().splitlines()]
    return {args.split()[0]: (args.split()[1:], threads, policy) for args, threads, policy in calls}


def test_run_all_shares_the_cpus_it_was_given_and_threads_wait_asleep(tmp_path):
    """WORKERS follows the CPUs the job may use (SLURM's --cpus-per-task 1 here), each stage divides them
    between its processes unless THREADS says otherwise, and idle OpenMP threads sleep (spinning ones made
    03 and 04 6-15x slower on a shared machine)."""
    calls = stage_calls(tmp_path, SLURM_CPUS_PER_TASK="1")
    for script in ("01_render_frames.py", "02_prep_fmri.py"):
        arguments, threads, policy = calls[script]
        assert arguments[arguments.index("--workers") + 1] == "1" and threads == "" and policy == "PASSIVE"
    calls = stage_calls(tmp_path / "threads", THREADS="1")
    assert {threads for _, threads, _ in calls.values()} == {"1"}


def test_the_demos_short_runs_get_the_six_motion_parameters_and_real_data_params24(tmp_path):
    """The demo's runs have 51 kept volumes: Params24 + cosines would take half their degrees of freedom
    (02 warned), so run_all.sh gives its 02 --motion basic; your own data and the Algonauts release keep
    02's defaults (that release is cleaned already)."""
    def prep(name, **env):
        return " ".join(stage_calls(tmp_path / name, **env)["02_prep_fmri.py"][0])
    assert "--motion basic" in prep("game")
    movie = prep("movie", STIMULI="movie")
    assert "--motion basic" in movie and "--test-tasks s06e01a s06e01b" in movie
    assert "--motion" not in prep("algonauts", STIMULI="movie", LAYOUT="algonauts")
    assert "--motion" not in prep("own", DATA=str(tmp_path / "data"), ATLAS="atlas.nii.gz")


def test_your_own_data_small_preset_first_then_the_papers(tmp_path):
    """The README's "Your own data" command runs the small CPU preset on real data (tiny models, 64 px, the
    demo's penalty grid, results/small, no ground truth), on the one subject it names; without PRESET, real
    data gets the paper's configuration."""
    readme = (REPO / "README.md").read_text()
    own = readme[readme.index("\n## Your own data\n"):readme.index("\n## Real data and a cluster\n")]
    command = own[own.index("```bash\n") + 8:own.index("\n```", own.index("```bash"))].replace("\\\n", "")
    settings = dict(word.split("=", 1) for word in shlex.split(command) if "=" in word and word[0].isupper())
    calls = stage_calls(tmp_path / "small", **{**settings, "DATA": str(tmp_path / "data")})
    assert calls["01_render_frames.py"][0][-2:] == ["--subjects", "01"]
    assert "--resolution 64" in " ".join(calls["01_render_frames.py"][0])
    assert {"--n-hiddens", "--device"} <= set(calls["03_train_vqvae.py"][0])
    assert calls["04_train_gpt.py"][0][calls["04_train_gpt.py"][0].index("--name") + 1] == "small"
    ridge = " ".join(calls["06_ridge.py"][0])
    assert "--alphas" not in ridge and "--ground-truth" not in ridge     # 06's default grid, as the demo
    paper = stage_calls(tmp_path / "paper", DATA=str(tmp_path / "data"), ATLAS="atlas.nii.gz")
    assert paper["03_train_vqvae.py"][0] == ["--work", str(tmp_path / "paper/work"), "--resume"]
    assert "--resolution 128" in " ".join(paper["01_render_frames.py"][0])


def test_run_all_stops_at_the_first_failing_stage(tmp_path):
    result = run_all(tmp_path, DATA=str(tmp_path / "no_such_dataset"), ATLAS=str(tmp_path / "atlas.nii.gz"))
    assert result.returncode == 2                      # 01's status: bad input
    assert "stage 01_render_frames failed (exit 2" in result.stderr
    assert "=== 02_prep_fmri" not in result.stdout


FAKE_STAGE = """#!/usr/bin/env bash
# stands in for python: each stage runs until SIGTERM, then stops as 03 does (a checkpoint, exit 75)
[ "$1" = -c ] && exit 1                                       # run_all.sh's progress_of: no record
trap 'echo "$1" > "$(dirname "$0")/stopped"; exit 75' TERM
echo $$ > "$(dirname "$0")/pid"
while :; do sleep 0.1; done
"""


def test_sigterm_to_run_all_reaches_the_stage_and_waits_for_it(tmp_path):
    """SIGTERM to run_all.sh itself (a job's time limit, a `kill`) used to kill the script alone (143, no
    message) and leave its stage running as an orphan: it is passed to the stage, whose status ends the
    script, and said. A stand-in for python keeps the test to a second."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_STAGE)
    fake.chmod(0o755)
    process = subprocess.Popen(["bash", "run_all.sh"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, WORK=str(tmp_path / "work"), PYTHON=str(fake),
                                                   WORKERS="1"))    # (the stand-in cannot count the CPUs)
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
        time.sleep(0.05)
    stage_pid = int((tmp_path / "pid").read_text())
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=30)
    finally:
        if common._process_is_alive(stage_pid):               # left running: the test fails below
            os.kill(stage_pid, signal.SIGKILL)
    assert process.returncode == 75
    assert (tmp_path / "stopped").read_text() == "00_make_demo.py\n"
    assert stderr.splitlines() == [
        f"run_all.sh: SIGTERM: passed to 00_make_demo (pid {stage_pid}); waiting for it to stop",
        "run_all.sh: 00_make_demo interrupted at an unknown step: re-run to resume"]
    assert not common._process_is_alive(stage_pid)


CTRL_C = """import os, signal, sys, time
sys.argv[0] = "05_extract.py"
import common
common.run_main(lambda: os.kill(os.getpid(), signal.SIGINT) or time.sleep(30))
"""


def test_ctrl_c_in_a_stage_without_checkpoint_is_one_line_and_130():
    """Ctrl-C in a stage that has no checkpoint to save was a KeyboardInterrupt traceback; started with
    SIGINT ignored, as run_all.sh starts its stages (in the background), a passed-on Ctrl-C did nothing."""
    result = subprocess.run([sys.executable, "-c", CTRL_C], cwd=REPO, capture_output=True, text=True, timeout=60,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert result.returncode == 130
    assert result.stderr.splitlines() == ["05_extract: interrupted by SIGINT; what it finished is kept, nothing is "
                                          "half-written: re-run to go on"]


def test_sigterm_to_03_stops_run_all_and_the_rerun_equals_an_uninterrupted_run(pipeline, tmp_path):
    work = tmp_path / "work"
    for stage_output in ("demo", "frames", "bold"):     # 00-02 skip: their records still vouch (copy2)
        shutil.copytree(pipeline[0] / stage_output, work / stage_output)
    process = subprocess.Popen(["bash", "run_all.sh"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=dict(os.environ, WORK=str(work), OMP_NUM_THREADS="2", **REDUCED))
    log = work / "vqvae" / "log.csv"
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None and not (
            log.is_file() and len(log.read_text().splitlines()) >= 2):    # 03 has logged step 50 of 300
        time.sleep(0.2)
    (pid,) = processes_running("03_train_vqvae.py", work)
    os.kill(pid, signal.SIGTERM)                       # what SLURM sends before it preempts a job
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 75, stderr[-2000:]
    step = common.read_record(work / "vqvae" / "ckpt.json")["step"]
    assert 50 <= step < 300
    assert stderr.strip().splitlines()[-1] == f"run_all.sh: 03_train_vqvae interrupted at step {step} of 300: re-run to resume"
    assert "=== 04_train_gpt" not in stdout and not (work / "gpt").exists()   # nothing trained on it

    again = run_all(work)
    assert again.returncode == 0, again.stderr[-3000:]
    uninterrupted, _ = pipeline
    a = common.load_checkpoint(uninterrupted / "vqvae" / "ckpt.pt")["model"]
    b = common.load_checkpoint(work / "vqvae" / "ckpt.pt")["model"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    np.testing.assert_allclose(np.load(work / "results/demo/sub-01/r.npy"),
                               np.load(uninterrupted / "results/demo/sub-01/r.npy"), rtol=1e-4, atol=1e-5)


def test_a_changed_gpt_flag_is_refused_then_overwrite_remakes_04_05_06(pipeline, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(pipeline[0], work)               # copy2 keeps modification times: records still vouch
    before = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    changed = dict(GPT_ARGS=REDUCED["GPT_ARGS"] + " --lr 1e-3")
    refused = run_all(work, **changed)
    assert refused.returncode == 2
    assert (f"error: {work / 'gpt/demo/ckpt.pt'}: made with --lr 0.003, not 0.001: pass the same flags, or "
            "--overwrite to redo it") in refused.stderr
    redone = run_all(work, GPT_ARGS=changed["GPT_ARGS"] + " --overwrite")
    assert redone.returncode == 0, redone.stderr[-3000:]
    assert "10 of 10 run(s) to do" in redone.stdout      # 05: every run's features, from the new checkpoint
    assert "sub-01: done already" not in redone.stdout   # 06: the subject fitted again
    after = json.loads((work / "results/demo/sub-01/summary.json").read_text())
    assert after["r_max"] != before["r_max"] and after["inputs"] != before["inputs"]


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


def test_demo_controls_run_end_to_end(pipeline, tmp_path):
    """07 --experiments controls on the reduced demo: the untrained GPT, the VQ-VAE alone and the low-level
    control go through 04 -> 05 -> 06 like any configuration. The demo's planted signals are luminance and
    motion of screen quadrants, so the low-level control must find them (and the report says so). On those
    parcels the report compares the trained model with its untrained copy; on this demo, training does not
    help there (random features of the codes capture luminance and motion as well), so the test checks the
    comparison's numbers, not a winner."""
    work = tmp_path / "work"
    shutil.copytree(pipeline[0], work)
    result = subprocess.run(
        # the flags of the sweep test above: the trained model and its results may already be there
        ["python", "07_sweep.py", "--work", str(work), "--demo", "--experiments", "controls", "--train-args",
         "--max-steps 10", "--ridge-args", "--n-permutations 0", "--n-boot", "20"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = (work / "figures" / "report.md").read_text()
    controls = report[report.index("## controls"):]
    for control in ("untrained", "VQ-VAE alone", "low-level"):
        assert f"against the {control} control, median r" in controls
    assert "the low-level control is expected to be strong" in controls
    truth = json.loads((work / "demo" / "ground_truth.json").read_text())
    r = np.load(work / "results" / "lowlevel" / "sub-01" / "r.npy")
    planted = np.array(sorted(int(label) for label in truth["planted"])) - 1   # labels 1..P are columns 0..P-1
    noise = np.array(sorted(truth["noise_parcels"])) - 1
    assert np.median(r[planted]) > np.median(r[noise]) + 0.15, (r[planted], r[noise])
    # Trained against untrained on the planted parcels: the report's numbers, recomputed from the r maps.
    (untrained,) = (work / "results").glob("*-untrained")
    folders = {"trained": untrained.name[:-len("-untrained")], "untrained": untrained.name,
               "VQ-VAE alone": untrained.name.replace("-untrained", "-vqvae"), "low-level": "lowlevel",
               "button presses": "buttons"}
    mean_r = {control: float(np.load(work / "results" / folder / "sub-01" / "r.npy")[planted].mean())
              for control, folder in folders.items()}
    reported = re.search(r"On the 10 planted parcels of ground_truth.json, mean r: trained (\S+), untrained (\S+), "
                         r"VQ-VAE alone (\S+), low-level (\S+), button presses (\S+)\. There, the trained model "
                         r"minus its untrained copy: (\S+) \(95% CI \[(\S+), (\S+)\]: (higher|lower|no difference beyond "
                         r"\+-\S+|inconclusive)\)",
                         controls)
    assert reported, controls
    assert [float(v) for v in reported.groups()[:5]] == pytest.approx(list(mean_r.values()), abs=6e-4)
    diff, lo, hi = (float(v) for v in reported.groups()[5:8])
    assert diff == pytest.approx(mean_r["trained"] - mean_r["untrained"], abs=6e-4)
    margin = 0.1 * mean_r["trained"]                                            # --margin 0.1 of the trained r
    assert reported.group(9) == ("higher" if lo > 0 else "lower" if hi < 0 else
                                 f"no difference beyond +-{margin:.3f}" if -margin < lo and hi < margin else
                                 "inconclusive")
    # Beyond low-level vision and the buttons (06 --with): the planted visual parcels are explained by
    # low-level vision (its R^2 alone above 0), 06's test finds no unique GPT part there (the GPT's
    # features re-encode the screen's luminance: what it gains there is luck), and the parcel planted on
    # button presses is found best by the buttons alone.
    partition = controls[controls.index("### What the GPT explains beyond"):]
    interval = r"(\S+) \(95% CI \[(\S+), (\S+)\]\)"
    alone = re.search(rf"mean R\^2 of each set alone: GPT {interval}, lowlevel {interval}, buttons {interval}; "
                      r"mean unique R\^2 \(parcels x subjects where 06 finds it\): GPT (\S+) \(significant in "
                      r"(\d+) of (\d+)\)", partition)
    assert alone, partition
    joint = work / "results" / f"{folders['trained']}+lowlevel+buttons"       # the trained GPT's partition
    found = np.load(joint / "sub-01" / "unique_significant.npy")[0, planted]   # the GPT's row, planted parcels
    assert float(alone[5]) > 0 and (int(alone[11]), int(alone[12])) == (found.sum(), len(planted)), alone.group(0)
    assert found.sum() == 0, alone.group(0)
    r2_alone = np.load(joint / "sub-01" / "r2_alone.npy")                      # (sets, P): GPT, low-level, buttons
    button_parcel = [int(label) - 1 for label in truth["planted_buttons"]]
    assert r2_alone[2, button_parcel].min() > 0 and (r2_alone[2, button_parcel] >= r2_alone[:2, button_parcel]).all()
    assert (work / "figures" / "controls_partition.png").is_file()
    assert (work / "figures" / "controls_scores.png").is_file() and (work / "figures" / "controls_maps.png").is_file()
