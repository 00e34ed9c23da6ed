"""The cluster path on a real one-node SLURM that these tests start (slurm/local_cluster.sh): the sbatch
templates, a time limit shorter than training, a real preemption, a signal at each moment of a training
job, and the sweep's job chains. The node's four GPUs are dummy devices, so the stages run on the CPU.

Jobs that must last a while do not compute more: tests/pause_points/sitecustomize.py (on the jobs'
PYTHONPATH) adds sleep to each training step, or holds a process at one moment while the test signals it.
A requeued job waits about two minutes (BeginTime) before it may start again: `Cluster.wait` releases it.
Needs root and Debian's slurm-wlm and munge (the README's test command installs them); elsewhere these
tests are skipped with the reason, and under CI=true that is a failure.
"""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

import common
from paper.vqvae import VQVAE
from conftest import REPO

PAUSE_POINTS = str(REPO / "tests" / "pause_points")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
            "DEADLINE"}
TIMING_COLUMNS = {"clips_per_s", "tokens_per_s", "mfu", "peak_mem_gb", "wall_s"}   # differ run to run
# 03 and 04 at the size of their own tests: seconds per run on one core
VQVAE_FLAGS = ["--device", "cpu", "--n-hiddens", "16", "--n-res-layers", "1", "--resolution", "32",
               "--sequence-length", "8", "--downsample", "2", "4", "4", "--n-codes", "32", "--embedding-dim", "8",
               "--batch-size", "4", "--val-clips", "4", "--workers", "1", "--max-steps", "40", "--log-every", "5",
               "--ckpt-every", "20"]
GPT_FLAGS = ["--device", "cpu", "--hidden-dim", "24", "--layers", "2", "--heads", "2", "--cond-dim", "24",
             "--batch-size", "4", "--val-reps", "1", "--max-steps", "30", "--log-every", "5", "--val-every", "15",
             "--ckpt-every", "10"]


# --------------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------------
class Cluster:
    """Commands against the test's SLURM (SLURM_CONF in `env`)."""

    def __init__(self, env):
        self.env = env

    def command(self, *args, check=True):
        result = subprocess.run([str(a) for a in args], cwd=REPO, env=self.env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, args))}: exit {result.returncode}\n{result.stderr}")
        return result

    def sbatch(self, *args, **env):
        """Submit as a user would, from the repository; `env` is added to the job's environment."""
        result = subprocess.run(["sbatch", "--parsable", *map(str, args)], cwd=REPO, env=dict(self.env, **env),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return int(result.stdout.strip().split(";")[0])

    def job(self, job_id):
        """scontrol's fields of the job: {"JobState": "COMPLETED", "Restarts": "1", "ExitCode": "0:0", ...}."""
        line = self.command("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", line))

    def wait(self, job_id, timeout=300):
        """Wait until the job has ended (a state seen twice, 2 s apart: a requeue passes through others),
        starting a requeued job at once instead of after its two-minute BeginTime."""
        deadline, last = time.time() + timeout, None
        while time.time() < deadline:
            info = self.job(job_id)
            if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
                self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
            if info["JobState"] in TERMINAL and last == info["JobState"]:
                return info
            last = info["JobState"] if info["JobState"] in TERMINAL else None
            time.sleep(2 if last else 0.5)
        raise AssertionError(f"job {job_id} still {info['JobState']} after {timeout} s: {info}")

    def wait_running(self, job_id, timeout=120):
        deadline = time.time() + timeout
        while self.job(job_id)["JobState"] != "RUNNING":
            assert time.time() < deadline, self.job(job_id)
            time.sleep(0.2)


