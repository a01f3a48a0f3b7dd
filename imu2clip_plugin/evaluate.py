"""Evaluation of an IMU encoder: cross-modal retrieval and activity recognition, with a report.

- Retrieval: IMU→video, video→IMU, IMU→text, text→IMU over one window set (use held-out recordings:
  ``windows.split("test")`` — splits are per recording), each with R@1/5/10/50, MRR, median rank and N.
- Activity recognition on windows with labels (``windows(..., label_stream="activities")``): zero-shot (nearest
  CLIP text embedding of a class prompt), a linear probe on the frozen encoder and fine-tuning of the whole encoder
  with a linear head; the probe and the fine-tuning are repeated on a randomly initialised encoder as the baseline;
  accuracy and macro-F1.
- ``evaluate_encoder``: all of the above for a train / held-out pair of window sets, optionally with the report.
- ``write_report``: ``report.md``, ``metrics.json`` and PNG plots (recall-at-k curves, confusion matrices, and
  retrieval examples: query IMU traces next to the top retrieved frames).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .embed import text_of
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


def verb_labeller(mapping: dict[str, str]):
    """A window-text → class function for datasets without activity labels (e.g. Ego4D narrations): the class of
    the first word of the text that starts with one of ``mapping``'s keys (``{"walk": "walking", "cut": "cooking"}``
    matches "C walks ..." and "C cuts ..."), or None. Longer keys win over their prefixes."""
    keys = sorted(((k.lower(), v) for k, v in mapping.items()), key=lambda kv: -len(kv[0]))
    if not keys:
        raise ValueError("the verb → class mapping is empty")

    def label(text: str) -> str | None:
        for word in text.lower().replace("#", " ").split():
            for k, v in keys:
                if word.startswith(k):
                    return v
        return None

    return label


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


AR_METHODS = ("zero_shot", "linear_probe", "random_init_linear_probe", "fine_tune", "random_init_fine_tune")


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
            label = verb_labeller(label_map)
            parts = []
            for e, name in ((train, "train"), (test, "held-out")):
                if e.texts is None:
                    raise ValueError("label_map labels windows from their text: build the windows with 'text'")
                labels = [label(t) for t in e.texts]
                keep = [i for i, v in enumerate(labels) if v is not None]
                if not keep:
                    raise ValueError(f"no {name} window's text names a verb of the label map {sorted(label_map)}")
                parts.append(dataclasses.replace(e, labels=labels).subset(keep))
            train, test = parts
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


def format_results(results: dict) -> str:
    """The compact text tables of ``evaluate_encoder``'s results (retrieval, then activity recognition)."""
    lines = [f"{'direction':<12} {'N':>5} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'MRR':>6} {'chance R@1':>11}"]
    for name, m in results["retrieval"].items():
        lines.append(f"{name:<12} {m['N']:>5} {m['R@1']:>6.3f} {m['R@5']:>6.3f} {m['R@10']:>6.3f} {m['MRR']:>6.3f} "
                     f"{m['chance_R@1']:>11.4f}")
    act = results.get("activity_recognition")
    if act:
        lines += ["", f"{'activity recognition':<28} {'accuracy':>9} {'macro-F1':>9}   ({len(act['classes'])} classes, "
                      f"{act['test_windows']} test windows)"]
        lines += [f"{m:<28} {act[m]['accuracy']:>9.3f} {act[m]['macro_f1']:>9.3f}"
                  for m in AR_METHODS if m in act]
    return "\n".join(lines)


def plot_retrieval_examples(emb: WindowEmbeddings, path: str | os.PathLike, queries: int = 4, k: int = 5,
                            seed: int = 0) -> str:
    """A PNG: for a few IMU queries, the query's IMU trace (channels 0-2 solid on the left axis, 3-5 dashed on the
    right: accelerometer m/s² and gyroscope rad/s for the Ego4D and Aria recipes) next to its
    true frame (with its rank) and the top-``k`` retrieved frames (IMU→video) with their cosines; the true match is
    framed in green where it was retrieved."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if emb.frames is None or emb.imu_raw is None or emb.video is None:
        raise ValueError("retrieval examples need frames, IMU windows and video embeddings: "
                         "embed_windows(encoder, windows, towers, keep_inputs=True)")
    sim = emb.imu @ emb.video.T
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(sim), size=min(queries, len(sim)), replace=False).tolist())
    fig, axes = plt.subplots(len(picks), k + 2, figsize=(2.0 * (k + 2) + 1.5, 2.0 * len(picks)),
                             gridspec_kw={"width_ratios": [2.2] + [1] * (k + 1)}, squeeze=False)
    for row, q in zip(axes, picks):
        x = emb.imu_raw[q]
        t = np.arange(x.shape[-1])
        ax = row[0]
        if x.shape[0] >= 6:
            ax.plot(t, x[:3].T, lw=0.6)
            ax.set_ylabel("ch 0-2 (solid)", fontsize=6)
            ax2 = ax.twinx()
            ax2.plot(t, x[3:6].T, lw=0.6, alpha=0.7, linestyle="--")
            ax2.tick_params(labelsize=6)
            ax2.set_ylabel("ch 3-5 (dashed)", fontsize=6)
        else:
            ax.plot(t, x.T, lw=0.6)
        label = f" [{emb.labels[q]}]" if emb.labels else ""
        ax.set_title(f"query IMU {q}{label}", fontsize=7)
        ax.set_xlabel("sample", fontsize=6)
        ax.tick_params(labelsize=6)
        order = np.argsort(-sim[q])
        rank = int(np.nonzero(order == q)[0][0]) + 1
        row[1].imshow(emb.frames[q])
        row[1].set_title(f"true frame (rank {rank})", fontsize=7)
        for j, c in enumerate(order[:k]):
            a = row[2 + j]
            a.imshow(emb.frames[c])
            a.set_title(f"#{j + 1} cos {sim[q, c]:.2f}", fontsize=7)
            if c == q:
                for spine in a.spines.values():
                    spine.set_edgecolor("green")
                    spine.set_linewidth(3)
        for a in row[1:]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f"IMU→video retrieval examples (N = {len(sim)} candidates)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def write_report(results: dict, run_dir: str | os.PathLike, examples: WindowEmbeddings | None = None) -> str:
    """``report.md`` + ``metrics.json`` + PNG plots in ``run_dir``; returns the report's path. ``examples``:
    held-out embeddings with inputs kept, for the retrieval-example figure."""
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
        if examples is not None and examples.frames is not None and examples.video is not None:
            plot_retrieval_examples(examples, os.path.join(run_dir, "retrieval_examples.png"))
            lines += ["Query IMU windows (left), their true frame and the top-5 retrieved frames (green: correct):", "",
                      "![retrieval examples](retrieval_examples.png)", ""]
    act = results.get("activity_recognition")
    if act:
        lines += ["## Activity recognition", "", f"{act['train_windows']} training / {act['test_windows']} test windows, "
                  f"{len(act['classes'])} classes.", "", "| method | accuracy | macro-F1 |", "|---|---|---|"]
        for method in AR_METHODS:
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
        lines += [""] + [f"![{m}](confusion_{m}.png)" for m in AR_METHODS if m in act]
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
