"""The end-to-end demo on the built-in sample data (``make demo`` runs it):

sample Ego4D tree → store → windows → embedding cache → IMU↔video↔text training → evaluation report.

    python -m imu2clip_plugin.demo [--run-dir runs/demo] [--videos 24] [--seconds 60] [--epochs 80] [--text-weight 0.2]

Training uses windows every ``sec/4`` seconds of the train recordings (overlapping windows: more IMU/frame pairs
for the same data); evaluation uses windows every ``sec/2`` seconds of the val and test recordings only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import torch


def _stage(n: int, total: int, text: str) -> None:
    print(f"\n== {n}/{total} {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default="runs/demo")
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--sec", type=float, default=4.0, help="window length")
    p.add_argument("--epochs", type=int, default=80)
    p.add_argument("--fine-tune-epochs", type=int, default=15)
    p.add_argument("--text-weight", type=float, default=0.2,
                   help="weight of the IMU<->text term (the sample's narrations only name the activity, in a few "
                        "interchangeable phrasings: at weight 1 that term overfits the phrasing and drowns the video term)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import mmloader
    from mmloader.recipes.ego4d.recipe import Ego4DAdapter
    from mmloader.samples import generate_ego4d_sample

    from .encoder import IMUEncoder, IMUEncoderConfig
    from .evaluate import evaluate_encoder, format_results
    from .towers import ClipTowers
    from .train import TrainConfig, train

    total = 6
    t_start = time.perf_counter()
    run = os.path.abspath(args.run_dir)
    src, store = os.path.join(run, "ego4d"), os.path.join(run, "store")
    _stage(1, total, f"generating the sample Ego4D tree ({args.videos} videos x {args.seconds:g} s) in {src}")
    shutil.rmtree(src, ignore_errors=True)
    generate_ego4d_sample(src, videos=args.videos, seconds=args.seconds, seed=args.seed)
    _stage(2, total, f"preparing the store {store}")
    Ego4DAdapter().prepare(src, store, overwrite=True)
    ds = mmloader.open(store)
    print(f"{len(ds.recording_ids)} recordings, splits {ds.splits}, modalities {ds.modalities}")

    _stage(3, total, f"{args.sec:g}-second windows with IMU, a video frame, narrations and activity labels")
    common = dict(modalities=["imu", "video", "text"], frames=1, size=(64, 64), label_stream="activities")
    train_stride, eval_stride = args.sec / 4, args.sec / 2
    train_wins = ds.windows(sec=args.sec, stride=train_stride, **common)   # train + val recordings
    wins = ds.windows(sec=args.sec, stride=eval_stride, **common)
    print(wins, wins.report())
    held_out = wins.filter([s in ("val", "test") for s in wins.index["split"].to_pylist()])
    train_set = wins.split("train")
    print(f"training on {len(train_wins.split('train'))} windows (stride {train_stride:g} s) of the train recordings; "
          f"evaluating on {len(held_out)} windows (stride {eval_stride:g} s) of the val + test recordings")

    _stage(4, total, "caching frozen CLIP embeddings and training the IMU encoder (IMU <-> video <-> text)")
    torch.manual_seed(args.seed)
    towers = ClipTowers("imu2clip-tiny")
    cfg = TrainConfig(store=store, sec=args.sec, stride=train_stride, frames=1, size=(64, 64),
                      targets=("video", "text"), target_weights={"text": args.text_weight},
                      epochs=args.epochs, batch_size=32, lr=2e-3,
                      run_dir=os.path.join(run, "train"), seed=args.seed, overwrite=True,  # a new run each time
                      encoder={"conv_channels": [32, 64], "kernel_sizes": [5, 5], "gru_hidden": 64, "gru_layers": 1})
    result = train(cfg, windows=train_wins, towers=towers)
    encoder = result["model"].encoder
    hist = result["val_history"]
    print(f"validation loss (val recordings) {hist[0]:.3f} -> {hist[-1]:.3f} (lowest {min(hist):.3f})")

    _stage(5, total, "evaluating on held-out recordings (retrieval, zero-shot, linear probe, fine-tuning)")
    enc_cfg = IMUEncoderConfig.from_dict({**IMUEncoderConfig().to_dict(), **cfg.encoder, "embed_dim": towers.embed_dim})
    torch.manual_seed(args.seed + 1)
    baseline = IMUEncoder(enc_cfg)
    results = evaluate_encoder(encoder, train_set, held_out, towers, baseline_encoder=baseline,
                               fine_tune_epochs=args.fine_tune_epochs, run_dir=os.path.join(run, "report"),
                               extra={"training": {k: result[k] for k in ("step", "train_loss", "val_loss", "val_history")}})
    report = results["report"]

    _stage(6, total, "results")
    print(format_results(results))
    print(f"\nreport: {report}   ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
