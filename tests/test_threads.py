"""CPU threads: a stage uses the CPUs its job was given, shared between its processes, one thread pool each
(left alone, torch and BLAS start one thread per CPU of the machine in every process)."""
import os
import subprocess
import sys

import common
from conftest import REPO
from test_vqvae import TINY_FLAGS, make_frames_work


def test_the_cpus_a_job_may_use(tmp_path, monkeypatch):
    """The fewest of the CPU affinity, SLURM's --cpus-per-task and a container's CPU quota (cgroup v2's
    cpu.max: 0.5 CPU counts as one)."""
    affinity = len(os.sched_getaffinity(0))
    none = tmp_path / "cpu.max"
    none.write_text("max 100000\n")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert common.available_cpus(none) == affinity
    half = tmp_path / "half"
    half.write_text("50000 100000\n")
    assert common.available_cpus(half) == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    assert common.available_cpus(none) == 1


def test_a_training_stage_takes_its_share_of_the_cpus_or_omp_num_threads(tmp_path):
    """03 under SLURM with one CPU per task uses one thread whatever the machine has; OMP_NUM_THREADS, when
    set, is obeyed."""
    work = make_frames_work(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for extra, threads in (({"SLURM_CPUS_PER_TASK": "1"}, 1), ({"OMP_NUM_THREADS": "3"}, 3)):
        result = subprocess.run([sys.executable, "03_train_vqvae.py", "--work", str(work), *TINY_FLAGS,
                                 "--max-steps", "1", "--overwrite"], cwd=REPO, capture_output=True, text=True,
                                env={**env, **extra})
        assert result.returncode == 0, result.stderr
        assert f"03_train_vqvae: {threads} CPU thread(s) per process (OMP_NUM_THREADS sets it)" in \
            result.stdout.splitlines()