def free_port_pair():
    """A port p with p and p + 1 free (slurmctld, slurmd)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two consecutive free ports")


def local_cluster(state, **node):
    """Start slurm/local_cluster.sh's SLURM with its state in `state` and the node's `node` settings
    (LOCAL_CLUSTER_CPUS=...); yields a Cluster, and stops it afterwards. Skips (fails under CI) where it
    cannot run."""
    reason = None
    if os.geteuid() != 0:
        reason = "needs root: slurmd and munged run as root"
    elif not all(shutil.which(c) for c in ("slurmctld", "slurmd", "munged", "sbatch")):
        reason = "needs slurm-wlm and munge: bash slurm/local_cluster.sh install"
    if reason:
        if os.environ.get("CI") == "true":
            pytest.fail(f"the SLURM tests cannot run under CI: {reason}")
        pytest.skip(reason)
    env = dict(os.environ, LOCAL_CLUSTER_DIR=str(state), LOCAL_CLUSTER_PORT=str(free_port_pair()),
               LOCAL_CLUSTER_GRACE_S="30", **node)
    started = subprocess.run(["bash", "slurm/local_cluster.sh", "start"], cwd=REPO, env=env, capture_output=True,
                             text=True)
    assert started.returncode == 0, started.stdout + started.stderr
    print(started.stdout.splitlines()[0])       # the SLURM version, in the test log
    yield Cluster(dict(env, SLURM_CONF=str(state / "slurm.conf"), OMP_NUM_THREADS="1"))
    subprocess.run(["bash", "slurm/local_cluster.sh", "stop"], cwd=REPO, env=env, capture_output=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    yield from local_cluster(tmp_path_factory.mktemp("slurm"))


@pytest.fixture
def small_cluster(tmp_path):
    """A second SLURM beside `cluster`, whose node is small: 4 CPUs, 16 GB, 1 GPU."""
    yield from local_cluster(tmp_path / "slurm", LOCAL_CLUSTER_CPUS="4", LOCAL_CLUSTER_MEMORY_MB="16384",
                             LOCAL_CLUSTER_GPUS="1")


# --------------------------------------------------------------------------------------------------
# Inputs and checks
# --------------------------------------------------------------------------------------------------
def frames_work(work, n_reps, n_frames, resolution):
    """A work dir with frames/manifest.tsv and n_reps repetitions of moving squares (stage 01's layout),
    sessions 001, 002, ... (none is the default test session 005)."""
    rows = []
    for i in range(n_reps):
        ses = f"{i + 1:03d}" if i < 4 else f"{i + 2:03d}"
        rel = f"frames/sub-01/ses-{ses}/sub-01_ses-{ses}_task-shinobi_run-01_level-1_rep-{i:02d}.npy"
        frames = np.zeros((n_frames, resolution, resolution, 3), np.uint8)
        for t in range(n_frames):
            x = (t // 2 + 5 * i) % (resolution - 8)
            frames[t, 2:10, x:x + 8] = (200, 50, 50)
            frames[t, -8:, resolution - 8 - x:resolution - x] = (40, 180, 90)
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(work / rel, frames)
        rows.append(dict(sub="01", ses=ses, task="shinobi", run="01", level=1, rep=i, bk2=f"rep{i}.bk2",
                         onset_s=0.0, n_frames=n_frames, fps=60, frames_path=rel, status="ok", error="n/a"))
    common.write_tsv(work / "frames" / "manifest.tsv", pd.DataFrame(rows))
    return work


def gpt_work(work):
    """Frames and a tiny random VQ-VAE (16 px, a 4 x 4 x 4 code grid) saved as stage 03 saves it."""
    frames_work(work, n_reps=6, n_frames=300, resolution=16)
    torch.manual_seed(0)
    vqvae = VQVAE(resolution=16, sequence_length=16, n_hiddens=16, n_res_layers=1, downsample=(4, 4, 4),
                         embedding_dim=8, n_codes=32)
    common.save_checkpoint(work / "vqvae" / "ckpt.pt", dict(model=vqvae.state_dict(), model_config=vqvae.config))
    return work


def uninterrupted(script, work, flags, processes):
    """The same training, straight through, with the same number of processes (torchrun for 2)."""
    launch = [sys.executable] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    result = subprocess.run([*launch, script, "--work", str(work), *flags], cwd=REPO, capture_output=True,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]


def assert_same_training(run_dir, reference_dir):
    """The final checkpoint's weights are equal and the logs agree row for row (timing columns aside)."""
    ours, theirs = (common.load_checkpoint(d / "ckpt.pt") for d in (run_dir, reference_dir))
    assert ours["complete"] and ours["step"] == theirs["step"]
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key
    log, reference_log = pd.read_csv(run_dir / "log.csv"), pd.read_csv(reference_dir / "log.csv")
    columns = [c for c in reference_log.columns if c not in TIMING_COLUMNS]
    pd.testing.assert_frame_equal(log[columns], reference_log[columns])


def assert_quiet_interruptions(log_text, stage, requeues):
    """Each requeue reads as the stage's own line and the batch script's: no traceback, no srun noise."""
    assert "Traceback" not in log_text and "Exited with exit code 75" not in log_text, log_text[-3000:]
    assert log_text.count("gpu_stage.sbatch: requeueing job") == requeues, log_text[-3000:]
    assert log_text.count(f"{stage}: interrupted") == requeues, log_text[-3000:]


# --------------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------------
def test_cpu_stage_runs_01_then_02_and_a_failing_stage_ends_failed(cluster, demo_root, tmp_path):
    work = tmp_path / "work"
    atlas = next((demo_root / "atlas").glob("*_dseg.nii.gz"))
    common_flags = ["--cpus-per-task", "2", "--output", tmp_path / "job-%j.out", "slurm/cpu_stage.sbatch"]
    render = cluster.sbatch(*common_flags, "01_render_frames.py", "--work", work, "--bids", demo_root,
                            "--resolution", "32")
    prep = cluster.sbatch("--dependency", f"afterok:{render}", *common_flags, "02_prep_fmri.py", "--work", work,
                          "--fmriprep", demo_root / "derivatives" / "fmriprep", "--atlas", atlas)
    bad = cluster.sbatch("--dependency", f"afterok:{render}", *common_flags, "02_prep_fmri.py", "--work", work,
                         "--fmriprep", demo_root / "derivatives" / "fmriprep", "--atlas", tmp_path / "none.nii.gz")
    assert cluster.wait(render)["JobState"] == "COMPLETED"
    assert cluster.wait(prep)["JobState"] == "COMPLETED"
    failed = cluster.wait(bad)
    assert failed["JobState"] == "FAILED" and failed["ExitCode"] == "2:0"      # 02's status: bad input
    assert f"error: {tmp_path / 'none.nii.gz'}" in (tmp_path / f"job-{bad}.out").read_text()
    assert (work / "frames" / "manifest.tsv").is_file() and (work / "bold" / "manifest.tsv").is_file()


def test_a_time_limit_shorter_than_training_requeues_until_complete(cluster, tmp_path):
    """--time 2 is within the template's 3-minute warning (SIGUSR1 at once); MIN_RUN_S=8 lets each run
    train 8 s at most before the script passes it on (40 steps of 0.3 s need 12 s). Two processes.
    The reference runs first: on 2 busy cores a start-up can otherwise outlast the time limit itself
    (seen once with --time 1 while the reference ran beside the job)."""
    work, reference = (frames_work(tmp_path / name, 4, 80, 32) for name in ("work", "reference"))
    uninterrupted("03_train_vqvae.py", reference, VQVAE_FLAGS, processes=2)
    log = tmp_path / "job.out"
    job = cluster.sbatch("--gpus-per-node", "2", "--cpus-per-task", "2", "--time", "2", "--output", log,
                         "slurm/gpu_stage.sbatch", "03_train_vqvae.py", "--work", work, *VQVAE_FLAGS,
                         MIN_RUN_S="8", TEST_STEP_SLEEP_S="0.3", PYTHONPATH=PAUSE_POINTS)
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    requeues = int(info["Restarts"])
    assert requeues >= 1, "the job never ran into its time limit"
    assert_same_training(work / "vqvae", reference / "vqvae")
    assert_quiet_interruptions(log.read_text(), "03_train_vqvae", requeues)
    assert log.read_text().count("after the time limit warning (SIGUSR1)") == requeues


def test_a_preempted_training_checkpoints_requeues_and_ends_as_if_uninterrupted(cluster, tmp_path):
    """A job of the high-priority partition takes the GPUs of a running 04 (two processes): 04 gets
    SIGTERM, checkpoints within the grace time, is requeued, and finishes after the other job."""
    work, reference = (gpt_work(tmp_path / name) for name in ("work", "reference"))
    log = tmp_path / "job.out"
    job = cluster.sbatch("--gpus-per-node", "2", "--cpus-per-task", "2", "--output", log, "slurm/gpu_stage.sbatch",
                         "04_train_gpt.py", "--work", work, "--name", "run", *GPT_FLAGS,
                         TEST_STEP_SLEEP_S="0.3", PYTHONPATH=PAUSE_POINTS)
    train_log = work / "gpt" / "run" / "log.csv"
    deadline = time.time() + 120
    while not (train_log.is_file() and len(train_log.read_text().splitlines()) >= 2):   # step 5 logged
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    urgent = cluster.sbatch("--partition", "urgent", "--gpus-per-node", "4", "--output", tmp_path / "urgent.out",
                            "--wrap", "sleep 1")
    uninterrupted("04_train_gpt.py", reference, [*GPT_FLAGS, "--name", "run"], processes=2)
    assert cluster.wait(urgent)["JobState"] == "COMPLETED"
    info = cluster.wait(job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert_same_training(work / "gpt" / "run", reference / "gpt" / "run")
    assert_quiet_interruptions(log.read_text(), "04_train_gpt", 1)
    assert "04_train_gpt: interrupted at step" in log.read_text() and "by SIGTERM" in log.read_text()


# A signal at each moment of a 04 job (one process): how the test sends it, as SLURM would
MOMENTS = {
    "startup": "preemption",   # SIGTERM to the step's processes before they can handle it: killed
    "codes": "time limit",     # SIGUSR1 to the batch script, passed on as SIGTERM: 04 stops caching codes
    "save": "preemption",      # while rank 0 writes a checkpoint
    "done": "time limit",      # after the last step: the run is complete, the job must end COMPLETED
}


@pytest.fixture(scope="module")
def moments(cluster, tmp_path_factory):
    """The four jobs of MOMENTS, run together, each signalled when its pause begins; and the same
    training uninterrupted. Returns ({moment: (work, log, final job info)}, reference work)."""
    root = tmp_path_factory.mktemp("moments")
    jobs = {}
    for moment in MOMENTS:
        work, log = gpt_work(root / moment), root / f"{moment}.out"
        job = cluster.sbatch("--gpus-per-node", "1", "--cpus-per-task", "1", "--output", log,
                             "slurm/gpu_stage.sbatch", "04_train_gpt.py", "--work", work, "--name", "run",
                             *GPT_FLAGS, PYTHONPATH=PAUSE_POINTS, TEST_PAUSE_AT=moment, MIN_RUN_S="0",
                             TEST_PAUSE_FILE=str(root / f"{moment}.paused"), TEST_PAUSE_S="8")
        jobs[moment] = (job, work, log)
    waiting, deadline = set(MOMENTS), time.time() + 180
    while waiting and time.time() < deadline:
        for moment in sorted(waiting):
            if (root / f"{moment}.paused").is_file():
                job = jobs[moment][0]
                if MOMENTS[moment] == "preemption":
                    cluster.command("scancel", "--signal=TERM", job)
                else:
                    cluster.command("scancel", "--batch", "--signal=USR1", job)
                waiting.discard(moment)
        time.sleep(0.1)
    assert not waiting, f"never reached: {waiting}"
    reference = gpt_work(root / "reference")
    uninterrupted("04_train_gpt.py", reference, [*GPT_FLAGS, "--name", "run"], processes=1)
    return {m: (work, log, cluster.wait(job)) for m, (job, work, log) in jobs.items()}, reference


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_signal_at_any_moment_requeues_or_completes_and_loses_nothing(moments, moment):
    results, reference = moments
    work, log, info = results[moment]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", info
    assert_same_training(work / "gpt" / "run", reference / "gpt" / "run")
    text = log.read_text()
    if moment == "done":        # nothing left to do: no requeue
        assert info["Restarts"] == "0" and "requeueing" not in text and "interrupted" not in text, text[-3000:]
        assert (work / "gpt" / "run" / "loss.png").is_file()
        return
    assert info["Restarts"] == "1", info
    if moment == "startup":     # killed before it could say anything: the batch script's line alone
        assert "Traceback" not in text and text.count("gpu_stage.sbatch: requeueing job") == 1, text[-3000:]
        assert "after a signal to the stage" in text
        return
    assert_quiet_interruptions(text, "04_train_gpt", 1)
    if moment == "codes":
        assert re.search(r"04_train_gpt: interrupted while caching codes by SIGTERM; 1 of 6 repetitions cached",
                         text), text[-3000:]
    if moment == "save":        # the checkpoint being written was finished, then one more step saved
        assert "04_train_gpt: interrupted at step 11 of 30 by SIGTERM" in text, text[-3000:]


def test_the_templates_and_the_sweep_fit_a_small_node_and_follow_account_and_partition(small_cluster):
    """Their default resources fit a node of 4 CPUs, 16 GB and 1 GPU (not 16 or 32 CPUs, 4 GPUs, all the
    memory); every job of the sweep goes to the account and the partition that sbatch's SBATCH_ACCOUNT and
    SBATCH_PARTITION name (its jobs are submitted held, then cancelled: none runs)."""
    for template in ("cpu_stage", "gpu_stage"):
        tried = small_cluster.command("sbatch", "--test-only", f"slurm/{template}.sbatch", "06_ridge.py", "--help",
                                      check=False)
        assert tried.returncode == 0 and "to start at" in tried.stderr, tried.stderr
    env = dict(small_cluster.env, SBATCH_ACCOUNT="lab", SBATCH_PARTITION="urgent", SBATCH_HOLD="1")
    submitted = subprocess.run(["bash", "slurm/submit_sweep.sh", "--work", "w", "--demo", "--experiments", "heads"],
                               cwd=REPO, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    ids = re.findall(r"\b\d+\b", submitted.stdout[submitted.stdout.index("sacct -j"):].split("--format")[0])
    assert len(ids) > 4
    jobs = [small_cluster.job(i) for i in ids]
    small_cluster.command("scancel", *ids)
    assert {(job["Account"], job["Partition"]) for job in jobs} == {("lab", "urgent")}


def test_the_readme_local_cluster_example_runs_after_the_demo(cluster, pipeline, tmp_path):
    """The README's sbatch command for the local cluster, on a copy of what run_all.sh made (the reduced demo
    here), trains its GPT beside the demo's."""
    readme = (REPO / "README.md").read_text().replace("\\\n", "")
    line = next(line for line in readme.splitlines() if line.startswith("sbatch ") and "--work work " in line)
    work = tmp_path / "work"
    for folder in ("frames", "bold", "vqvae", "gpt/codes"):
        shutil.copytree(pipeline[0] / folder, work / folder)
    job = cluster.sbatch("--output", tmp_path / "job.out", *shlex.split(line.replace("--work work ", f"--work {work} "))[1:])
    info = cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    assert common.read_record(work / "gpt" / "cluster-try" / "ckpt.json")["complete"]


def chain_ids(submit_output):
    """{configuration: (train, extract, ridge) job ids} and the figures job id, from submit_sweep.sh."""
    chains = {name: tuple(None if i == "none" else int(i) for i in ids) for name, *ids in
              re.findall(r"^(\S+): train (\S+) -> extract (\d+) -> ridge (\d+)$", submit_output, re.M)}
    return chains, int(re.search(r"^figures: (\d+)", submit_output, re.M)[1])


def test_the_sweep_runs_as_job_chains_and_a_failed_chain_is_named_not_hidden(cluster, pipeline, tmp_path):
    """submit_sweep.sh on the reduced demo, three widths. The third model's checkpoint is damaged, so its
    training fails: SLURM cancels its extraction and ridge, the other chains finish, and the figures job
    draws them, names the missing one and fails. With the damage repaired, the same command finishes
    the rest (finished stages skip) and the figures job succeeds."""
    work = tmp_path / "work"
    for folder in ("frames", "bold", "vqvae", "demo", "gpt/codes"):   # 01-03's outputs, the code cache
        shutil.copytree(pipeline[0] / folder, work / folder)
    command = ["bash", "slurm/submit_sweep.sh", "--work", str(work), "--demo", "--experiments", "hidden",
               "--values", "6", "12", "24", "--train-args", "--max-steps 10",
               "--ridge-args", "--n-permutations 20", "--n-boot", "20"]   # 06's device: the node's (CPU)
    env = dict(cluster.env, GPUS_PER_TRAIN_JOB="1", SBATCH_OUTPUT=str(tmp_path / "%x-%j.out"))
    damaged = work / "gpt" / "h24-l2-a2-fall-fp32" / "ckpt.pt"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"not a checkpoint")

    submitted = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    chains, figures = chain_ids(submitted.stdout)
    assert sorted(chains) == ["h12-l2-a2-fall-fp32", "h24-l2-a2-fall-fp32", "h6-l2-a2-fall-fp32"]
    report = work / "figures" / "report.md"
    info = cluster.wait(figures, timeout=600)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", info
    states = {name: [cluster.job(i)["JobState"] for i in ids] for name, ids in chains.items()}
    assert states["h24-l2-a2-fall-fp32"] == ["FAILED", "CANCELLED", "CANCELLED"], states
    assert states["h6-l2-a2-fall-fp32"] == states["h12-l2-a2-fall-fp32"] == ["COMPLETED"] * 3, states
    text = report.read_text()
    assert "h24-l2-a2-fall-fp32" in text[:text.index("## hidden")]            # named at the top as missing
    table = text[text.index("## hidden"):]
    assert "| 6 |" in table and "| 12 |" in table and "| 24 |" not in table
    figures_log = (tmp_path / f"sweep-figures-{figures}.out").read_text()
    assert "h24-l2-a2-fall-fp32" in figures_log and "Traceback" not in figures_log

    damaged.unlink()
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    chains, figures = chain_ids(again.stdout)
    assert cluster.wait(figures, timeout=600)["JobState"] == "COMPLETED"
    assert all(cluster.job(i)["JobState"] == "COMPLETED" for ids in chains.values() for i in ids)
    train_log = (tmp_path / f"train-h6-l2-a2-fall-fp32-{chains['h6-l2-a2-fall-fp32'][0]}.out").read_text()
    assert "is complete" in train_log                                        # finished stages skip
    assert "| 24 |" in report.read_text()[report.read_text().index("## hidden"):]
