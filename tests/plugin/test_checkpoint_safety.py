"""Checkpoints a user may have been handed: never unpickled, checksummed, refused by name when corrupt or truncated;
resume without a checkpoint is an error (or, with resume="auto", a fresh start); metrics log each step once."""

from __future__ import annotations

import hashlib
import json
import shutil
import zipfile

import pytest
from conftest import tiny_train_config
import torch

import mmloader

pytest.importorskip("open_clip")

from imu2clip_plugin import checkpoint as checkpoint_mod  # noqa: E402
from imu2clip_plugin import train as train_mod  # noqa: E402
from imu2clip_plugin.cli import main  # noqa: E402
from imu2clip_plugin.train import (  # noqa: E402
    CHECKPOINT_NAME, METRICS_NAME, CheckpointError, RunDirInUseError, TrainConfig, TrainSetupError, checksum_path,
    load_checkpoint, save_checkpoint, train)



class _Killed(Exception):
    """Stands for the process dying at that point."""


class _OpensAFile:
    """Unpickling this calls ``open(path, "w")``: the file appears iff pickled code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def store(sample_store):
    return sample_store(videos=4, seconds=16, seed=2, defect_fraction=0.0)


@pytest.fixture(scope="module")
def windows(store):
    return mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))


def _cfg(run_dir, **kw):
    return tiny_train_config(run_dir, **{"use_cache": False, "device": "cpu", "max_steps": 8, **kw})


@pytest.fixture(scope="module")
def interrupted(windows, tmp_path_factory):
    """A run dir checkpointed mid-epoch at step 3 (stop_after_steps)."""
    d = tmp_path_factory.mktemp("runs") / "cut"
    out = train(_cfg(d, stop_after_steps=3), windows=windows)
    assert out["stopped_early"] and out["step"] == 3
    return d


@pytest.fixture
def run_dir(interrupted, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(interrupted, d)
    return d


def _write_record(ckpt):
    data = ckpt.read_bytes()
    checksum_path(ckpt).write_text(json.dumps({"file": ckpt.name, "size": len(data),
                                               "sha256": hashlib.sha256(data).hexdigest(), "step": 3,
                                               "format_version": 2}))


def _largest_tensor_record(path):
    """(offset, length) of the biggest tensor storage inside a torch.save zip (stored uncompressed)."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    off = info.header_offset
    assert raw[off:off + 4] == b"PK\x03\x04" and info.compress_type == zipfile.ZIP_STORED
    start = off + 30 + int.from_bytes(raw[off + 26:off + 28], "little") + int.from_bytes(raw[off + 28:off + 30], "little")
    return start, info.file_size


# -- format -------------------------------------------------------------------------------------------
def test_checkpoint_is_plain_values_with_a_matching_checksum(run_dir):
    ckpt = run_dir / CHECKPOINT_NAME
    ck = torch.load(ckpt, weights_only=True)          # would raise on anything pickled beyond plain values
    assert ck["step"] == 3 and ck["format_version"] == 2
    assert isinstance(ck["rng"]["numpy"]["key"], torch.Tensor) and isinstance(ck["rng"]["python"]["state"], list)
    rec = json.loads(checksum_path(ckpt).read_text())
    data = ckpt.read_bytes()
    assert rec["file"] == CHECKPOINT_NAME and rec["size"] == len(data) and rec["step"] == 3
    assert rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert not list(run_dir.glob("*.partial")) and not list(run_dir.glob("*.tmp*"))
    assert load_checkpoint(ckpt)["loader"]["offset"] == 24


