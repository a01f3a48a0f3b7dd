"""Evaluation of an IMU encoder: cross-modal retrieval and activity recognition, with a report.

- Retrieval: IMU→video, video→IMU, IMU→text, text→IMU over one window set (use held-out recordings:
  ``windows.split("test")`` — splits are per recording), each with R@1/5/10/50, MRR, median rank and N.
- Activity recognition on windows with labels (``windows(..., label_stream="activities")``): zero-shot (nearest
  CLIP text embedding of a class prompt), a linear probe on the frozen encoder and fine-tuning of the whole encoder
  with a linear head; the probe and the fine-tuning are repeated on a randomly initialised encoder as the baseline;
  accuracy and macro-F1.
- ``evaluate_encoder``: all of the above for a train / held-out pair of window sets, optionally with the report.
- The report (``format_results``, ``write_report``: ``report.md``, ``metrics.json`` and PNG plots) is
  :mod:`imu2clip_plugin.report`, window text and ``verb_labeller`` :mod:`imu2clip_plugin.text`; both are
  re-exported here.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .metrics import classification_metrics, confusion_matrix, retrieval_metrics
from .report import AR_METHODS, RECALL_KS, format_results, plot_retrieval_examples, write_report
from .text import text_of, verb_labeller

__all__ = ["WindowEmbeddings", "embed_windows", "reembed", "retrieval", "zero_shot", "linear_probe", "fine_tune",
           "activity_recognition", "evaluate_encoder", "verb_labeller", "format_results", "plot_retrieval_examples",
           "write_report", "AR_METHODS", "RECALL_KS"]


@dataclass
class WindowEmbeddings:
    """L2-normalised embeddings of a window set, in window order. ``video``/``text`` None when absent."""

    imu: np.ndarray
    video: np.ndarray | None
    text: np.ndarray | None
    labels: list[str] | None
    recording_ids: list[str]
    imu_raw: np.ndarray | None = None       # (N, C, T) float32 input windows, with ``keep_inputs=True``
    imu_mask: np.ndarray | None = None      # (N, T) bool
    frames: np.ndarray | None = None        # (N, H, W, 3) uint8 centre frames, with ``keep_inputs=True``
    texts: list[str] | None = None          # each window's text as embedded (``embed.text_of``), when it has text

    def subset(self, idx: Sequence[int]) -> "WindowEmbeddings":
        """The embeddings of windows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        pick = lambda a: None if a is None else a[idx]  # noqa: E731
        plist = lambda a: None if a is None else [a[i] for i in idx]  # noqa: E731
        return WindowEmbeddings(pick(self.imu), pick(self.video), pick(self.text), plist(self.labels),
                                plist(self.recording_ids), pick(self.imu_raw), pick(self.imu_mask), pick(self.frames),
                                plist(self.texts))


