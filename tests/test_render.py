"""01_render_frames.py: exact replays, the resize, the manifest, and bad input."""
import shutil
import subprocess
import zipfile

import numpy as np
import pandas as pd
import pytest
import stable_retro as retro

import common
from conftest import load_stage, needs_namespaces, run_confined, run_script

render = load_stage("01_render_frames.py")
GAME = "Airstriker-Genesis-v0"


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A bk2 recorded here with stable-retro's own API, the screens the player saw (N, 224, 320, 3)
    and the actions passed to env.step() (N, 12)."""
    folder = tmp_path_factory.mktemp("rec")
    env = retro.make(game=GAME, render_mode=None, use_restricted_actions=retro.Actions.ALL)
    env.auto_record(str(folder))
    env.reset()
    rng = np.random.default_rng(1)
    screens, actions = [], rng.integers(0, 2, (240, len(env.buttons)))
    for action in actions:
        screen, *_ = env.step(action)
        screens.append(screen.copy())
    env.stop_record()
    env.close()
    (bk2,) = folder.glob("*.bk2")
    return bk2, np.stack(screens), actions


def box_average(image, size):
    """Independent reference for the squash: output pixel o is the plain mean of the input pixels whose
    centres fall inside its footprint (o, o + 1] * (n_in / n_out) along each axis (PIL breaks ties at
    footprint edges towards the left output pixel)."""
    def weights(n_in, n_out):
        edges = np.linspace(0, n_in, n_out + 1)
        centres = np.arange(n_in) + 0.5
        w = ((centres > edges[:-1, None]) & (centres <= edges[1:, None])).astype(float)  # (n_out, n_in)
        return w / w.sum(1, keepdims=True)
    wy, wx = weights(image.shape[0], size), weights(image.shape[1], size)
    return np.einsum("oi,ijc,pj->opc", wy, image.astype(float), wx, optimize=True)  # two products, not one 5-loop


def test_replay_is_exact_and_repeatable(recording):
    bk2, screens, actions = recording
    frames, buttons, names = render.replay(bk2, 64)
    assert frames.shape == (len(screens), 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, render.replay(bk2, 64).frames)
    # row i of the inputs is the action that made frame i; the columns have stable-retro's names
    assert buttons.dtype == np.uint8 and names == retro.get_system_info("Genesis")["buttons"]
    np.testing.assert_array_equal(buttons, actions)
    # The frames are what the player saw, squashed: replay reproduces the recorded session exactly.
    expected = np.stack([render.squash(s, 64) for s in screens])
    np.testing.assert_array_equal(frames, expected)
    assert frames.std() > 10  # not a blank screen


def test_squash_is_a_box_average(recording):
    _, screens, _ = recording
    for size in (64, 128):
        ours = render.squash(screens[100], size).astype(float)
        assert np.abs(ours - box_average(screens[100], size)).max() <= 1.0


def test_frames_on_disk_match_replay(tmp_path, recording):
    bk2, screens, actions = recording
    result = run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution", "32")
    manifest = pd.read_csv(tmp_path / "frames/manifest.tsv", sep="\t", dtype={"sub": str})
    assert manifest["status"].tolist() == ["ok"] and manifest["n_frames"].tolist() == [len(screens)]
    frames = np.load(tmp_path / manifest["frames_path"][0])
    np.testing.assert_array_equal(frames, render.replay(bk2, 32).frames)
    np.testing.assert_array_equal(np.load(tmp_path / manifest["buttons_path"][0]), actions)
    assert "1 ok" in result.stdout


def test_manifest_agrees_with_events(rendered_work):
    demo = rendered_work / "demo"
    manifest = pd.read_csv(rendered_work / "frames/manifest.tsv", sep="\t", dtype=str, keep_default_na=False)
    rows = []
    for events_path in sorted(demo.glob("sub-*/ses-*/func/*_events.tsv")):
        events = pd.read_csv(events_path, sep="\t")
        sub, ses, task, run = (part.split("-")[1] for part in events_path.name.split("_")[:4])
        for _, event in events.iterrows():
            rows.append((sub, ses, task, run, event["onset"], event["duration_bk2"], event["stim_file"]))
    assert len(manifest) == len(rows)
    for (_, m), (sub, ses, task, run, onset, duration, stim) in zip(manifest.iterrows(), rows):
        assert (m["sub"], m["ses"], m["task"], m["run"]) == (sub, ses, task, run)
        assert float(m["onset_s"]) == pytest.approx(onset)
        if stim == "Missing file":
            assert m["status"] == "missing" and m["frames_path"] == "n/a" and "Missing file" in m["error"]
        else:
            assert m["status"] == "ok" and m["bk2"].endswith(stim)
            assert int(m["n_frames"]) == round(duration * 60)
            frames = np.load(rendered_work / m["frames_path"], mmap_mode="r")
            assert frames.shape == (int(m["n_frames"]), 32, 32, 3)


def test_rerun_skips_other_resolution_fails_and_overwrite_rerenders(tmp_path, recording):
    bk2, *_ = recording
    run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution", "16")
    npy = tmp_path / "frames/sub-unknown/ses-unknown/Airstriker-Genesis-v0-Level1-000000.npy"
    stamp, manifest = npy.stat().st_mtime_ns, (tmp_path / "frames/manifest.tsv").read_text()
    run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution", "16")
    assert npy.stat().st_mtime_ns == stamp
    # frames of another resolution are not silently kept
    result = run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution", "24", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: {npy}: made with --resolution 16, not 24: pass the same flags, or "
                                     "--overwrite to redo it")
    assert npy.stat().st_mtime_ns == stamp and (tmp_path / "frames/manifest.tsv").read_text() == manifest
    # frames cut short (a full disk, a bad copy) and a killed run's temporary file: repaired by a re-run
    rendered = np.load(npy)
    npy.write_bytes(npy.read_bytes()[:5000])
    dead = subprocess.Popen(["true"])   # a process that has ended: its temporary files are garbage
    dead.wait()
    stale = npy.with_name(f".{npy.name}.tmp-{common.HOST}-{dead.pid}.npy")
    foreign = npy.with_name(f".{npy.name}.tmp-othermachine-{dead.pid}.npy")   # maybe still being written
    stale.write_bytes(b"x"), foreign.write_bytes(b"x")
    repaired = run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution", "16")
    assert "changed since it was made (damaged?)" in repaired.stdout
    np.testing.assert_array_equal(np.load(npy), rendered)
    assert not stale.exists() and foreign.exists()
    foreign.unlink()
    run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution", "24", "--overwrite")
    assert npy.stat().st_mtime_ns != stamp and np.load(npy).shape[1:] == (24, 24, 3)
    buttons = npy.with_suffix(".buttons.npy")
    assert sorted(p.name for p in npy.parent.iterdir()) == sorted(
        [npy.name, npy.with_suffix(".json").name, buttons.name])
    record = common.read_record(npy.with_suffix(".json"))   # no temporary file left behind; the record:
    assert record["settings"] == {"--resolution": 24} and record["n_frames"] == len(rendered)
    assert record["inputs"]["bk2"]["sha256"] == common.file_sha256(bk2)
    # the same record covers the inputs (their column names, their bytes): deleted, made again
    assert record["buttons"] == retro.get_system_info("Genesis")["buttons"]
    assert record["outputs"][buttons.name]["sha256"] == common.file_sha256(buttons)
    buttons.unlink()
    again = run_script("01_render_frames.py", "--work", tmp_path, "--bk2", bk2, "--resolution",
                       "24")
    assert f"{buttons} is missing" in again.stdout and np.load(buttons).shape == (len(rendered), 12)


def test_subjects_rendered_in_separate_calls_share_one_manifest(tmp_path, recording):
    bk2, *_ = recording
    replays = {}
    for sub in ("01", "02"):
        replays[sub] = tmp_path / f"sub-{sub}_ses-001_task-x_run-01_level-1_rep-01.bk2"
        shutil.copy(bk2, replays[sub])
    replays["03"] = tmp_path / "sub-03_ses-001_task-x_run-01_level-1_rep-01.bk2"
    replays["03"].write_bytes(bk2.read_bytes()[:3000])  # a truncated replay: a failed row
    together, apart = tmp_path / "together", tmp_path / "apart"
    flags = ("--resolution", "16")
    assert run_script("01_render_frames.py", "--work", together, "--bk2", *replays.values(), *flags,
                      check=False).returncode == 1
    # each later call keeps the rows of the others; sub-03's failure fails only its own call
    assert run_script("01_render_frames.py", "--work", apart, "--bk2", replays["03"], *flags,
                      check=False).returncode == 1
    for sub in ("02", "01"):
        run_script("01_render_frames.py", "--work", apart, "--bk2", replays[sub], *flags)
    assert (apart / "frames/manifest.tsv").read_text() == (together / "frames/manifest.tsv").read_text()
    manifest = pd.read_csv(apart / "frames/manifest.tsv", sep="\t", dtype={"sub": str})
    assert manifest["sub"].tolist() == ["01", "02", "03"]
    assert manifest["status"].tolist() == ["ok", "ok", "failed"]


def test_bad_replays_are_reported_and_the_batch_goes_on(tmp_path, recording):
    bk2, *_ = recording
    good = tmp_path / "sub-01_ses-001_task-x_run-01_level-1_rep-01.bk2"
    shutil.copy(bk2, good)
    truncated = tmp_path / "sub-01_ses-001_task-x_run-01_level-1_rep-02.bk2"
    truncated.write_bytes(bk2.read_bytes()[:3000])
    no_rom = tmp_path / "sub-01_ses-001_task-x_run-01_level-1_rep-03.bk2"
    with zipfile.ZipFile(bk2) as src, zipfile.ZipFile(no_rom, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename == "Header.txt":
                data = data.replace(b"Airstriker-Genesis-v0", b"ShinobiIIIReturnOfTheNinjaMaster-Genesis-v0")
            dst.writestr(item, data)
    absent = tmp_path / "sub-01_ses-001_task-x_run-01_level-1_rep-04.bk2"
    work = tmp_path / "work"
    result = run_script("01_render_frames.py", "--work", work, "--resolution", "16", "--workers", "2",
                        "--bk2", good, truncated, no_rom, absent, check=False)
    assert result.returncode == 1
    manifest = pd.read_csv(work / "frames/manifest.tsv", sep="\t", dtype={"rep": str})
    assert manifest["status"].tolist() == ["ok", "failed", "failed", "failed"]
    errors = manifest["error"].tolist()
    assert errors[1] == f"{truncated}: corrupt or truncated bk2 (stable-retro could not load the movie)"
    assert errors[2] == (f"{no_rom}: the ROM of ShinobiIIIReturnOfTheNinjaMaster-Genesis-v0 is not imported "
                         "into stable-retro; import it with `python -m stable_retro.import DIR_WITH_ROMS`")
    assert errors[3] == f"{absent}: file not found"
    for message in errors[1:]:
        assert f"failed: {message}" in result.stderr
    assert (work / manifest["frames_path"][0]).is_file()
    assert sorted(p.name for p in (work / "frames").rglob("*.npy")) == [
        good.with_suffix(".buttons.npy").name, good.with_suffix(".npy").name]
    accepted = run_script("01_render_frames.py", "--work", work, "--resolution", "16", "--allow-missing",
                          "--bk2", good, truncated, check=False)
    assert accepted.returncode == 0


def test_bad_dataset_root(tmp_path):
    result = run_script("01_render_frames.py", "--work", tmp_path, "--bids", tmp_path / "nope", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'}: dataset root does not exist " \
                                    "(run 00_make_demo.py, or pass --bids DIR)"
    (tmp_path / "empty").mkdir()
    result = run_script("01_render_frames.py", "--work", tmp_path, "--bids", tmp_path / "empty", check=False)
    assert result.returncode == 2 and "no sub-*/ses-*/func/*_events.tsv" in result.stderr
    assert not (tmp_path / "frames").exists()


def test_onset_na_in_events_is_an_error_before_anything_is_rendered(tmp_path, recording):
    bk2, *_ = recording
    func = tmp_path / "bids/sub-01/ses-001/func"
    func.mkdir(parents=True)
    shutil.copy(bk2, tmp_path / "bids/sub-01_ses-001_task-x_run-01_level-1_rep-01.bk2")
    events = func / "sub-01_ses-001_task-x_run-01_events.tsv"
    events.write_text("trial_type\tonset\tduration\tstim_file\n"
                      "gym-retro_game\tn/a\t4.0\tsub-01_ses-001_task-x_run-01_level-1_rep-01.bk2\n")
    result = run_script("01_render_frames.py", "--work", tmp_path / "work", "--bids", tmp_path / "bids", check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {events}: row 1 (sub-01_ses-001_task-x_run-01_level-1_rep-01.bk2) has onset n/a; every gameplay "
        "row needs its onset in seconds")
    assert not (tmp_path / "work/frames").exists()


@needs_namespaces
def test_read_only_work_and_full_disk(tmp_path, recording):
    bk2, *_ = recording
    work = tmp_path / "work"
    work.mkdir()
    result, _ = run_confined("01_render_frames.py", "--work", work, "--bk2", bk2, "--resolution", "16",
                             read_only=work)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {work / 'frames'}: Read-only file system"
    # 240 frames of 16 x 16 x 3 need 180 kB: the disk is full at once, and the frames file says so
    result, left = run_confined("01_render_frames.py", "--work", work, "--bk2", bk2, "--resolution", "16",
                                full=work / "frames", full_bytes=64 * 1024)
    assert result.returncode == 2
    npy = work / "frames/sub-unknown/ses-unknown/Airstriker-Genesis-v0-Level1-000000.npy"
    assert result.stderr.strip().splitlines()[-1] == f"error: {npy}: cannot write it (No space left on device)"
    assert left == []                                    # its temporary file does not hold the space
    run_script("01_render_frames.py", "--work", work, "--bk2", bk2, "--resolution", "16")   # with room: done
    assert np.load(npy).shape == (240, 16, 16, 3)


def test_stim_file_is_found_under_the_dataset_root_not_the_current_directory(tmp_path, monkeypatch):
    """Another copy of the dataset in the current directory must not stand in for the one given."""
    stim = "sub-01/ses-001/gamelogs/x.bk2"
    root, elsewhere = tmp_path / "dataset", tmp_path / "copy"
    for base in (root, elsewhere):
        (base / stim).parent.mkdir(parents=True)
        (base / stim).write_bytes(b"bk2")
    events = root / "sub-01/ses-001/func/sub-01_ses-001_task-x_run-01_events.tsv"
    monkeypatch.chdir(elsewhere)
    assert render.resolve_stim_file(stim, root, events) == root / stim
    assert render.resolve_stim_file(str(elsewhere / stim), root, events) == elsewhere / stim   # absolute: as given
