"""ContrastiveLoss: hand-computed reference, temperature clamp, targets, and cross-rank negatives with gradients."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from imu2clip_plugin.encoder import IMUEncoder, IMUEncoderConfig
from imu2clip_plugin.loss import INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, ContrastiveLoss, gather_with_grad, info_nce


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def reference(q, k, scale):
    """Symmetric InfoNCE written out with Python floats."""
    q, k = q.tolist(), k.tolist()
    n = len(q)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731

    def direction(a, b):
        total = 0.0
        for i in range(n):
            logits = [scale * dot(a[i], b[j]) for j in range(n)]
            total += -(logits[i] - math.log(sum(math.exp(v) for v in logits)))
        return total / n

    return 0.5 * (direction(q, k) + direction(k, q))


def test_matches_hand_computed_reference():
    q, k = unit(3, 4, seed=1), unit(3, 4, seed=2)
    loss = ContrastiveLoss(targets=("video",))
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert loss(q, video=k).item() == pytest.approx(reference(q, k, 1 / 0.07), rel=1e-5)
    # symmetric in its two arguments, and a functional form
    assert loss(k, video=q).item() == pytest.approx(loss(q, video=k).item(), rel=1e-6)
    assert info_nce(q, k, torch.tensor(0.0)).item() == pytest.approx(reference(q, k, 1.0), rel=1e-5)
    # a tiny example worked by hand: 2 orthogonal pairs, scale 1: each row is -log(e / (e + 1))
    e = torch.eye(2)
    assert info_nce(e, e, torch.tensor(0.0)).item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)


def test_temperature_is_learnable_log_parameterised_and_clamped():
    q, k = unit(5, 8, seed=3), unit(5, 8, seed=4)
    loss = ContrastiveLoss()
    assert isinstance(loss.logit_scale, torch.nn.Parameter)
    loss(q, video=k).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs() > 0
    with torch.no_grad():
        loss.logit_scale.fill_(10.0)  # e^10 would be far beyond CLIP's 100
    loss.logit_scale.grad = None
    assert loss.scale().item() == pytest.approx(100.0, rel=1e-5)
    value = loss(q, video=k)
    assert value.item() == pytest.approx(reference(q, k, 100.0), rel=1e-5)
    value.backward()
    assert loss.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further
    loss.clamp_()
    assert loss.logit_scale.item() == pytest.approx(MAX_LOGIT_SCALE)
    fixed = ContrastiveLoss(learnable_scale=False)
    assert not any(True for _ in fixed.parameters()) and fixed.logit_scale.item() == pytest.approx(INIT_LOGIT_SCALE)


def test_both_targets_is_the_sum():
    q, v, t = unit(6, 8, seed=5), unit(6, 8, seed=6), unit(6, 8, seed=7)
    both = ContrastiveLoss(targets=("video", "text"))
    lv = ContrastiveLoss(targets=("video",))(q, video=v)
    lt = ContrastiveLoss(targets="text")(q, text=t)
    assert both(q, video=v, text=t).item() == pytest.approx((lv + lt).item(), rel=1e-6)
    terms = both.terms(q, video=v, text=t)
    assert set(terms) == {"video", "text"} and terms["video"].item() == pytest.approx(lv.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs"):
        both(q, video=v)
    with pytest.raises(ValueError, match="subset"):
        ContrastiveLoss(targets=("audio",))


def test_aligned_pairs_have_a_low_loss():
    q = unit(8, 16, seed=8)
    loss = ContrastiveLoss()
    assert loss(q, video=q).item() < loss(q, video=unit(8, 16, seed=9)).item()
    assert gather_with_grad(q) == (q, 0)  # not distributed: identity


# -- two real processes (gloo) against one process on the concatenated batch --------------------------------

B, C, T, D = 4, 6, 250, 16
CFG = dict(conv_channels=(8, 16), kernel_sizes=(5, 3), norm_groups=4, gru_hidden=12, gru_layers=1,
           bidirectional=True, embed_dim=D, dropout=0.0)


def make_problem(world: int):
    """The same model, loss and data in every process (seeded); data for world·B windows.

    float64, so that the comparison tests the formulation and not float32 summation order (in float32 the two
    runs agree to ~1e-5 relative).
    """
    torch.manual_seed(0)
    encoder = IMUEncoder(IMUEncoderConfig(**CFG)).double()
    adapter = torch.nn.Linear(D, D).double()  # a learnable map on the video side: the keys' gather needs grads too
    loss = ContrastiveLoss(targets=("video", "text")).double()
    with torch.no_grad():
        loss.logit_scale.fill_(math.log(20.0))
    g = torch.Generator().manual_seed(1)
    n = world * B
    x = torch.randn(n, C, T, generator=g, dtype=torch.float64)
    mask = torch.rand(n, T, generator=g) > 0.1
    video = torch.randn(n, D, generator=g, dtype=torch.float64)
    text = F.normalize(torch.randn(n, D, generator=g, dtype=torch.float64), dim=-1)
    return encoder, adapter, loss, (x, mask, video, text)


def step(encoder, adapter, loss, x, mask, video, text):
    z = encoder(x, mask, normalize=True)
    v = F.normalize(adapter(video), dim=-1)
    value = loss(z, video=v, text=text)
    value.backward()
    params = {**{f"encoder.{k}": p for k, p in encoder.named_parameters()},
              **{f"adapter.{k}": p for k, p in adapter.named_parameters()}, "logit_scale": loss.logit_scale}
    return value.detach(), params


class Pair(torch.nn.Module):
    """Encoder + video adapter + loss in one module, to wrap in DistributedDataParallel."""

    def __init__(self, encoder, adapter, loss):
        super().__init__()
        self.encoder, self.adapter, self.loss = encoder, adapter, loss

    def forward(self, x, mask, video, text):
        z = self.encoder(x, mask, normalize=True)
        return self.loss(z, video=F.normalize(self.adapter(video), dim=-1), text=text)


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        encoder, adapter, loss, data = make_problem(world)
        mine = [t[rank * B:(rank + 1) * B] for t in data]
        value, params = step(encoder, adapter, loss, *mine)
        # what DDP does: average the gradients (and here the loss, to report it) over ranks
        dist.all_reduce(value)
        value /= world
        grads = {}
        for k, p in params.items():
            g = p.grad.clone()
            dist.all_reduce(g)
            grads[k] = g / world
        # unequal per-rank sizes: forward is the concatenation, backward sums every rank's gradient
        n = 3 if rank == 0 else 2
        x = torch.full((n, 2), float(rank), requires_grad=True)
        gathered, offset = gather_with_grad(x)
        w = torch.arange(10.0).view(5, 2)  # the same on every rank
        (gathered * w).sum().backward()
        gather_ok = (torch.equal(gathered.detach(), torch.tensor([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 2))
                     and offset == (0 if rank == 0 else 3)
                     and torch.equal(x.grad, world * w[offset:offset + n]))
        # the same through real DDP (its bucketed all-reduce runs alongside the gather's backward all-reduce)
        ddp = torch.nn.parallel.DistributedDataParallel(Pair(*make_problem(world)[:3]))
        ddp(*mine).backward()
        ddp_grads = {k: p.grad.clone() for k, p in ddp.module.named_parameters()}
        torch.save({"loss": value, "grads": grads, "ddp_grads": ddp_grads, "gather_ok": gather_ok},
                   os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_gathered_negatives_match_one_process_on_the_concatenated_batch(tmp_path: Path):
    """2 gloo ranks × B windows with all-gathered negatives == 1 process × 2B windows: loss and gradients.

    Each rank's loss is the mean over its own B queries (scored against all 2B keys); the reported loss and the
    gradients are averaged over the ranks as DDP does. That equals the single-process mean over 2B queries and
    its gradient, because the gather's backward all-reduces every rank's gradient w.r.t. this rank's rows.
    """
    world = 2
    ctx = mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=False)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("distributed workers did not finish in 120 s")

    encoder, adapter, loss, data = make_problem(world)  # the same 2B windows, one process
    ref_loss, params = step(encoder, adapter, loss, *data)
    ref = {k: p.grad for k, p in params.items()}
    assert len(data[0]) == world * B
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["gather_ok"]
        torch.testing.assert_close(got["loss"], ref_loss, atol=1e-5, rtol=1e-5)
        assert got["grads"].keys() == ref.keys()
        for k in ref:
            assert ref[k].abs().max() > 0, k
            torch.testing.assert_close(got["grads"][k], ref[k], atol=1e-5, rtol=1e-5, msg=lambda m: f"{k}: {m}")
            torch.testing.assert_close(got["ddp_grads"][k.replace("logit_scale", "loss.logit_scale")], ref[k],
                                       atol=1e-5, rtol=1e-5, msg=lambda m: f"DDP {k}: {m}")


def test_duplicated_targets_are_not_negatives_of_each_other():
    """Rows 1 and 2 share one narration: with masking, row 1's softmax runs over its own key and the other
    distinct keys only, i.e. it equals InfoNCE on the pool without the duplicate column."""
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    k[2] = k[1]
    ls = torch.tensor(2.0)
    s = ls.exp()
    masked = info_nce(q, k, ls, mask_duplicates=True)
    plain = info_nce(q, k, ls)
    assert not torch.allclose(masked, plain)

    def ce(logits, label, keep):
        return F.cross_entropy(logits[keep][None], torch.tensor([keep.index(label)]))

    want = 0.0
    for i in range(4):
        keep = [j for j in range(4) if not (j != i and {i, j} == {1, 2})]
        want += 0.5 * (ce(s * q[i] @ k.T, i, keep) + ce(s * k[i] @ q.T, i, keep)) / 4
    torch.testing.assert_close(masked, torch.as_tensor(want, dtype=masked.dtype))


def test_target_weights_scale_each_term():
    g = torch.Generator().manual_seed(1)
    imu, vid, txt = (F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(3))
    loss = ContrastiveLoss(("video", "text"), weights={"text": 0.25})
    t = loss.terms(imu, vid, txt)
    torch.testing.assert_close(loss(imu, vid, txt), t["video"] + 0.25 * t["text"])
    with pytest.raises(ValueError, match="weights"):
        ContrastiveLoss(("video",), weights={"text": 1.0})
