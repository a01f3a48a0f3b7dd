"""Evaluation of an IMU encoder: cross-modal retrieval and activity recognition, with a report.

- Retrieval: IMU→video, video→IMU, IMU→text, text→IMU over one window set (use held-out recordings:
  ``windows.split("test")`` — splits are per recording), each with R@1/5/10/50, MRR, median rank and N.
- Activity recognition on windows with labels (``windows(..., label_stream="activities")``): zero-shot (nearest
  CLIP text embedding of a class prompt) and a linear probe on the frozen encoder, the same probe on a randomly
  initialised encoder as the baseline; accuracy and macro-F1.
- ``write_report``: ``report.md``, ``metrics.json`` and PNG plots (recall-at-k curves, confusion matrices).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .metrics import classification_metrics, confusion_matrix, retrieval_metrics

RECALL_KS = (1, 5, 10, 50)


@dataclass
class WindowEmbeddings:
    """L2-normalised embeddings of a window set, in window order. ``video``/``text`` None when absent."""

    imu: np.ndarray
    video: np.ndarray | None
    text: np.ndarray | None
    labels: list[str] | None
    recording_ids: list[str]


@torch.no_grad()
def embed_windows(encoder: torch.nn.Module, windows, towers=None, batch_size: int = 64, reduce: str = "center",
                  num_workers: int = 0) -> WindowEmbeddings:
    """Run the encoder (and the frozen towers, when given) over every window, in order."""
    was_training = encoder.training
    encoder.eval()
    imu, video, text, labels, rids = [], [], [], [], []
    for batch in windows.loader(batch_size=batch_size, shuffle=False, num_workers=num_workers):
        imu.append(encoder(batch["imu"], batch.get("imu_mask"), normalize=True).float().cpu().numpy())
        if towers is not None and "video" in batch:
            video.append(towers.encode_frames(batch["video"], reduce=reduce).float().cpu().numpy())
        if towers is not None and "text" in batch:
            texts = [t if isinstance(t, str) else " ".join(t) for t in batch["text"]]
            text.append(towers.encode_text(texts).float().cpu().numpy())
        if "label" in batch:
            labels.extend(batch["label"])
        rids.extend(batch["recording_id"])
    encoder.train(was_training)
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    return WindowEmbeddings(cat(imu), cat(video), cat(text), labels or None, rids)


def retrieval(emb: WindowEmbeddings, ks: Sequence[int] = RECALL_KS) -> dict[str, dict]:
    """Both directions for each modality present; window i's IMU matches window i's video / text."""
    out = {}
    for name, other in (("video", emb.video), ("text", emb.text)):
        if other is None:
            continue
        sim = emb.imu @ other.T
        out[f"imu->{name}"] = retrieval_metrics(sim, ks=ks)
        out[f"{name}->imu"] = retrieval_metrics(sim.T, ks=ks)
    return out


def zero_shot(emb: WindowEmbeddings, towers, classes: Sequence[str], prompt: str = "a person {}") -> dict:
    """Nearest class prompt in the joint space."""
    if emb.labels is None:
        raise ValueError("zero-shot needs labelled windows: build them with label_stream=...")
    with torch.no_grad():
        protos = towers.encode_text([prompt.format(c) for c in classes]).float().cpu().numpy()
    pred = (emb.imu @ protos.T).argmax(axis=1)
    y = [list(classes).index(label) for label in emb.labels]
    return {**classification_metrics(y, pred, len(classes)), "confusion": confusion_matrix(y, pred, len(classes)).tolist()}


def linear_probe(train_x: np.ndarray, train_y: Sequence[int], test_x: np.ndarray, test_y: Sequence[int],
                 num_classes: int, epochs: int = 300, lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> dict:
    """A linear classifier (softmax regression, full-batch AdamW) on frozen features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(list(train_y), dtype=torch.int64)
    mean, std = x.mean(0, keepdim=True), x.std(0, keepdim=True) + 1e-6
    head = torch.nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        loss = torch.nn.functional.cross_entropy(head((x - mean) / std), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = head((torch.as_tensor(test_x, dtype=torch.float32) - mean) / std).argmax(1).numpy()
    y_test = list(test_y)
    return {**classification_metrics(y_test, pred, num_classes),
            "confusion": confusion_matrix(y_test, pred, num_classes).tolist()}


def activity_recognition(train: WindowEmbeddings, test: WindowEmbeddings, classes: Sequence[str],
                         baseline_train: WindowEmbeddings | None = None, baseline_test: WindowEmbeddings | None = None,
                         towers=None) -> dict:
    """Zero-shot (when towers are given), linear probe, and the random-init baseline's linear probe."""
    if train.labels is None or test.labels is None:
        raise ValueError("activity recognition needs labelled windows: build them with label_stream=...")
    index = {c: i for i, c in enumerate(classes)}
    ytr, yte = [index[v] for v in train.labels], [index[v] for v in test.labels]
    out: dict[str, Any] = {"classes": list(classes), "train_windows": len(ytr), "test_windows": len(yte)}
    if towers is not None:
        out["zero_shot"] = zero_shot(test, towers, classes)
    out["linear_probe"] = linear_probe(train.imu, ytr, test.imu, yte, len(classes))
    if baseline_train is not None and baseline_test is not None:
        out["random_init_linear_probe"] = linear_probe(baseline_train.imu, ytr, baseline_test.imu, yte, len(classes))
    return out


def write_report(results: dict, run_dir: str | os.PathLike) -> str:
    """``report.md`` + ``metrics.json`` + PNG plots in ``run_dir``; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# IMU2CLIP evaluation", ""]
    ret = results.get("retrieval", {})
    if ret:
        lines += ["## Retrieval", "", "| direction | N | R@1 | R@5 | R@10 | R@50 | MRR | median rank | chance R@1 |",
                  "|---|---|---|---|---|---|---|---|---|"]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, m in ret.items():
            lines.append(f"| {name} | {m['N']} | " + " | ".join(f"{m[f'R@{k}']:.3f}" for k in RECALL_KS)
                         + f" | {m['MRR']:.3f} | {m['median_rank']:.1f} | {m['chance_R@1']:.4f} |")
            ax.plot(RECALL_KS, [m[f"R@{k}"] for k in RECALL_KS], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k")
        ax.set_title("Retrieval")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(run_dir, "recall_at_k.png"), dpi=120)
        plt.close(fig)
        lines += ["", "![recall at k](recall_at_k.png)", ""]
    act = results.get("activity_recognition")
    if act:
        lines += ["## Activity recognition", "", f"{act['train_windows']} training / {act['test_windows']} test windows, "
                  f"{len(act['classes'])} classes.", "", "| method | accuracy | macro-F1 |", "|---|---|---|"]
        for method in ("zero_shot", "linear_probe", "random_init_linear_probe"):
            if method in act:
                lines.append(f"| {method.replace('_', ' ')} | {act[method]['accuracy']:.3f} | {act[method]['macro_f1']:.3f} |")
                fig, ax = plt.subplots(figsize=(4.5, 4))
                cm = np.asarray(act[method]["confusion"])
                ax.imshow(cm, cmap="Blues")
                ax.set_xticks(range(len(act["classes"])), act["classes"], rotation=60, ha="right", fontsize=7)
                ax.set_yticks(range(len(act["classes"])), act["classes"], fontsize=7)
                for (i, j), v in np.ndenumerate(cm):
                    ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                            color="white" if v > cm.max() / 2 else "black")
                ax.set_xlabel("predicted")
                ax.set_ylabel("true")
                ax.set_title(method.replace("_", " "))
                fig.tight_layout()
                fig.savefig(os.path.join(run_dir, f"confusion_{method}.png"), dpi=120)
                plt.close(fig)
        lines += [""] + [f"![{m}](confusion_{m}.png)" for m in ("zero_shot", "linear_probe", "random_init_linear_probe")
                         if m in act]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