@torch.no_grad()
def embed_windows(encoder: torch.nn.Module, windows, towers=None, batch_size: int = 64, reduce: str = "center",
                  num_workers: int = 0, keep_inputs: bool = False) -> WindowEmbeddings:
    """Run the encoder (and the frozen towers, when given) over every window, in order.

    ``keep_inputs=True`` also keeps the IMU windows and the centre video frame of each window (for fine-tuning and
    the retrieval-example plots)."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    imu, video, text, labels, rids, texts = [], [], [], [], [], []
    raw, masks, frames = [], [], []
    for batch in windows.loader(batch_size=batch_size, shuffle=False, num_workers=num_workers):
        x = batch["imu"].to(device)
        m = batch["imu_mask"].to(device) if "imu_mask" in batch else None
        imu.append(encoder(x, m, normalize=True).float().cpu().numpy())
        if keep_inputs:
            raw.append(batch["imu"].float().numpy())
            masks.append(batch["imu_mask"].numpy() if "imu_mask" in batch else np.ones(batch["imu"].shape[::2], bool))
            if "video" in batch:
                v = batch["video"]                              # (B, F, 3, H, W) uint8
                frames.append(v[:, v.shape[1] // 2].permute(0, 2, 3, 1).numpy())
        if towers is not None and "video" in batch:
            video.append(towers.encode_frames(batch["video"], reduce=reduce).float().cpu().numpy())
        if towers is not None and "text" in batch:
            text.append(towers.encode_text([text_of(t) for t in batch["text"]]).float().cpu().numpy())
        if "text" in batch:
            texts.extend(text_of(t) for t in batch["text"])
        if "label" in batch:
            labels.extend(batch["label"])
        rids.extend(batch["recording_id"])
    encoder.train(was_training)
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    return WindowEmbeddings(cat(imu), cat(video), cat(text), labels or None, rids,
                            imu_raw=cat(raw), imu_mask=cat(masks), frames=cat(frames), texts=texts or None)


@torch.no_grad()
def reembed(encoder: torch.nn.Module, emb: WindowEmbeddings, batch_size: int = 64) -> WindowEmbeddings:
    """``emb`` with its ``imu`` embeddings recomputed by ``encoder`` from the kept IMU windows (no data is read)."""
    if emb.imu_raw is None:
        raise ValueError("re-embedding needs the IMU windows: embed_windows(..., keep_inputs=True)")
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    x, m = torch.as_tensor(emb.imu_raw), torch.as_tensor(emb.imu_mask)
    out = [encoder(x[i:i + batch_size].to(device), m[i:i + batch_size].to(device), normalize=True).float().cpu()
           for i in range(0, len(x), batch_size)]
    encoder.train(was_training)
    return dataclasses.replace(emb, imu=torch.cat(out).numpy())


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


def fine_tune(encoder: torch.nn.Module, train: WindowEmbeddings, test: WindowEmbeddings, train_y: Sequence[int],
              test_y: Sequence[int], num_classes: int, epochs: int = 15, lr: float = 1e-3, batch_size: int = 64,
              weight_decay: float = 0.01, seed: int = 0) -> dict:
    """Fine-tune a copy of ``encoder`` with a linear head on its (un-normalised) embedding (cross-entropy, AdamW).

    Needs the raw IMU windows: ``embed_windows(..., keep_inputs=True)``. ``encoder`` itself is not modified."""
    import copy

    if train.imu_raw is None or test.imu_raw is None:
        raise ValueError("fine-tuning needs the IMU windows: embed_windows(..., keep_inputs=True)")
    g = torch.Generator().manual_seed(seed)
    device = next(encoder.parameters()).device
    model = copy.deepcopy(encoder).train()
    head = torch.nn.Linear(model.config.embed_dim, num_classes).to(device)
    params = list(model.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    x, m = torch.as_tensor(train.imu_raw), torch.as_tensor(train.imu_mask)
    y = torch.as_tensor(list(train_y), dtype=torch.int64)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(order), batch_size):
            j = order[i:i + batch_size]
            logits = head(model(x[j].to(device), m[j].to(device)))
            loss = torch.nn.functional.cross_entropy(logits, y[j].to(device))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
    model.eval()
    preds = []
    with torch.no_grad():
        xt, mt = torch.as_tensor(test.imu_raw), torch.as_tensor(test.imu_mask)
        for i in range(0, len(xt), batch_size):
            preds.append(head(model(xt[i:i + batch_size].to(device), mt[i:i + batch_size].to(device))).argmax(1).cpu())
    pred = torch.cat(preds).numpy()
    y_test = list(test_y)
    return {**classification_metrics(y_test, pred, num_classes),
            "confusion": confusion_matrix(y_test, pred, num_classes).tolist(), "epochs": epochs}


def activity_recognition(train: WindowEmbeddings, test: WindowEmbeddings, classes: Sequence[str],
                         baseline_train: WindowEmbeddings | None = None, baseline_test: WindowEmbeddings | None = None,
                         towers=None, encoder: torch.nn.Module | None = None,
                         baseline_encoder: torch.nn.Module | None = None, fine_tune_epochs: int = 15) -> dict:
    """Zero-shot (when towers are given), linear probe, and the random-init baseline's linear probe; with
    ``encoder`` (and ``baseline_encoder``) and raw inputs in the embeddings, fine-tuning too."""
    if train.labels is None or test.labels is None:
        raise ValueError("activity recognition needs labelled windows: build them with label_stream=...")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(train.labels) - set(index)) + sorted(set(test.labels) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the classes {list(classes)}")
    ytr, yte = [index[v] for v in train.labels], [index[v] for v in test.labels]
    out: dict[str, Any] = {"classes": list(classes), "train_windows": len(ytr), "test_windows": len(yte)}
    if towers is not None:
        out["zero_shot"] = zero_shot(test, towers, classes)
    out["linear_probe"] = linear_probe(train.imu, ytr, test.imu, yte, len(classes))
    if baseline_train is not None and baseline_test is not None:
        out["random_init_linear_probe"] = linear_probe(baseline_train.imu, ytr, baseline_test.imu, yte, len(classes))
    if encoder is not None and train.imu_raw is not None and fine_tune_epochs > 0:
        out["fine_tune"] = fine_tune(encoder, train, test, ytr, yte, len(classes), epochs=fine_tune_epochs)
        if baseline_encoder is not None:
            out["random_init_fine_tune"] = fine_tune(baseline_encoder, train, test, ytr, yte, len(classes),
                                                     epochs=fine_tune_epochs)
    return out


def _labelled_from_text(emb: WindowEmbeddings, label_map: dict[str, str], name: str) -> WindowEmbeddings:
    """The windows of ``emb`` whose text names a verb of ``label_map``, labelled by it (:func:`verb_labeller`)."""
    label = verb_labeller(label_map)
    if emb.texts is None:
        raise ValueError("label_map labels windows from their text: build the windows with 'text'")
    labels = [label(t) for t in emb.texts]
    keep = [i for i, v in enumerate(labels) if v is not None]
    if not keep:
        raise ValueError(f"no {name} window's text names a verb of the label map {sorted(label_map)}")
    return dataclasses.replace(emb, labels=labels).subset(keep)


def evaluate_encoder(encoder: torch.nn.Module, train_windows, test_windows, towers, *, classes: Sequence[str] | None = None,
                     baseline_encoder: torch.nn.Module | None = None, fine_tune_epochs: int = 15,
                     reduce: str = "center", run_dir: str | os.PathLike | None = None,
                     extra: dict | None = None, label_map: dict[str, str] | None = None) -> dict:
    """Retrieval on ``test_windows`` (use held-out recordings) and, when both sets carry labels, activity
    recognition trained on ``train_windows``; writes the report into ``run_dir`` when given
    (``results["report"]`` is its path). ``baseline_encoder``: a randomly initialised encoder of the same config.
    ``label_map``: verb → class (:func:`verb_labeller`) to label windows from their text when the windows carry no
    labels; activity recognition then runs on the windows whose text names a mapped verb."""
    test = held_out = embed_windows(encoder, test_windows, towers, reduce=reduce, keep_inputs=True)
    results: dict[str, Any] = {"retrieval": retrieval(test)}
    if train_windows is not None and (label_map is not None or test.labels is not None):
        train = embed_windows(encoder, train_windows, keep_inputs=True)
        if label_map is not None:
            train, test = (_labelled_from_text(e, label_map, name) for e, name in ((train, "train"), (test, "held-out")))
        if train.labels is not None:
            b_train = b_test = None
            if baseline_encoder is not None:
                b_train, b_test = reembed(baseline_encoder, train), reembed(baseline_encoder, test)
            classes = list(classes) if classes is not None else sorted(set(train.labels) | set(test.labels))
            results["activity_recognition"] = activity_recognition(
                train, test, classes, b_train, b_test, towers=towers, encoder=encoder,
                baseline_encoder=baseline_encoder, fine_tune_epochs=fine_tune_epochs)
    results.update(extra or {})
    if run_dir is not None:
        results["report"] = write_report(results, run_dir, examples=held_out)
    return results
