"""IMUEncoder: any window length and channel count, GRU over time, masks, save/load."""

from __future__ import annotations

import json
import math

import pytest
import torch

from imu2clip_plugin.encoder import IMUEncoder, IMUEncoderConfig, MaskedGroupNorm, load_encoder, save_encoder

SMALL = dict(conv_channels=(16, 32), kernel_sizes=(5, 3), norm_groups=4, gru_hidden=24, gru_layers=2,
             bidirectional=True, embed_dim=20, dropout=0.0)


def small(**kw) -> IMUEncoder:
    torch.manual_seed(0)
    return IMUEncoder(IMUEncoderConfig(**{**SMALL, **kw})).eval()


@pytest.mark.parametrize("T", [400, 1000, 2000, 999])
def test_any_window_length(T):
    model = small()
    x = torch.randn(3, 6, T)
    y = model(x)
    assert y.shape == (3, 20) and torch.isfinite(y).all()
    assert model(x, normalize=True).norm(dim=-1).allclose(torch.ones(3))
    assert model.downsampled_length(T) == math.ceil(T / 5)


def test_default_config_real_size():
    model = IMUEncoder().eval()
    cfg = model.config
    assert (cfg.in_channels, cfg.groups, cfg.pool_kernel, cfg.embed_dim) == (6, ((0, 1, 2), (3, 4, 5)), 5, 512)
    y = model(torch.randn(2, 6, 1000), torch.ones(2, 1000, dtype=torch.bool))
    assert y.shape == (2, 512)
    n = model.num_parameters()
    assert n == sum(p.numel() for p in model.parameters()) and 100_000 < n < 10_000_000


@pytest.mark.parametrize("groups", [None, ((0, 1, 2),), ((0,), (1, 2))])
def test_three_channels(groups):
    model = small(in_channels=3, groups=groups)
    for T in (400, 999):
        assert model(torch.randn(2, 3, T)).shape == (2, 20)
    with pytest.raises(ValueError, match=r"\(B, 3, T\)"):
        model(torch.randn(2, 6, 400))


def test_config_validation_and_dict_round_trip():
    with pytest.raises(ValueError, match="partition"):
        IMUEncoderConfig(in_channels=6, groups=((0, 1, 2), (3, 4)))
    with pytest.raises(ValueError, match="same length"):
        IMUEncoderConfig(conv_channels=(16, 32), kernel_sizes=(5,))
    with pytest.raises(ValueError, match="norm_groups"):
        IMUEncoderConfig(conv_channels=(12,), kernel_sizes=(5,), norm_groups=8)
    cfg = IMUEncoderConfig(**SMALL)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert IMUEncoderConfig.from_dict(d) == cfg
    assert cfg.n_blocks == 2
    with pytest.raises(ValueError, match="unknown"):
        IMUEncoderConfig.from_dict({**d, "gru_size": 3})


def test_gru_runs_over_time_with_no_length_specific_weights():
    model = small()
    # the GRU's features are the conv channels; its sequence is the (pooled) time axis
    assert model.gru.input_size == model.config.conv_channels[-1] and model.gru.batch_first
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    lengths = (400, 1000, 2000, 999)
    for T in lengths:
        model(torch.randn(1, 6, T))
        for k, s in shapes.items():  # nothing sized by the window (T) or by the GRU steps (T / 5)
            assert T not in s and model.downsampled_length(T) not in s, (k, s)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes
    # the last samples of a long window still reach the embedding
    x = torch.randn(2, 6, 2000)
    x2 = x.clone()
    x2[:, :, -25:] += 3.0
    assert (model(x) - model(x2)).abs().max() > 1e-4
    # and the first ones too
    x3 = x.clone()
    x3[:, :, :25] += 3.0
    assert (model(x) - model(x3)).abs().max() > 1e-4


def test_samples_are_independent_of_their_batch():
    """Per-sample normalisation only (no BatchNorm): a window's embedding does not depend on its batch mates."""
    model = small()
    x = torch.randn(4, 6, 600)
    torch.testing.assert_close(model(x)[1:2], model(x[1:2]), atol=1e-6, rtol=1e-5)