# -- hostile and damaged checkpoints --------------------------------------------------------------------
def test_a_checkpoint_whose_pickle_opens_a_file_is_refused_and_runs_nothing(run_dir, tmp_path, capsys):
    ckpt = run_dir / CHECKPOINT_NAME
    ck = torch.load(ckpt, weights_only=True)
    # the payload is live: an unsafe load of the same bytes creates the file
    probe = tmp_path / "probe"
    torch.save({**ck, "x": _OpensAFile(probe)}, tmp_path / "probe.pt")
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()
    # the attacker controls the whole run dir: a matching checksum record comes with the crafted file
    marker = tmp_path / "pwned"
    torch.save({**ck, "x": _OpensAFile(marker)}, ckpt)
    _write_record(ckpt)
    with pytest.raises(CheckpointError, match="refusing to load.*more than tensors and plain values") as e:
        train(_cfg(run_dir, resume=True))
    assert str(ckpt) in str(e.value) and "\x1b" not in str(e.value)   # torch's bold/colour codes stripped
    assert not marker.exists()
    # the CLI's --resume takes the same path (it fails before any data is opened): one line naming the file
    capsys.readouterr()
    rc = main(["train", "--config", "imu_video", "--set", f"run_dir={run_dir}", "--set", "progress=false",
               "--set", "device=cpu", "--resume"])
    err = capsys.readouterr().err
    assert rc == 1 and "refusing to load" in err and str(ckpt) in err and len(err.strip().splitlines()) == 1
    assert "\x1b" not in err
    assert not marker.exists()


def test_one_flipped_byte_in_tensor_data_is_refused_by_name(run_dir):
    ckpt = run_dir / CHECKPOINT_NAME
    good = torch.load(ckpt, weights_only=True)
    start, n = _largest_tensor_record(ckpt)
    raw = bytearray(ckpt.read_bytes())
    raw[start + n // 2] ^= 0x40
    ckpt.write_bytes(bytes(raw))
    # torch alone would load it (different numbers, no error): only the checksum catches it
    bad = torch.load(ckpt, weights_only=True)
    assert any(not torch.equal(a, b) for a, b in zip(_tensors(bad), _tensors(good)))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        train(_cfg(run_dir, resume=True))
    assert str(ckpt) in str(e.value)
    with pytest.raises(CheckpointError, match="corrupt"):
        train(_cfg(run_dir, resume="auto"))


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def test_a_truncated_checkpoint_is_refused_by_name(run_dir):
    ckpt = run_dir / CHECKPOINT_NAME
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        train(_cfg(run_dir, resume=True))
    assert str(ckpt) in str(e.value) and "PytorchStreamReader" not in str(e.value)


def test_a_checkpoint_without_its_checksum_record_is_refused(run_dir):
    checksum_path(run_dir / CHECKPOINT_NAME).unlink()
    with pytest.raises(CheckpointError, match="no checksum record") as e:
        train(_cfg(run_dir, resume="auto"))
    assert str(run_dir / CHECKPOINT_NAME) in str(e.value)


def test_a_truncated_file_with_a_matching_record_is_still_refused_by_name(run_dir):
    """Even when the record was rewritten to match, an unreadable file gives an error naming it."""
    ckpt = run_dir / CHECKPOINT_NAME
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    _write_record(ckpt)
    with pytest.raises(CheckpointError, match="not a readable torch.save file") as e:
        load_checkpoint(ckpt)
    assert str(ckpt) in str(e.value)


# -- nothing to resume ---------------------------------------------------------------------------------
def test_resume_with_no_checkpoint_is_an_error_naming_the_run_dir(tmp_path, capsys):
    d = tmp_path / "empty-run"
    with pytest.raises(CheckpointError, match="nothing to resume") as e:
        train(_cfg(d, resume=True))
    assert str(d) in str(e.value)
    assert not d.exists()            # nothing written beside an old run
    assert main(["train", "--config", "imu_video", "--set", f"run_dir={d}", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "nothing to resume" in err and str(d) in err
    assert not d.exists()


def test_resume_auto_starts_fresh_without_a_checkpoint_and_continues_with_one(windows, tmp_path):
    d = tmp_path / "auto"
    out = train(_cfg(d, resume="auto", stop_after_steps=2), windows=windows)
    assert out["step"] == 2 and load_checkpoint(d / CHECKPOINT_NAME)["step"] == 2
    out = train(_cfg(d, resume="auto", max_steps=3), windows=windows)
    assert out["step"] == 3 and not out["stopped_early"]
    steps = [r["step"] for r in _metrics(d) if r["event"] == "train"]
    assert steps == [1, 2, 3]
    # starting afresh in the same run dir (overwrite) begins a new metrics.jsonl (not steps 1.. after the old ones)
    train(_cfg(d, stop_after_steps=1, overwrite=True), windows=windows)
    assert [r["step"] for r in _metrics(d) if r["event"] == "train"] == [1]


def test_resume_in_config_json_and_cli(tmp_path, capsys):
    cfg = TrainConfig(resume="auto")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).resume == "auto"
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig(resume=True).to_dict()))).resume is True
    with pytest.raises(ValueError, match="resume"):
        TrainConfig(resume="yes")
    for flag, want in ((["--resume"], True), (["--resume", "auto"], "auto"), ([], False)):
        assert main(["train", "--config", "imu_video", *flag, "--print-config"]) == 0
        assert json.loads(capsys.readouterr().out)["resume"] == want
    with pytest.raises(SystemExit):
        main(["train", "--config", "imu_video", "--resume", "always", "--print-config"])


