"""What two or more stages share: error reporting, atomic IO, manifests, BIDS names.

The paper's algorithms live in the numbered stage scripts; this file is plumbing (and, later, the
VideoGPT models that stages 03, 04 and 05 all need).
"""
import contextlib
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

# The stage scripts start with a digit, so they cannot be imported by name; tests load them with
# importlib. Everything here is importable as `import common`.

DEFAULT_WORK = "work"


# --------------------------------------------------------------------------------------------------
# Errors: bad input gives one clear line naming the file and what is wrong, and a non-zero exit.
# --------------------------------------------------------------------------------------------------
class InputError(Exception):
    """Bad input. The message names the file (or flag) and what is wrong, on one line."""


def run_main(main):
    """Call `main()`; an InputError becomes `error: <message>` on stderr and exit status 2."""
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


# --------------------------------------------------------------------------------------------------
# Atomic writes: an output exists under its final name only once it is complete, so an interrupted
# stage never leaves a half-written file that a re-run would mistake for a finished one.
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` when the block succeeds.

    The temporary name keeps the final suffix (np.save and nibabel look at it), e.g.
    `r_map.nii.gz` is written as `.r_map.nii.gz.tmp-1234.nii.gz`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_npy(path, array):
    """np.save to `path` atomically."""
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def write_tsv(path, table):
    """Write a DataFrame (or list of dicts) as a tab-separated file, atomically; 'n/a' for missing."""
    table = pd.DataFrame(table)
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="n/a")


def read_tsv(path, required=()):
    """Read a BIDS-style TSV ('n/a' is missing). Fails clearly when it is absent or lacks columns."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    try:
        table = pd.read_csv(path, sep="\t", na_values=["n/a"], keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not a readable TSV file ({str(err).splitlines()[0]})") from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
    return table


# --------------------------------------------------------------------------------------------------
# BIDS names: sub-01_ses-002_task-shinobi_run-03_level-1_rep-02.bk2 -> {"sub": "01", ...}
# --------------------------------------------------------------------------------------------------
_ENTITY = re.compile(r"(?:^|_)([a-zA-Z]+)-([a-zA-Z0-9]+)")


def bids_entities(path):
    """The key-value entities of a BIDS file name, in order: {'sub': '01', 'ses': '002', ...}."""
    stem = Path(path).name.split(".")[0]
    return dict(_ENTITY.findall(stem))


def run_stem(sub, ses, task, run):
    """The BIDS prefix that names one fMRI run: sub-01_ses-002_task-shinobi_run-03."""
    return f"sub-{sub}_ses-{ses}_task-{task}_run-{run}"
