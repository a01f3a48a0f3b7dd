"""Embedding cache: cached embeddings equal freshly computed ones, and a cached set never decodes video."""

from __future__ import annotations

import pytest
import torch

import mmloader
from mmloader.adapters.ego4d import Ego4DAdapter
from mmloader.samples import generate_ego4d_sample

pytest.importorskip("open_clip")

from imu2clip_plugin.embed import EmbeddedWindows, _text_of, build_embedding_cache, towers_fingerprint  # noqa: E402
from imu2clip_plugin.towers import ClipTowers  # noqa: E402


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    root = generate_ego4d_sample(tmp_path_factory.mktemp("e") / "ego4d", videos=3, seconds=16, seed=2,
                                 defect_fraction=0.0, progress=False)
    ds = mmloader.open(Ego4DAdapter().prepare(str(root), str(root.parent / "store"), progress=False))
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
        fresh_t = towers.encode_text([_text_of(raw["text"])])[0]
        assert s["video_emb"].shape == (towers.embed_dim,) and s["video_emb"].dtype == torch.float32
        torch.testing.assert_close(s["video_emb"], fresh_v, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s["text_emb"], fresh_t, rtol=1e-5, atol=1e-6)


def test_cached_set_reads_no_video(windows, towers, tmp_path, monkeypatch):
    cached = build_embedding_cache(windows, towers, url=str(tmp_path / "c"))

    def boom(*a, **k):
        raise AssertionError("video decoded")

    monkeypatch.setattr(EmbeddedWindows, "_read_video", boom)
    batches = list(cached.loader(batch_size=5, shuffle=True, seed=0))
    assert sum(len(b["index"]) for b in batches) == len(windows)
    for b in batches:
        assert "video" not in b and "video_t" not in b
        assert b["video_emb"].shape[1:] == (towers.embed_dim,) and b["text_emb"].shape[1:] == (towers.embed_dim,)


def test_fingerprint_follows_towers_and_reduce(towers):
    torch.manual_seed(1)
    other = ClipTowers("imu2clip-tiny")
    assert towers_fingerprint(towers, "center") == towers_fingerprint(towers, "center")
    assert towers_fingerprint(towers, "center") != towers_fingerprint(towers, "mean")
    assert towers_fingerprint(towers, "center") != towers_fingerprint(other, "center")
