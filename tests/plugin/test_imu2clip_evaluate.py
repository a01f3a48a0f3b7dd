"""Evaluation end to end on the sample data (tiny towers, untrained encoder) and the probe on known features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import mmloader
from imu2clip_plugin import ClipTowers, IMUEncoder, IMUEncoderConfig
from imu2clip_plugin.evaluate import (AR_METHODS, WindowEmbeddings, activity_recognition, embed_windows, evaluate_encoder,
                                      fine_tune, linear_probe, retrieval, write_report)
from mmloader.samples import ACTIVITIES


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 4
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(size=(300, 16))
    m = linear_probe(x[:200], y[:200], x[200:], y[200:], 3)
    assert m["accuracy"] > 0.95 and m["n"] == 100


@pytest.fixture(scope="module")
def ds(sample_store):
    return mmloader.open(sample_store(videos=4, seconds=20, seed=4, defect_fraction=0.0))


def test_evaluation_report_on_the_sample(ds, tmp_path):
    torch.manual_seed(0)
    towers = ClipTowers("imu2clip-tiny")
    small = IMUEncoderConfig(conv_channels=(16, 32), kernel_sizes=(5, 5), gru_hidden=32, gru_layers=1,
                             embed_dim=towers.embed_dim, dropout=0.0)
    encoder, baseline = IMUEncoder(small), IMUEncoder(small)
    wins = ds.windows(sec=2, stride=1, modalities=["imu", "video", "text"], frames=1, size=(48, 64),
                      label_stream="activities")
    assert len(wins) > 20
    emb = embed_windows(encoder, wins, towers)
    n = len(wins)
    assert emb.imu.shape == (n, towers.embed_dim) and emb.video.shape == emb.imu.shape and emb.text.shape == emb.imu.shape
    np.testing.assert_allclose(np.linalg.norm(emb.imu, axis=1), 1, atol=1e-5)
    ret = retrieval(emb)
    assert set(ret) == {"imu->video", "video->imu", "imu->text", "text->imu"}
    assert all(m["N"] == n for m in ret.values())
    classes = sorted(set(emb.labels))
    half = n // 2
    split = lambda e, sl: type(e)(e.imu[sl], None, None, e.labels[sl], e.recording_ids[sl])  # noqa: E731
    base = embed_windows(baseline, wins)
    act = activity_recognition(split(emb, slice(0, half)), split(emb, slice(half, n)), classes,
                               split(base, slice(0, half)), split(base, slice(half, n)), towers=towers)
    for method in ("zero_shot", "linear_probe", "random_init_linear_probe"):
        assert 0 <= act[method]["accuracy"] <= 1 and np.sum(act[method]["confusion"]) == n - half
    path = write_report({"retrieval": ret, "activity_recognition": act}, tmp_path / "run")
    text = open(path).read()
    assert "| imu->video | " + str(n) in text and "linear probe" in text
    for png in ("recall_at_k.png", "confusion_linear_probe.png", "confusion_zero_shot.png"):
        assert (tmp_path / "run" / png).stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["retrieval"]["imu->text"]["N"] == n
    assert set(classes) <= set(ACTIVITIES)


def _small_encoder(embed_dim=16, seed=0):
    torch.manual_seed(seed)
    return IMUEncoder(IMUEncoderConfig(conv_channels=(8, 16), kernel_sizes=(5, 5), norm_groups=4, gru_hidden=16,
                                       gru_layers=1, embed_dim=embed_dim, dropout=0.0))


def test_fine_tune_learns_a_separable_task_and_leaves_the_encoder_untouched():
    # class = the sign of a slow ramp on channel 0 (its direction over time), hidden in noise on 6 channels
    g = np.random.default_rng(0)

    def make(n):
        y = g.integers(0, 2, n)
        ramp = np.linspace(-1, 1, 100)[None, :] * np.where(y == 1, 1.0, -1.0)[:, None]
        x = g.normal(0, 0.3, (n, 6, 100)).astype(np.float32)
        x[:, 0] += ramp.astype(np.float32)
        return WindowEmbeddings(np.zeros((n, 16), np.float32), None, None, None, [""] * n,
                                imu_raw=x, imu_mask=np.ones((n, 100), bool)), y.tolist()

    (train, ytr), (test, yte) = make(128), make(64)
    enc = _small_encoder()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    out = fine_tune(enc, train, test, ytr, yte, num_classes=2, epochs=8, lr=3e-3)
    assert out["accuracy"] > 0.9, out
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    with pytest.raises(ValueError, match="keep_inputs"):
        fine_tune(enc, WindowEmbeddings(train.imu, None, None, None, []), test, ytr, yte, num_classes=2)


def test_evaluate_encoder_writes_every_method_and_the_retrieval_examples(ds, tmp_path):
    torch.manual_seed(0)
    towers = ClipTowers("imu2clip-tiny")
    wins = ds.windows(sec=2, stride=1, modalities=["imu", "video", "text"], frames=1, size=(48, 64),
                      label_stream="activities")
    recs = sorted(set(wins.index["recording_id"].to_pylist()))
    half = len(recs) // 2
    train_w, test_w = wins.recordings(recs[:half]), wins.recordings(recs[half:])
    res = evaluate_encoder(_small_encoder(towers.embed_dim), train_w, test_w, towers,
                           baseline_encoder=_small_encoder(towers.embed_dim, seed=1), fine_tune_epochs=1,
                           run_dir=tmp_path / "rep")
    assert res["retrieval"]["imu->video"]["N"] == len(test_w)
    act = res["activity_recognition"]
    assert set(AR_METHODS) <= set(act)
    for m in AR_METHODS:
        assert np.sum(act[m]["confusion"]) == len(test_w)
    text = open(res["report"]).read()
    assert "retrieval_examples.png" in text and "random init fine tune" in text
    assert (tmp_path / "rep" / "retrieval_examples.png").stat().st_size > 5000
    assert (tmp_path / "rep" / "confusion_fine_tune.png").stat().st_size > 1000


def test_verb_labeller():
    from imu2clip_plugin.evaluate import verb_labeller

    f = verb_labeller({"walk": "walking", "run": "running", "runway": "x", "climb": "climbing stairs"})
    assert f("C walks along the corridor") == "walking"
    assert f("#C C runs on the track") == "running"
    assert f("C climbs the stairs") == "climbing stairs"
    assert f("C looks around") is None
    with pytest.raises(ValueError):
        verb_labeller({})


def test_labels_from_narration_verbs(ds, tmp_path):
    """The Ego4D route: no label stream, classes from the narrations' verbs through a mapping."""
    torch.manual_seed(0)
    towers = ClipTowers("imu2clip-tiny")
    wins = ds.windows(sec=2, stride=1, modalities=["imu", "video", "text"], frames=1, size=(48, 64))
    assert "label" not in wins.index.column_names
    recs = sorted(set(wins.index["recording_id"].to_pylist()))
    half = len(recs) // 2
    mapping = {"walk": "walking", "stroll": "walking", "run": "running", "jog": "running", "sprint": "running",
               "sit": "sitting down", "climb": "climbing stairs", "ride": "cycling", "cycle": "cycling"}
    res = evaluate_encoder(_small_encoder(towers.embed_dim), wins.recordings(recs[:half]), wins.recordings(recs[half:]),
                           towers, baseline_encoder=_small_encoder(towers.embed_dim, seed=1), fine_tune_epochs=1,
                           label_map=mapping)
    act = res["activity_recognition"]
    assert set(act["classes"]) <= set(mapping.values()) and len(act["classes"]) >= 2
    assert 0 < act["test_windows"] < len(wins.recordings(recs[half:]))
    assert res["retrieval"]["imu->video"]["N"] == len(wins.recordings(recs[half:]))
