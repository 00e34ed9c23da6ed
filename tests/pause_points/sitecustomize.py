"""Test-only: hold a stage process at a chosen moment, so that a test can send a signal exactly there.

tests/test_slurm.py puts this folder on PYTHONPATH of the jobs it submits; Python then imports this file
before the stage script starts. It does nothing unless the job's environment asks for it:

    TEST_PAUSE_AT      startup: before the stage's imports (no signal handler yet)
                       codes:   after 04 cached the codes of its first repetition
                       save:    while a checkpoint is written (its temporary file complete, not renamed)
                       done:    after the final, complete checkpoint (the run still writes its figures)
    TEST_PAUSE_FILE    created when the pause begins (the test waits for it, then signals)
    TEST_PAUSE_S       how long the pause lasts (default 15 s)
    TEST_STEP_SLEEP_S  seconds added to every training step: a slow GPU, without using the CPU

Rank 0 alone pauses, and only in the first run of a job (SLURM_RESTART_COUNT unset or 0): the requeued
run goes straight through. Nothing here changes what a stage computes.
"""
import os
import sys
import time
from pathlib import Path

PAUSE_AT = os.environ.get("TEST_PAUSE_AT", "")
STEP_SLEEP_S = float(os.environ.get("TEST_STEP_SLEEP_S", "0"))
FIRST_RUN = os.environ.get("SLURM_RESTART_COUNT", "0") == "0" and os.environ.get("RANK", "0") == "0"
IS_STAGE = bool(sys.argv) and Path(sys.argv[0]).name[:3] in ("03_", "04_", "05_", "06_")


def pause(reason):
    Path(os.environ["TEST_PAUSE_FILE"]).write_text(f"{reason} {os.getpid()}\n")
    time.sleep(float(os.environ.get("TEST_PAUSE_S", "15")))


def once(wrapped_check):
    """Pause the first time `wrapped_check(*args)` is true."""
    state = {"done": False}

    def maybe_pause(*args):
        if not state["done"] and wrapped_check(*args):
            state["done"] = True
            pause(PAUSE_AT)
    return maybe_pause


def install():
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # the repository: `import common`
    import common
    import torch

    if STEP_SLEEP_S:
        cosine_lr = common.cosine_lr                 # called once per step by 03 and 04

        def slow_cosine_lr(*args, **kwargs):
            time.sleep(STEP_SLEEP_S)
            return cosine_lr(*args, **kwargs)
        common.cosine_lr = slow_cosine_lr
    if not FIRST_RUN:
        return
    if PAUSE_AT == "codes":
        save_npy, check = common.save_npy, once(lambda path, array: "codes" in Path(path).parts)

        def save_npy_then_pause(path, array):
            save_npy(path, array)
            check(path, array)
        common.save_npy = save_npy_then_pause
    elif PAUSE_AT == "save":
        torch_save, check = torch.save, once(lambda obj, f: Path(str(f)).name.startswith(".ckpt.pt.tmp-"))

        def torch_save_then_pause(obj, f, *args, **kwargs):
            torch_save(obj, f, *args, **kwargs)
            check(obj, f)
        torch.save = torch_save_then_pause
    elif PAUSE_AT == "done":
        save_checkpoint = common.save_checkpoint
        check = once(lambda path, checkpoint: checkpoint.get("complete") is True)

        def save_checkpoint_then_pause(path, checkpoint):
            save_checkpoint(path, checkpoint)
            check(path, checkpoint)
        common.save_checkpoint = save_checkpoint_then_pause


if IS_STAGE and (PAUSE_AT or STEP_SLEEP_S):
    if PAUSE_AT == "startup" and FIRST_RUN:
        pause("startup")
    install()
