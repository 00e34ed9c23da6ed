"""The Algonauts 2025 release (CNeuroMod Friends seasons 1-6 and movie10) as an input of 02's
contract: its parcel time series become bold/, its runs' movies the stimuli 01 decodes.

The layout read (the public algonauts_2025.competitors repository, its README and baseline code):

    fmri/sub-XX/func/sub-XX_task-friends_space-..._desc-s123456_bold.h5   one per subject and
    fmri/sub-XX/func/sub-XX_task-movie10_space-..._bold.h5                dataset (any *_bold.h5)
        one 2D dataset (volumes, parcels) per run, named ses-<session>_task-<chunk>[_run-<n>]:
        ses-001_task-s01e02a (Friends season 1, episode 2, part a), ses-010_task-figures01_run-2
        (movie10's Hidden Figures, part 01, second viewing); parcellated (Schaefer-1000) and
        normalised by the release, at TR 1.49 s
    fmri/sub-XX/atlas/sub-XX_space-..._desc-dseg_parcellation.nii.gz   the subject's atlas:
        parcel labels 1 ... P, column j of every dataset being the j-th label
    stimuli/movies/friends/s<season>/friends_<chunk>.mkv, stimuli/movies/movie10/<movie>/<chunk>.mkv

A run is (sub, ses, task = the chunk, run); its video is the one file under stimuli/movies whose
stem is the chunk, or <the .h5's task>_<chunk>. The video starts with the run's first volume.
"""
import re
from pathlib import Path

import numpy as np

import common
import video_frames
from common import InputError, run_stem

H5_PATTERN = "fmri/sub-*/func/sub-*_bold.h5"
ATLAS_PATTERN = "fmri/sub-{sub}/atlas/sub-{sub}_*parcellation.nii.gz"
MOVIES = "stimuli/movies"
DATASET_NAME = re.compile(r"^ses-(?P<ses>[A-Za-z0-9]+)_task-(?P<task>[A-Za-z0-9]+)"
                          r"(?:_run-(?P<run>[A-Za-z0-9]+))?$")
TR_S = 1.49   # CNeuroMod's: the .h5 files do not hold it


def open_h5(path):
    """h5py.File of a readable .h5 file; InputError naming it otherwise."""
    import h5py   # imported here: the stages of the game data do without it

    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise InputError(f"{path}: not a readable .h5 file ({str(err).splitlines()[0]})") from None


def find_runs(root, subjects=None, task=None, with_videos=True):
    """One dict per run of every .h5 file under root (of `subjects`, and of the .h5 files of `task`
    or runs of that chunk when given): sub ses task run stem h5 key n_volumes n_parcels, and
    `video` (with_videos: InputError for a run without exactly one). Sorted by stem."""
    root = Path(root)
    files = sorted(root.glob(H5_PATTERN))
    if not files:
        raise InputError(f"{root}: no {H5_PATTERN} (is this the algonauts_2025.competitors "
                         "folder, with its fmri/ downloaded?)")
    runs = {}
    for h5 in files:
        names = common.bids_entities(h5)
        if subjects and names.get("sub") not in subjects:
            continue
        for run in runs_of_file(h5, names):
            if task and task not in (names.get("task"), run["task"]):
                continue
            if run["stem"] in runs:
                raise InputError(f"{h5}: dataset {run['key']} is run {run['stem']} again (also in "
                                 f"{runs[run['stem']]['h5']})")
            runs[run["stem"]] = run
    if not runs:
        raise InputError(f"{root}: no run of subject(s) {' '.join(subjects or ['any'])}"
                         + (f" and task {task}" if task else ""))
    if with_videos:
        videos = video_index(root)
        for run in runs.values():
            run["video"] = video_of(run, videos, root)
    return [runs[stem] for stem in sorted(runs)]