def test_masked_values_do_not_affect_the_output():
    model = small()
    T = 1000
    x = torch.randn(3, 6, T)
    mask = torch.ones(3, T, dtype=torch.bool)
    mask[0, 300:420] = False          # a gap in the middle
    mask[1, 900:] = False             # trailing padding
    mask[2, :7] = False               # an unaligned gap at the start (not a multiple of the pool)
    x2 = x.clone()
    x2[~mask.unsqueeze(1).expand_as(x)] = torch.randn(int((~mask).sum()) * 6) * 100
    x3 = x.clone()
    x3[:, :, 300:420][0] = float("nan")  # NaN in a gap never reaches the output
    y, y2, y3 = model(x, mask), model(x2, mask), model(x3, mask)
    torch.testing.assert_close(y, y2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(y, y3, atol=1e-6, rtol=1e-5)
    # the mask matters (and None means all valid)
    assert (model(x) - y).abs().max() > 1e-4
    torch.testing.assert_close(model(x), model(x, torch.ones(3, T, dtype=torch.bool)))
    with pytest.raises(ValueError, match="mask"):
        model(x, mask[:, :10])


def test_fully_masked_window_and_gradients():
    model = small().train()
    x = torch.randn(2, 6, 500)
    mask = torch.ones(2, 500, dtype=torch.bool)
    mask[1] = False
    y = model(x, mask, normalize=True)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_masked_group_norm_matches_group_norm_without_mask():
    x = torch.randn(3, 8, 50)
    ours = MaskedGroupNorm.contiguous(4, 8)
    ref = torch.nn.GroupNorm(4, 8)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # non-contiguous groups normalise each group's channels together
    g = MaskedGroupNorm([(0, 2, 4, 6), (1, 3, 5, 7)], 8)
    y = g(x)
    for chans in ((0, 2, 4, 6), (1, 3, 5, 7)):
        sel = y[:, list(chans)]
        torch.testing.assert_close(sel.mean((1, 2)), torch.zeros(3), atol=1e-5, rtol=0)
        torch.testing.assert_close(sel.var((1, 2), unbiased=False), torch.ones(3), atol=1e-3, rtol=0)


def test_save_load_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    model = small(in_channels=3, groups=None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # not the init: the weights must really be loaded
    d = save_encoder(model, tmp_path / "enc")
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_encoder(d)
    assert loaded.config == model.config and not loaded.training
    x, mask = torch.randn(2, 3, 777), torch.rand(2, 777) > 0.2
    assert torch.equal(model(x, mask), loaded(x, mask))
    with pytest.raises(FileNotFoundError, match="not an IMU encoder"):
        load_encoder(tmp_path)


def test_encodes_a_loader_batch(ego4d_tree):
    """The loader's ``imu (B, 6, T)`` and ``imu_mask (B, T)`` go straight in."""
    import mmloader

    wins = mmloader.open("ego4d", root=str(ego4d_tree)).windows(sec=1, modalities=["imu"])
    batch = next(iter(wins.loader(batch_size=2)))
    assert batch["imu"].shape[:2] == (2, 6) and batch["imu_mask"].shape == (2, batch["imu"].shape[-1])
    y = small()(batch["imu"], batch["imu_mask"], normalize=True)
    assert y.shape == (2, 20) and torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_statistics_stay_float32_under_autocast(dtype):
    """Sums of squares of 1000 samples of ~100 overflow float16 (max 65504); the norm must compute them in float32
    under autocast, as torch's own group_norm does, and match the float32 result."""
    from imu2clip_plugin.encoder import MaskedGroupNorm

    norm = MaskedGroupNorm([(0, 1, 2), (3, 4, 5)], 6)
    x = 100.0 * torch.randn(2, 6, 1000, generator=torch.Generator().manual_seed(0))
    ref = norm(x)
    with torch.autocast("cpu", dtype=dtype):
        out = norm(x.to(dtype))
    assert torch.isfinite(out).all()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
