"""The trainer: exact resume from a mid-epoch checkpoint, a short run lowers the loss, cached training, the CLI."""

from __future__ import annotations

import json

import pytest
from conftest import TINY_ENCODER, tiny_train_config
import torch

import mmloader

pytest.importorskip("open_clip")

from imu2clip_plugin.cli import apply_overrides, load_config, main  # noqa: E402
from mmloader.windows.dataset import WindowSet  # noqa: E402
from imu2clip_plugin.encoder import load_encoder  # noqa: E402
from imu2clip_plugin.train import TrainConfig, lr_lambda, split_train_val, train  # noqa: E402



@pytest.fixture(scope="module")
def store(sample_store):
    return sample_store(videos=4, seconds=16, seed=2, defect_fraction=0.0)


@pytest.fixture(scope="module")
def windows(store):
    return mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MMLOADER_CACHE_DIR", str(tmp_path / "mmcache"))


def _cfg(tmp_path, name, **kw):
    return tiny_train_config(tmp_path / name, **kw)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("use_cache", [True, False])
def test_interrupt_and_resume_equals_an_uninterrupted_run(windows, tmp_path, use_cache):
    # 8 steps over an epoch boundary (the train split gives 4-5 batches per epoch); interrupted after 3
    full = train(_cfg(tmp_path, "full", max_steps=8, use_cache=use_cache), windows=windows)
    cut = _cfg(tmp_path, "cut", max_steps=8, use_cache=use_cache, stop_after_steps=3)
    first = train(cut, windows=windows)
    assert first["stopped_early"] and first["step"] == 3 and first["encoder_dir"] is None
    ck = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)  # plain values only: no pickle
    assert ck["step"] == 3 and ck["loader"]["offset"] == 24 and ck["loader"]["epoch"] == 0
    assert {"model", "optimizer", "scheduler", "scaler", "logit_scale", "rng"} <= set(ck)
    resumed = train(_cfg(tmp_path, "cut", max_steps=8, use_cache=use_cache, resume=True), windows=windows)
    assert resumed["step"] == 8 and not resumed["stopped_early"]
    a, b = _params(full["model"]), _params(resumed["model"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert full["val_history"][-1] == pytest.approx(resumed["val_history"][-1], abs=1e-6)
    # the exported encoder is the best one by validation R@1, kept in the checkpoint across the interruption
    assert resumed["best"] == full["best"] and resumed["best"]["metric"] == "imu_video_r1"
    best = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["best"]
    enc = load_encoder(resumed["encoder_dir"])
    for k, v in enc.state_dict().items():
        assert torch.equal(v, best["encoder"][k])
        if best["step"] == resumed["step"]:
            assert torch.equal(v, b[f"encoder.{k}"].cpu())


def test_short_run_lowers_the_validation_loss_on_held_out_recordings(sample_store, tmp_path):
    """The must-show: validation on recordings never trained on (the sample's val split) falls clearly."""
    ds = mmloader.open(sample_store(videos=10, seconds=30, seed=5, defect_fraction=0.0))
    wins = ds.windows(sec=2, stride=0.5, modalities=["imu", "video"], frames=1, size=(32, 32))
    tr, va = (set(wins.split(s).index["recording_id"].to_pylist()) for s in ("train", "val"))
    assert tr and va and not tr & va
    cfg = _cfg(tmp_path, "fit", sec=2, epochs=6, batch_size=16, lr=3e-3,
               encoder=dict(TINY_ENCODER, conv_channels=[16, 32], gru_hidden=32))
    out = train(cfg, windows=wins)
    hist = out["val_history"]
    assert hist[-1] < 0.8 * hist[0], hist
    lines = [json.loads(x) for x in (tmp_path / "fit" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in lines].count("val") == len(hist)
    assert all(k in lines[1] for k in ("loss", "lr", "grad_norm", "logit_scale"))


def test_validation_falls_back_to_held_out_recordings(windows):
    cfg = TrainConfig(store="unused", val_split="no-such-split", val_fraction=0.5)
    tr, va = split_train_val(windows, cfg)
    rt, rv = set(tr.index["recording_id"].to_pylist()), set(va.index["recording_id"].to_pylist())
    assert rt and rv and not rt & rv
    assert rt | rv == set(windows.split("train").index["recording_id"].to_pylist())


def test_cached_training_decodes_no_video(windows, tmp_path, monkeypatch):
    calls = []
    orig = WindowSet._read_video

    def spy(self, *a, **k):
        calls.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(WindowSet, "_read_video", spy)
    train(_cfg(tmp_path, "warm", max_steps=1), windows=windows)   # builds the cache (decodes once)
    assert calls
    calls.clear()

    def boom(*a, **k):
        raise AssertionError("video decoded during cached training")

    monkeypatch.setattr(WindowSet, "_read_video", boom)
    out = train(_cfg(tmp_path, "cached", max_steps=4), windows=windows)
    assert out["step"] == 4


def test_lr_schedule_warmup_then_cosine():
    f = lr_lambda(4, 20)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(12) == pytest.approx(0.5) and f(20) == pytest.approx(0.0)


def test_cli_configs_and_overrides(tmp_path, windows, store, capsys):
    for name in ("imu_video", "imu_text", "imu_video_text"):
        d = load_config(name)
        cfg = TrainConfig.from_dict(d)
        assert cfg.model_name == "imu2clip-tiny" and cfg.store == "sample:ego4d"
    assert TrainConfig.from_dict(load_config("imu_video_text")).targets == ("video", "text")
    d = apply_overrides(load_config("imu_video"), ["lr=1e-2", "size=[32,32]", "encoder.gru_hidden=8",
                                                   "pretrained=null", "run_dir=x"])
    assert d["lr"] == 0.01 and d["size"] == [32, 32] and d["encoder"]["gru_hidden"] == 8 and d["run_dir"] == "x"
    run = tmp_path / "cli"
    rc = main(["train", "--config", "imu_video", "--set", f"store={store}", "--set", "sec=1", "--set", "stride=0.5",
               "--set", "size=[32,32]", "--set", "batch_size=8", "--set", "max_steps=2", "--set", f"run_dir={run}",
               "--set", f"encoder={json.dumps(TINY_ENCODER)}", "--set", "progress=false", "--set", "val_split=train"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 2 and (run / "encoder" / "model.safetensors").exists()
    # imu2clip evaluate on the held-out recordings of the same store
    rc = main(["evaluate", str(run / "encoder"), store, "--sec", "1", "--size", "32", "32", "--fine-tune-epochs", "1",
               "--out", str(tmp_path / "rep")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "imu->video" in printed and "fine_tune" in printed and "report:" in printed
    metrics = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    held = mmloader.open(store).windows(sec=1, stride=0.5, modalities=["imu", "video", "text"], frames=1, size=(32, 32))
    n_held = sum(s in ("val", "test") for s in held.index["split"].to_pylist())
    assert metrics["retrieval"]["imu->video"]["N"] == n_held > 0
    # labels from the narrations' verbs (the route for stores without an activity stream)
    verbs = tmp_path / "verbs.json"
    verbs.write_text(json.dumps({"walk": "walking", "run": "running", "jog": "running", "climb": "climbing stairs",
                                 "sit": "sitting down", "ride": "cycling", "cycle": "cycling", "look": "looking around"}))
    rc = main(["evaluate", str(run / "encoder"), store, "--sec", "1", "--size", "32", "32", "--fine-tune-epochs", "0",
               "--label-map", str(verbs), "--out", str(tmp_path / "rep2")])
    assert rc == 0 and "linear_probe" in capsys.readouterr().out
    act = json.loads((tmp_path / "rep2" / "metrics.json").read_text())["activity_recognition"]
    assert set(act["classes"]) <= set(json.loads(verbs.read_text()).values())


def test_cli_embed_builds_the_cache(store, tmp_path, capsys):
    url = str(tmp_path / "emb")
    rc = main(["embed", store, "--sec", "1", "--stride", "0.5", "--size", "32", "32", "--targets", "video", "text",
               "--split", "train", "--url", url, "--device", "cpu"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["url"].rstrip("/").endswith("emb") and out["windows"] > 0
    assert (tmp_path / "emb" / "cache.json").exists()


def _ddp_worker(rank, world, port, windows, cfg_dict, cache_dir):
    import os

    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), MMLOADER_CACHE_DIR=cache_dir)
    torch.set_num_threads(1)
    try:
        train(TrainConfig.from_dict(cfg_dict), windows=windows)
    finally:
        torch.distributed.destroy_process_group()


def test_two_rank_ddp_run_matches_one_process(windows, tmp_path):
    """2 gloo ranks × batch 4 take the same 8 windows per step as 1 process × batch 8 (order[r::2]); with the
    loss gathering negatives from both ranks and DDP averaging gradients, the parameters agree."""
    import socket

    import torch.multiprocessing as mp

    enc = {**TINY_ENCODER, "dropout": 0.0}
    # gloo on the CPU in both runs (on a one-GPU machine, device="auto" would put two NCCL ranks on one GPU)
    single = train(_cfg(tmp_path, "one", max_steps=3, encoder=enc, batch_size=8, device="cpu"), windows=windows)
    cfg = _cfg(tmp_path, "two", max_steps=3, encoder=enc, batch_size=4, device="cpu").to_dict()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, windows, cfg, str(tmp_path / "mmcache")), nprocs=2, join=True)
    ck = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)  # plain values only: no pickle
    assert ck["step"] == 3 and len(ck["loader"]) == 2 and ck["loader"][1]["rank"] == 1
    ref = _params(single["model"])
    for k, v in ck["model"].items():
        torch.testing.assert_close(v, ref[k], rtol=1e-4, atol=1e-5, msg=k)
