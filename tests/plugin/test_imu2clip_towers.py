"""ClipTowers: the tiny registered open_clip model, CLIP preprocessing on tensors, checkpoints, clear weight errors."""

from __future__ import annotations

import time

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="the towers need open_clip_torch (the 'train' extra)")
pytest.importorskip("torchvision")
Image = pytest.importorskip("PIL.Image")

from imu2clip_plugin import towers as towers_mod  # noqa: E402
from imu2clip_plugin.towers import TINY_MODEL, ClipTowers, WeightsUnavailableError, register_tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def tiny() -> ClipTowers:
    torch.manual_seed(0)
    return ClipTowers(TINY_MODEL)


def frames(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 frames (N, 3, H, W)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, h // 4 + 1, w // 4 + 1, generator=g) * 255
    return torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear").round().clamp(0, 255).to(torch.uint8)


def test_tiny_config_is_registered_with_open_clip(tiny):
    assert TINY_MODEL in open_clip.list_models()
    assert register_tiny_config() == TINY_MODEL  # idempotent
    cfg = open_clip.get_model_config(TINY_MODEL)
    assert cfg["vision_cfg"]["image_size"] == 32 and cfg["text_cfg"]["vocab_size"] == 49408
    assert tiny.embed_dim == 64 and tiny.image_size == (32, 32)


def test_text_shapes_normalised_frozen(tiny):
    z = tiny.encode_text(["C cuts an onion", "C walks along the corridor", "C cuts an onion"])
    assert z.shape == (3, 64) and z.dtype == torch.float32 and not z.requires_grad
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    assert torch.equal(z[0], z[2]) and not torch.allclose(z[0], z[1])
    assert tiny.encode_text("one").shape == (1, 64) and tiny.encode_text([]).shape == (0, 64)
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.model.training and not tiny.model.visual.training


def test_frames_shapes_and_reduce(tiny):
    video = torch.stack([frames(5, 48, 64, seed=s) for s in range(2)])  # (B=2, F=5, 3, 48, 64)
    c = tiny.encode_frames(video)
    m = tiny.encode_frames(video, reduce="mean")
    assert c.shape == m.shape == (2, 64) and not c.requires_grad
    torch.testing.assert_close(c.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(m.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(c, tiny.encode_images(video[:, 2]))  # centre frame F // 2
    assert not torch.allclose(c, m)
    assert tiny.encode_frames(video[:, 0]).shape == (2, 64)  # (B, 3, H, W): one frame per window
    with pytest.raises(ValueError, match="uint8"):
        tiny.encode_frames(video.float())
    with pytest.raises(ValueError, match="reduce"):
        tiny.encode_frames(video, reduce="max")


@pytest.mark.parametrize("hw", [(48, 64), (120, 90), (17, 40), (32, 32)])
def test_preprocess_matches_open_clip_transform_on_non_square_frames(tiny, hw):
    """Batched tensor preprocessing == open_clip's own PIL eval transform (to one uint8 step after mean/std)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = open_clip.get_model_preprocess_cfg(tiny.model)
    ref_tf = image_transform_v2(PreprocessCfg(**pp), is_train=False)
    x = frames(3, *hw, seed=hw[0])
    ours = tiny.preprocess(x)
    ref = torch.stack([ref_tf(Image.fromarray(f.permute(1, 2, 0).numpy())) for f in x])
    assert ours.shape == ref.shape == (3, 3, 32, 32)
    step = 1 / 255 / min(pp["std"])
    assert (ours - ref).abs().max() <= step * 1.01


def test_preprocess_centre_crops_the_longer_side(tiny):
    x = torch.zeros(1, 3, 32, 96, dtype=torch.uint8)
    x[..., 32:64] = 255  # only the centre third is white
    y = tiny.preprocess(x) * tiny.std + tiny.mean
    assert y.min() > 0.99


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoint_round_trip(tiny, tmp_path, suffix):
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in tiny.model.state_dict().items()}
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = ClipTowers(TINY_MODEL, checkpoint=path)
    texts = ["C opens the fridge", "C picks up a knife"]
    video = frames(4, 40, 56).view(2, 2, 3, 40, 56)
    assert torch.equal(loaded.encode_text(texts), tiny.encode_text(texts))
    assert torch.equal(loaded.encode_frames(video, "mean"), tiny.encode_frames(video, "mean"))
    torch.manual_seed(123)
    assert not torch.equal(ClipTowers(TINY_MODEL).encode_text(texts), tiny.encode_text(texts))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(WeightsUnavailableError, match=r"imu2clip-tiny.*not found.*nope\.pt"):
        ClipTowers(TINY_MODEL, checkpoint=tmp_path / "nope.pt")


def test_pretrained_unavailable_offline_is_quick_and_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as e:
        ClipTowers("ViT-B-32", pretrained="openai", cache_dir=str(tmp_path))  # empty cache: nothing to load
    assert time.monotonic() - t < 5
    msg = str(e.value)
    assert "'ViT-B-32'" in msg and "'openai'" in msg and "cannot be downloaded" in msg and "checkpoint=" in msg


def test_pretrained_unreachable_host_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("IMU2CLIP_OFFLINE", raising=False)
    monkeypatch.setattr(towers_mod, "_reachable", lambda host, timeout: False)  # never touch the network
    with pytest.raises(WeightsUnavailableError, match=r"'ViT-B-32'.*unreachable"):
        ClipTowers("ViT-B-32", pretrained="laion2b_s34b_b79k", cache_dir=str(tmp_path))


def test_unknown_tag_lists_the_known_ones():
    with pytest.raises(WeightsUnavailableError, match=r"no pretrained tag 'nonsense'.*'ViT-B-32'.*openai"):
        ClipTowers("ViT-B-32", pretrained="nonsense")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipTowers("ViT-Nope")


def test_cached_tag_weights_load_offline(tiny, monkeypatch, tmp_path):
    """A pretrained tag whose file is already in the Hugging Face cache loads with HF_HUB_OFFLINE=1."""
    from safetensors.torch import save_file

    snap = tmp_path / "models--org--tiny" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (tmp_path / "models--org--tiny" / "refs").mkdir()
    (tmp_path / "models--org--tiny" / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(snap / "open_clip_model.safetensors"))
    tag = {"hf_hub": "org/tiny/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "quick_gelu": False}
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, t: tag if (name, t) == (TINY_MODEL, "demo") else {})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = ClipTowers(TINY_MODEL, pretrained="demo", cache_dir=str(tmp_path))
    assert torch.equal(loaded.encode_text(["x"]), tiny.encode_text(["x"]))
    assert loaded.mean.flatten().tolist() == [0.5] * 3 and loaded.std.flatten().tolist() == [0.25] * 3