# -- metrics -------------------------------------------------------------------------------------------
def _metrics(d):
    return [json.loads(x) for x in (d / METRICS_NAME).read_text().splitlines()]


def test_metrics_log_each_step_once_after_a_crash_and_resume(windows, tmp_path, monkeypatch):
    """A run killed while writing its final checkpoint has logged steps past its last (epoch-end) checkpoint; the
    resumed run rewrites them: every train step once, val steps increasing, one end record."""
    d = tmp_path / "crash"
    real = train_mod.save_checkpoint

    def killed_at_8(state, path):
        if state["step"] == 8:
            raise _Killed("killed")
        return real(state, path)

    monkeypatch.setattr(train_mod, "save_checkpoint", killed_at_8)
    with pytest.raises(_Killed):
        train(_cfg(d), windows=windows)
    monkeypatch.undo()
    ck_step = load_checkpoint(d / CHECKPOINT_NAME)["step"]
    logged = [r["step"] for r in _metrics(d) if r["event"] == "train"]
    assert 0 < ck_step < 8 and logged == list(range(1, 9))   # steps past the checkpoint were logged
    out = train(_cfg(d, resume=True), windows=windows)
    assert out["step"] == 8
    recs = _metrics(d)
    assert [r["step"] for r in recs if r["event"] == "train"] == list(range(1, 9))
    vals = [r["step"] for r in recs if r["event"] == "val"]
    assert vals == sorted(set(vals)) and vals[0] == 0 and vals[-1] == 8
    assert [r["event"] for r in recs].count("end") == 1 and recs[-1]["event"] == "end"


def test_metrics_after_stop_and_resume_have_no_duplicate_steps(run_dir, windows):
    out = train(_cfg(run_dir, resume=True), windows=windows)
    assert out["step"] == 8
    recs = _metrics(run_dir)
    train_steps = [r["step"] for r in recs if r["event"] == "train"]
    assert train_steps == list(range(1, 9))
    vals = [r["step"] for r in recs if r["event"] == "val"]
    assert vals == sorted(set(vals))
    assert [r["event"] for r in recs].count("end") == 1      # the interrupted run's end record is gone
    # resuming the finished run again validates nothing twice
    train(_cfg(run_dir, resume=True), windows=windows)
    again = _metrics(run_dir)
    assert [r for r in again if r["event"] != "end"] == [r for r in recs if r["event"] != "end"]


