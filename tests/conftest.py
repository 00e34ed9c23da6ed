"""Shared fixtures: a small demo dataset made once per test session, the stage scripts as modules."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

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


def load_stage(filename):
    """Import a stage script (its name starts with a digit) as a module."""
    spec = importlib.util.spec_from_file_location(filename.split(".")[0].replace("0", "s0", 1), REPO / filename)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.fixture(scope="session")
def rendered_work(demo_work):
    """demo_work after 01_render_frames.py at 32 px (frames/manifest.tsv and the .npy files)."""
    run_script("01_render_frames.py", "--work", demo_work, "--resolution", "32", "--workers", "2")
    return demo_work
