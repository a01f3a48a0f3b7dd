"""Embedding cache: cached embeddings equal freshly computed ones, and a cached set never decodes video."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmloader

pytest.importorskip("open_clip")

from imu2clip_plugin.embed import EmbeddedWindows, text_of, build_embedding_cache, towers_fingerprint  # noqa: E402
from mmloader.windows.dataset import WindowSet  # noqa: E402
from mmloader.windows.protocol import Windows  # noqa: E402
from imu2clip_plugin.towers import ClipTowers  # noqa: E402


@pytest.fixture(scope="module")
def windows(sample_store):
    ds = mmloader.open(sample_store(videos=3, seconds=16, seed=2, defect_fraction=0.0))
    return ds.windows(sec=1, stride=0.5, modalities=["imu", "video", "text"], frames=2, size=(32, 40))


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    return ClipTowers("imu2clip-tiny")


def test_cached_embeddings_equal_fresh_ones(windows, towers, tmp_path):
    cached = build_embedding_cache(windows, towers, url=str(tmp_path / "c"), reduce="mean", shard_size=4)
    for i in (0, 5, len(windows) - 1):
        s, raw = cached[i], windows[i]
        assert "video" not in s and "video_t" not in s
        assert torch.equal(s["imu"], raw["imu"]) and torch.equal(s["imu_mask"], raw["imu_mask"])
        assert s["text"] == raw["text"]
        fresh_v = towers.encode_frames(raw["video"][None], reduce="mean")[0]
        fresh_t = towers.encode_text([text_of(raw["text"])])[0]
        assert s["video_emb"].shape == (towers.embed_dim,) and s["video_emb"].dtype == torch.float32
        torch.testing.assert_close(s["video_emb"], fresh_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["text_emb"], fresh_t, rtol=1e-5, atol=1e-6)
    # evaluation embeds a window's text exactly as the cache (and so the training targets) did
    from imu2clip_plugin import IMUEncoder, IMUEncoderConfig
    from imu2clip_plugin.evaluate import embed_windows

    enc = IMUEncoder(IMUEncoderConfig(conv_channels=(8,), kernel_sizes=(3,), norm_groups=4, gru_hidden=8,
                                      gru_layers=1, embed_dim=towers.embed_dim))
    ev = embed_windows(enc, windows, towers, reduce="mean")
    multi = [i for i in range(len(windows)) if isinstance(windows[i]["text"], (list, tuple)) and len(windows[i]["text"]) > 1]
    assert multi, "the fixture should have windows with several narrations"
    for i in [0, len(windows) - 1] + multi[:2]:
        want = torch.nn.functional.normalize(cached[i]["text_emb"], dim=-1).numpy()
        got = ev.text[i] / np.linalg.norm(ev.text[i])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_cached_set_reads_no_video(windows, towers, tmp_path, monkeypatch):
    cached = build_embedding_cache(windows, towers, url=str(tmp_path / "c"))

    def boom(*a, **k):
        raise AssertionError("video decoded")

    monkeypatch.setattr(WindowSet, "_read_video", boom)
    batches = list(cached.loader(batch_size=5, shuffle=True, seed=0))
    assert sum(len(b["index"]) for b in batches) == len(windows)
    for b in batches:
        assert "video" not in b and "video_t" not in b
        assert b["video_emb"].shape[1:] == (towers.embed_dim,) and b["text_emb"].shape[1:] == (towers.embed_dim,)


def test_embedded_windows_wrap_a_window_set(windows, towers):
    """EmbeddedWindows is a Windows by composition (not a WindowSet), with the wrapped set's index fields."""
    emb = EmbeddedWindows(windows, towers, block_size=4)
    assert isinstance(emb, Windows) and not isinstance(emb, WindowSet) and emb.windows is windows
    assert len(emb) == len(windows) and emb.index_fields(5) == windows.index_fields(5)
    assert emb.fingerprint_components() == windows.fingerprint_components()
    s, raw = emb[5], windows[5]
    assert "video" not in s and s["video_emb"].shape == (towers.embed_dim,)
    assert torch.equal(s["imu"], raw["imu"]) and {k: s[k] for k in emb.index_fields(5)} == emb.index_fields(5)


def test_fingerprint_follows_towers_and_reduce(towers):
    torch.manual_seed(1)
    other = ClipTowers("imu2clip-tiny")
    assert towers_fingerprint(towers, "center") == towers_fingerprint(towers, "center")
    assert towers_fingerprint(towers, "center") != towers_fingerprint(towers, "mean")
    assert towers_fingerprint(towers, "center") != towers_fingerprint(other, "center")


def test_embedded_and_embedding_cache_keep_selections_and_the_loader(windows, towers, tmp_path):
    emb = EmbeddedWindows(windows, towers)
    cached = build_embedding_cache(windows, towers, url=str(tmp_path / "emb"), progress=False)
    for s in (emb, cached):
        split = windows.index["split"][0].as_py()
        assert len(s.split(split)) == len(windows.split(split))  # raw windows of that split, as before
        assert len(s.filter([True] * len(windows))) == len(windows)
        rid = windows.index["recording_id"][0].as_py()
        assert len(s.recordings(rid)) == len(windows.recordings(rid))
        assert s.video_backend == windows.video_backend
    batch = next(iter(emb.loader(batch_size=2)))
    assert "video_emb" in batch and "video" not in batch
    batch = next(iter(cached.loader(batch_size=2)))
    assert "video_emb" in batch and "video" not in batch