# -- crash-safe saving ---------------------------------------------------------------------------------
def test_a_save_interrupted_at_any_point_never_serves_a_mismatched_pair(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint({"format_version": 2, "step": 1, "w": torch.zeros(64)}, path)

    # killed before the checksum record is committed: the previous pair is intact
    def die(*a, **k):
        raise _Killed

    monkeypatch.setattr(checkpoint_mod, "atomic_write", die)
    with pytest.raises(_Killed):
        save_checkpoint({"format_version": 2, "step": 2, "w": torch.ones(64)}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1

    # killed after the record, before the data's rename: the next load completes the save
    real_replace = checkpoint_mod.os.replace

    def replace_but_not_the_checkpoint(src, dst):
        if str(dst) == str(path):
            raise _Killed
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_mod.os, "replace", replace_but_not_the_checkpoint)
    with pytest.raises(_Killed):
        save_checkpoint({"format_version": 2, "step": 3, "w": torch.full((64,), 3.0)}, path)
    monkeypatch.undo()
    assert json.loads(checksum_path(path).read_text())["step"] == 3
    ck = load_checkpoint(path)
    assert ck["step"] == 3 and torch.equal(ck["w"], torch.full((64,), 3.0))
    assert not path.with_name(path.name + ".partial").exists()

    # a record and data from different saves: refused
    other = tmp_path / "other.pt"
    save_checkpoint({"format_version": 2, "step": 4, "w": torch.ones(64)}, other)
    shutil.copy(other, path)
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        load_checkpoint(path)


# -- CLIP tower weights handed to ClipTowers(checkpoint=...) ----------------------------------------------
def test_tower_weights_file_with_a_pickle_payload_is_refused(tmp_path):
    from imu2clip_plugin.towers import ClipTowers, WeightsUnavailableError

    marker = tmp_path / "pwned"
    f = tmp_path / "clip.pt"
    torch.save({"state_dict": {}, "x": _OpensAFile(marker)}, f)
    with pytest.raises(WeightsUnavailableError, match="refusing") as e:
        ClipTowers("imu2clip-tiny", checkpoint=f)
    assert str(f) in str(e.value) and not marker.exists()


# -- hand-made checkpoints with a matching checksum record: contents checked field by field ------------------
def _craft(run_dir, mutate):
    """Rewrite run_dir's checkpoint, changed in place by ``mutate(ck)``, with a matching checksum record."""
    ckpt = run_dir / CHECKPOINT_NAME
    ck = torch.load(ckpt, weights_only=True)
    mutate(ck)
    torch.save(ck, ckpt)
    _write_record(ckpt)
    return ckpt


def _nan_model(ck):
    ck["model"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ck["model"].items()}


def _nan_exp_avg(ck):
    st = next(iter(ck["optimizer"]["state"].values()))
    st["exp_avg"] = torch.full_like(st["exp_avg"], float("inf"))


def _shrunk_model(ck):
    ck["model"] = {k: v[:1] if v.dim() else v for k, v in ck["model"].items()}


def _short_exp_avg(ck):
    st = next(iter(ck["optimizer"]["state"].values()))
    st["exp_avg"] = st["exp_avg"].flatten()[:1]


# (mutation, field named in the message, words in the message); the interrupted run's checkpoint is at step 3 of 8
BAD_CONTENTS = {
    "no model": (lambda ck: ck.pop("model"), "'model'", "missing"),
    "only format_version": (lambda ck: ck.clear() or ck.update(format_version=2), "'model'", "missing"),
    "no step": (lambda ck: ck.pop("step"), "'step'", "missing"),
    "step -5": (lambda ck: ck.update(step=-5), "'step'", ">= 0"),
    "step a string": (lambda ck: ck.update(step="3"), "'step'", "must be an int"),
    "step past the run": (lambda ck: ck.update(step=1000), "'step'", "past this run's 8 steps"),
    "loader offset 10**12": (lambda ck: ck["loader"].update(offset=10 ** 12), "'loader.offset'", "past the"),
    "loader epoch 'x'": (lambda ck: ck["loader"].update(epoch="x"), "'loader.epoch'", "must be an int"),
    "loader without seed": (lambda ck: ck["loader"].pop("seed"), "'loader'", "lacks 'seed'"),
    "loader of other windows": (lambda ck: ck["loader"].update(num_windows=7), "'loader'", "num_windows=7"),
    "rng garbage": (lambda ck: ck.update(rng={"torch": torch.zeros(3), "numpy": 1, "python": "x"}),
                    "'rng.torch'", "uint8 tensor"),
    "python rng short": (lambda ck: ck["rng"]["python"].update(state=[1, 2, 3]), "'rng.python.state'", "624"),
    "numpy rng key floats": (lambda ck: ck["rng"]["numpy"].update(key=torch.zeros(624)), "'rng.numpy.key'",
                             "int64"),
    "NaN weights": (_nan_model, "'model.", "NaN or infinite"),
    "inf optimiser moment": (_nan_exp_avg, "'optimizer.state.", "NaN or infinite"),
    "NaN learning rate": (lambda ck: ck["optimizer"]["param_groups"][0].update(lr=float("nan")),
                          "'optimizer.param_groups[0].lr'", "not a finite number"),
    "model of another shape": (_shrunk_model, "'model'", "does not fit this run's model"),
    "optimiser moment of another shape": (_short_exp_avg, "'optimizer.state.exp_avg'", "has shape"),
    "scheduler behind the step": (lambda ck: ck["scheduler"].update(last_epoch=1), "'scheduler.last_epoch'",
                                  "not the checkpoint's step 3"),
    "scheduler unknown key": (lambda ck: ck["scheduler"].update(optimizer=1), "'scheduler'", "unknown key"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENTS))
def test_hand_made_checkpoint_with_wrong_contents_is_refused_by_file_and_field(case, run_dir, windows):
    mutate, field, words = BAD_CONTENTS[case]
    ckpt = _craft(run_dir, mutate)
    before = {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()}
    with pytest.raises(CheckpointError) as e:
        train(_cfg(run_dir, resume=True), windows=windows)
    msg = str(e.value)
    assert msg.startswith(f"{ckpt}: field {field}") and words in msg, msg
    assert "\n" not in msg and len(msg) - len(str(ckpt)) < 400    # one line, not torch's 47
    # nothing in the run dir was touched: not the checkpoint, not metrics.jsonl, not config.json
    assert {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()} == before


def test_an_untouched_checkpoint_passes_the_content_checks(run_dir, windows):
    """The checks refuse nothing the trainer writes (here re-saved through _craft, so the record is rewritten)."""
    _craft(run_dir, lambda ck: None)
    out = train(_cfg(run_dir, resume=True, max_steps=4), windows=windows)
    assert out["step"] == 4 and all(torch.isfinite(p).all() for p in out["model"].parameters())


# -- a fresh run into a run dir that holds a checkpoint ------------------------------------------------------
def test_a_fresh_run_into_a_run_dir_with_a_checkpoint_is_refused(run_dir, windows, capsys):
    before = {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()}
    with pytest.raises(RunDirInUseError) as e:
        train(_cfg(run_dir), windows=windows)
    assert isinstance(e.value, FileExistsError) and isinstance(e.value, CheckpointError)
    msg = str(e.value)
    assert msg.startswith(f"{run_dir}:") and "--resume" in msg and "--resume auto" in msg and "--overwrite" in msg
    assert "step 3" in msg
    assert {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()} == before
    # a checksum record alone (the data lost) counts too: the run dir is not silently reused
    (run_dir / CHECKPOINT_NAME).unlink()
    with pytest.raises(RunDirInUseError):
        train(_cfg(run_dir), windows=windows)
    # the CLI: one line naming the run dir, exit status 1, before anything is opened
    capsys.readouterr()
    rc = main(["train", "--config", "imu_video", "--set", f"run_dir={run_dir}", "--set", "device=cpu"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and str(run_dir) in err and "--overwrite" in err


def test_overwrite_starts_over_replacing_the_checkpoint_and_metrics(run_dir, windows):
    old_metrics = _metrics(run_dir)
    assert [r["step"] for r in old_metrics if r["event"] == "train"] == [1, 2, 3]
    out = train(_cfg(run_dir, overwrite=True, stop_after_steps=1), windows=windows)
    assert out["step"] == 1
    assert [r["step"] for r in _metrics(run_dir) if r["event"] == "train"] == [1]
    assert load_checkpoint(run_dir / CHECKPOINT_NAME)["step"] == 1
    assert json.loads((run_dir / "config.json").read_text())["overwrite"] is True
    # overwrite on a new run dir is just a fresh run
    out = train(_cfg(run_dir.parent / "new", overwrite=True, stop_after_steps=1), windows=windows)
    assert out["step"] == 1


def test_overwrite_that_fails_before_training_leaves_the_old_run(run_dir, windows):
    before = {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()}
    with pytest.raises(TrainSetupError, match="less than one batch"):
        train(_cfg(run_dir, overwrite=True, batch_size=100000), windows=windows)
    assert {f.name: f.read_bytes() for f in run_dir.iterdir() if f.is_file()} == before


def test_overwrite_and_resume_in_config_and_cli(tmp_path, capsys):
    with pytest.raises(ValueError, match="overwrite"):
        TrainConfig(overwrite=True, resume=True)
    with pytest.raises(ValueError, match="overwrite"):
        TrainConfig(overwrite=True, resume="auto")
    with pytest.raises(ValueError, match="overwrite"):
        TrainConfig(overwrite="yes")
    assert TrainConfig.from_dict(json.loads(json.dumps(TrainConfig(overwrite=True).to_dict()))).overwrite is True
    with pytest.raises(SystemExit):   # argparse: not both
        main(["train", "--config", "imu_video", "--resume", "--overwrite", "--print-config"])
    capsys.readouterr()
    assert main(["train", "--config", "imu_video", "--overwrite", "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["overwrite"] is True and d["resume"] is False
    # the flags override the file: a run's own config.json (overwrite: true) resumes with --resume
    f = tmp_path / "cfg.json"
    f.write_text(json.dumps(d))
    assert main(["train", "--config", str(f), "--resume", "auto", "--print-config"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["overwrite"] is False and d["resume"] == "auto"


# -- the CLI: expected errors are one line, bugs keep their traceback -------------------------------------------
def _cli_train(store, run, *sets):
    return main(["train", "--config", "imu_video", "--set", f"store={store}", "--set", "sec=1", "--set",
                 "stride=0.5", "--set", "size=[32,32]", "--set", "device=cpu", "--set", "use_cache=false",
                 "--set", "progress=false", "--set", "batch_size=8", "--set", f"run_dir={run}",
                 *[a for s in sets for a in ("--set", s)]])


def test_cli_train_prints_one_line_for_config_and_data_errors(store, tmp_path, capsys):
    cases = [(["batch_size=100000"], "less than one batch of 100000"),
             (["train_split=nope"], "nope"),
             (["sec=-1"], "sec"),
             (["amp_dtype=float8"], "amp_dtype"),
             (["epochs=0"], "epochs"),
             (["no_such_key=1"], "unknown TrainConfig keys")]
    for sets, words in cases:
        capsys.readouterr()
        rc = _cli_train(store, tmp_path / "r", *sets)
        err = capsys.readouterr().err
        assert rc == 1, sets
        assert len(err.strip().splitlines()) == 1 and words in err and "Traceback" not in err, (sets, err)
        assert err.startswith("imu2clip train: error:")
    assert not (tmp_path / "r" / CHECKPOINT_NAME).exists()


def test_cli_train_keeps_the_traceback_of_a_bug(monkeypatch, tmp_path):
    def broken(cfg, *a, **k):
        raise ValueError("a bug, not a config problem")

    monkeypatch.setattr(train_mod, "train", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["train", "--config", "imu_video", "--set", f"run_dir={tmp_path / 'r'}"])
