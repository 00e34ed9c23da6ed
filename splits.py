"""The one split of the pipeline (beyond the paper's fixed sessions): which runs train, validate and
test, chosen once by 02_prep_fmri.py (by session, the paper's 2.1.4: sessions 004 and 005; by run; by
task; or a file you edit) and written to bold/splits.tsv, which 03 and 04 (they never train on a test
run) and 06 read.
"""
import fnmatch
import sys
from pathlib import Path

import common
from common import InputError, write_tsv


SPLIT_DEFAULTS = {"test": common.DEFAULT_TEST_SESSIONS,
                  "validation": common.DEFAULT_VALIDATION_SESSIONS}
# --algonauts: Friends seasons 1-5 (and movie10) train, season 6 test, as the challenge held out a
# season (its 7th, whose fMRI is not released)
ALGONAUTS_SPLIT = {"test": ("s06e*",), "validation": ()}
SPLIT_ENTITY = {"sessions": "ses", "runs": "run", "tasks": "task"}


def add_split_arguments(parser):
    """The flags that choose the split: by session (the default), by run, or a file."""
    group = parser.add_argument_group(
        "split (one way: sessions, runs or a file; written to bold/splits.tsv, which 03-06 "
        "follow; without these flags an existing bold/splits.tsv is kept, edits included)")
    for role in ("test", "validation"):
        group.add_argument(f"--{role}-sessions", nargs="*", default=None, type=common.session_flag,
                           help=f"sessions of the {role} split (default "
                                f"{' '.join(SPLIT_DEFAULTS[role])}; no value: none)")
    for role in ("test", "validation"):
        group.add_argument(f"--{role}-runs", nargs="*", default=None, type=common.run_flag,
                           help=f"run labels of the {role} split, in every session (e.g. 03; "
                                "no value: none)")
    for role in ("test", "validation"):
        group.add_argument(f"--{role}-tasks", nargs="*", default=None, metavar="PATTERN",
                           help=f"task labels of the {role} split, shell patterns (movies: "
                                f"'s06e*' for Friends season 6, 'wolf*'; default with --algonauts"
                                f": {' '.join(ALGONAUTS_SPLIT[role]) or 'none'})")
    group.add_argument("--splits", metavar="TSV",
                       help="the split of every run from a file: columns sub ses task run split "
                            "(train, validation or test), e.g. an edited copy of bold/splits.tsv")


def split_flags(args):
    """{flag: value} of the split flags given on the command line."""
    values = {"--splits": args.splits}
    for kind in SPLIT_ENTITY:
        for role in ("test", "validation"):
            values[f"--{role}-{kind}"] = getattr(args, f"{role}_{kind}")
    return {flag: value for flag, value in values.items() if value is not None}


def check_split_flags(args):
    """InputError when the split flags mix two ways (sessions, runs, a file) or put a label in
    both test and validation."""
    given = split_flags(args)
    if len({flag.split("-")[-1] for flag in given}) > 1:
        raise InputError(f"{' and '.join(given)}: choose one way to split the runs "
                         "(sessions, runs or a --splits file)")
    rule = split_rule(args)
    if "--splits" in rule:
        return
    (test_flag, test), (validation_flag, validation) = rule.items()
    shared = set(map(common.bids_label, test)) & set(map(common.bids_label, validation))
    if shared:
        raise InputError(f"{validation_flag} and {test_flag} share "
                         f"{test_flag.split('-')[-1][:-1]}(s) {' '.join(sorted(shared))}")


def split_rule(args):
    """The split the flags ask for, as it is recorded: {"--splits": path}, or the labels of each
    role by run or by session (the default), e.g. {"--test-sessions": ["005"], ...}."""
    if args.splits is not None:
        return {"--splits": str(Path(args.splits).resolve())}
    given_kinds = [kind for kind in SPLIT_ENTITY if any(
        getattr(args, f"{role}_{kind}") is not None for role in ("test", "validation"))]
    kind = given_kinds[0] if given_kinds else "tasks" if args.algonauts else "sessions"
    defaults = {"sessions": SPLIT_DEFAULTS, "tasks": ALGONAUTS_SPLIT}.get(kind, {})
    rule = {}
    for role in ("test", "validation"):
        given = getattr(args, f"{role}_{kind}")
        rule[f"--{role}-{kind}"] = list(defaults.get(role, ()) if given is None else given)
    return rule


