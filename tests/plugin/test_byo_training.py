"""docs/own-dataset.md section 4, as a test: a 50 Hz wrist accelerometer with activity labels, written with
mmloader.recipes.custom, windowed with label_stream, and the IMU encoder trained IMU<->text against frozen CLIP text
embeddings of the labels (the tiny offline open_clip config)."""

from __future__ import annotations

import numpy as np
import torch

import mmloader
from imu2clip_plugin import ClipTowers, ContrastiveLoss, IMUEncoder, IMUEncoderConfig
from mmloader.recipes.custom import Recording, TimeSeriesInput, write_store

NS = 1_000_000_000
ACTIVITIES = {"walking": (2.0, 2.0), "running": (3.0, 6.0), "sitting": (0.0, 0.0)}  # (step Hz, amplitude m/s^2)


def wrist_recording(rid: str, split: str, order: list[str], seg_sec: float, rng: np.random.Generator) -> Recording:
    t = np.arange(int(seg_sec * len(order) * 50)) / 50.0
    data = np.zeros((len(t), 3), np.float32)
    labels = []
    for k, act in enumerate(order):
        sel = (t >= k * seg_sec) & (t < (k + 1) * seg_sec)
        hz, amp = ACTIVITIES[act]
        data[sel, 2] = 9.81 + amp * np.sin(2 * np.pi * hz * t[sel])
        data[sel, 0] = 0.5 * amp * np.sin(np.pi * hz * t[sel])
        labels.append((round(k * seg_sec * NS), round((k + 1) * seg_sec * NS), act))
    data += rng.normal(0, 0.2, data.shape).astype(np.float32)
    ts = TimeSeriesInput((t * NS).astype(np.int64), data, ["acc_x", "acc_y", "acc_z"], ["m/s^2"] * 3, 50.0)
    return Recording(id=rid, split=split, timeseries={"wrist": ts}, events={"activities": labels})


def test_training_the_encoder_on_a_wrist_dataset(tmp_path):
    rng = np.random.default_rng(0)
    recs = [wrist_recording(f"s{i}", "train", list(rng.permutation(list(ACTIVITIES))), 20.0, rng) for i in range(3)]
    url = write_store(tmp_path / "wrist", recs, dataset="wrist")

    wins = mmloader.open(url).windows(sec=2, stride=1, modalities=["wrist"], imu_hz=50, label_stream="activities")
    towers = ClipTowers("imu2clip-tiny")
    classes = sorted(ACTIVITIES)
    prompts = towers.encode_text([f"a person {c}" for c in classes])              # (3, D), frozen
    encoder = IMUEncoder(IMUEncoderConfig(in_channels=3, groups=None, conv_channels=(16, 32), kernel_sizes=(5, 5),
                                          gru_hidden=32, gru_layers=1, embed_dim=towers.embed_dim, dropout=0.0))
    loss_fn = ContrastiveLoss(targets=("text",))
    opt = torch.optim.AdamW([*encoder.parameters(), *loss_fn.parameters()], lr=3e-3)

    def accuracy() -> float:
        encoder.eval()
        with torch.no_grad():
            hits = n = 0
            for batch in wins.loader(batch_size=64):
                z = encoder(batch["wrist"], batch["wrist_mask"], normalize=True)
                pred = (z @ prompts.T).argmax(1)
                hits += sum(classes[p] == y for p, y in zip(pred.tolist(), batch["label"]))
                n += len(batch["label"])
        encoder.train()
        return hits / n

    losses = []
    loader = wins.loader(batch_size=16, shuffle=True, seed=0)
    for _ in range(6):
        for batch in loader:
            z_imu = encoder(batch["wrist"], batch["wrist_mask"], normalize=True)
            z_txt = prompts[[classes.index(y) for y in batch["label"]]]
            loss = loss_fn(z_imu, text=z_txt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert accuracy() > 0.8  # zero-shot against the label prompts; chance is 1/3
