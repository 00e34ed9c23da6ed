"""Shared fixtures: a small demo dataset made once per test session, the stage scripts as modules."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import load_stage  # noqa: E402,F401  (tests import it from here)

# Small enough to make in ~10 s on 2 cores, big enough for a planted signal to be measurable:
# 1 subject x 5 sessions (ses-004 validation, ses-005 test) x 1 run x 2 repetitions of 15 s.
TINY_DEMO_FLAGS = ["--subjects", "1", "--sessions", "5", "--runs", "1", "--reps", "2", "--rep-seconds", "15"]


def run_script(script, *args, check=True):
    """Run a stage script as a user would; returns the CompletedProcess (text stdout/stderr)."""
    result = subprocess.run([sys.executable, str(REPO / script), *map(str, args)],
                            cwd=REPO, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def processes_running(script, work):
    """PIDs of the processes whose command line runs `script` on `work` (read from /proc)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(script.encode()) for a in args) and str(work).encode() in args:
            pids.append(int(cmdline.parent.name))
    return pids


@pytest.fixture(scope="session")
def demo_work(tmp_path_factory):
    """A work directory holding demo/ made by 00_make_demo.py with TINY_DEMO_FLAGS."""
    work = tmp_path_factory.mktemp("work")
    run_script("00_make_demo.py", "--work", work, *TINY_DEMO_FLAGS)
    return work


@pytest.fixture(scope="session")
def demo_root(demo_work):
    """The BIDS root of the tiny demo (Path)."""
    return demo_work / "demo"


# Your own data, as 00_make_demo.py makes it in variants (each a few seconds): sub-01 with 3 sessions and
# sub-02 with a single one, 2 runs each, at TR 2.0 s, an atlas parcel (41) below the BOLD field of view. Runs
# of ~18 volumes: stage 02 needs --motion basic.
VARIANT_FLAGS = ["--subjects", "2", "--sessions", "3", "1", "--runs", "2", "--reps", "1", "--rep-seconds", "25",
                 "--tr", "2.0", "--parcel-outside-fov"]


@pytest.fixture(scope="session")
def variant_work(tmp_path_factory):
    """A work directory holding demo/ made with VARIANT_FLAGS, and its frames rendered at 32 px."""
    work = tmp_path_factory.mktemp("variant")
    run_script("00_make_demo.py", "--work", work, *VARIANT_FLAGS)
    run_script("01_render_frames.py", "--work", work, "--resolution", "32", "--workers", "2")
    return work


@pytest.fixture(scope="session")
def rendered_work(demo_work):
    """demo_work after 01_render_frames.py at 32 px (frames/manifest.tsv and the .npy files)."""
    run_script("01_render_frames.py", "--work", demo_work, "--resolution", "32", "--workers", "2")
    return demo_work


# run_all.sh on a reduced demo (test_run_all.py; test_slurm.py's sweep reads its frames, parcels and
# VQ-VAE): it keeps what makes the planted signal measurable (5 sessions x 2 runs x 3 repetitions of 20 s)
# but has one subject, 32-pixel frames and smaller, shorter-trained models: about two minutes on 2 cores.
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
                          env=dict(os.environ, WORK=str(work), OMP_NUM_THREADS="2", **{**REDUCED, **env}))


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """(work, CompletedProcess) of run_all.sh on the reduced demo."""
    work = tmp_path_factory.mktemp("run_all")
    result = run_all(work)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, result


# --------------------------------------------------------------------------------------------------
# A read-only folder, a full disk: each in a private mount namespace (`unshare -rm`, no privileges
# needed), because root ignores file permissions and the tests may run as root.
# --------------------------------------------------------------------------------------------------
def _namespaces_work():
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_work(),
                                      reason="needs `unshare -rm` (user namespaces) to mount a read-only folder "
                                             "or a small full filesystem")
FILES_LEFT = "--- files left:"


def run_confined(script, *args, read_only=None, full=None, full_bytes=64 * 1024):
    """Run a stage script as a user would, with the folder `read_only` mounted read-only, or an empty
    filesystem of `full_bytes` mounted on the folder `full` (a disk that fills at once). Returns the
    CompletedProcess and, for `full`, the files left in it after the run (relative paths)."""
    mounts = []
    if read_only is not None:
        mounts.append(f'mount --bind -o ro "{read_only}" "{read_only}"')
    if full is not None:
        Path(full).mkdir(parents=True, exist_ok=True)
        mounts.append(f'mount -t tmpfs -o size={full_bytes} tmpfs "{full}"')
    command = " ".join(f'"{a}"' for a in [sys.executable, str(REPO / script), *map(str, args)])
    listing = f'; echo "{FILES_LEFT}"; cd "{full}" && find . -type f' if full is not None else ""
    shell = " && ".join(mounts) + f" && {{ {command}; status=$?{listing}; exit $status; }}"
    result = subprocess.run(["unshare", "-rm", "sh", "-c", shell], cwd=REPO, capture_output=True, text=True)
    left = []
    if full is not None and FILES_LEFT in result.stdout:
        result.stdout, listing_out = result.stdout.split(FILES_LEFT)
        left = sorted(line[2:] for line in listing_out.split() if line.startswith("./"))
    return result, left