def plan_splits(args, runs, out_dir):
    """(the split rule, {run key: split} of `runs`: a DataFrame of sub ses task run). Split flags
    split every run; without them, bold/splits.tsv is kept (a hand edit too) and the rule it was
    made with splits the runs it does not list. A label asked for that names no run is an
    InputError (a warning or a note for a default); subjects without a test run are said."""
    given, path = split_flags(args), out_dir / "splits.tsv"
    rule, kept = split_rule(args), {}
    if not given and path.is_file():
        table = common.read_splits(path)
        kept = dict(zip(table.apply(common.run_key, axis=1), table["split"]))
        rule = (common.read_record(common.record_path(path)) or {}).get("settings") or rule
    keys = runs.apply(common.run_key, axis=1)
    new = runs[~keys.isin(kept)]
    split = keys.map(kept).astype(object)
    if "--splits" in rule:
        split[new.index] = split_from_file(Path(rule["--splits"]), new)
    else:
        for flag, labels in rule.items():
            role, kind = flag[2:].split("-")
            entity = new[SPLIT_ENTITY[kind]]
            check_labels_exist(flag, labels, entity, explicit=flag in given)
            chosen = entity.map(lambda value: any(label_matches(label, value) for label in labels))
            split[chosen[chosen].index] = role
        split = split.fillna("train")
    for role in ("train", "test"):
        for sub in sorted(set(runs["sub"]) - set(runs["sub"][split == role])):
            print(f"note: sub-{sub}: no {role} run in this split: 06 will skip it",
                  file=sys.stderr)
    return rule, dict(zip(keys, split))


def check_labels_exist(flag, labels, found, explicit):
    """A label of --{role}-{kind} that names none of the runs (`found`: their labels of that
    entity) is an InputError when `explicit`, else (a default) a warning for test, a note for
    validation."""
    missing = [label for label in labels
               if not any(label_matches(label, value) for value in found)]
    if not missing or found.empty:
        return
    entity = flag.split("-")[-1][:-1]
    values = sorted(set(found.dropna()))
    found_text = ", ".join(values[:12]) + (f" ... ({len(values)})" if len(values) > 12 else "") \
        or "none"
    message = (f"{flag} {' '.join(missing)}{'' if explicit else ' (the default)'}: no run has "
               f"that {entity} ({entity}s found: {found_text})")
    if explicit:
        raise InputError(message)
    if flag.startswith("--validation"):
        print(f"note: {message}: no validation run", file=sys.stderr)
        return
    print(f"warning: {message}: every run is train or validation, and 06 finds no test run; "
          "choose them with --test-sessions, --test-runs or --splits", file=sys.stderr)


def label_matches(label, value):
    """Whether a split flag's label names a run's: as common.bids_label compares them ('005' is
    'ses-005' and 5), or as a shell pattern ('s06e*', for --*-tasks)."""
    return (common.bids_label(label) == common.bids_label(value)
            or fnmatch.fnmatchcase(str(value), str(label)))


def split_from_file(path, runs):
    """The split of each of `runs` (a Series like it) from a user's splits file: every run needs
    a row."""
    table = common.read_splits(path)
    split_of = dict(zip(table.apply(common.run_key, axis=1), table["split"]))
    keys = runs.apply(common.run_key, axis=1)
    missing = runs[~keys.isin(split_of)]
    if len(missing):
        row = missing.iloc[0]
        raise InputError(f"{path}: no row for run "
                         f"{common.run_stem(*(row[k] for k in common.RUN_ENTITIES))}, one of "
                         f"{len(missing)} run(s) it does not list")
    return keys.map(split_of)


def check_splits_file(out_dir, splits, args):
    """Refuse to replace a bold/splits.tsv edited by hand since 02 wrote it with the other split
    that the flags make: 03-06 follow that file, so an edit is dropped on purpose only (delete
    the file) and kept with --splits."""
    path = out_dir / "splits.tsv"
    if not split_flags(args) or args.splits is not None or not path.is_file():
        return
    written = (common.read_record(common.record_path(path)) or {}).get("output", {})
    if written.get("sha256") == common.file_sha256(path):
        return
    edited = common.read_splits(path)
    if dict(zip(edited.apply(common.run_key, axis=1), edited["split"])) != splits:
        raise InputError(f"{path}: edited since 02 wrote it, and the split flags make another "
                         f"split: keep the edit with --splits {path}, or delete the file to make "
                         "it from the flags")


def write_splits(out_dir, manifest, rule):
    """bold/splits.tsv (sub ses task run split, one row per run of the manifest) and its record,
    bold/splits.json (the split rule; the --splits file), unless the file already holds that
    split: a hand edit that 02 kept stays as the user wrote it."""
    path = out_dir / "splits.tsv"
    table = manifest[[*common.RUN_ENTITIES, "split"]]
    if path.is_file():
        current = common.read_splits(path)
        record = common.read_record(common.record_path(path)) or {}
        if (record.get("settings") == rule and dict(zip(current.apply(common.run_key, axis=1),
                                                        current["split"]))
                == dict(zip(table.apply(common.run_key, axis=1), table["split"]))):
            return
    write_tsv(path, table)
    inputs = {"splits_file": common.hash_file(rule["--splits"])} if "--splits" in rule else {}
    common.write_record(path, common.new_record("02_prep_fmri", rule, inputs, path))
