"""The best checkpoint by validation retrieval: select_metric, early stopping, the exported encoder, summary.json, and
the best-so-far state across an interruption. Validation values are the real ones except where a test scripts them
(by training step, on top of the real validation) to make a selection unambiguous."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import tiny_train_config
import torch

import mmloader

pytest.importorskip("open_clip")

from imu2clip_plugin.checkpoint import CheckpointError  # noqa: E402
from imu2clip_plugin.encoder import load_encoder  # noqa: E402
from imu2clip_plugin.evaluate import embed_windows, retrieval  # noqa: E402
from imu2clip_plugin.metrics import retrieval_ranks  # noqa: E402
from imu2clip_plugin.train import (  # noqa: E402
    SUMMARY_NAME, Trainer, TrainConfig, TrainSetupError, recall_at_1, resolve_select_metric, split_train_val, train)



@pytest.fixture(scope="module")
def windows(sample_store):
    store = sample_store(videos=4, seconds=16, seed=2, defect_fraction=0.0)
    return mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))


def _cfg(run_dir, **kw):
    return tiny_train_config(run_dir, **{"use_cache": False, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def spe(windows):
    """Train steps per epoch of _cfg's runs."""
    return len(split_train_val(windows, _cfg("x"))[0]) // 8


def _script(monkeypatch, values: dict[int, float]):
    """Validations at step s report imu_video_r1 = values[s] (the real validation still runs)."""
    real = Trainer.validate

    def validate(self):
        v = real(self)
        self.val_metrics["imu_video_r1"] = values[self.global_step]
        return v

    monkeypatch.setattr(Trainer, "validate", validate)


def _vals(run_dir):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["event"] == "val"]


def test_select_metric_defaults_to_the_first_retrieval_target_and_is_checked():
    assert resolve_select_metric(TrainConfig())[0] == "imu_video_r1"
    assert resolve_select_metric(TrainConfig(targets=("text",)))[0] == "imu_text_r1"
    assert resolve_select_metric(TrainConfig(targets=("video", "text")))[0] == "imu_video_r1"
    assert resolve_select_metric(TrainConfig(select_metric="val_loss"))[0] == "val_loss"
    with pytest.raises(TrainSetupError, match="select_metric='imu_text_r1' needs 'text' in targets"):
        TrainConfig(select_metric="imu_text_r1")
    with pytest.raises(TrainSetupError, match="select_metric must be"):
        TrainConfig(select_metric="r5")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(TrainSetupError, match="early_stop_patience"):
            TrainConfig(early_stop_patience=bad)
    assert TrainConfig.from_dict(TrainConfig(early_stop_patience=3).to_dict()).early_stop_patience == 3


def test_recall_at_1_counts_ties_for_the_query_as_the_evaluation_does():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 8)).astype(np.float32)
    g = q + rng.normal(scale=1.0, size=q.shape).astype(np.float32)
    g[5] = g[6]                                            # a tie: both rows score the same for every query
    want = float(np.mean(retrieval_ranks(q.astype(np.float64) @ g.T.astype(np.float64)) == 1))
    assert recall_at_1(torch.from_numpy(q), torch.from_numpy(g), block=4) == pytest.approx(want)
    assert recall_at_1(torch.eye(3), torch.eye(3)) == 1.0


def test_the_best_epoch_by_r1_is_exported_and_summarised(windows, tmp_path, monkeypatch, spe):
    # epochs 0..3 end at steps spe..4*spe; epoch 1 is the best; epoch 3 only ties it (the first one wins)
    _script(monkeypatch, {0: 0.9, spe: 0.2, 2 * spe: 0.5, 3 * spe: 0.4, 4 * spe: 0.5})
    out = train(_cfg(tmp_path / "run", epochs=4), windows=windows)
    best = {"metric": "imu_video_r1", "value": 0.5, "epoch": 1, "step": 2 * spe}
    assert out["best"] == best and out["exported"] == "best" and not out["stopped_by_patience"]
    summary = json.loads((tmp_path / "run" / SUMMARY_NAME).read_text())
    assert summary["best"] == best and summary["select_metric"] == "imu_video_r1"
    assert summary["encoder_dir"] == out["encoder_dir"] and summary["step"] == 4 * spe
    assert [r.get("best") for r in _vals(tmp_path / "run")] == [None, True, True, False, False]
    # the exported weights are the model's after epoch 1 (the same run stopped there), not the last ones
    monkeypatch.undo()
    at_best = train(_cfg(tmp_path / "cut", epochs=4, stop_after_steps=2 * spe), windows=windows)["model"].encoder
    exported = load_encoder(out["encoder_dir"]).state_dict()
    for k, v in at_best.state_dict().items():
        assert torch.equal(exported[k], v), k
    assert any(not torch.equal(exported[k], v) for k, v in out["model"].encoder.state_dict().items())


