"""The evaluation report: text tables of the results, ``report.md``, ``metrics.json`` and PNG plots (recall-at-k
curves, confusion matrices, retrieval examples: query IMU traces next to the top retrieved frames).

Reads the results dict of :func:`imu2clip_plugin.evaluate.evaluate_encoder`; computes nothing itself.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from .evaluate import WindowEmbeddings

RECALL_KS = (1, 5, 10, 50)
AR_METHODS = ("zero_shot", "linear_probe", "random_init_linear_probe", "fine_tune", "random_init_fine_tune")
"""The activity-recognition methods of the results, in the order the tables list them."""


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


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_imu_trace(ax, x: np.ndarray) -> None:
    """One IMU window ``(C, T)``: channels 0-2 solid on the left axis, 3-5 dashed on a right axis."""
    t = np.arange(x.shape[-1])
    if x.shape[0] >= 6:
        ax.plot(t, x[:3].T, lw=0.6)
        ax.set_ylabel("ch 0-2 (solid)", fontsize=6)
        ax2 = ax.twinx()
        ax2.plot(t, x[3:6].T, lw=0.6, alpha=0.7, linestyle="--")
        ax2.tick_params(labelsize=6)
        ax2.set_ylabel("ch 3-5 (dashed)", fontsize=6)
    else:
        ax.plot(t, x.T, lw=0.6)
    ax.set_xlabel("sample", fontsize=6)
    ax.tick_params(labelsize=6)


def _plot_retrieved(row, emb: "WindowEmbeddings", sim: np.ndarray, q: int, k: int) -> None:
    """Query ``q``'s true frame (with its rank) and its top-``k`` retrieved frames, the true match framed green."""
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


def plot_retrieval_examples(emb: "WindowEmbeddings", path: str | os.PathLike, queries: int = 4, k: int = 5,
                            seed: int = 0) -> str:
    """A PNG: for a few IMU queries, the query's IMU trace (channels 0-2 solid on the left axis, 3-5 dashed on the
    right: accelerometer m/s² and gyroscope rad/s for the Ego4D and Aria recipes) next to its
    true frame (with its rank) and the top-``k`` retrieved frames (IMU→video) with their cosines; the true match is
    framed in green where it was retrieved."""
    plt = _pyplot()
    if emb.frames is None or emb.imu_raw is None or emb.video is None:
        raise ValueError("retrieval examples need frames, IMU windows and video embeddings: "
                         "embed_windows(encoder, windows, towers, keep_inputs=True)")
    sim = emb.imu @ emb.video.T
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(sim), size=min(queries, len(sim)), replace=False).tolist())
    fig, axes = plt.subplots(len(picks), k + 2, figsize=(2.0 * (k + 2) + 1.5, 2.0 * len(picks)),
                             gridspec_kw={"width_ratios": [2.2] + [1] * (k + 1)}, squeeze=False)
    for row, q in zip(axes, picks):
        _plot_imu_trace(row[0], emb.imu_raw[q])
        label = f" [{emb.labels[q]}]" if emb.labels else ""
        row[0].set_title(f"query IMU {q}{label}", fontsize=7)
        _plot_retrieved(row, emb, sim, q, k)
    fig.suptitle(f"IMU→video retrieval examples (N = {len(sim)} candidates)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def _retrieval_section(ret: dict[str, Any], run_dir: str | os.PathLike,
                       examples: "WindowEmbeddings | None") -> list[str]:
    """The retrieval table, ``recall_at_k.png`` and (with ``examples``) ``retrieval_examples.png``."""
    plt = _pyplot()
    lines = ["## Retrieval", "", "| direction | N | R@1 | R@5 | R@10 | R@50 | MRR | median rank | chance R@1 |",
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
    return lines


def _plot_confusion(method: str, confusion: Any, classes: list[str], path: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4))
    cm = np.asarray(confusion)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=7, color="white" if v > cm.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(method.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _activity_section(act: dict[str, Any], run_dir: str | os.PathLike) -> list[str]:
    """The activity-recognition table and one ``confusion_<method>.png`` per method."""
    lines = ["## Activity recognition", "", f"{act['train_windows']} training / {act['test_windows']} test windows, "
             f"{len(act['classes'])} classes.", "", "| method | accuracy | macro-F1 |", "|---|---|---|"]
    for method in AR_METHODS:
        if method in act:
            lines.append(f"| {method.replace('_', ' ')} | {act[method]['accuracy']:.3f} | {act[method]['macro_f1']:.3f} |")
            _plot_confusion(method, act[method]["confusion"], act["classes"],
                            os.path.join(run_dir, f"confusion_{method}.png"))
    return lines + [""] + [f"![{m}](confusion_{m}.png)" for m in AR_METHODS if m in act]


def write_report(results: dict, run_dir: str | os.PathLike, examples: "WindowEmbeddings | None" = None) -> str:
    """``report.md`` + ``metrics.json`` + PNG plots in ``run_dir``; returns the report's path. ``examples``:
    held-out embeddings with inputs kept, for the retrieval-example figure."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["# IMU2CLIP evaluation", ""]
    ret = results.get("retrieval", {})
    if ret:
        lines += _retrieval_section(ret, run_dir, examples)
    act = results.get("activity_recognition")
    if act:
        lines += _activity_section(act, run_dir)
    path = os.path.join(run_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