def runs_of_file(h5, names):
    """The runs of one .h5 file, from its datasets' names and shapes (no data read)."""
    runs = []
    with open_h5(h5) as f:
        for key in f:
            match = DATASET_NAME.match(key)
            if match is None or not hasattr(f[key], "shape"):
                raise InputError(f"{h5}: {key} is not a run's dataset (ses-<session>_task-<chunk>"
                                 "[_run-<n>], as the release names them)")
            if len(f[key].shape) != 2 or f[key].shape[0] < 2:
                raise InputError(f"{h5}: dataset {key} has shape {f[key].shape}, not (volumes, "
                                 "parcels)")
            labels = dict(sub=names["sub"], ses=match["ses"], task=match["task"], run=match["run"])
            runs.append(dict(labels, stem=run_stem(**labels), h5=h5, key=key,
                             h5_task=names.get("task"), n_volumes=int(f[key].shape[0]),
                             n_parcels=int(f[key].shape[1])))
    return runs


def video_index(root):
    """{stem: [paths]} of the videos under root/stimuli/movies."""
    index = {}
    for path in sorted((Path(root) / MOVIES).rglob("*")):
        if video_frames.is_video(path):
            index.setdefault(path.name.split(".")[0], []).append(path)
    return index


def video_of(run, videos, root):
    """The one video of a run: stem <chunk> or <the .h5's task>_<chunk>; InputError otherwise."""
    found = videos.get(run["task"], []) + videos.get(f"{run['h5_task']}_{run['task']}", [])
    if len(found) != 1:
        what = "no video" if not found else f"{len(found)} videos ({', '.join(map(str, found))})"
        raise InputError(f"{run['h5']}: dataset {run['key']} has {what} under {Path(root) / MOVIES}"
                         f" named {run['task']}.mkv or {run['h5_task']}_{run['task']}.mkv")
    return found[0]


def read_run(run):
    """float32 (volumes, parcels) of a run's dataset, as released; InputError naming the file and
    the dataset for values that are not finite."""
    with open_h5(run["h5"]) as f:
        try:
            data = np.asarray(f[run["key"]][()], dtype=np.float32)
        except (OSError, ValueError, TypeError) as err:
            raise InputError(f"{run['h5']}: dataset {run['key']} cannot be read as numbers "
                             f"({str(err).splitlines()[0]})") from None
    bad = ~np.isfinite(data).all(axis=1)
    if bad.any():
        raise InputError(f"{run['h5']}: dataset {run['key']} has {int(bad.sum())} row(s) with "
                         f"NaN or infinite values (first: volume {int(np.argmax(bad))})")
    return data


def subject_atlas(root, sub):
    """The path of a subject's atlas NIfTI; InputError unless there is exactly one."""
    pattern = ATLAS_PATTERN.format(sub=sub)
    found = sorted(Path(root).glob(pattern))
    if len(found) != 1:
        raise InputError(f"{root}: {len(found)} files match {pattern}, one expected (the "
                         "subject's atlas)")
    return found[0]


def check_columns(runs, labels, atlas_path):
    """Each run's columns must be the atlas's parcels, one each."""
    for run in runs:
        if run["n_parcels"] != len(labels):
            raise InputError(f"{run['h5']}: dataset {run['key']} has {run['n_parcels']} parcels, "
                             f"its subject's atlas {atlas_path} {len(labels)}")


def runs_to_write(runs, paths, stage, settings, overwrite, say=print):
    """[(run, its output, the inputs of its record)] of the runs whose output is not up to date;
    each .h5 file is fingerprinted once (its sha256 is read from a record that vouches for it)."""
    fingerprints, todo = {}, []
    for run, out in zip(runs, paths):
        record = common.read_record(common.record_path(out))
        if run["h5"] not in fingerprints:
            known = (record or {}).get("inputs", {}).get("h5")
            fingerprints[run["h5"]] = common.fingerprint(run["h5"], known)
        inputs = {"h5": fingerprints[run["h5"]], "dataset": run["key"]}
        if not common.is_up_to_date(out, record, stage, settings, inputs, overwrite, say=say):
            todo.append((run, out, inputs))
    return todo


def write_run(run, out, stage, settings, inputs, tr):
    """A run's parcel time series, float32 (volumes, parcels) as released, to `out` and its
    record."""
    common.save_npy(out, read_run(run))
    common.write_record(out, common.new_record(stage, settings, inputs, out, tr_s=tr,
                                               h5=str(run["h5"]), dataset=run["key"]))