def test_early_stopping_after_patience_epochs_without_improvement(windows, tmp_path, monkeypatch, spe):
    _script(monkeypatch, {0: 0.0, spe: 0.3, 2 * spe: 0.2, 3 * spe: 0.25, 4 * spe: 0.1})
    d = tmp_path / "run"
    out = train(_cfg(d, epochs=6, early_stop_patience=2), windows=windows)
    assert out["stopped_by_patience"] and out["step"] == 3 * spe and not out["stopped_early"]
    assert out["best"]["epoch"] == 0 and out["best"]["value"] == 0.3 and out["exported"] == "best"
    assert json.loads((d / SUMMARY_NAME).read_text())["stopped_by_patience"] is True
    # the finished run resumed: nothing more is trained
    again = train(_cfg(d, epochs=6, early_stop_patience=2, resume=True), windows=windows)
    assert again["step"] == 3 * spe and again["stopped_by_patience"] and again["best"] == out["best"]
    # resumed with more patience: training goes on from where it stopped (one more epoch, then patience 3 runs out)
    more = train(_cfg(d, epochs=6, early_stop_patience=3, resume=True), windows=windows)
    assert more["step"] == 4 * spe and more["stopped_by_patience"] and more["best"] == out["best"]


def test_resume_keeps_the_best_so_far(windows, tmp_path, monkeypatch, spe):
    values = {0: 0.0, spe: 0.6, 2 * spe: 0.1, 3 * spe: 0.2}
    _script(monkeypatch, values)
    full = train(_cfg(tmp_path / "full", epochs=3), windows=windows)
    first = train(_cfg(tmp_path / "cut", epochs=3, stop_after_steps=spe + 2), windows=windows)
    assert first["best"] == {"metric": "imu_video_r1", "value": 0.6, "epoch": 0, "step": spe}
    resumed = train(_cfg(tmp_path / "cut", epochs=3, resume=True), windows=windows)
    assert resumed["best"] == full["best"] == first["best"]
    a, b = (load_encoder(o["encoder_dir"]).state_dict() for o in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another select_metric on resume is refused by name (the best so far was chosen by R@1)
    with pytest.raises(CheckpointError, match=r"field 'best.metric' is 'imu_video_r1', this run selects by 'val_loss'"):
        train(_cfg(tmp_path / "cut", epochs=4, resume=True, select_metric="val_loss"), windows=windows)


def test_validation_r1_is_the_evaluation_r1_of_the_same_windows(windows, tmp_path):
    from imu2clip_plugin import ClipTowers

    torch.manual_seed(0)
    towers = ClipTowers("imu2clip-tiny")
    cfg = _cfg(tmp_path / "run", max_steps=3, select_metric="val_loss")
    out = train(cfg, windows=windows, towers=towers)
    last = _vals(tmp_path / "run")[-1]
    assert out["best"]["metric"] == "val_loss" and out["select_reason"].startswith("given")
    val = split_train_val(windows, cfg)[1]
    emb = embed_windows(out["model"].encoder, val, towers)
    assert last["imu_video_r1"] == pytest.approx(retrieval(emb)["imu->video"]["R@1"])


@pytest.fixture(scope="module")
def after_one_epoch(windows, tmp_path_factory, spe):
    """A run dir checkpointed mid-epoch 1, its best from epoch 0 in the checkpoint."""
    d = tmp_path_factory.mktemp("best") / "cut"
    out = train(_cfg(d, epochs=3, stop_after_steps=spe + 1), windows=windows)
    assert out["best"]["step"] == spe
    return d


BAD_BEST = {
    "value NaN": (lambda b: b.update(value=float("nan")), "'best.value'", "not a finite number"),
    "unknown metric": (lambda b: b.update(metric="r5"), "'best.metric'", "must be one of"),
    "step past the checkpoint": (lambda b: b.update(step=10 ** 6), "'best.step'", "must be in"),
    "encoder of another shape": (lambda b: b.update(encoder={k: v[:1] if v.dim() else v
                                                             for k, v in b["encoder"].items()}),
                                 "'best.encoder'", "does not fit this run's encoder"),
    "encoder not tensors": (lambda b: b["encoder"].update(x=1), "'best.encoder.x'", "must map parameter names"),
}


@pytest.mark.parametrize("case", sorted(BAD_BEST))
def test_a_hand_made_best_state_is_refused_by_field(case, after_one_epoch, windows, tmp_path):
    import hashlib
    import shutil

    mutate, field, words = BAD_BEST[case]
    d = tmp_path / "run"
    shutil.copytree(after_one_epoch, d)
    ckpt = d / "checkpoint.pt"
    ck = torch.load(ckpt, weights_only=True)
    mutate(ck["best"])
    torch.save(ck, ckpt)
    data = ckpt.read_bytes()
    (d / "checkpoint.pt.sha256.json").write_text(json.dumps({"file": "checkpoint.pt", "size": len(data), "step": 1,
                                                             "sha256": hashlib.sha256(data).hexdigest()}))
    with pytest.raises(CheckpointError) as e:
        train(_cfg(d, epochs=3, resume=True), windows=windows)
    assert str(e.value).startswith(f"{ckpt}: field {field}") and words in str(e.value), str(e.value)
